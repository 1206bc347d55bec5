"""Fake (meta) kernels, one file per op, so torch.compile can trace pirope ops."""

from . import apply_rope, rope_attention  # noqa: F401
