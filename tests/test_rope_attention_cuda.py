"""The fused CUDA forward of rope_attention (csrc/pirope/cuda/rope_attention_kernel.cu)
against the float64 reference. Skipped cleanly without a GPU."""

import math

import pytest
import torch

import pirope
from reference import attention_reference, rope_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tables(rotary_dim, n):
    inv_freq, _ = pirope.rope_frequencies(rotary_dim, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, n)
    return cos.cuda(), sin.cuda()


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen", [1, 7, 129, 1000])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_forward_matches_float64_reference(dtype, head_dim, causal, seqlen, heads):
    hq, hk = heads
    q = torch.randn(2, seqlen, hq, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, seqlen, hk, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(2, seqlen, hk, head_dim, device="cuda", dtype=dtype)
    cos, sin = tables(head_dim, seqlen)
    scale = head_dim ** -0.5
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, scale, False)
    ref = attention_reference(q, k, v, cos, sin, causal=causal)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-2
    # lse: log-sum-exp of the scaled scores of the rotated q, k
    qr, kr = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    kr = kr.repeat_interleave(hq // hk, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", qr, kr) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(seqlen, seqlen, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(lse.double().cpu(), scores.logsumexp(-1), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_layouts_and_positions(interleaved):
    q = torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = tables(64, 4096)  # 64 of 128 features rotate
    pos = torch.randint(0, 4096, (2, 300), device="cuda")
    out, _ = torch.ops.pirope.rope_attention(q, k, v, cos, sin, pos, True, 0.1, interleaved)
    ref = attention_reference(q, k, v, cos, sin, pos, causal=True, softmax_scale=0.1, interleaved=interleaved)
    assert rel_err(out, ref) < 1e-2


def test_out_of_range_position_poisons_with_nan():
    q, k, v = (torch.randn(1, 70, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    cos, sin = tables(64, 70)
    pos = torch.arange(70, device="cuda")
    pos[65] = 1000
    out, _ = torch.ops.pirope.rope_attention(q, k, v, cos, sin, pos, True, 0.125, False)
    assert torch.isnan(out[0, 65]).all()  # the bad query row, and every row that sees key 65
    assert torch.isnan(out[0, 66:]).all()
    assert not torch.isnan(out[0, :65]).any()


def test_wrapper_uses_the_kernel_when_enabled(monkeypatch):
    q, k, v = (torch.randn(2, 200, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cos, sin = tables(128, 200)
    fallback = pirope.rope_attention(q, k, v, cos, sin)
    monkeypatch.setenv("PIROPE_CUDA_ATTENTION", "1")
    with torch.no_grad():
        fused = pirope.rope_attention(q, k, v, cos, sin)
    torch.testing.assert_close(fused.float(), fallback.float(), atol=2e-2, rtol=2e-2)
    # with gradients the (differentiable) fallback is used until the backward kernel lands
    qg = q.clone().requires_grad_()
    pirope.rope_attention(qg, k, v, cos, sin).float().sum().backward()
    assert qg.grad is not None
