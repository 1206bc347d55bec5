"""Fake kernels of the fused attention: outputs allocated like the real kernels
(contiguous; lse (batch, nheads_q, seqlen) in float32, float64 for float64 input)."""

import torch

from .apply_rope import _check_devices


def _math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pirope::rope_attention")
def _rope_attention(q, k, v, cos, sin, position_ids, causal, softmax_scale, interleaved,
                    deterministic=False):
    _check_devices("rope_attention", ("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin),
                   ("position_ids", position_ids))
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "rope_attention: q, k and v must be (batch, seqlen, nheads, headdim)")
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_math_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("pirope::rope_attention_backward")
def _rope_attention_backward(grad_out, q, k, v, out, lse, cos, sin, position_ids, causal,
                             softmax_scale, interleaved, deterministic=False):
    _check_devices("rope_attention_backward", ("q", q), ("grad_out", grad_out), ("k", k), ("v", v),
                   ("out", out), ("lse", lse), ("cos", cos), ("sin", sin),
                   ("position_ids", position_ids))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
