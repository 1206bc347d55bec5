"""Shared helpers of the batching rules: fold the vmapped dim into the heads."""

from __future__ import annotations

import torch


def into_heads(t: torch.Tensor, dim: int | None, size: int, heads: int) -> torch.Tensor:
    """A sample's ``(..., nheads, ...)`` (``heads``: that dim's index in one sample),
    vmapped along ``dim`` (None: not vmapped, the same for every index) ->
    ``(..., size * nheads, ...)``, the vmapped index outermost within the heads."""
    t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.movedim(0, heads).flatten(heads, heads + 1)


def out_of_heads(t: torch.Tensor, size: int, heads: int) -> tuple[torch.Tensor, int]:
    """Inverse of :func:`into_heads` for an op's output: (tensor, its vmapped dim)."""
    return t.unflatten(heads, (size, -1)), heads


def sample_dim(t: torch.Tensor, dim: int | None) -> int:
    """The number of dims of one sample of ``t``."""
    return t.dim() - (dim is not None)


def loop(op, info, in_dims, args):
    """The op once per vmapped index, outputs stacked along dim 0."""
    outs = [op(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)])
            for i in range(info.batch_size)]
    if isinstance(outs[0], (tuple, list)):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0
