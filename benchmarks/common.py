"""Timing helpers shared by the benchmarks: medians of repeated runs, CUDA-aware."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device: str, *, warmup: int = 2, repeat: int = 10) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class PeakRSS:
    """Peak resident set size growth (bytes) while the block runs (CPU): sampled every
    0.2 ms from /proc/self/statm (torch's ops run without the GIL)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.stop = False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.base


def exec_with_returning_malloc():
    """glibc raises its mmap threshold after large frees, so freed tensors stay in the
    heap and the resident set no longer follows live memory. A fixed threshold keeps
    every large block mmap'ed and returned on free; it must be set before start-up,
    hence the re-exec (of this process's command line; before PeakRSS measures)."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate_half (the baselines' eager rotation)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(widths[c]) for c in columns))


# Command-line values, as argparse `type=` converters: a bad value ends in argparse's usage
# error naming the flag (exit status 2), not in a traceback from deep inside a run.
DTYPES = ("float16", "bfloat16", "float32", "float64")
MODES = ("fwd", "fwd+bwd")


def _expected(what: str, text: str):
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")


def int_list(minimum: int = 1):
    """Comma-separated integers >= minimum ("512,1024")."""
    what = f"comma-separated integers >= {minimum}"

    def convert(text: str) -> list[int]:
        try:
            values = [int(s) for s in text.split(",")]
        except ValueError:
            _expected(what, text)
        if any(v < minimum for v in values):
            _expected(what, text)
        return values
    return convert


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    return value if value >= 1 else _expected("an integer >= 1", text)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    return value if 0 < value < float("inf") else _expected("a finite number > 0", text)


def head_dim(text: str) -> int:
    """A rotary head dimension: a positive even integer."""
    value = positive_int(text)
    return value if value % 2 == 0 else _expected("an even head dimension", text)


def heads_pair(text: str) -> str:
    """"Q/KV" head counts (Q a multiple of KV, as GQA needs), kept as written (a row key)."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[0]) % int(parts[1]):
        _expected("nheads_q/nheads_kv such as 32/8 (nheads_q a multiple of nheads_kv)", text)
    return text


def heads_list(text: str) -> list[str]:
    return [heads_pair(h) for h in text.split(",")]


def choice_list(allowed):
    """Comma-separated names out of ``allowed``, in the order given."""
    def convert(text: str) -> list[str]:
        names = text.split(",")
        if any(n not in allowed for n in names):
            _expected(f"comma-separated names out of {', '.join(allowed)}", text)
        return names
    return convert


def device_name(text: str) -> str:
    """A torch device that exists here (cuda only where torch sees a GPU)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        _expected("a device such as cpu or cuda", text)
    if device.type not in ("cpu", "cuda"):
        _expected("a device such as cpu or cuda", text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA GPU here")
    return text


def require_cuda(ap) -> None:
    """For a GPU-only benchmark: a usage error where torch sees no CUDA GPU."""
    if not torch.cuda.is_available():
        ap.error("this benchmark needs a CUDA GPU, and torch sees none here")


def add_method_args(ap, methods: str, dtypes: str = "float32,bfloat16", heads: str = "32/8",
                    heads_type=heads_pair) -> None:
    """The options of a benchmark that times --methods (any of the default ``methods``)
    over --dtypes and --modes; --heads one pair (heads_pair) or several (heads_list)."""
    ap.add_argument("--dtypes", default=dtypes, type=choice_list(DTYPES))
    several = " (comma-separated pairs)" if heads_type is heads_list else ""
    ap.add_argument("--heads", default=heads, type=heads_type, help="nheads_q/nheads_kv" + several)
    ap.add_argument("--headdim", type=head_dim, default=128)
    ap.add_argument("--device", default="cpu", type=device_name)
    ap.add_argument("--repeat", type=positive_int, default=3)
    ap.add_argument("--methods", default=methods, type=choice_list(methods.split(",")))
    ap.add_argument("--modes", default="fwd,fwd+bwd", type=choice_list(MODES))
    ap.add_argument("--json", default=None, help="write the results to this path")


def time_methods(chosen, run, tensors, grad, *, device: str, repeat: int, modes: list[str], key: dict,
                 diffs: dict) -> list[dict]:
    """One row per mode ("fwd": under no_grad; "fwd+bwd": with the gradients of ``tensors``
    for ``grad``) timing each ``(name, fn)`` of ``chosen`` as ``run(fn, *tensors)``: its
    median ms, its speed-up over the first method and, where ``diffs`` has it, its max
    |difference| from the baseline's output. ``key``: the row's leading columns."""
    rows = []
    for mode in modes:
        backward = mode == "fwd+bwd"
        leaves = [t.detach().requires_grad_(backward) for t in tensors]

        def step(fn):
            if not backward:
                with torch.no_grad():
                    return run(fn, *leaves)
            torch.autograd.grad(run(fn, *leaves), leaves, grad)

        times = {name: median_ms(lambda fn=fn: step(fn), device, warmup=1, repeat=repeat) for name, fn in chosen}
        base = times[chosen[0][0]]
        row = {**key, "mode": mode}
        for name, _ in chosen:
            row[f"{name} ms"] = f"{times[name]:.1f}"
            row[f"{name} x"] = f"{base / times[name]:.2f}"
            if name in diffs:
                row[f"{name} max|diff|"] = f"{diffs[name]:.1e}"
        rows.append(row)
        print(f"  {' '.join(str(v) for v in key.values())} {mode}: "
              + ", ".join(f"{name} {times[name]:.1f} ms" for name, _ in chosen), flush=True)
    return rows


def method_setup(args, methods: dict):
    """From add_method_args' options: (device, nheads_q, nheads_kv, headdim, the chosen
    (name, fn) of ``methods``, PI-by-4 inv_freq); prints the machine line."""
    import pirope

    device = torch.device(args.device)
    hq, hkv = map(int, args.heads.split("/"))
    chosen = [methods[m] for m in args.methods]
    inv_freq, _ = pirope.rope_frequencies(args.headdim, scaling={"rope_type": "linear", "factor": 4.0})
    print(f"{machine()}; heads {hq}/{hkv}, headdim {args.headdim}, causal, repeat {args.repeat}")
    return device, hq, hkv, args.headdim, chosen, inv_freq


def report(rows: list[dict], args) -> None:
    """Prints the rows as a table and, with --json, writes them with the machine line."""
    import json

    print()
    print_table(rows, list(rows[0]) if rows else [])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "heads": args.heads, "headdim": args.headdim, "rows": rows}, f, indent=1)


def additive_mask(seqlen: int, window: int, dtype, device) -> torch.Tensor:
    """transformers' eager mask (1, 1, S, S): 0 where key j is seen from query i (j <= i, and
    i - W < j with a window W > 0), the dtype's lowest elsewhere."""
    i = torch.arange(seqlen, device=device)[:, None]
    j = torch.arange(seqlen, device=device)[None, :]
    seen = (j <= i) & ((j > i - window) if window > 0 else True)
    mask = torch.zeros(seqlen, seqlen, dtype=dtype, device=device)
    return mask.masked_fill(~seen, torch.finfo(dtype).min)[None, None]


def eager_parser(doc: str, *, windows: str, heads: str, headdim: int):
    """The command line of a benchmark against a model's eager attention (time_against_eager):
    --seqlens, --windows and add_method_args' options for methods a..e, with the model's
    heads as defaults."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="2048,4096", type=int_list(1))
    ap.add_argument("--windows", default=windows, type=int_list(0),
                    help="comma-separated sliding windows W (0: none)")
    add_method_args(ap, "a,b,c,d,e")
    ap.set_defaults(heads=heads, headdim=headdim)
    return ap


def time_against_eager(args, methods: dict, reference, *, qk_std: float, skip_diff=()) -> None:
    """The loop of a benchmark against a model's eager attention (Gemma 2's soft-cap,
    GPT-OSS's sinks): for each --seqlens x --windows x --dtypes, q and k (std ``qk_std``),
    v, grad of batch 1 and transformers' additive mask; each chosen method is run as
    ``fn(q, k, v, cos, sin, window, mask)``, compared (max |difference|) with ``reference``
    run the same way in float64 (not the methods of ``skip_diff``, which compute another
    result), then timed; the table (and --json) printed by report()."""
    import pirope

    device, hq, hkv, d, chosen, inv_freq = method_setup(args, methods)
    rows = []
    for seqlen in args.seqlens:
        cos, sin = (t.to(device) for t in pirope.rope_cos_sin(inv_freq, seqlen))
        for window in args.windows:
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                mask = additive_mask(seqlen, window, dtype, device)
                gen = torch.Generator(device=device).manual_seed(0)
                mk = lambda h, s: s * torch.randn(1, seqlen, h, d, device=device, dtype=dtype, generator=gen)  # noqa: E731
                q, k, v, grad = mk(hq, qk_std), mk(hkv, qk_std), mk(hkv, 1.0), mk(hq, 1.0)
                with torch.no_grad():
                    exact = [t.double() for t in (q, k, v)]
                    ref = reference(*exact, cos, sin, window, additive_mask(seqlen, window, torch.float64, device))
                    diffs = {name: (fn(q, k, v, cos, sin, window, mask).double() - ref).abs().max().item()
                             for name, fn in chosen if name not in skip_diff}
                    del exact, ref
                rows += time_methods(chosen, lambda fn, q, k, v: fn(q, k, v, cos, sin, window, mask),
                                     (q, k, v), grad, device=str(device), repeat=args.repeat,
                                     modes=args.modes,
                                     key={"seqlen": seqlen, "window": window, "dtype": dtype_name}, diffs=diffs)
    report(rows, args)
