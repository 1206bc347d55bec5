"""Batching rules (torch.func.vmap), one file per op: a vmapped q/k/v folds into the
head dimension, so one launch does the whole batch. Anything else (vmapped tables or
positions, an empty vmap) runs the op once per vmapped index, as torch's fallback would,
without its performance warning."""

from . import apply_rope, rope_attention  # noqa: F401
