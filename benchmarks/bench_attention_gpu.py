"""Fused RoPE attention on a GPU against pirope rope + torch SDPA, one SDPA backend at a time.

    python benchmarks/bench_attention_gpu.py                      # the issue's grid
    python benchmarks/bench_attention_gpu.py --seqlens 2048 --heads 32/8 --modes fwd

Every configuration keeps batch x seqlen = --tokens (16k) tokens, head dim 128.
Methods (q, k, v arrive as (batch, seqlen, heads, headdim), the view of a projection):
  fused        torch.ops.pirope.rope_attention (the CUDA kernel; fwd+bwd through
               pirope.rope_attention's autograd, i.e. the fused backward too: this
               script sets PIROPE_CUDA_ATTENTION=1, which the wrapper needs for that)
  fused_det    fwd+bwd only: the same with deterministic=True (the atomic-free dq kernel)
  fused_ws     fused with PIROPE_ATTENTION_SM90=ws (or $PIROPE_WS_VARIANT): the
               warp-specialised TMA kernels (rope_attention_{fwd,bwd}_sm90_ws.cuh; on
               sm_90 with a 9.0a build, else = fused)
  fused_ws_atomic
               fwd+bwd only: fused_ws with PIROPE_WS_DQ=atomic (dQ by float2 atomics
               instead of TMA reductions: the A/B of that step; column "wsA ms")
  flash, efficient, cudnn
               pirope.apply_rope_qk + torch SDPA restricted to that backend
               (missing where the backend does not take the call)
Times: CUDA events, median of --repeat runs after warm-up. TFLOP/s counts the
attention matmuls only (4·B·H·S²·D, halved when causal; fwd+bwd = 3.5x fwd).
"ratio" = time of the fastest SDPA backend / time of fused (> 1: fused is faster), "ws r."
the same for fused_ws. "err" = max |fused - reference| / max |reference| with the fastest
backend's output as reference (a real-shape sanity check; the float64 checks live in
tests/), over fused, fused_ws and fused_ws_atomic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MODES, choice_list, head_dim, heads_list, int_list, median_ms, positive_int,  # noqa: E402
                    require_cuda)

import pirope  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def peak_mem(fn, *leaves):
    for t in leaves:  # the previous step's gradients are not part of this one's growth
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@contextlib.contextmanager
def env_vars(**env):
    """The environment variables env set inside the block (pirope's CUDA dispatch reads them
    at each call, the backward's included: a method's whole step runs inside)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_methods(cos, sin, causal, backward):
    def sdpa(backend):
        def fn(q, k, v):
            qr, kr = pirope.apply_rope_qk(q, k, cos, sin)
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(
                    qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                    enable_gqa=True)
            return out.transpose(1, 2)
        return fn

    def fused(q, k, v):
        if backward:
            return pirope.rope_attention(q, k, v, cos, sin, causal=causal)
        return torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, q.shape[-1] ** -0.5,
                                               False)[0]

    ws = os.environ.get("PIROPE_WS_VARIANT", "ws")  # gpu_check.sh: ws_fwd / ws_bwd if one direction failed
    # name -> (fn, the environment its forward and backward run in)
    methods = {"fused": (fused, {}), "fused_ws": (fused, {"PIROPE_ATTENTION_SM90": ws})}
    if backward:  # the deterministic backward (no float atomics: its cost, measured)
        methods["fused_det"] = (lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, causal=causal,
                                                                      deterministic=True), {})
        methods["fused_ws_atomic"] = (fused, {"PIROPE_ATTENTION_SM90": ws, "PIROPE_WS_DQ": "atomic"})
    methods.update({name: (sdpa(b), {}) for name, b in BACKENDS.items()})
    return methods


def make_step(fn, env, q, k, v, grad=None):
    """One timed step of a method: its forward (and, with grad, its backward into fresh
    .grad), all of it inside its environment."""
    def step():
        with env_vars(**env):
            if grad is not None:
                for t in (q, k, v):
                    t.grad = None
                out = fn(q, k, v)
                out.backward(grad)
                return out
            with torch.inference_mode():
                return fn(q, k, v)
    return step


def run_case(dtype, hq, hkv, seqlen, tokens, d, causal, mode, repeat, methods):
    batch = max(1, tokens // seqlen)
    backward = mode == "fwd+bwd"
    inv_freq, _ = pirope.rope_frequencies(d, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = (t.cuda() for t in pirope.rope_cos_sin(inv_freq, seqlen))
    gen = torch.Generator(device="cuda").manual_seed(0)

    def mk(h):
        return torch.randn(batch, seqlen, h, d, device="cuda", dtype=dtype, generator=gen)

    q, k, v = mk(hq), mk(hkv), mk(hkv)
    grad = mk(hq)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    flops = 4 * batch * hq * seqlen * seqlen * d * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)
    results, outs = {}, {}
    for name, (fn, env) in make_methods(cos, sin, causal, backward).items():
        if name not in methods:
            continue
        step = make_step(fn, env, q, k, v, grad if backward else None)
        try:
            out = step()
            torch.cuda.synchronize()
        except RuntimeError as e:  # backend does not take this call
            results[name] = None
            print(f"  ({name}: {str(e).splitlines()[0][:100]})")
            continue
        outs[name] = (out.detach().float(), *(t.grad.float() if backward else None for t in (q, k, v)))
        ms = median_ms(step, "cuda", warmup=3, repeat=repeat)
        results[name] = dict(ms=ms, tflops=flops / ms / 1e9, mem=peak_mem(step, q, k, v))
    baselines = {n: r for n, r in results.items() if not n.startswith("fused") and r}
    best = min(baselines, key=lambda n: baselines[n]["ms"]) if baselines else None
    row = dict(dtype=str(dtype).replace("torch.", ""), heads=f"{hq}/{hkv}", seqlen=seqlen, batch=batch,
               causal=causal, mode=mode, best_sdpa=best,
               **{f"{n}_ms": (r["ms"] if r else None) for n, r in results.items()},
               **{f"{n}_tflops": (r["tflops"] if r else None) for n, r in results.items()},
               **{f"{n}_mem_MiB": (r["mem"] / 2**20 if r else None) for n, r in results.items()})
    if best and results.get("fused"):
        row["ratio_vs_best_sdpa"] = baselines[best]["ms"] / results["fused"]["ms"]
    if best and results.get("fused_ws"):
        row["ratio_ws_vs_best_sdpa"] = baselines[best]["ms"] / results["fused_ws"]["ms"]
    errs = []
    for name in ("fused", "fused_ws", "fused_ws_atomic", "fused_det"):
        if best and name in outs:
            for a, b in zip(outs[name], outs[best]):
                if a is not None:
                    errs.append(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    if errs:
        row["err_vs_best"] = max(errs)
    return row


def main():
    os.environ["PIROPE_CUDA_ATTENTION"] = "1"  # the fused kernels are opt-in
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384", type=int_list(1))
    ap.add_argument("--heads", default="32/32,32/8", type=heads_list)
    ap.add_argument("--tokens", type=positive_int, default=16384, help="batch x seqlen")
    ap.add_argument("--headdim", type=head_dim, default=128)
    ap.add_argument("--dtypes", default="bfloat16", type=choice_list(("float16", "bfloat16")))
    ap.add_argument("--causal", default="1,0", type=choice_list("10"))
    ap.add_argument("--modes", default="fwd,fwd+bwd", type=choice_list(MODES))
    ap.add_argument("--repeat", type=positive_int, default=20)
    methods = "fused,fused_ws,fused_ws_atomic,fused_det,flash,efficient,cudnn"
    ap.add_argument("--methods", default=methods, type=choice_list(methods.split(",")))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    require_cuda(ap)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, pirope {pirope.__version__}, "
          f"{args.tokens} tokens per config, headdim {args.headdim}, "
          f"PIROPE_ATTENTION_K_PREPASS={os.environ.get('PIROPE_ATTENTION_K_PREPASS', 'default')}")
    hdr = (f"{'dtype':8} {'heads':6} {'seqlen':>6} {'causal':6} {'mode':8} {'fused ms':>9} {'TFLOP/s':>7} "
           f"{'ws ms':>8} {'wsA ms':>8} {'det ms':>8} {'flash':>8} {'effic.':>8} {'cudnn':>8} {'best':>6} {'ratio':>6} "
           f"{'ws r.':>6} {'err':>8}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for dtype in (getattr(torch, n) for n in args.dtypes):
        for heads in args.heads:
            hq, hkv = map(int, heads.split("/"))
            for causal in (c == "1" for c in args.causal):
                for mode in args.modes:
                    for s in args.seqlens:
                        r = run_case(dtype, hq, hkv, s, args.tokens, args.headdim, causal, mode, args.repeat,
                                     args.methods)
                        rows.append(r)
                        f = lambda key: f"{r[key]:8.3f}" if r.get(key) is not None else f"{'-':>8}"  # noqa: E731
                        print(f"{r['dtype']:8} {heads:6} {s:6d} {str(causal):6} {mode:8} "
                              f"{f('fused_ms'):>9} {r.get('fused_tflops') or 0:7.1f} {f('fused_ws_ms')} "
                              f"{f('fused_ws_atomic_ms')} {f('fused_det_ms')} "
                              f"{f('flash_ms')} {f('efficient_ms')} {f('cudnn_ms')} {r['best_sdpa'] or '-':>6} "
                              f"{r.get('ratio_vs_best_sdpa', 0):6.2f} {r.get('ratio_ws_vs_best_sdpa', 0):6.2f} "
                              f"{r.get('err_vs_best', float('nan')):8.1e}",
                              flush=True)
                        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
