"""rope_attention at the paper's longest window: LLaMA 2k -> 32k by Position Interpolation
(factor 16), 32768 tokens, head dim 128, GQA, forward and backward on CPU.

A float64 reference of the whole 32768 x 32768 score matrix would be 8 GiB a head, so the
check is exact on sampled query rows instead: the output of a row depends on that row alone,
and with an upstream gradient that is zero except on the sampled rows, dq, dk and dv depend
on those rows alone too (every other row's dS = P * (dP - D) is zero). So the reference
computes R rows x 32768 keys in float64 and still checks every element of dk and dv, and
that dq is exactly zero on the rows without gradient."""

import pytest
import torch

import pirope
from conftest import CUDA_SKIP_REASON, cuda_ready
from reference import cos_sin_table, rope_reference

SEQLEN, HEADS_Q, HEADS_KV, HEAD_DIM, FACTOR = 32768, 2, 1, 128, 16.0
# first rows, rows around tile edges, far rows, the last row
ROWS = [0, 1, 63, 64, 65, 1000, 4095, 4096, 16383, 20000, 32766, 32767]
# max |error| relative to the reference's largest magnitude: float32 sums over 32k keys,
# bfloat16 rounds rotated q, k and the probabilities once (as FlashAttention does)
REL = {torch.float32: 5e-5, torch.bfloat16: 2e-2}
pytestmark = pytest.mark.slow  # ~35 s a case on 2 cores (tests/compat.sh leaves them out)


def pi_tables():
    """float32 tables of pirope (the op's input) and float64 ones computed here."""
    inv_freq, _ = pirope.rope_frequencies(HEAD_DIM, scaling={"rope_type": "linear", "factor": FACTOR})
    cos, sin = pirope.rope_cos_sin(inv_freq, SEQLEN)
    exact = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM) / FACTOR
    return (cos, sin), cos_sin_table(exact, SEQLEN)


def sampled_reference(q, k, v, grad_rows, cos64, sin64):
    """float64 output of the sampled rows and dq (sampled rows), dk, dv (all rows) for an
    upstream gradient grad_rows on the sampled rows only, causal, scale head_dim ** -0.5."""
    rows = torch.tensor(ROWS)
    scale = HEAD_DIM ** -0.5
    qr = rope_reference(q[:, rows], cos64, sin64, rows)[0]  # (R, Hq, D)
    kr = rope_reference(k, cos64, sin64)[0]  # (S, Hkv, D)
    v64 = v[0].double().cpu()
    do = grad_rows.double().cpu()
    visible = torch.arange(SEQLEN)[None, :] <= rows[:, None]  # (R, S)
    out, dqr = torch.zeros_like(qr), torch.zeros_like(qr)
    dkr, dv = torch.zeros_like(kr), torch.zeros_like(v64)
    group = HEADS_Q // HEADS_KV
    for h in range(HEADS_Q):
        g = h // group
        p = (qr[:, h] @ kr[:, g].T * scale).masked_fill(~visible, float("-inf")).softmax(-1)
        out[:, h] = p @ v64[:, g]
        ds = p * (do[:, h] @ v64[:, g].T - (do[:, h] * out[:, h]).sum(-1, keepdim=True))
        dqr[:, h] = ds @ kr[:, g] * scale
        dkr[:, g] += ds.T @ qr[:, h] * scale
        dv[:, g] += p.T @ do[:, h]
    dq = rope_reference(dqr[None], cos64, sin64, rows, conjugate=True)[0]
    dk = rope_reference(dkr[None], cos64, sin64, conjugate=True)[0]
    return out, dq, dk, dv


def assert_close(actual, ref, dtype, what):
    err = (actual.double().cpu() - ref).abs().max().item()
    bound = REL[dtype] * ref.abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({dtype})"


# CUDA: the default path (pirope rope + SDPA) in both dtypes, and pirope's fused kernels
# (deterministic=True takes them for bfloat16, head dim 128)
CASES = [("cpu", torch.float32, None), ("cpu", torch.bfloat16, None)] + [
    pytest.param("cuda", dtype, det, marks=pytest.mark.skipif(not cuda_ready(), reason=CUDA_SKIP_REASON))
    for dtype, det in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, True))]


@pytest.mark.parametrize("device, dtype, deterministic", CASES)
def test_pi_to_32k_forward_and_backward_match_float64_on_sampled_rows(device, dtype, deterministic):
    g = torch.Generator().manual_seed(7)
    (cos, sin), (cos64, sin64) = pi_tables()
    # q scaled so that each row attends to a few keys, as trained models do, rather than
    # averaging 32k random values into noise
    q = 3.0 * torch.randn(1, SEQLEN, HEADS_Q, HEAD_DIM, generator=g)
    k, v = (torch.randn(1, SEQLEN, HEADS_KV, HEAD_DIM, generator=g) for _ in range(2))
    grad_rows = torch.randn(len(ROWS), HEADS_Q, HEAD_DIM, generator=g).to(dtype)
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
    grad = torch.zeros(1, SEQLEN, HEADS_Q, HEAD_DIM, dtype=dtype, device=device)
    grad[0, ROWS] = grad_rows.to(device)

    out = pirope.rope_attention(q, k, v, cos.to(device), sin.to(device), deterministic=deterministic)
    out.backward(grad)

    ref_out, ref_dq, ref_dk, ref_dv = sampled_reference(q.detach(), k.detach(), v.detach(), grad_rows, cos64, sin64)
    assert_close(out.detach()[0, ROWS], ref_out, dtype, "out")
    assert_close(q.grad[0, ROWS], ref_dq, dtype, "dq")
    assert_close(k.grad[0], ref_dk, dtype, "dk")
    assert_close(v.grad[0], ref_dv, dtype, "dv")
    others = torch.ones(SEQLEN, dtype=torch.bool, device=device)
    others[ROWS] = False
    assert torch.count_nonzero(q.grad[0, others]) == 0  # no gradient in, none out
    assert out.isfinite().all()
