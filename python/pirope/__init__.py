"""pirope: Position Interpolation and RoPE scalings as fused CPU/CUDA torch ops.

    import pirope
    inv_freq, attn = pirope.rope_frequencies(128, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, 8192, attn)
    q, k = pirope.apply_rope_qk(q, k, cos, sin)       # (batch, seqlen, heads, 128)
"""

from ._extension import build_info, cpu_gemm  # loads pirope._C: registers torch.ops.pirope.*
from . import _fake, _autograd, _vmap  # noqa: F401  (fake kernels, autograd and batching rules of the ops)
from .apply_rope import apply_rope, apply_rope_qk
from .frequencies import rope_cos_sin, rope_frequencies
from .modules import RotaryEmbedding
from .rope_attention import rope_attention

__version__ = "0.1.0"

__all__ = [
    "apply_rope",
    "apply_rope_qk",
    "build_info",
    "cpu_gemm",
    "rope_cos_sin",
    "rope_frequencies",
    "RotaryEmbedding",
    "rope_attention",
]
