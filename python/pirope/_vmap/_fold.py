"""Shared helpers of the batching rules: fold the vmapped dim into the heads."""

from __future__ import annotations

import torch


def sample_shape(t: torch.Tensor, dim: int | None) -> tuple[int, ...]:
    """The shape of one sample of ``t`` (vmapped along ``dim``, or not at all: None)."""
    return tuple(t.shape) if dim is None else tuple(t.shape[:dim] + t.shape[dim + 1:])


def into_heads(t: torch.Tensor, dim: int | None, size: int, heads: int) -> torch.Tensor:
    """A sample's ``(..., nheads, ...)`` (``heads``: that dim's index in one sample),
    vmapped along ``dim`` (None: not vmapped, the same for every index) ->
    ``(..., size * nheads, ...)``, the vmapped index outermost within the heads."""
    t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.movedim(0, heads).flatten(heads, heads + 1)


def fold_each(info, tensors, dims, heads) -> list[torch.Tensor]:
    return [into_heads(t, d, info.batch_size, h) for t, d, h in zip(tensors, dims, heads)]


def out_of_heads(t: torch.Tensor, size: int, heads: int, nheads: int) -> tuple[torch.Tensor, int]:
    """Inverse of :func:`into_heads` for an op's output of ``nheads`` heads per sample:
    (tensor, its vmapped dim)."""
    return t.unflatten(heads, (size, nheads)), heads


def loop(op, info, in_dims, args):
    """The op once per vmapped index, outputs stacked along dim 0 (for an empty vmap, empty
    outputs of the shapes the op's fake kernel gives one sample: no sample exists whose
    values could be valid input, e.g. a cu_seqlens)."""
    if info.batch_size == 0:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        meta = [a if not isinstance(a, torch.Tensor) else a.to("meta") if d is None
                else a.new_empty(sample_shape(a, d), device="meta") for a, d in zip(args, in_dims)]
        shapes = op(*meta)
        def empty(o):
            return torch.empty((0, *o.shape), dtype=o.dtype, device=device)
        if isinstance(shapes, (tuple, list)):
            return tuple(empty(o) for o in shapes), (0,) * len(shapes)
        return empty(shapes), 0
    outs = [op(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)])
            for i in range(info.batch_size)]
    if isinstance(outs[0], (tuple, list)):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0
