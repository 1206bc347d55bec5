"""Packed (variable-length) sequences: pirope.rope_attention(..., cu_seqlens=...) against
the ways a padding-free training step computes the same thing otherwise.

    python benchmarks/bench_attention_varlen.py                     # CPU, two packings of 4096 tokens
    python benchmarks/bench_attention_varlen.py --lengths 2048,2048 512,512,512,512 \
        --dtypes bfloat16 --repeat 5 --json varlen.json

q, k, v arrive packed, (total, heads, headdim), sequences of the --lengths given (one
packing per argument), positions restarting in each sequence, causal. Methods:
  a  hf_masked  Hugging Face eager RoPE + SDPA with the block-diagonal causal mask
                (total x total) that transformers builds for packed sequences with its
                sdpa backend (one attention call over every token, the mask cuts it up)
  b  per_seq    pirope.apply_rope_qk on the packed tensors, then SDPA sequence by
                sequence (what rope_attention runs on CUDA)
  c  fused      pirope.rope_attention(q, k, v, cos, sin, cu_seqlens=cu_seqlens)
Before timing, every method's output is compared with (a)'s (max abs difference
printed). Times are medians of --repeat runs after a warm-up; x = speed-up over the first
method ((a) by default).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_method_args, int_list, method_setup, report, rotate_half, time_methods  # noqa: E402

import pirope  # noqa: E402
from pirope.rope_attention import _varlen_unfused  # noqa: E402


def hf_masked(q, k, v, cos, sin, cu, pos, mask):
    # transformers' eager rotation on (1, H, T, D) with per-token cos/sin rows, then one
    # SDPA call whose boolean mask keeps each token inside its own sequence
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    c = torch.cat((cos, cos), -1)[pos].to(q.dtype)[None, None]
    s = torch.cat((sin, sin), -1)[pos].to(q.dtype)[None, None]
    q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def per_seq(q, k, v, cos, sin, cu, pos, mask):
    return _varlen_unfused(q, k, v, cos, sin, None, cu, True, q.shape[-1] ** -0.5, False)


def fused(q, k, v, cos, sin, cu, pos, mask):
    return pirope.rope_attention(q, k, v, cos, sin, causal=True, cu_seqlens=cu)


METHODS = {"a": ("hf_masked", hf_masked), "b": ("per_seq", per_seq), "c": ("fused", fused)}


def packing(lengths: list[int], device):
    """cu_seqlens, restarting positions and transformers' block-diagonal causal mask."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    idx = torch.arange(len(pos), device=device)
    mask = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
    return cu, pos, mask


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", type=int_list(1),
                    default=[[1024, 1024, 1024, 1024], [2048, 1024, 512, 256, 128, 64, 64]],
                    help="one packing per argument: comma-separated sequence lengths")
    add_method_args(ap, "a,b,c")
    args = ap.parse_args()

    device, hq, hkv, d, chosen, inv_freq = method_setup(args, METHODS)
    rows = []
    for lengths in args.lengths:
        total = sum(lengths)
        cos, sin = (t.to(device) for t in pirope.rope_cos_sin(inv_freq, max(lengths)))
        cu, pos, mask = packing(lengths, device)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator(device=device).manual_seed(0)
            mk = lambda h: torch.randn(total, h, d, device=device, dtype=dtype, generator=gen)  # noqa: E731
            q, k, v, grad = mk(hq), mk(hkv), mk(hkv), mk(hq)
            with torch.no_grad():
                ref = hf_masked(q, k, v, cos, sin, cu, pos, mask).float()
                diffs = {name: (fn(q, k, v, cos, sin, cu, pos, mask).float() - ref).abs().max().item()
                         for name, fn in chosen}
            rows += time_methods(chosen, lambda fn, q, k, v: fn(q, k, v, cos, sin, cu, pos, mask), (q, k, v), grad,
                                 device=str(device), repeat=args.repeat, modes=args.modes,
                                 key={"lengths": ",".join(map(str, lengths)), "total": total, "dtype": dtype_name},
                                 diffs=diffs)
    report(rows, args)


if __name__ == "__main__":
    main()
