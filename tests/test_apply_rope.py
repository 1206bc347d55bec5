"""apply_rope / apply_rope_qk against the float64 reference (tests/reference.py)."""

import pytest
import torch

import pirope
from reference import cos_sin_table, rope_reference, tolerance

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def tables(rotary_dim, positions, device, factor=1.0, base=10000.0):
    inv_freq, _ = pirope.rope_frequencies(
        rotary_dim, base=base, scaling=None if factor == 1.0 else {"rope_type": "linear", "factor": factor})
    cos, sin = pirope.rope_cos_sin(inv_freq, positions)
    return cos.to(device), sin.to(device)


def check(out, ref):
    torch.testing.assert_close(out.double().cpu(), ref, **tolerance(out.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_matches_reference_every_dtype_and_layout(device, dtype, interleaved):
    x = torch.randn(2, 37, 4, 64, device=device, dtype=dtype)
    cos, sin = tables(64, 64, device, factor=4.0)
    out = pirope.apply_rope(x, cos, sin, interleaved=interleaved)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    check(out, rope_reference(x, cos, sin, interleaved=interleaved))


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("partial", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_and_head_dims(device, head_dim, partial, interleaved):
    rotary = int(head_dim * partial)
    x = torch.randn(1, 9, 3, head_dim, device=device)
    cos, sin = tables(rotary, 16, device)
    out = pirope.apply_rope(x, cos, sin, interleaved=interleaved)
    check(out, rope_reference(x, cos, sin, interleaved=interleaved))
    # the features past rotary_dim pass through bit for bit, in every op and in place
    assert torch.equal(out[..., rotary:], x[..., rotary:])
    k = torch.randn(1, 9, 1, head_dim, device=device)
    oq, ok = pirope.apply_rope_qk(x, k, cos, sin, interleaved=interleaved)
    check(ok, rope_reference(k, cos, sin, interleaved=interleaved))
    assert torch.equal(oq[..., rotary:], x[..., rotary:]) and torch.equal(ok[..., rotary:], k[..., rotary:])
    q2, k2 = x.clone(), k.clone()
    pirope.apply_rope_qk(q2, k2, cos, sin, interleaved=interleaved, inplace=True)
    assert torch.equal(q2[..., rotary:], x[..., rotary:]) and torch.equal(k2[..., rotary:], k[..., rotary:])


@pytest.mark.parametrize("hq,hk", [(32, 8), (8, 1), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_gqa_head_counts(device, hq, hk, dtype):
    q = torch.randn(2, 33, hq, 128, device=device, dtype=dtype)
    k = torch.randn(2, 33, hk, 128, device=device, dtype=dtype)
    cos, sin = tables(128, 40, device, factor=2.0)
    oq, ok = pirope.apply_rope_qk(q, k, cos, sin)
    check(oq, rope_reference(q, cos, sin))
    check(ok, rope_reference(k, cos, sin))


@pytest.mark.parametrize("form", ["shared", "batched", "broadcast_batch", "int32", "shared_int32", "strided"])
def test_position_ids_forms(device, form):
    b, s = 3, 17
    x = torch.randn(b, s, 2, 32, device=device)
    cos, sin = tables(32, 100, device)
    if form == "shared":
        pos = torch.randperm(100)[:s]
    elif form == "batched":
        pos = torch.randint(0, 100, (b, s))
    elif form == "broadcast_batch":
        pos = torch.randint(0, 100, (1, s))
    elif form == "int32":
        pos = torch.randint(0, 100, (b, s), dtype=torch.int32)
    elif form == "shared_int32":
        pos = torch.randperm(100)[:s].to(torch.int32)
    else:  # a non-contiguous view
        pos = torch.randint(0, 100, (s, b)).t()
    pos = pos.to(device)
    out = pirope.apply_rope(x, cos, sin, pos)
    check(out, rope_reference(x, cos, sin, pos))


def test_packed_sequences(device):
    # three sequences of lengths 5, 11, 1 packed into 17 tokens, positions restart
    lengths = [5, 11, 1]
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    q = torch.randn(17, 4, 64, device=device)
    k = torch.randn(17, 2, 64, device=device)
    cos, sin = tables(64, 16, device)
    for ids in (pos, pos.to(torch.int32)):  # int64 or int32
        oq, ok = pirope.apply_rope_qk(q, k, cos, sin, ids)
        check(oq, rope_reference(q, cos, sin, ids))
        check(ok, rope_reference(k, cos, sin, ids))
    # packed without position_ids means positions 0..total-1
    cos, sin = tables(64, 17, device)
    check(pirope.apply_rope(q, cos, sin), rope_reference(q, cos, sin))


@pytest.mark.parametrize("seqlen", [1, 7, 129, 1000])
def test_odd_sequence_lengths(device, seqlen):
    x = torch.randn(2, seqlen, 2, 64, device=device, dtype=torch.bfloat16)
    cos, sin = tables(64, seqlen, device)
    check(pirope.apply_rope(x, cos, sin), rope_reference(x, cos, sin))


def test_transposed_bhsd_view(device):
    # Hugging Face keeps q as (batch, heads, seqlen, dim); a transpose is accepted as is
    q_bhsd = torch.randn(2, 8, 21, 64, device=device)
    k_bhsd = torch.randn(2, 2, 21, 64, device=device)
    q, k = q_bhsd.transpose(1, 2), k_bhsd.transpose(1, 2)
    cos, sin = tables(64, 21, device)
    oq, ok = pirope.apply_rope_qk(q, k, cos, sin)
    check(oq, rope_reference(q, cos, sin))
    check(ok, rope_reference(k, cos, sin))
    # the output keeps the input's memory layout, so transposing back is contiguous
    assert oq.transpose(1, 2).is_contiguous()


def test_strided_views_and_noncontiguous_features(device):
    base = torch.randn(4, 30, 6, 128, device=device)
    x = base[::2, 1::3, ::2]  # steps on every leading dim
    cos, sin = tables(128, 30, device)
    check(pirope.apply_rope(x, cos, sin), rope_reference(x, cos, sin))
    y = torch.randn(2, 5, 64, 3, device=device).transpose(-1, -2)  # feature stride 3
    check(pirope.apply_rope(y, cos[:, :32], sin[:, :32]), rope_reference(y, cos[:, :32], sin[:, :32]))
    z = torch.randn(1, 5, 1, 64, device=device).expand(3, 5, 4, 64)  # stride-0 dims
    check(pirope.apply_rope(z, cos[:, :32], sin[:, :32]), rope_reference(z, cos[:, :32], sin[:, :32]))
    # tables may be views too (e.g. a slice of a larger table)
    big_cos, big_sin = tables(256, 30, device)
    c2, s2 = big_cos[:, ::4], big_sin[:, ::4]
    check(pirope.apply_rope(base, c2, s2), rope_reference(base, c2, s2))


@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_writes_into_inputs(device, interleaved):
    q = torch.randn(2, 12, 4, 80, device=device, dtype=torch.float16)
    k = torch.randn(2, 12, 1, 80, device=device, dtype=torch.float16)
    q0, k0 = q.clone(), k.clone()
    cos, sin = tables(40, 12, device)
    rq, rk = pirope.apply_rope_qk(q, k, cos, sin, interleaved=interleaved, inplace=True)
    assert rq is q and rk is k
    check(q, rope_reference(q0, cos, sin, interleaved=interleaved))
    check(k, rope_reference(k0, cos, sin, interleaved=interleaved))
    x = torch.randn(3, 5, 2, 64, device=device).transpose(1, 2)  # non-contiguous in place
    x0 = x.clone()
    assert pirope.apply_rope(x, cos[:, :16], sin[:, :16], inplace=True) is x
    check(x, rope_reference(x0, cos[:, :16], sin[:, :16]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_float64_tables_accepted(device, dtype):
    # "float32 (float64 accepted)": float64 tables rotate inputs of every dtype, and the
    # result keeps the input's dtype
    x = torch.randn(2, 10, 2, 32, device=device, dtype=dtype)
    k = torch.randn(2, 10, 1, 32, device=device, dtype=dtype)
    inv_freq, _ = pirope.rope_frequencies(32)
    cos, sin = cos_sin_table(inv_freq, 10)
    cos, sin = cos.to(device), sin.to(device)
    out = pirope.apply_rope(x, cos, sin)
    assert out.dtype == dtype
    check(out, rope_reference(x, cos, sin))
    oq, ok = pirope.apply_rope_qk(x, k, cos, sin)
    assert oq.dtype == ok.dtype == dtype
    check(oq, rope_reference(x, cos, sin))
    check(ok, rope_reference(k, cos, sin))


def test_empty_batch_and_seqlen(device):
    cos, sin = tables(64, 8, device)
    for shape in [(0, 5, 2, 64), (2, 0, 2, 64), (0, 2, 64), (2, 3, 0, 64)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        out = pirope.apply_rope(x, cos, sin)
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape


def test_long_positions_stay_accurate(device):
    # positions near 1e6: the table must match float64 math (a float32 angle would be
    # off by ~0.06 rad there)
    inv_freq, _ = pirope.rope_frequencies(128, scaling={"rope_type": "linear", "factor": 16.0})
    pos = torch.arange(1_000_000 - 64, 1_000_000)
    cos, sin = pirope.rope_cos_sin(inv_freq, pos)
    ref_cos, ref_sin = cos_sin_table(inv_freq, pos)
    assert (cos.double() - ref_cos).abs().max() < 1e-6
    assert (sin.double() - ref_sin).abs().max() < 1e-6
    x = torch.randn(1, 64, 2, 128, device=device)
    big_cos, big_sin = pirope.rope_cos_sin(inv_freq, 1_000_000)
    out = pirope.apply_rope(x, big_cos.to(device), big_sin.to(device), pos.to(device))
    ref = rope_reference(x, ref_cos, ref_sin)  # exact float64 table indexed 0..63
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-5, rtol=1e-5)


def test_rope_cos_sin_takes_an_int_or_a_1d_integer_tensor():
    # positions: an int P (0..P-1) or a 1-D int32/int64 tensor (any order, repeats);
    # cos and sin: float32 (len(positions), rotary_dim // 2), times attention_factor,
    # against the float64 reference tables
    inv_freq, _ = pirope.rope_frequencies(64, scaling={"rope_type": "linear", "factor": 4.0})
    cases = [(37, 37), (0, 0), (torch.tensor([5, 0, 3000, 3, 3]), 5),
             (torch.tensor([7, 1, 2**20], dtype=torch.int32), 3), (torch.arange(40)[::3], 14)]
    for freqs in (inv_freq, inv_freq.double()):  # a float64 inv_freq still gives float32 tables
        for positions, n in cases:
            for factor in (1.0, 1.25):
                cos, sin = pirope.rope_cos_sin(freqs, positions, factor)
                ref_cos, ref_sin = cos_sin_table(freqs, positions, factor)
                for got, want in ((cos, ref_cos), (sin, ref_sin)):
                    assert got.dtype == torch.float32 and got.shape == (n, 32)
                    torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=0)


def test_rotation_preserves_norm_and_inverts(device):
    x = torch.randn(2, 50, 4, 128, device=device, dtype=torch.float64)
    cos, sin = tables(128, 50, device)
    y = pirope.apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    back = torch.ops.pirope.apply_rope_backward(y, cos, sin, None, False)
    torch.testing.assert_close(back, x)
