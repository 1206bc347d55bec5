"""Independent float64 references in plain PyTorch (no pirope code): the rotation the
README documents (out = x * cos + rotate(x) * sin), written the obvious way, and exact
cos/sin tables."""

from __future__ import annotations

import torch


def cos_sin_table(inv_freq: torch.Tensor, positions, attention_factor: float = 1.0):
    """float64 cos/sin of position * inv_freq (positions: int or 1-D tensor)."""
    if isinstance(positions, int):
        positions = torch.arange(positions)
    ang = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    return ang.cos() * attention_factor, ang.sin() * attention_factor


def positions_bs(position_ids, batch: int, seqlen: int) -> torch.Tensor:
    """position_ids of any accepted form as an int64 (batch, seqlen) tensor."""
    if position_ids is None:
        return torch.arange(seqlen).expand(batch, seqlen)
    return position_ids.to(torch.int64).cpu().expand(batch, seqlen)


def rope_reference(x, cos, sin, position_ids=None, interleaved=False, conjugate=False):
    """float64 rotary embedding of x ((B, S, H, D) or packed (T, H, D))."""
    packed = x.dim() == 3
    x64 = x.detach().to(torch.float64).cpu()
    if packed:
        x64 = x64.unsqueeze(0)
    b, s, _, _ = x64.shape
    pos = positions_bs(position_ids, b, s)
    r = 2 * cos.shape[1]
    c = cos.detach().to(torch.float64).cpu()[pos].unsqueeze(2)  # (B, S, 1, R/2)
    sn = sin.detach().to(torch.float64).cpu()[pos].unsqueeze(2)
    if conjugate:
        sn = -sn
    rot, rest = x64[..., :r], x64[..., r:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    o1 = x1 * c - x2 * sn
    o2 = x2 * c + x1 * sn
    if interleaved:
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        out = torch.cat((o1, o2), dim=-1)
    out = torch.cat((out, rest), dim=-1)
    return out.squeeze(0) if packed else out


def tolerance(dtype: torch.dtype) -> dict:
    """Tolerances for one rounding of an O(1) result to dtype."""
    return {
        torch.float64: dict(atol=1e-12, rtol=1e-12),
        torch.float32: dict(atol=2e-6, rtol=2e-6),
        torch.float16: dict(atol=4e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
    }[dtype]



def _attention64(qr, kr, v64, causal, scale):
    """Softmax attention in float64 on rotated (B, S, Hq, D) q and (B, S, Hkv, D) k, v,
    kv heads repeated over their query-head group, scores materialised."""
    group = qr.shape[2] // kr.shape[2]
    kr = kr.repeat_interleave(group, dim=2)
    v64 = v64.repeat_interleave(group, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", qr, kr) * scale
    if causal:  # key j is visible to query i when j <= i
        s = qr.shape[1]
        visible = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v64)


def attention_reference(q, k, v, cos, sin, position_ids=None, causal=True, softmax_scale=None,
                        interleaved=False, grad_out=None):
    """float64 RoPE + attention: rope_reference on q and k, then plain softmax
    attention. Returns the output (B, S, Hq, D), or with grad_out (out, dq, dk, dv):
    gradients through the attention by autograd, rotated back to the input basis by
    the inverse rotation (rope_reference with conjugate=True)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qr = rope_reference(q, cos, sin, position_ids, interleaved).requires_grad_(grad_out is not None)
    kr = rope_reference(k, cos, sin, position_ids, interleaved).requires_grad_(grad_out is not None)
    v64 = v.detach().to(torch.float64).cpu().requires_grad_(grad_out is not None)
    out = _attention64(qr, kr, v64, causal, scale)
    if grad_out is None:
        return out
    gq, gk, gv = torch.autograd.grad(out, (qr, kr, v64), grad_out.detach().to(torch.float64).cpu())
    dq = rope_reference(gq, cos, sin, position_ids, interleaved, conjugate=True)
    dk = rope_reference(gk, cos, sin, position_ids, interleaved, conjugate=True)
    return out.detach(), dq, dk, gv


# Max |error| of an attention output or gradient, relative to max(1, max |reference|):
# float32 sums over many keys, one rounding to the input dtype.
ATTENTION_REL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_attention_close(actual, ref, dtype, what=""):
    """actual (any dtype/device) within ATTENTION_REL[dtype] of the float64 reference."""
    actual = actual.detach().to(torch.float64).cpu()
    assert actual.shape == ref.shape, (what, actual.shape, ref.shape)
    err = (actual - ref).abs().max().item() if ref.numel() else 0.0
    bound = ATTENTION_REL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({dtype})"
