"""Sliding-window attention: pirope.rope_attention(..., window_size=(W - 1, 0)) against the
ways a model with sliding-window layers (Mistral, Gemma 2/3, Qwen2 with use_sliding_window)
computes them otherwise.

    python benchmarks/bench_attention_window.py                 # CPU, 4096 and 8192 tokens, window 1024
    python benchmarks/bench_attention_window.py --seqlens 8192 --windows 512,4096 \
        --dtypes bfloat16 --repeat 5 --json window.json

q, k, v (batch 1, seqlen, heads, headdim), causal, query i sees keys i - W < j <= i
(transformers' sliding_window W). Methods:
  a  hf_masked   Hugging Face eager RoPE + SDPA with the (seqlen x seqlen) sliding-window
                 causal mask transformers builds with its sdpa backend
  b  pirope_sdpa pirope.apply_rope_qk + SDPA with that mask (patch_rope(attention="sdpa"))
  c  band_sdpa   pirope.apply_rope_qk + SDPA over blocks of query rows with the keys of
                 their band (what rope_attention runs on CUDA)
  d  fused       pirope.rope_attention(..., window_size=(W - 1, 0))
  e  fused_full  pirope.rope_attention without the window (plain causal: not the same
                 result; the work the window saves)
Before timing, every method's output is compared with (a)'s (max abs difference printed;
not for e). Times are medians of --repeat runs after a warm-up; x = speed-up over the
first method ((a) by default).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_method_args, int_list, method_setup, report, rotate_half, time_methods  # noqa: E402

import pirope  # noqa: E402
from pirope.rope_attention import _sdpa_fallback  # noqa: E402


def hf_masked(q, k, v, cos, sin, window, mask):
    # transformers' eager rotation on (B, H, S, D) with per-token cos/sin rows, then SDPA
    # with the boolean sliding-window causal mask
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    c = torch.cat((cos, cos), -1)[: q.shape[2]].to(q.dtype)
    s = torch.cat((sin, sin), -1)[: q.shape[2]].to(q.dtype)
    q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def pirope_sdpa(q, k, v, cos, sin, window, mask):
    qr, kr = pirope.apply_rope_qk(q, k, cos, sin)
    out = torch.nn.functional.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def band_sdpa(q, k, v, cos, sin, window, mask):
    return _sdpa_fallback(q, k, v, cos, sin, None, True, q.shape[-1] ** -0.5, False, (window - 1, 0))


def fused(q, k, v, cos, sin, window, mask):
    return pirope.rope_attention(q, k, v, cos, sin, window_size=(window - 1, 0))


def fused_full(q, k, v, cos, sin, window, mask):
    return pirope.rope_attention(q, k, v, cos, sin)


METHODS = {"a": ("hf_masked", hf_masked), "b": ("pirope_sdpa", pirope_sdpa), "c": ("band_sdpa", band_sdpa),
           "d": ("fused", fused), "e": ("fused_full", fused_full)}


def sliding_mask(seqlen: int, window: int, device) -> torch.Tensor:
    """transformers' sliding-window causal mask: key j seen from query i when i - W < j <= i."""
    i = torch.arange(seqlen, device=device)[:, None]
    j = torch.arange(seqlen, device=device)[None, :]
    return (j <= i) & (j > i - window)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="4096,8192", type=int_list(1))
    ap.add_argument("--windows", default="1024", type=int_list(1), help="comma-separated sliding windows W")
    add_method_args(ap, "a,b,c,d,e")
    args = ap.parse_args()

    device, hq, hkv, d, chosen, inv_freq = method_setup(args, METHODS)
    rows = []
    for seqlen in args.seqlens:
        cos, sin = (t.to(device) for t in pirope.rope_cos_sin(inv_freq, seqlen))
        for window in args.windows:
            mask = sliding_mask(seqlen, window, device)
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                gen = torch.Generator(device=device).manual_seed(0)
                mk = lambda h: torch.randn(1, seqlen, h, d, device=device, dtype=dtype, generator=gen)  # noqa: E731
                q, k, v, grad = mk(hq), mk(hkv), mk(hkv), mk(hq)
                with torch.no_grad():
                    ref = hf_masked(q, k, v, cos, sin, window, mask).float()
                    diffs = {name: (fn(q, k, v, cos, sin, window, mask).float() - ref).abs().max().item()
                             for name, fn in chosen if name != "fused_full"}
                rows += time_methods(chosen, lambda fn, q, k, v: fn(q, k, v, cos, sin, window, mask), (q, k, v),
                                     grad, device=str(device), repeat=args.repeat, modes=args.modes,
                                     key={"seqlen": seqlen, "window": window, "dtype": dtype_name}, diffs=diffs)
    report(rows, args)


if __name__ == "__main__":
    main()
