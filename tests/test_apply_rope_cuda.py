"""CUDA-only promises of the rotary ops (the shared tests also run on CUDA through the
`device` fixture). Skipped cleanly without a GPU."""

import pytest
import torch

import pirope
from conftest import CUDA_SKIP_REASON, cuda_ready
from reference import rope_reference, tolerance

pytestmark = pytest.mark.skipif(not cuda_ready(), reason=CUDA_SKIP_REASON)


def tables(rotary_dim, n):
    inv_freq, _ = pirope.rope_frequencies(rotary_dim, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, n)
    return cos.cuda(), sin.cuda()


def test_out_of_range_positions_give_nan_rows_not_reads():
    cos, sin = tables(64, 16)
    x = torch.randn(2, 4, 3, 64, device="cuda")
    pos = torch.tensor([[0, 1, 99, 3], [-5, 1, 2, 3]], device="cuda")
    out = pirope.apply_rope(x, cos, sin, pos)
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[0, 2] = bad[1, 0] = True
    assert torch.isnan(out[bad.cuda()]).all()
    good = ~bad.cuda()
    ref = rope_reference(x, cos, sin, pos.clamp(0, 15))
    torch.testing.assert_close(out[good].double().cpu(), ref[good.cpu()], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("head_dim,rotary", [(128, 128), (128, 64), (80, 40), (66, 20)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned base pointer -> scalar path
def test_vector_and_scalar_paths(dtype, head_dim, rotary, interleaved, offset):
    cos, sin = tables(rotary, 64)
    buf = torch.randn(2 * 33 * 5 * head_dim + offset, device="cuda", dtype=dtype)
    x = buf[offset:].view(2, 33, 5, head_dim)
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    out.copy_(pirope.apply_rope(x, cos, sin, interleaved=interleaved))
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double().cpu(), rope_reference(x, cos, sin, interleaved=interleaved),
                               **tolerance(dtype))


def test_large_llama_shapes_match_cpu():
    cos, sin = tables(128, 8192)
    q = torch.randn(2, 8192, 32, 128, dtype=torch.bfloat16)
    k = torch.randn(2, 8192, 8, 128, dtype=torch.bfloat16)
    gq, gk = pirope.apply_rope_qk(q.cuda(), k.cuda(), cos, sin)
    cq, ck = pirope.apply_rope_qk(q, k, cos.cpu(), sin.cpu())
    # same float32 math on both devices: at most one bfloat16 rounding step apart
    torch.testing.assert_close(gq.cpu(), cq, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gk.cpu(), ck, atol=1e-2, rtol=1e-2)


def test_current_stream_and_other_device_tensors():
    cos, sin = tables(64, 32)
    x = torch.randn(1, 32, 4, 64, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = pirope.apply_rope(x, cos, sin)
    s.synchronize()
    torch.testing.assert_close(out.double().cpu(), rope_reference(x, cos, sin), atol=2e-6, rtol=2e-6)
    with pytest.raises(RuntimeError, match="cos must be on cuda"):
        pirope.apply_rope(x, cos.cpu(), sin.cpu())
