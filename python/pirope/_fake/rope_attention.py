"""Fake kernels of the fused attention: outputs allocated like the real kernels
(contiguous; lse (batch, nheads_q, seqlen) in float32, float64 for float64 input),
after the shape and dtype checks of csrc/pirope/rope_attention.cpp, so that meta
tensors (and torch.compile's tracing) reject what the real kernels reject."""

import math

import torch

from .._checks import FLOAT32_MAX as _FLOAT32_MAX, FLOAT32_TINIEST as _FLOAT32_TINIEST
from .apply_rope import DTYPES, _check_devices, check_positions, check_tables


def _math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_window(op, window_left, window_right):
    # rope_attention.cpp's check_window (its CPU-only rule is the real kernels' own)
    torch._check(window_left >= -1 and window_right >= -1,
                 lambda: f"{op}: window_size must be (left, right) with each -1 (unbounded) or >= 0, "
                         f"got ({window_left}, {window_right})")


def _check_softcap(op, softcap, dtype):
    # rope_attention.cpp's check_softcap (its CPU-only rule is the real kernels' own)
    torch._check(math.isfinite(softcap) and softcap >= 0,
                 lambda: f"{op}: softcap must be 0 (no soft-cap) or finite and > 0, got {softcap}")
    torch._check(softcap == 0 or dtype == torch.float64 or _FLOAT32_TINIEST <= softcap <= _FLOAT32_MAX,
                 lambda: f"{op}: softcap must be 0 or within float32's positive range ({_FLOAT32_TINIEST} to "
                         f"{_FLOAT32_MAX}: {dtype} inputs are computed in float32), got {softcap}")


def _check_sinks(op, sinks, q, packed):
    # rope_attention.cpp's check_sinks, but for its values (data) and its CPU-only rule
    nheads_q = q.shape[1] if packed else q.shape[2]
    torch._check(sinks.dim() == 1 and sinks.shape[0] == nheads_q,
                 lambda: f"{op}: sinks must be 1-D (nheads_q,) = ({nheads_q},), got shape {tuple(sinks.shape)}")
    torch._check(sinks.dtype in DTYPES,
                 lambda: f"{op}: sinks must be float32, float64, float16 or bfloat16, got {sinks.dtype}")


def _check(op, q, k, v, cos, sin, position_ids, softmax_scale, cu_seqlens=None):
    packed = cu_seqlens is not None
    if packed:  # rope_attention.cpp's check_cu_seqlens, but for its values (data)
        torch._check(cu_seqlens.dtype in (torch.int32, torch.int64),
                     lambda: f"{op}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        torch._check(cu_seqlens.dim() == 1 and cu_seqlens.shape[0] >= 1,
                     lambda: f"{op}: cu_seqlens must be 1-D (number of sequences + 1,), "
                             f"got shape {tuple(cu_seqlens.shape)}")
    for name, t, heads in (("q", q, "nheads_q"), ("k", k, "nheads_kv"), ("v", v, "nheads_kv")):
        if packed:
            torch._check(t.dim() == 3, lambda: f"{op}: with cu_seqlens (packed sequences) {name} must be "
                                               f"(total, {heads}, headdim), got shape {tuple(t.shape)}")
        else:
            torch._check(t.dim() == 4, lambda: f"{op}: {name} must be (batch, seqlen, {heads}, headdim), "
                                               f"got shape {tuple(t.shape)}")
        torch._check(t.dtype in DTYPES,
                     lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if packed:  # as (1, total, heads, headdim), as the real kernels see them
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    for name, t in (("k", k), ("v", v)):
        torch._check(t.dtype == q.dtype, lambda: f"{op}: {name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        torch._check(t.shape[0] == q.shape[0],
                     lambda: f"{op}: {name} must have the batch and seqlen of q, got shape {tuple(t.shape)}")
        torch._check(t.shape[1] == q.shape[1],
                     lambda: (f"{op}: {name} must have the total tokens of q ({q.shape[1]}), got shape "
                              f"{tuple(t.shape[1:])}") if packed else
                     f"{op}: {name} must have the batch and seqlen of q, got shape {tuple(t.shape)}")
        torch._check(t.shape[3] == q.shape[3],
                     lambda: f"{op}: {name} must have the head dim of q ({q.shape[3]}), got shape "
                             f"{tuple(t.shape[1:] if packed else t.shape)}")
    torch._check(v.shape[2] == k.shape[2], lambda: f"{op}: k and v must have the same number of heads")
    torch._check(k.shape[2] >= 1, lambda: f"{op}: nheads_q must be a multiple of nheads_kv")
    torch._check(q.shape[2] % k.shape[2] == 0, lambda: f"{op}: nheads_q must be a multiple of nheads_kv, "
                                                       f"got nheads_q = {q.shape[2]} and nheads_kv = {k.shape[2]}")
    torch._check(q.shape[3] >= 1, lambda: f"{op}: headdim must be >= 1, got shape {tuple(q.shape)}")
    check_tables(op, q, cos, sin)
    # rope_attention.cpp's check_scale
    torch._check(math.isfinite(softmax_scale) and softmax_scale > 0,
                 lambda: f"{op}: softmax_scale must be finite and > 0, got {softmax_scale}")
    torch._check(q.dtype == torch.float64 or softmax_scale <= _FLOAT32_MAX,
                 lambda: f"{op}: softmax_scale must be at most {_FLOAT32_MAX} (the largest float32: {q.dtype} "
                         f"inputs are computed in float32), got {softmax_scale}")
    if packed:
        # positions restart in each sequence: how many rows the tables need is data
        if position_ids is not None:
            check_positions(op, q[0], cos, position_ids)
    else:
        check_positions(op, q, cos, position_ids)


@torch.library.register_fake("pirope::rope_attention")
def _rope_attention(q, k, v, cos, sin, position_ids, causal, softmax_scale, interleaved,
                    deterministic=False, cu_seqlens=None, window_left=-1, window_right=-1, softcap=0.0,
                    sinks=None):
    op = "rope_attention"
    _check_devices(op, ("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("position_ids", position_ids),
                   ("cu_seqlens", cu_seqlens), ("sinks", sinks))
    _check(op, q, k, v, cos, sin, position_ids, softmax_scale, cu_seqlens)
    _check_window(op, window_left, window_right)
    _check_softcap(op, softcap, q.dtype)
    if sinks is not None:
        _check_sinks(op, sinks, q, cu_seqlens is not None)
    out = q.new_empty(q.shape)
    # (batch, nheads_q, seqlen), or (nheads_q, total) for packed sequences
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else (q.shape[0], q.shape[2], q.shape[1])
    lse = q.new_empty(lse_shape, dtype=_math_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("pirope::rope_attention_backward")
def _rope_attention_backward(grad_out, q, k, v, out, lse, cos, sin, position_ids, causal,
                             softmax_scale, interleaved, deterministic=False, cu_seqlens=None,
                             window_left=-1, window_right=-1, softcap=0.0):
    op = "rope_attention_backward"
    _check_devices(op, ("q", q), ("grad_out", grad_out), ("k", k), ("v", v), ("out", out), ("lse", lse),
                   ("cos", cos), ("sin", sin), ("position_ids", position_ids), ("cu_seqlens", cu_seqlens))
    _check(op, q, k, v, cos, sin, position_ids, softmax_scale, cu_seqlens)
    _check_window(op, window_left, window_right)
    _check_softcap(op, softcap, q.dtype)
    for name, t in (("grad_out", grad_out), ("out", out)):  # rope_attention.cpp's check_like_q
        torch._check(t.dim() == q.dim() and all(t.shape[d] == q.shape[d] for d in range(q.dim())),
                     lambda: f"{op}: {name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        torch._check(t.dtype == q.dtype, lambda: f"{op}: {name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if cu_seqlens is not None:
        torch._check(lse.dim() == 2 and lse.shape[0] == q.shape[1] and lse.shape[1] == q.shape[0],
                     lambda: f"{op}: with cu_seqlens lse must be (nheads_q, total) = ({q.shape[1]}, {q.shape[0]}), "
                             f"got shape {tuple(lse.shape)}")
    else:
        torch._check(lse.dim() == 3 and lse.shape[0] == q.shape[0] and lse.shape[1] == q.shape[2]
                     and lse.shape[2] == q.shape[1],
                     lambda: f"{op}: lse must be (batch, nheads_q, seqlen) = ({q.shape[0]}, {q.shape[2]}, "
                             f"{q.shape[1]}), got shape {tuple(lse.shape)}")
    torch._check(lse.dtype == _math_dtype(q.dtype),
                 lambda: f"{op}: lse must be {_math_dtype(q.dtype)} (the forward's), got {lse.dtype}")
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
