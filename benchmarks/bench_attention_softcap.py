"""Soft-capped attention (Gemma 2's attn_logit_softcapping): pirope.rope_attention(...,
softcap=c) against the ways a Gemma 2 model computes its layers otherwise.

    python benchmarks/bench_attention_softcap.py                # CPU, Gemma 2 9B heads, 2048 and 4096 tokens
    python benchmarks/bench_attention_softcap.py --seqlens 4096 --windows 0,1024 \
        --dtypes bfloat16 --repeat 5 --json softcap.json

q, k, v (batch 1, seqlen, heads, headdim; default 16/8 heads of 256, Gemma 2 9B's), causal,
scores s = q.k / sqrt(headdim) capped to c * tanh(s / c) (default c = 50, Gemma 2's) before
the mask; --windows W > 0: Gemma 2's sliding layers (query i sees keys i - W < j <= i).
transformers runs Gemma 2 with its eager attention only (it refuses sdpa: SDPA has no
soft-cap). Methods:
  a  hf_eager     Hugging Face's Gemma 2 code: apply_rotary_pos_emb, then
                  eager_attention_forward with the (seqlen x seqlen) additive causal mask
                  (scores, capped scores and probabilities materialised)
  b  pirope_eager pirope.apply_rope_qk, then the same eager_attention_forward (what
                  patch_rope(attention="sdpa") runs for Gemma 2)
  c  blocks       pirope.apply_rope_qk + the capped softmax over blocks of query rows, each
                  recomputed in the backward (what rope_attention runs on CUDA)
  d  fused        pirope.rope_attention(..., softcap=c)
  e  fused_nocap  pirope.rope_attention without the cap (not the same result; the cost of
                  the cap in the fused kernels)
Before timing, every method's output is compared with (a) run in float64 (max abs
difference printed; not for e): in bfloat16, (a) and (b) multiply q k^T in bfloat16, (c) and
(d) in float32 (the scores are ~16 here, where a bfloat16 rounding moves a probability by 5%). Times are medians of --repeat runs after a warm-up; x = speed-up over the
first method ((a) by default).
"""

from __future__ import annotations

import functools
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import eager_parser, positive_float, time_against_eager  # noqa: E402

import pirope  # noqa: E402
from pirope.rope_attention import _sdpa_fallback  # noqa: E402


def _gemma2():
    from transformers.models.gemma2 import modeling_gemma2

    return modeling_gemma2


def _eager(q, k, v, cap, mask):
    """transformers' Gemma 2 eager attention of (B, H, S, D) q, k, v; output (B, S, H, D)."""
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], head_dim=q.shape[-1],
                                   training=False)
    out, _ = _gemma2().eager_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5, softcap=cap)
    return out


def hf_eager(q, k, v, cos, sin, window, mask, *, cap):
    # transformers' rotation on (B, H, S, D) with per-token cos/sin rows (Gemma2RotaryEmbedding's
    # output: the table duplicated over both halves, in the input dtype)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    c = torch.cat((cos, cos), -1)[None].to(q.dtype)
    s = torch.cat((sin, sin), -1)[None].to(q.dtype)
    q, k = _gemma2().apply_rotary_pos_emb(q, k, c, s)
    return _eager(q, k, v, cap, mask)


def pirope_eager(q, k, v, cos, sin, window, mask, *, cap):
    qr, kr = pirope.apply_rope_qk(q, k, cos, sin)
    return _eager(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), cap, mask)


def blocks(q, k, v, cos, sin, window, mask, *, cap):
    return _sdpa_fallback(q, k, v, cos, sin, None, True, q.shape[-1] ** -0.5, False, (window - 1, 0), cap)


def fused(q, k, v, cos, sin, window, mask, *, cap):
    return pirope.rope_attention(q, k, v, cos, sin, window_size=(window - 1, 0), softcap=cap)


def fused_nocap(q, k, v, cos, sin, window, mask, *, cap):
    return pirope.rope_attention(q, k, v, cos, sin, window_size=(window - 1, 0))


METHODS = {"a": ("hf_eager", hf_eager), "b": ("pirope_eager", pirope_eager), "c": ("blocks", blocks),
           "d": ("fused", fused), "e": ("fused_nocap", fused_nocap)}


def main():
    ap = eager_parser(__doc__, windows="0", heads="16/8", headdim=256)  # Gemma 2 9B's heads
    ap.add_argument("--softcap", type=positive_float, default=50.0, help="Gemma 2's attn_logit_softcapping")
    args = ap.parse_args()
    # scores of several units (std ~ 2 sqrt(headdim) q.k / sqrt(headdim)): the cap matters
    methods = {key: (name, functools.partial(fn, cap=args.softcap)) for key, (name, fn) in METHODS.items()}
    time_against_eager(args, methods, methods["a"][1], qk_std=4.0, skip_diff=("fused_nocap",))


if __name__ == "__main__":
    main()
