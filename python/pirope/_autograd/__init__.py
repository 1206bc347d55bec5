"""The ops' autograd under torch.func, one file per op (their autograd for eager,
torch.compile and LibTorch is C++: csrc/pirope/autograd). Each backward calls its own op."""

from . import apply_rope, rope_attention  # noqa: F401
