"""Fake kernels of the rotary ops: outputs are allocated like the real kernels do
(torch.empty_like of the input, which keeps a dense input's strides), after the shape
and dtype checks of csrc/pirope/apply_rope.cpp, so that meta tensors (and
torch.compile's tracing) reject what the real kernels reject."""

import torch
from torch.fx.experimental.symbolic_shapes import sym_or

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_devices(op, first, *others):
    # A tensor on the meta device routes the whole call here: keep the real kernels'
    # device check so that mixing devices never passes silently.
    for name, t in others:
        if t is not None and t.device != first[1].device:
            raise RuntimeError(f"{op}: {name} must be on {first[1].device} like {first[0]}, got {t.device}")


def check_tables(op, x, cos, sin):
    """apply_rope.cpp's check_tables (x: the rotated input, for its head dim)."""
    for name, t in (("cos", cos), ("sin", sin)):
        torch._check(t.dim() == 2, lambda: f"{op}: {name} must be (max_positions, rotary_dim // 2), "
                                           f"got shape {tuple(t.shape)}")
        torch._check(t.dtype in (torch.float32, torch.float64),
                     lambda: f"{op}: {name} must be float32 (or float64), got {t.dtype}")
    torch._check(cos.dtype == sin.dtype, lambda: f"{op}: cos and sin must have the same dtype")
    for d in (0, 1):
        torch._check(cos.shape[d] == sin.shape[d], lambda: f"{op}: cos and sin must have the same shape")
    torch._check(2 * cos.shape[1] <= x.shape[-1],
                 lambda: f"{op}: rotary_dim = 2 * cos.size(1) = {2 * cos.shape[1]} exceeds the head dim {x.shape[-1]}")


def check_positions(op, x, cos, position_ids):
    """apply_rope.cpp's plan_positions (shapes, dtype) and, where the real kernels check
    positions (CPU; meta stands in for it) and there are rows (also rows without
    elements: zero heads), the row count needed without position_ids. x: the rotated
    input (4-D, or 3-D packed)."""
    packed = x.dim() == 3
    seqlen = x.shape[0] if packed else x.shape[1]
    rows = seqlen if packed else x.shape[0] * seqlen
    if position_ids is None:
        if x.device.type != "cuda":
            # (as one condition: a data-dependent row count, x made by a boolean mask under
            # torch.compile, has no value to branch on; checked when the graph runs)
            torch._check(sym_or(rows == 0, seqlen <= cos.shape[0]),
                         lambda: f"{op}: position_ids is None, so positions run 0..{seqlen - 1}, but cos/sin have "
                                 f"only {cos.shape[0]} rows")
        return
    torch._check(position_ids.dtype in (torch.int32, torch.int64),
                 lambda: f"{op}: position_ids must be int32 or int64, got {position_ids.dtype}")
    if packed:
        torch._check(position_ids.dim() == 1 and position_ids.shape[0] == seqlen,
                     lambda: f"{op}: for packed input (total_tokens, nheads, headdim) position_ids must be "
                             f"(total_tokens,) = ({seqlen},), got shape {tuple(position_ids.shape)}")
        return
    batch = x.shape[0]
    ok = ((position_ids.dim() == 1 and position_ids.shape[0] == seqlen)
          or (position_ids.dim() == 2 and position_ids.shape[1] == seqlen
              and position_ids.shape[0] in (batch, 1)))
    torch._check(ok, lambda: f"{op}: position_ids must be (seqlen,) = ({seqlen},) or (batch, seqlen) = "
                             f"({batch}, {seqlen}), got shape {tuple(position_ids.shape)}")


def _check(op, cos, sin, *inputs, position_ids=None):
    """apply_rope.cpp's input checks of x, or of q and k (inputs: (name, tensor) pairs)."""
    for name, t in inputs:
        torch._check(t.dim() in (3, 4), lambda: f"{op}: {name} must be (batch, seqlen, nheads, headdim) or packed "
                                                f"(total_tokens, nheads, headdim), got shape {tuple(t.shape)}")
        torch._check(t.dtype in DTYPES,
                     lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if len(inputs) == 2:
        (qn, q), (kn, k) = inputs
        torch._check(q.dim() == k.dim(), lambda: f"{op}: {qn} and {kn} must have the same rank")
        torch._check(q.dtype == k.dtype, lambda: f"{op}: {qn} and {kn} must have the same dtype")
        for d in (*range(q.dim() - 2), q.dim() - 1):  # all but the heads
            torch._check(q.shape[d] == k.shape[d], lambda: f"{op}: {qn} and {kn} must agree on batch, seqlen and "
                                                           f"headdim, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    check_tables(op, inputs[0][1], cos, sin)
    # the kernels return early only when every rotated tensor is empty
    check_positions(op, inputs[0][1], cos, position_ids)


def check_qk(op, q, k, cos, sin, position_ids):
    """The checks of the qk ops (devices, shapes, dtypes, tables, position_ids), for a
    caller that rotates q and k in two launches and must not write q if k fails."""
    _check_devices(op, ("q", q), ("k", k), ("cos", cos), ("sin", sin), ("position_ids", position_ids))
    _check(op, cos, sin, ("q", q), ("k", k), position_ids=position_ids)


@torch.library.register_fake("pirope::apply_rope")
def _apply_rope(x, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope", ("x", x), ("cos", cos), ("sin", sin), ("position_ids", position_ids))
    _check("apply_rope", cos, sin, ("x", x), position_ids=position_ids)
    return torch.empty_like(x)


@torch.library.register_fake("pirope::apply_rope_backward")
def _apply_rope_backward(grad, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope_backward", ("grad", grad), ("cos", cos), ("sin", sin),
                   ("position_ids", position_ids))
    _check("apply_rope_backward", cos, sin, ("grad", grad), position_ids=position_ids)
    return torch.empty_like(grad)


@torch.library.register_fake("pirope::apply_rope_qk")
def _apply_rope_qk(q, k, cos, sin, position_ids, interleaved):
    check_qk("apply_rope_qk", q, k, cos, sin, position_ids)
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("pirope::apply_rope_qk_backward")
def _apply_rope_qk_backward(grad_q, grad_k, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope_qk_backward", ("grad_q", grad_q), ("grad_k", grad_k), ("cos", cos),
                   ("sin", sin), ("position_ids", position_ids))
    _check("apply_rope_qk_backward", cos, sin, ("grad_q", grad_q), ("grad_k", grad_k), position_ids=position_ids)
    return torch.empty_like(grad_q), torch.empty_like(grad_k)


@torch.library.register_fake("pirope::apply_rope_")
def _apply_rope_(x, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope_", ("x", x), ("cos", cos), ("sin", sin), ("position_ids", position_ids))
    _check("apply_rope_", cos, sin, ("x", x), position_ids=position_ids)
    return None


@torch.library.register_fake("pirope::apply_rope_qk_")
def _apply_rope_qk_(q, k, cos, sin, position_ids, interleaved):
    check_qk("apply_rope_qk_", q, k, cos, sin, position_ids)
    return None
