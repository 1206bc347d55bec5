"""apply_rope / apply_rope_qk: rotary position embedding of q and k, with any
cos/sin table (plain RoPE, Position Interpolation or another scaling)."""

from __future__ import annotations

import torch

from . import _checks, _extension
from ._autograd import functorch as _functorch
from ._fake import apply_rope as _fake_checks
from ._extension import require_cuda_build

__all__ = ["apply_rope", "apply_rope_qk"]


def _check_common(op, cos, sin, position_ids, interleaved, inplace):
    _checks.tensor(op, "cos", cos)
    _checks.tensor(op, "sin", sin)
    _checks.tensor(op, "position_ids", position_ids, optional=True)
    _checks.flag(op, "interleaved", interleaved)
    _checks.flag(op, "inplace", inplace)
    _checks.constant_tables(op, cos, sin, stacklevel=4)  # (the caller of apply_rope / apply_rope_qk)


class _RopeInplace(torch.autograd.Function):
    """In-place rotation that stays differentiable: marks the inputs dirty and
    backpropagates through the inverse rotation (the backward op). The rotated tensors
    come first among the inputs: autograd's rebase of an in-place-modified view
    (CopySlices) takes the Function's first gradient as the view's."""

    @staticmethod
    def forward(ctx, x, k, cos, sin, position_ids, interleaved):
        if k is None:
            torch.ops.pirope.apply_rope_(x, cos, sin, position_ids, interleaved)
            ctx.mark_dirty(x)
        else:
            torch.ops.pirope.apply_rope_qk_(x, k, cos, sin, position_ids, interleaved)
            ctx.mark_dirty(x, k)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.interleaved = interleaved
        return x if k is None else (x, k)

    @staticmethod
    def backward(ctx, *grads):
        cos, sin, position_ids = ctx.saved_tensors
        if len(grads) == 1:
            g = torch.ops.pirope.apply_rope_backward(grads[0], cos, sin, position_ids, ctx.interleaved)
            return g, None, None, None, None, None
        gq, gk = torch.ops.pirope.apply_rope_qk_backward(
            grads[0], grads[1], cos, sin, position_ids, ctx.interleaved)
        return gq, gk, None, None, None, None


def _refuse_leaf_inplace(op, *named):
    """torch's in-place rule, checked before anything is written (autograd would raise
    only after the kernel ran): a leaf that requires grad, or a view of one, cannot be
    modified in place. Not under torch.compile, which raises the same at trace time."""
    if torch.compiler.is_compiling():
        return
    for name, t in named:
        if not t.requires_grad:
            continue
        if t.is_leaf:
            raise RuntimeError(f"{op}: {name} is a leaf tensor that requires grad and cannot be rotated "
                               "in place (a leaf Variable that requires grad is being used in an in-place operation)")
        if t._base is not None and t._base.is_leaf and t._base.requires_grad:
            raise RuntimeError(f"{op}: {name} is a view of a leaf tensor that requires grad and cannot be "
                               "rotated in place (a view of a leaf Variable that requires grad is being used "
                               "in an in-place operation)")


# Views autograd refuses to modify in place (torch's CreationMeta other than DEFAULT),
# with what made them so.
_UNWRITABLE_VIEWS = {
    "MULTI_OUTPUT_NODE": "a function that returns several views (unbind, split, chunk, ...)",
    "NO_GRAD_MODE": "no_grad mode",
    "INFERENCE_MODE": "inference mode",
    "IN_CUSTOM_FUNCTION": "a custom autograd Function",
}


def _refuse_inplace(op, *named):
    """Every rule torch applies to an in-place write, checked for all the tensors before
    any is written (autograd raises only after the kernel ran, which would leave a tensor
    rotated behind the error, or q rotated and k not): the leaf rules above; with grad,
    a view that requires grad and that autograd cannot rebase (see _UNWRITABLE_VIEWS);
    and, with or without grad, an inference tensor outside inference mode. Not under
    torch.compile, which raises the same at trace time."""
    if torch.compiler.is_compiling():
        return
    for name, t in named:
        if t.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"{op}: {name} is an inference tensor (made under torch.inference_mode) and cannot "
                               "be rotated in place outside inference mode (Inplace update to inference tensor "
                               "outside InferenceMode is not allowed)")
    if not torch.is_grad_enabled():
        return
    for name, t in named:  # (before the leaf rule: a view made under no_grad is a leaf)
        if t.requires_grad and t._is_view():
            made_by = _UNWRITABLE_VIEWS.get(torch._C._autograd._get_creation_meta(t).name)
            if made_by is not None:
                raise RuntimeError(f"{op}: {name} is a view made by {made_by} and cannot be rotated in place "
                                   "while it requires grad; rotate a clone of it, or pass inplace=False")
    _refuse_leaf_inplace(op, *named)


class _NoHint(Exception):
    pass


def _check_op_tensors(q, k, cos, sin, position_ids):
    """torch.ops.pirope.check_rope_inplace's Tensor arguments are tensors (torch passes None
    through a Python op's; the message is the C++ ops' for theirs)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t is None:
            raise RuntimeError(f"check_rope_inplace: {name} must be a tensor, got None")
        _checks.tensor("check_rope_inplace", name, t)
    _checks.tensor("check_rope_inplace", "position_ids", position_ids, optional=True)


def _check_inplace_qk(q, k, cos, sin, position_ids):
    """Every check of the one-launch in-place op, for a caller that rotates q and k in two:
    shapes, dtypes, devices, tables and positions (as the fake kernel checks them), then
    csrc/pirope/apply_rope.cpp's check_inplace_targets (q and k share no element, nor any
    with what the kernel reads)."""
    _fake_checks.check_qk("apply_rope_qk", q, k, cos, sin, position_ids)
    _extension._C.check_rope_inplace(q, k, cos, sin, position_ids)


@torch.library.custom_op("pirope::check_rope_inplace", mutates_args=())
def _check_inplace_traced(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          position_ids: torch.Tensor | None) -> None:
    """_check_inplace_qk as an op, so that torch.compile traces it: its fake kernel runs the
    same checks as the graph is traced, on the fake tensors' layouts (which keep the real
    ones' aliasing). Eager calls take the function itself (the op's dispatch costs ~15x)."""
    _check_op_tensors(q, k, cos, sin, position_ids)
    _check_inplace_qk(q, k, cos, sin, position_ids)


@_check_inplace_traced.register_fake
def _(q, k, cos, sin, position_ids):
    from torch.multiprocessing.reductions import StorageWeakRef

    _check_op_tensors(q, k, cos, sin, position_ids)
    _fake_checks.check_qk("apply_rope_qk", q, k, cos, sin, position_ids)

    def value(n):
        # a symbolic size (dynamic shapes) by the value it has in the call being traced,
        # read without a guard: the layouts are compared for that call's shapes
        if isinstance(n, torch.SymInt):
            if not n.node.has_hint():
                raise _NoHint
            return int(n.node.hint)
        return n

    # CPU stand-ins with the same sizes, strides and offsets, sharing a buffer where the
    # fake tensors share a storage, and the real check on those
    buffers = {}

    def stand_in(t):
        if t is None:
            return None
        key = StorageWeakRef(t.untyped_storage())
        if key not in buffers:
            buffers[key] = torch.empty(value(t.untyped_storage().nbytes()), dtype=torch.uint8).untyped_storage()
        return torch.empty(0, dtype=t.dtype).set_(buffers[key], value(t.storage_offset()),
                                                  [value(n) for n in t.shape], [value(n) for n in t.stride()])

    try:
        stand_ins = [stand_in(t) for t in (q, k, cos, sin, position_ids)]
    except _NoHint:
        return  # a size without a value at trace time (data-dependent): nothing to compare

    _extension._C.check_rope_inplace(*stand_ins)


def _check_unwrapped_targets(q, k, cos, sin, position_ids):
    """The in-place targets' memory check (csrc/pirope/apply_rope.cpp's
    check_inplace_targets; k None: x = q alone) on the plain tensors under torch.func's
    wrappers, where the rotation is copied back rather than written by the kernel."""
    _extension._C.check_rope_inplace(*(None if t is None else _functorch.unwrapped(t)
                                       for t in (q, k, cos, sin, position_ids)))


def _copy_both(q, q_rot, k, k_rot):
    """q.copy_(q_rot) and k.copy_(k_rot), or neither: when k cannot take its result
    (under vmap: a per-sample result for a tensor shared by the batch), q is restored
    before the error propagates."""
    q_before = q.clone()
    q.copy_(q_rot)
    try:
        k.copy_(k_rot)
    except Exception:
        q.copy_(q_before)
        raise
    return q, k


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    interleaved: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """Rotates ``x`` by the rotary position embedding given by ``cos``/``sin``.

    Args:
        x: ``(batch, seqlen, nheads, headdim)`` or packed ``(total_tokens, nheads,
            headdim)``; float32, float64, float16 or bfloat16; any strides on the
            leading dims (a transpose of ``(batch, nheads, seqlen, headdim)`` works).
        cos, sin: ``(max_positions, rotary_dim // 2)`` float32 (or float64) tables,
            e.g. from :func:`pirope.rope_cos_sin`. The last ``headdim - rotary_dim``
            features of each head pass through unchanged.
        position_ids: ``None`` (token ``i`` of each sequence is at position ``i``),
            ``(seqlen,)``, ``(batch, seqlen)`` or, for packed input,
            ``(total_tokens,)``; int32 or int64, values in ``[0, max_positions)``.
        interleaved: rotate pairs ``(2i, 2i+1)`` (Meta LLaMA / GPT-J) instead of
            ``(i, i + rotary_dim/2)`` (Hugging Face / GPT-NeoX).
        inplace: write the result into ``x`` and return it.

    Returns:
        ``x * cos + rotate(x) * sin``, computed in float32 (float64 for float64
        input) and rounded once to ``x.dtype``. Differentiable in ``x``.
    """
    op = "apply_rope"
    _checks.tensor(op, "x", x)
    _check_common(op, cos, sin, position_ids, interleaved, inplace)
    _checks.no_forward_ad(op, ("cos", cos), ("sin", sin), what=" (the tables are constants)")
    require_cuda_build(x.device, op)
    if not inplace:
        return _functorch.call("apply_rope", x, cos, sin, position_ids, interleaved)
    if _functorch.transforming() or _functorch.vmapping():  # torch.func: rotation copied back
        _refuse_leaf_inplace(op, ("x", x))
        _check_unwrapped_targets(x, None, cos, sin, position_ids)
        return x.copy_(_functorch.call("apply_rope", x, cos, sin, position_ids, interleaved))
    _refuse_inplace(op, ("x", x))
    if torch.is_grad_enabled() and x.requires_grad:
        return _RopeInplace.apply(x, None, cos, sin, position_ids, interleaved)
    torch.ops.pirope.apply_rope_(x, cos, sin, position_ids, interleaved)
    return x


def apply_rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    interleaved: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates queries and keys in one pass (one kernel launch).

    ``q`` and ``k`` follow :func:`apply_rope`'s rules for ``x``; they must agree on
    batch, seqlen, headdim, dtype and device but may have different head counts
    (grouped-query / multi-query attention). Returns ``(q_rotated, k_rotated)``;
    with ``inplace=True`` these are ``q`` and ``k`` themselves.
    """
    op = "apply_rope_qk"
    _checks.tensor(op, "q", q)
    _checks.tensor(op, "k", k)
    _check_common(op, cos, sin, position_ids, interleaved, inplace)
    _checks.no_forward_ad(op, ("cos", cos), ("sin", sin), what=" (the tables are constants)")
    require_cuda_build(q.device, op)
    if not inplace:
        return _functorch.call("apply_rope_qk", q, k, cos, sin, position_ids, interleaved)
    if _functorch.transforming() or _functorch.vmapping():  # torch.func: rotations copied back
        _refuse_leaf_inplace(op, ("q", q), ("k", k))
        _check_unwrapped_targets(q, k, cos, sin, position_ids)
        q_rot, k_rot = _functorch.call("apply_rope_qk", q, k, cos, sin, position_ids, interleaved)
        return _copy_both(q, q_rot, k, k_rot)
    _refuse_inplace(op, ("q", q), ("k", k))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        compiling = torch.compiler.is_compiling()
        if not (compiling or q._is_view() or k._is_view()):
            return _RopeInplace.apply(q, k, cos, sin, position_ids, interleaved)
        # Autograd lets a Function that modifies a view in place return only that one
        # tensor, and q and k are usually views (of a projection, of a fused qkv): one
        # launch each, then, after every check the single launch makes, so that nothing
        # is written unless both can be (elements shared by q and k would be rotated twice,
        # compiled too); torch's own in-place rules: _refuse_inplace above.
        if compiling:  # the op: its checks run as the graph is traced
            torch.ops.pirope.check_rope_inplace(q, k, cos, sin, position_ids)
        else:
            _check_inplace_qk(q, k, cos, sin, position_ids)
        q = apply_rope(q, cos, sin, position_ids, interleaved=interleaved, inplace=True)
        return q, apply_rope(k, cos, sin, position_ids, interleaved=interleaved, inplace=True)
    torch.ops.pirope.apply_rope_qk_(q, k, cos, sin, position_ids, interleaved)
    return q, k
