"""Autograd registrations, one file per op. Each backward calls its own op."""

from . import apply_rope, rope_attention  # noqa: F401
