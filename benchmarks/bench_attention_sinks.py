"""Attention sinks (GPT-OSS): pirope.rope_attention(..., sinks=s) against the ways a GPT-OSS
model computes its layers otherwise.

    python benchmarks/bench_attention_sinks.py               # CPU, GPT-OSS 20B heads, full and sliding layers
    python benchmarks/bench_attention_sinks.py --seqlens 4096 --windows 0 --dtypes bfloat16 --json sinks.json

q, k, v (batch 1, seqlen, heads, headdim; default 64/8 heads of 64, GPT-OSS 20B's and 120B's),
causal, one sink logit per query head (std 2: trained sinks reach a few units, where they
take a good share of each row); --windows W > 0: GPT-OSS's sliding layers (query i sees keys
i - W < j <= i; W = 128 there). transformers runs GPT-OSS with its eager attention (it refuses
sdpa: SDPA has no sinks) or hub flash kernels (CUDA). Methods:
  a  hf_eager      Hugging Face's GPT-OSS code: apply_rotary_pos_emb, then
                   eager_attention_forward with the (seqlen x seqlen) additive mask and
                   the sinks as one more score column (scores and probabilities materialised)
  b  pirope_eager  pirope.apply_rope_qk, then the same eager_attention_forward (what
                   patch_rope(attention="sdpa") runs for GPT-OSS)
  c  blocks        pirope.apply_rope_qk + the softmax with sinks over blocks of query rows,
                   each recomputed in the backward (what rope_attention runs on CUDA)
  d  fused         pirope.rope_attention(..., sinks=s)
  e  fused_nosinks pirope.rope_attention without sinks (not the same result: the cost of
                   the sinks in the fused kernels)
Before timing, every method's output is compared with (a) run in float64 (max abs
difference printed; not for e). Times are medians of --repeat runs after a warm-up; x =
speed-up over the first method ((a) by default). The sinks are constants here (their
gradient, an elementwise pass over out, is not timed).
"""

from __future__ import annotations

import functools
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import eager_parser, time_against_eager  # noqa: E402

import pirope  # noqa: E402
from pirope.rope_attention import _sdpa_fallback  # noqa: E402


def _gpt_oss():
    from transformers.models.gpt_oss import modeling_gpt_oss

    return modeling_gpt_oss


def _eager(q, k, v, sinks, mask):
    """transformers' GPT-OSS eager attention of (B, H, S, D) q, k, v; output (B, S, H, D)."""
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], sinks=sinks.to(q.dtype),
                                   training=False)
    out, _ = _gpt_oss().eager_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    return out


def hf_eager(q, k, v, cos, sin, window, mask, *, sinks):
    # transformers' rotation on (B, H, S, D): GPT-OSS's rotary embedding gives half-width
    # cos/sin rows (no duplication), in the input dtype
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = _gpt_oss().apply_rotary_pos_emb(q, k, cos[None].to(q.dtype), sin[None].to(q.dtype))
    return _eager(q, k, v, sinks, mask)


def pirope_eager(q, k, v, cos, sin, window, mask, *, sinks):
    qr, kr = pirope.apply_rope_qk(q, k, cos, sin)
    return _eager(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), sinks, mask)


def blocks(q, k, v, cos, sin, window, mask, *, sinks):
    return _sdpa_fallback(q, k, v, cos, sin, None, True, q.shape[-1] ** -0.5, False, (window - 1, 0), 0.0, False,
                          sinks)


def fused(q, k, v, cos, sin, window, mask, *, sinks):
    return pirope.rope_attention(q, k, v, cos, sin, window_size=(window - 1, 0), sinks=sinks)


def fused_nosinks(q, k, v, cos, sin, window, mask, *, sinks):
    return pirope.rope_attention(q, k, v, cos, sin, window_size=(window - 1, 0))


METHODS = {"a": ("hf_eager", hf_eager), "b": ("pirope_eager", pirope_eager), "c": ("blocks", blocks),
           "d": ("fused", fused), "e": ("fused_nosinks", fused_nosinks)}


def main():
    args = eager_parser(__doc__, windows="0,128", heads="64/8", headdim=64).parse_args()  # GPT-OSS 20B's heads
    nheads_q = int(args.heads.split("/")[0])
    sinks = 2.0 * torch.randn(nheads_q, generator=torch.Generator().manual_seed(1)).to(args.device)
    methods = {key: (name, functools.partial(fn, sinks=sinks)) for key, (name, fn) in METHODS.items()}
    time_against_eager(args, methods, methods["a"][1], qk_std=1.0, skip_diff=("fused_nosinks",))


if __name__ == "__main__":
    main()
