"""Random inputs of the rope_attention tests: PI tables, dense and packed q/k/v, and
cu_seqlens helpers (shared by test_rope_attention*.py)."""

import torch

import pirope


def tables(rotary_dim, n, device="cpu", dtype=torch.float32):
    """cos/sin of n positions, PI by 4 (linear scaling)."""
    inv_freq, _ = pirope.rope_frequencies(rotary_dim, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, n)
    return cos.to(device, dtype), sin.to(device, dtype)


def qkv(b, s, hq, hkv, d, dtype=torch.float32, device="cpu", requires_grad=False):
    """Dense (b, s, heads, d) q and k, v with hq and hkv heads."""
    mk = lambda h: torch.randn(b, s, h, d, dtype=dtype, device=device, requires_grad=requires_grad)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def packed_qkv(total, hq, hkv, d, dtype=torch.float32, device="cpu"):
    """Packed (total, heads, d) q and k, v."""
    mk = lambda h: torch.randn(total, h, d, dtype=dtype, device=device)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def cu_tensor(cu, device="cpu", dtype=torch.int32):
    return torch.tensor(cu, dtype=dtype, device=device)


def spans(cu):
    """[(start, end)] of the sequences of cu_seqlens."""
    cu = [int(c) for c in cu]
    return list(zip(cu[:-1], cu[1:]))
