"""Fused RoPE attention against the unfused ways of computing it.

    python benchmarks/bench_attention.py                # CPU, modest grid
    python benchmarks/bench_attention.py --seqlens 1024,4096,8192 --dtypes bfloat16 \
        --device cuda --repeat 10 --json results.json

Methods (q, k, v arrive as (batch, seqlen, heads, headdim), the view of a projection):
  a  hf_eager     Hugging Face eager RoPE (q*cos + rotate_half(q)*sin on the
                  (B, H, S, D) transposes) + torch SDPA (enable_gqa, is_causal)
  b  pirope_sdpa  pirope.apply_rope_qk + SDPA on the transposed views
  c  compiled     (b) under torch.compile
  d  fused        pirope.rope_attention (on CUDA: its apply_rope_qk + SDPA fallback)
Times are medians of --repeat runs after a warm-up; "x" is the speed-up over (a)
(time of a / time of the method). Peak memory is the growth over the inputs during
one run: on CUDA torch.cuda.max_memory_allocated; on CPU the peak resident set size
sampled every 0.2 ms from /proc/self/statm (ops run without the GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (PeakRSS, add_method_args, exec_with_returning_malloc, heads_list, int_list,  # noqa: E402
                    positive_int, rotate_half)

import pirope  # noqa: E402


def hf_eager(q, k, v, cos_hf, sin_hf, cos, sin):
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    c, s = cos_hf.unsqueeze(1), sin_hf.unsqueeze(1)
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def pirope_sdpa(q, k, v, cos_hf, sin_hf, cos, sin):
    q, k = pirope.apply_rope_qk(q, k, cos, sin)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def fused(q, k, v, cos_hf, sin_hf, cos, sin):
    return pirope.rope_attention(q, k, v, cos, sin, causal=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(fn, inputs, grad, backward):
    q, k, v = inputs[:3]
    if backward:
        for t in (q, k, v):
            t.grad = None
    out = fn(*inputs)
    if backward:
        out.backward(grad)
    return out


def measure(fn, inputs, grad, backward, repeat, device):
    """(median seconds, peak memory growth, the output and gradients of the warm-up run in
    float32, for the correctness column)."""
    out = run_once(fn, inputs, grad, backward)  # warm-up (and compilation)
    sync(device)
    check = (out.detach().float(), *((t.grad.float() for t in inputs[:3]) if backward else ()))
    del out
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run_once(fn, inputs, grad, backward)
        sync(device)
        times.append(time.perf_counter() - t0)
    # memory: one more run, from no gradients (the last run's would be freed inside the
    # measured block and hide the new ones' size)
    if backward:
        for t in inputs[:3]:
            t.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(fn, inputs, grad, backward)
        sync(device)
        mem = torch.cuda.max_memory_allocated() - base
    else:
        with PeakRSS() as m:
            out = run_once(fn, inputs, grad, backward)
            del out
        mem = m.growth
    return statistics.median(times), mem, check


def rel_diff(got, want) -> float:
    """max |got - want| / max |want| over the output (and gradients)."""
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, want))


def main():
    exec_with_returning_malloc()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="512,1024,2048", type=int_list(1))
    ap.add_argument("--batch", type=positive_int, default=1)
    add_method_args(ap, "a,b,c,d", heads="32/32,32/8", heads_type=heads_list)
    args = ap.parse_args()

    device = torch.device(args.device)
    methods = {"a": ("hf_eager", hf_eager), "b": ("pirope_sdpa", pirope_sdpa),
               "c": ("compiled", "compile"), "d": ("fused", fused)}
    chosen = [methods[m] for m in args.methods]
    d = args.headdim
    inv_freq, _ = pirope.rope_frequencies(d, scaling={"rope_type": "linear", "factor": 4.0})
    rows = []
    cpu_gemm = pirope.cpu_gemm() if device.type == "cpu" else {}
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, headdim {d}, "
          f"repeat {args.repeat}, causal; x = speed-up over (a) hf_eager")
    if cpu_gemm:  # which tile products the fused CPU kernels run (PIROPE_CPU_GEMM)
        print("pirope CPU tile products: " + ", ".join(f"{k} {v}" for k, v in cpu_gemm.items()))
    header = f"{'dtype':9} {'heads':6} {'seqlen':>6} {'mode':8} " + " ".join(
        f"{name:>22}" for name, _ in chosen)
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for heads in args.heads:
            hq, hkv = map(int, heads.split("/"))
            for s in args.seqlens:
                cos, sin = pirope.rope_cos_sin(inv_freq, s)
                cos, sin = cos.to(device), sin.to(device)
                cos_hf = torch.cat((cos, cos), -1).to(dtype).expand(args.batch, s, d)
                sin_hf = torch.cat((sin, sin), -1).to(dtype).expand(args.batch, s, d)
                for mode in args.modes:
                    backward = mode == "fwd+bwd"
                    gen = torch.Generator(device=device).manual_seed(0)
                    mk = lambda h: torch.randn(args.batch, s, h, d, device=device, dtype=dtype,  # noqa: E731
                                               generator=gen).requires_grad_(backward)
                    q, k, v = mk(hq), mk(hkv), mk(hkv)
                    grad = torch.randn(args.batch, s, hq, d, device=device, dtype=dtype, generator=gen)
                    inputs = (q, k, v, cos_hf, sin_hf, cos, sin)
                    results = {}
                    ctx = torch.enable_grad() if backward else torch.inference_mode()
                    for name, fn in chosen:
                        if fn == "compile":  # a fresh compilation per configuration
                            torch._dynamo.reset()
                            fn = torch.compile(pirope_sdpa)
                        with ctx:
                            results[name] = measure(fn, inputs, grad, backward, args.repeat, device)
                    base, _, reference = results.get("hf_eager", (None, None, None))
                    cells = []
                    for name, _ in chosen:
                        t, mem, check = results[name]
                        ratio = f"{base / t:4.2f}x" if base else "  -  "
                        cells.append(f"{t * 1e3:8.1f}ms {ratio} {mem / 2**20:5.0f}M")
                        rows.append(dict(dtype=dtype_name, heads=heads, seqlen=s, mode=mode, method=name,
                                         batch=args.batch, headdim=d, device=str(device),
                                         median_s=t, speedup_vs_hf=(base / t if base else None),
                                         peak_mem_bytes=mem, threads=torch.get_num_threads(),
                                         # the output (and gradients) against (a)'s, same inputs
                                         rel_diff_vs_hf=(rel_diff(check, reference) if reference else None),
                                         cpu_gemm=cpu_gemm.get(dtype_name)))
                    print(f"{dtype_name:9} {heads:6} {s:6d} {mode:8} " + " ".join(f"{c:>22}" for c in cells),
                          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
