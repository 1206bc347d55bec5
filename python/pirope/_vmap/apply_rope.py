"""Batching rules of the rotary ops: the vmapped dim joins the heads (every head of a
token has the same position), so one launch rotates all of it."""

import torch

from . import _fold


def _foldable(info, tensors, in_dims, rest_dims) -> bool:
    # Tables and positions shared by the batch; each sample (batch, seqlen, nheads,
    # headdim) or packed (total, nheads, headdim) (else the op's own error, per sample).
    return info.batch_size > 0 and all(d is None for d in rest_dims) and all(
        len(_fold.sample_shape(t, d)) in (3, 4) for t, d in zip(tensors, in_dims))


def _rule(op, n):
    """Rule of an op whose first ``n`` arguments are the rotated tensors. Each is rotated
    on its own, so one that is not vmapped (k shared by vmapped queries) is passed as it
    is and comes out not vmapped."""
    def rule(info, in_dims, *args):
        tensors, dims = args[:n], in_dims[:n]
        if not _foldable(info, tensors, dims, in_dims[n:]):
            return _fold.loop(op, info, in_dims, args)
        shapes = [_fold.sample_shape(t, d) for t, d in zip(tensors, dims)]
        heads = [len(s) - 2 for s in shapes]
        folded = [t if d is None else _fold.into_heads(t, d, info.batch_size, h)
                  for t, d, h in zip(tensors, dims, heads)]
        out = op(*folded, *args[n:])
        outs = [(o, None) if d is None else _fold.out_of_heads(o, info.batch_size, h, s[h])
                for o, d, h, s in zip((out,) if n == 1 else out, dims, heads, shapes)]
        if n == 1:
            return outs[0]
        return tuple(o for o, _ in outs), tuple(d for _, d in outs)
    return rule


for _name, _n in (("apply_rope", 1), ("apply_rope_backward", 1), ("apply_rope_qk", 2), ("apply_rope_qk_backward", 2)):
    torch.library.register_vmap(f"pirope::{_name}", _rule(getattr(torch.ops.pirope, _name), _n))
