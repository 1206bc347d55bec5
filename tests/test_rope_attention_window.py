"""pirope.rope_attention with window_size=(left, right): sliding-window (local)
attention, flash-attn's convention.

Query row i attends to key j iff (left == -1 or j >= i - left) and (right == -1 or
j <= i + right), and j <= i when causal (with causal=True window_size[1] changes
nothing). i and j are token indices in the sequence (restarting at each sequence of
cu_seqlens), never position_ids, which only choose the rotation.

Outputs, gradients and lse are checked against an independent float64 reference
(band_reference in attention_inputs.py: rope_reference's rotation at each token's
position, then softmax attention under an explicit boolean band mask built from the rule
above), across the
CPU kernels' tiles (64 query rows, 256 key columns, 256-row query chunks), dtypes,
GQA, head dims, partial rotary, interleaved pairs, position_ids forms and packed
sequences; then bitwise properties (wide windows are the plain call, causal ignores
the right window, a row depends on its window only, the backward does not depend on
the thread count), gradcheck, opcheck, torch.compile, torch.func, the unfused CUDA
path (run on CPU), bad input, and CUDA (skipped without a GPU)."""

import importlib
import itertools

import pytest
import torch

import pirope
from attention_inputs import (assert_all_equal, assert_compiled_like_eager, at_thread_counts, band_reference,
                              check_against_reference, cu_tensor, dense_per_sequence, packed_qkv, qkv, run, spans,
                              small_call, tables, unfused_module, unfused_with, use_packed_products, visibility, wid)
from conftest import CUDA_SKIP_REASON, cuda_ready
from reference import ATTENTION_REL, attention_reference
from reference import assert_attention_close as assert_close_to

func = torch.func
WINDOW_ERRORS = (ValueError, TypeError)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- 1. the reference itself ----

@pytest.mark.parametrize("causal", [True, False])
def test_reference_without_window_is_attention_reference(causal):
    q, k, v = qkv(2, 13, 4, 2, 16, dtype=torch.float64)
    cos, sin = tables(12, 20, dtype=torch.float64)
    pos = torch.randint(0, 20, (2, 13))
    g = torch.randn(2, 13, 4, 16, dtype=torch.float64)
    mine = band_reference(q, k, v, cos, sin, pos, causal, (-1, -1), 0.3, True, grad_out=g)
    theirs = attention_reference(q, k, v, cos, sin, pos, causal, 0.3, True, grad_out=g)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-13)
    # a window as wide as the sequence masks nothing either
    wide = band_reference(q, k, v, cos, sin, pos, causal, (12, 12), 0.3, True, grad_out=g)
    for a, b in zip(wide, theirs):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-13)


def test_reference_band_follows_the_rule_entry_by_entry():
    # the vectorised mask against the rule written out per (i, j), and transformers'
    # sliding mask (kv > q - W, kv <= q) for causal windows of W = left + 1
    for s in (1, 6, 11):
        for causal in (True, False):
            for left in (-1, 0, 1, 3, 10, 20):
                for right in (-1, 0, 2, 10, 20):
                    got = visibility(s, causal, (left, right))
                    for i in range(s):
                        for j in range(s):
                            want = ((left == -1 or j >= i - left) and (right == -1 or j <= i + right)
                                    and (not causal or j <= i))
                            assert bool(got[i, j]) == want, (s, causal, left, right, i, j)
                    if causal and left >= 0:
                        w = left + 1
                        i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
                        assert torch.equal(got, (j > i - w) & (j <= i))
    # packed: indices restart at each sequence, and nothing crosses sequences
    vis = visibility([0, 3, 3, 8], True, (1, -1))
    want = torch.zeros(8, 8, dtype=torch.bool)
    for a, b in ((0, 3), (3, 8)):
        want[a:b, a:b] = visibility(b - a, True, (1, -1))
    assert torch.equal(vis, want)


def test_reference_packed_is_dense_per_sequence():
    cu = [0, 5, 5, 17]
    q, k, v = packed_qkv(17, 4, 2, 16, dtype=torch.float64)
    cos, sin = tables(16, 17, dtype=torch.float64)
    for causal, window in ((True, (2, -1)), (False, (3, 1))):
        ref = band_reference(q, k, v, cos, sin, None, causal, window, cu=cu)
        for a, b in spans(cu):
            dense = band_reference(q[None, a:b], k[None, a:b], v[None, a:b], cos, sin, None, causal, window)[0]
            torch.testing.assert_close(ref[a:b], dense, atol=1e-13, rtol=1e-13)


# ---- 2. matches the float64 reference ----

# (seqlen, window) across the 64-row query tiles, 256-key tiles and 256-row query chunks
SEQ_WINDOWS = [
    (1, (0, 0)), (1, (5, 5)), (7, (0, 0)), (7, (1, 1)), (7, (5, -1)), (7, (-1, 2)), (7, (2, 0)),
    (64, (63, 63)), (64, (0, 64)), (65, (64, 0)), (255, (63, 1)), (255, (254, 0)),
    (256, (64, 64)), (256, (1, 255)), (257, (255, 0)), (257, (256, 256)), (257, (0, 1)),
    (300, (200, 5)), (300, (1, -1)), (300, (-1, 1)), (300, (5, 257)),
    (600, (257, 63)), (600, (511, 200)), (600, (64, 511)), (600, (0, 0)), (1100, (255, 256)),
]


@pytest.mark.parametrize("seqlen, window", SEQ_WINDOWS, ids=[f"s{s}-w{wid(w)}" for s, w in SEQ_WINDOWS])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_seqlen_window(seqlen, window, causal):
    q, k, v = qkv(1, seqlen, 2, 1, 32)
    cos, sin = tables(32, seqlen)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [(63, 5), (5, 200)], ids=wid)
def test_matches_reference_every_dtype(dtype, causal, window):
    q, k, v = qkv(2, 300, 4, 2, 64, dtype=dtype)
    cos, sin = tables(64, 300)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal, window", [(True, (256, -1)), (False, (511, 64))], ids=["causal", "full"])
def test_matches_reference_long_sequence(dtype, causal, window):
    q, k, v = qkv(1, 1100, 2, 1, 64, dtype=dtype)
    cos, sin = tables(64, 1100)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window)


@pytest.mark.parametrize("heads", [(4, 1), (4, 2), (8, 8)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_gqa(heads, causal):
    q, k, v = qkv(2, 130, *heads, 32)
    cos, sin = tables(32, 130)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=(40, 17))


@pytest.mark.parametrize("head_dim, rotary_dim", [(16, 16), (64, 64), (64, 32), (128, 128), (24, 16)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_head_dims_partial_rotary_interleaved(head_dim, rotary_dim, interleaved, causal):
    s = 90 if head_dim == 128 else 150
    q, k, v = qkv(1, s, 4, 2, head_dim)
    cos, sin = tables(rotary_dim, s)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=(65, 3), interleaved=interleaved)


@pytest.mark.parametrize("form", ["none", "seq_perm", "batch_seq_random", "one_seq_offset", "int32_batch_seq"])
@pytest.mark.parametrize("causal", [True, False])
def test_mask_follows_indices_not_position_ids(form, causal):
    # Random and per-batch positions: a kernel that built the band from positions
    # instead of token indices would mask other keys than the reference.
    b, s, n = 2, 80, 200
    cos, sin = tables(32, n)
    pos = {
        "none": None,
        "seq_perm": torch.randperm(n)[:s],
        "batch_seq_random": torch.randint(0, n, (b, s)),
        "one_seq_offset": torch.arange(100, 100 + s)[None],
        "int32_batch_seq": torch.stack([torch.randperm(n)[:s], torch.arange(s).flip(0)]).to(torch.int32),
    }[form]
    q, k, v = qkv(b, s, 4, 2, 32)
    check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=(9, 4), interleaved=form == "seq_perm")


def test_explicit_softmax_scale_and_float64_tables():
    q, k, v = qkv(2, 70, 4, 2, 32)
    cos, sin = tables(32, 70, dtype=torch.float64)
    check_against_reference(q, k, v, cos, sin, causal=True, window=(20, -1), scale=0.3)
    check_against_reference(q, k, v, cos, sin, causal=False, window=(3, 30), scale=0.05)


@pytest.mark.parametrize("causal", [True, False])
def test_window_zero_attends_to_own_token_only(causal):
    # window (0, 0): every query sees exactly its own key, so out is v of its kv head
    q, k, v = qkv(2, 300, 4, 2, 32)
    cos, sin = tables(32, 300)
    out = pirope.rope_attention(q, k, v, cos, sin, causal=causal, window_size=(0, 0))
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=2), atol=1e-6, rtol=1e-6)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=(0, 0))


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_or_seqlen(shape):
    q, k, v = qkv(*shape, 4, 2, 32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cos, sin = tables(32, 8)
    out = pirope.rope_attention(q, k, v, cos, sin, window_size=(2, 1))
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    # the unfused (CUDA) path: no block of query rows, one empty call
    out = unfused_module()._sdpa_fallback(q, k, v, cos, sin, None, False, 32 ** -0.5, False, (2, 1))
    assert out.shape == q.shape and out.requires_grad


# ---- 3. wide windows are the plain call, bit for bit ----

@pytest.mark.parametrize("seqlen", [7, 257, 600])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_as_wide_as_sequence_is_plain_call_bitwise(seqlen, causal, dtype):
    q, k, v = qkv(1, seqlen, 4, 2, 64, dtype=dtype)
    cos, sin = tables(64, seqlen)
    g = torch.randn(1, seqlen, 4, 64, dtype=dtype)
    plain = run(q, k, v, cos, sin, g=g, causal=causal)[:4]
    for window in ((seqlen - 1, seqlen - 1), (seqlen, -1), (-1, seqlen), (seqlen + 100, 10 ** 6)):
        assert_all_equal(run(q, k, v, cos, sin, g=g, causal=causal, window_size=window)[:4], plain)


@pytest.mark.parametrize("causal", [True, False])
def test_a_bound_near_or_past_int64_max_is_no_bound(causal):
    # i + right + 1 and j + left + 1 would overflow int64: the kernels compare, never add
    q, k, v = qkv(1, 300, 4, 2, 32)
    cos, sin = tables(32, 300)
    g = torch.randn(1, 300, 4, 32)
    big = 2**63 - 1
    for window, same_as in (((big, big), (-1, -1)), ((big - 1, 5), (-1, 5)), ((2**70, -1), (-1, -1)),
                            ((7, big), (7, -1)), ((2**64, 2**64), (-1, -1))):
        assert_all_equal(run(q, k, v, cos, sin, g=g, causal=causal, window_size=window)[:4],
                         run(q, k, v, cos, sin, g=g, causal=causal, window_size=same_as)[:4])
    # the raw op with INT64_MAX bounds, and the unfused (CUDA) path
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, 32 ** -0.5, False, False, None,
                                               big, big)
    ref_out, ref_lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, 32 ** -0.5, False)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    fallback = unfused_module()._sdpa_fallback
    torch.testing.assert_close(fallback(q, k, v, cos, sin, None, causal, 32 ** -0.5, False, (big, big)),
                               fallback(q, k, v, cos, sin, None, causal, 32 ** -0.5, False, (-1, -1)))


@pytest.mark.parametrize("causal", [True, False])
def test_default_window_is_the_keyword_omitted_bitwise(causal):
    q, k, v = qkv(2, 300, 4, 1, 64)
    cos, sin = tables(64, 300)
    pos = torch.randint(0, 300, (2, 300))
    g = torch.randn(2, 300, 4, 64)
    plain = run(q, k, v, cos, sin, pos, g=g, causal=causal)[:4]
    assert_all_equal(run(q, k, v, cos, sin, pos, g=g, causal=causal, window_size=(-1, -1))[:4], plain)
    assert_all_equal(run(q, k, v, cos, sin, pos, g=g, causal=causal, window_size=[-1, -1])[:4], plain)
    # packed too
    cu = cu_tensor([0, 100, 100, 357, 600])
    qp, kp, vp = (t.reshape(600, *t.shape[2:]) for t in (q, k, v))
    gp = g.reshape(600, 4, 64)
    plain = run(qp, kp, vp, cos, sin, g=gp, causal=causal, cu_seqlens=cu)[:4]
    assert_all_equal(run(qp, kp, vp, cos, sin, g=gp, causal=causal, cu_seqlens=cu, window_size=(-1, -1))[:4],
                     plain)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_window_wider_than_every_sequence_is_plain_call_bitwise(causal):
    cu = cu_tensor([0, 100, 100, 357, 600])  # longest sequence: 257 tokens
    q, k, v = packed_qkv(600, 4, 2, 64)
    cos, sin = tables(64, 600)
    g = torch.randn(600, 4, 64)
    plain = run(q, k, v, cos, sin, g=g, causal=causal, cu_seqlens=cu)[:4]
    for window in ((256, 256), (257, -1), (-1, 300), (600, 600)):
        assert_all_equal(run(q, k, v, cos, sin, g=g, causal=causal, cu_seqlens=cu, window_size=window)[:4], plain)


# ---- 4. causal ignores window_size[1] ----

@pytest.mark.parametrize("left", [0, 5, 63, 256, -1])
@pytest.mark.parametrize("packed", [False, True])
def test_causal_ignores_right_window_bitwise(left, packed):
    kw = dict(causal=True)
    if packed:
        q, k, v = packed_qkv(400, 4, 2, 32)
        kw["cu_seqlens"] = cu_tensor([0, 7, 7, 300, 400])
    else:
        q, k, v = qkv(2, 300, 4, 2, 32)
    cos, sin = tables(32, 400)
    g = torch.randn_like(q)
    base = run(q, k, v, cos, sin, g=g, window_size=(left, 0), **kw)[:4]
    for right in (5, -1, 1000):
        assert_all_equal(run(q, k, v, cos, sin, g=g, window_size=(left, right), **kw)[:4], base)


# ---- 5. a row depends on the keys and values in its window only ----

def window_range(i, n, causal, window):
    """[lo, hi] of the keys visible to query index i of a sequence of n tokens."""
    left, right = window
    lo = 0 if left == -1 else max(0, i - left)
    hi = n - 1 if right == -1 else min(n - 1, i + right)
    if causal:
        hi = min(hi, i)
    return lo, hi


ROW_CASES = [(True, (63, -1)), (True, (0, -1)), (True, (200, 7)), (False, (5, 64)), (False, (256, 0)),
             (False, (0, 257)), (False, (-1, 3)), (False, (70, -1))]


@pytest.mark.parametrize("causal, window", ROW_CASES, ids=[f"{'c' if c else 'f'}-{wid(w)}" for c, w in ROW_CASES])
@pytest.mark.parametrize("packed", [False, True])
def test_row_depends_only_on_its_window(causal, window, packed):
    n = 300
    if packed:  # the row's sequence is the middle one: indices restart there
        cu, start = [0, 90, 90 + n, 90 + n + 50], 90
        q, k, v = packed_qkv(cu[-1], 2, 1, 32)
        kw = dict(cu_seqlens=cu_tensor(cu))
    else:
        start = 0
        q, k, v = (t[0] for t in qkv(1, n, 2, 1, 32))
        kw = {}
    cos, sin = tables(32, 500)

    def out_of(k, v):
        if packed:
            return pirope.rope_attention(q, k, v, cos, sin, causal=causal, window_size=window, **kw)
        return pirope.rope_attention(q[None], k[None], v[None], cos, sin, causal=causal, window_size=window)[0]

    base = out_of(k, v)
    for i in (0, 1, 63, 64, 150, 255, 256, 299):
        lo, hi = window_range(i, n, causal, window)
        outside = torch.ones(k.shape[0], dtype=torch.bool)
        outside[start + lo:start + hi + 1] = False
        k2, v2 = k.clone(), v.clone()
        k2[outside] = torch.randn_like(k2[outside]) * 3
        v2[outside] = torch.randn_like(v2[outside]) * 3
        assert torch.equal(out_of(k2, v2)[start + i], base[start + i]), \
            f"row {i} changed by keys outside [{lo}, {hi}]"
        for j in {lo, hi}:  # each edge of the window is inside it
            k3, v3 = k.clone(), v.clone()
            v3[start + j] += 1.0
            k3[start + j] += 1.0
            assert not torch.equal(out_of(k3, v3)[start + i], base[start + i]), \
                f"row {i} not changed by key {j} (its window is [{lo}, {hi}])"


# ---- 6. lse of the raw op ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal, window", [(True, (5, -1)), (True, (64, 64)), (False, (0, 0)), (False, (3, 200)),
                                            (False, (257, -1))],
                         ids=["c5", "c64", "f0_0", "f3_200", "f257"])
def test_raw_op_lse_is_logsumexp_over_visible_keys(dtype, causal, window):
    q, k, v = qkv(2, 300, 4, 2, 32, dtype=dtype)
    cos, sin = tables(32, 300)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, 0.2, False, False, None,
                                               window_left=window[0], window_right=window[1])
    assert lse.shape == (2, 4, 300) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_out, ref_lse = band_reference(q, k, v, cos, sin, None, causal, window, 0.2, with_lse=True)
    assert_close_to(out, ref_out, dtype, "out")
    assert_close_to(lse, ref_lse, dtype, "lse")
    # packed: (nheads_q, total)
    cu = [0, 5, 5, 200, 300]
    qp, kp, vp = (t[0] for t in (q, k, v))
    out, lse = torch.ops.pirope.rope_attention(qp, kp, vp, cos, sin, None, causal, 0.2, False, False,
                                               cu_tensor(cu), window_left=window[0], window_right=window[1])
    assert lse.shape == (4, 300)
    ref_out, ref_lse = band_reference(qp, kp, vp, cos, sin, None, causal, window, 0.2, cu=cu, with_lse=True)
    assert_close_to(out, ref_out, dtype, "packed out")
    assert_close_to(lse, ref_lse, dtype, "packed lse")


def test_raw_backward_op_matches_reference():
    q, k, v = qkv(1, 300, 4, 1, 32)
    cos, sin = tables(32, 300)
    for cu in (None, [0, 120, 300]):
        args = (q, k, v) if cu is None else tuple(t[0] for t in (q, k, v))
        cut = None if cu is None else cu_tensor(cu)
        kw = dict(window_left=70, window_right=9)
        out, lse = torch.ops.pirope.rope_attention(*args, cos, sin, None, False, 0.2, False, False, cut, **kw)
        g = torch.randn_like(out)
        dq, dk, dv = torch.ops.pirope.rope_attention_backward(g, *args, out, lse, cos, sin, None, False, 0.2,
                                                              False, False, cut, **kw)
        ref = band_reference(*args, cos, sin, None, False, (70, 9), 0.2, grad_out=g, cu=cu)
        for what, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
            assert_close_to(got, want, torch.float32, what)


# ---- 7. packed sequences ----

CU_WINDOWS = [
    ([0, 5, 5, 17, 40], (3, 2)),  # zero-length sequence
    ([0, 5, 5, 17, 40], (30, 30)),  # every sequence shorter than the window
    ([0, 300, 301, 600], (64, 257)),  # across query and key tiles, a length-1 sequence
    ([0, 300, 301, 600], (255, 0)),
    ([0, 1, 2, 3, 70], (0, 0)),
    ([0, 70, 71, 330], (5, 63)),
    ([0, 0, 256, 256, 513, 513], (256, 1)),  # zero-length first and last
    ([0, 40, 640], (200, -1)),
]


@pytest.mark.parametrize("cu, window", CU_WINDOWS, ids=[f"{'-'.join(map(str, c))}-w{wid(w)}" for c, w in CU_WINDOWS])
@pytest.mark.parametrize("causal", [True, False])
def test_cu_seqlens_matches_reference(cu, window, causal):
    q, k, v = packed_qkv(cu[-1], 4, 2, 32)
    cos, sin = tables(32, cu[-1])
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window, cu=cu)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_cu_seqlens_matches_reference_every_dtype(dtype, causal):
    cu = [0, 9, 9, 80, 330]
    q, k, v = packed_qkv(cu[-1], 4, 1, 64, dtype=dtype)
    cos, sin = tables(64, 330)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=(63, 17), cu=cu)


@pytest.mark.parametrize("form", ["flat_random", "one_total_random", "flat_global_offset"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_cu_seqlens_position_forms(form, interleaved):
    cu = [0, 5, 5, 17, 40, 90]
    total = cu[-1]
    cos, sin = tables(16, 256)
    pos = {
        "flat_random": torch.randint(0, 256, (total,)),
        "one_total_random": torch.randint(0, 256, (1, total)),
        "flat_global_offset": torch.arange(total) + 100,  # not restarting: the mask still does
    }[form]
    q, k, v = packed_qkv(total, 4, 2, 32)
    for causal in (True, False):
        check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=(4, 6), interleaved=interleaved,
                                cu=cu)


@pytest.mark.parametrize("cu", [[0, 5, 5, 17, 40], [0, 300, 301, 600], [0, 64, 128, 129, 385], [0, 0, 3, 3]],
                         ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("causal, window", [(True, (10, -1)), (True, (256, 3)), (False, (2, 70)),
                                            (False, (300, 300))], ids=["c10", "c256", "f2_70", "f300"])
def test_cu_seqlens_equals_dense_call_per_sequence(cu, causal, window):
    total = cu[-1]
    q, k, v = packed_qkv(total, 4, 2, 64)
    cos, sin = tables(64, 700)
    pos = torch.randint(0, 700, (total,))
    kw = dict(causal=causal, softmax_scale=0.11, window_size=window)
    out, gq, gk, gv, g = run(q, k, v, cos, sin, pos, cu_seqlens=cu_tensor(cu), **kw)
    dense = dense_per_sequence(q, k, v, cos, sin, cu, pos, g, **kw)
    for what, got, want in zip(("out", "dq", "dk", "dv"), (out, gq, gk, gv), dense):
        tol = dict(atol=1e-6, rtol=1e-6) if what == "out" else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


# ---- 8. gradcheck ----

@pytest.mark.parametrize("causal, window", [(True, (2, -1)), (True, (0, 3)), (False, (1, 2)), (False, (-1, 0)),
                                            (False, (3, -1))], ids=["c2", "c0", "f1_2", "f_1_0", "f3"])
def test_gradcheck_float64(causal, window):
    q = torch.randn(2, 8, 2, 8, dtype=torch.float64, requires_grad=True)  # GQA: 2 query heads per kv head
    k, v = (torch.randn(2, 8, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cos, sin = tables(6, 12, dtype=torch.float64)  # partial rotary: 6 of 8
    pos = torch.tensor([[8, 0, 3, 2, 1, 5, 4, 11], [0, 1, 2, 3, 4, 5, 6, 7]])
    fn = lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, pos, causal=causal,  # noqa: E731
                                               window_size=window)
    assert torch.autograd.gradcheck(fn, (q, k, v))
    # packed
    cu = cu_tensor([0, 4, 4, 11])
    qp = torch.randn(11, 2, 8, dtype=torch.float64, requires_grad=True)
    kp, vp = (torch.randn(11, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fn = lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, causal=causal,  # noqa: E731
                                               window_size=window, cu_seqlens=cu)
    assert torch.autograd.gradcheck(fn, (qp, kp, vp))


# ---- 9. opcheck ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_with_windows(dtype, packed):
    cos, sin = tables(32, 16, dtype=dtype)
    if packed:
        make = lambda: packed_qkv(12, 4, 2, 48, dtype=dtype)  # noqa: E731
        cu, pos = cu_tensor([0, 3, 3, 10, 12], dtype=torch.int64), torch.randint(0, 16, (12,))
    else:
        make = lambda: qkv(2, 7, 4, 2, 48, dtype=dtype)  # noqa: E731
        cu, pos = None, torch.randint(0, 16, (2, 7))
    for rg in (False, True):
        q, k, v = (t.requires_grad_(rg) for t in make())
        for causal, (left, right) in ((True, (2, -1)), (False, (1, 3)), (False, (0, 0)), (True, (-1, 4))):
            torch.library.opcheck(torch.ops.pirope.rope_attention.default,
                                  (q, k, v, cos, sin, pos, causal, 0.2, False, False, cu),
                                  dict(window_left=left, window_right=right))
    q, k, v = make()
    kw = dict(window_left=2, window_right=1)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, pos, False, 0.2, True, False, cu, **kw)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pirope.rope_attention_backward.default,
                          (g, q, k, v, out, lse, cos, sin, pos, False, 0.2, True, False, cu), kw)


# ---- 10. torch.compile ----

def test_torch_compile_fullgraph_forward_and_backward():
    cos, sin = tables(32, 64)
    proj = torch.nn.Linear(32, 32)

    def dense(q, k, v):
        return pirope.rope_attention(proj(q), k, v, cos, sin, causal=True, window_size=(5, 0)).square().sum()

    def packed(q, k, v, cu):
        return pirope.rope_attention(proj(q), k, v, cos, sin, causal=False, window_size=(3, 7),
                                     cu_seqlens=cu).square().sum()

    cases = [(dense, qkv(2, 40, 4, 2, 32), ()),
             (packed, packed_qkv(40, 4, 2, 32), (cu_tensor([0, 5, 5, 17, 40]),)),
             (packed, packed_qkv(40, 4, 2, 32), (cu_tensor([0, 20, 21, 40]),))]
    assert_compiled_like_eager(cases)


# ---- 11. torch.func ----

def test_vmap_matches_loop():
    cos, sin = tables(16, 40, dtype=torch.float64)
    qs = torch.randn(3, 2, 20, 4, 16, dtype=torch.float64)
    ks, vs = (torch.randn(3, 2, 20, 2, 16, dtype=torch.float64) for _ in range(2))
    for causal, window in ((True, (3, -1)), (False, (2, 5))):
        kw = dict(causal=causal, window_size=window)
        out = func.vmap(lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, **kw))(qs, ks, vs)
        loop = torch.stack([pirope.rope_attention(q, k, v, cos, sin, **kw) for q, k, v in zip(qs, ks, vs)])
        torch.testing.assert_close(out, loop, atol=1e-12, rtol=1e-12)
        ref = torch.stack([band_reference(q, k, v, cos, sin, None, causal, window) for q, k, v in zip(qs, ks, vs)])
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        # k, v shared by the vmapped queries, vmapped over a non-leading dim
        out = func.vmap(lambda q: pirope.rope_attention(q, ks[0], vs[0], cos, sin, **kw), in_dims=2)(
            qs.movedim(0, 2))
        loop = torch.stack([pirope.rope_attention(q, ks[0], vs[0], cos, sin, **kw) for q in qs])
        torch.testing.assert_close(out, loop, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("packed", [False, True])
def test_func_grad_matches_eager(packed):
    cos, sin = tables(16, 40, dtype=torch.float64)
    if packed:
        q, k, v = packed_qkv(30, 4, 2, 16, dtype=torch.float64)
        extra = dict(cu_seqlens=cu_tensor([0, 11, 11, 30]))
    else:
        q, k, v = qkv(2, 30, 4, 2, 16, dtype=torch.float64)
        extra = {}
    g = torch.randn_like(q)
    for causal, window in ((True, (4, 2)), (False, (0, 6))):
        kw = dict(causal=causal, window_size=window, **extra)
        loss = lambda q, k, v: (pirope.rope_attention(q, k, v, cos, sin, **kw) * g).sum()  # noqa: E731
        grads = func.grad(loss, argnums=(0, 1, 2))(q, k, v)
        _, gq, gk, gv, _ = run(q, k, v, cos, sin, g=g, **kw)
        for a, b in zip(grads, (gq, gk, gv)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_per_sample_gradients_vmap_of_grad():
    cos, sin = tables(16, 40, dtype=torch.float64)
    qs, gs = (torch.randn(4, 1, 17, 4, 16, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 17, 2, 16, dtype=torch.float64) for _ in range(2))
    loss = lambda q, k, v, g: (pirope.rope_attention(q, k, v, cos, sin, causal=False,  # noqa: E731
                                                     window_size=(3, 1)) * g).sum()
    dq, dk, dv = func.vmap(func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None, 0))(qs, k, v, gs)
    for i in range(4):
        _, rq, rk, rv = band_reference(qs[i], k, v, cos, sin, None, False, (3, 1), grad_out=gs[i])
        for a, b in zip((dq[i], dk[i], dv[i]), (rq, rk, rv)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# ---- 12. the CPU backward does not depend on the thread count ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal, window", [(True, (300, -1)), (False, (255, 256)), (True, (64, 0))],
                         ids=["c300", "f255_256", "c64"])
def test_backward_bit_identical_over_thread_counts_mqa(monkeypatch, dtype, causal, window):
    # batch 1, one kv head: the split two-pass backward with 2+ threads, one pass with 1
    # (the AVX512 products or their portable version: BLAS ones never split)
    use_packed_products(monkeypatch, dtype)
    q, k, v = qkv(1, 1100, 2, 1, 32, dtype=dtype)  # (small heads: quick under ASan too)
    cos, sin = tables(32, 1100)
    g = torch.randn(1, 1100, 2, 32, dtype=dtype)
    runs = at_thread_counts((1, 2, 3, 4), lambda: run(q, k, v, cos, sin, g=g, causal=causal, window_size=window)[:4])
    for n, other in zip((2, 3, 4), runs[1:]):
        for what, a, b in zip(("out", "dq", "dk", "dv"), runs[0], other):
            assert torch.equal(a, b), f"{what}: 1 thread vs {n} threads"
    ref = band_reference(q, k, v, cos, sin, None, causal, window, grad_out=g)
    for what, got, want in zip(("out", "dq", "dk", "dv"), runs[0], ref):
        assert_close_to(got, want, dtype, what)


@pytest.mark.parametrize("packed", [False, True])
def test_backward_bit_identical_over_thread_counts_gqa(packed):
    # batch 2 with 2 kv heads (one pass with few threads), and packed sequences
    if packed:
        q, k, v = packed_qkv(700, 4, 1, 64)
        extra = dict(cu_seqlens=cu_tensor([0, 300, 301, 700]))
    else:
        q, k, v = qkv(2, 350, 4, 2, 64)
        extra = {}
    cos, sin = tables(64, 700)
    g = torch.randn_like(q)
    runs = at_thread_counts((1, 2, 3, 8), lambda: run(q, k, v, cos, sin, g=g, causal=False, window_size=(100, 63),
                                                      deterministic=True, **extra)[:4])
    for other in runs[1:]:
        assert_all_equal(runs[0], other)
    cu = extra["cu_seqlens"].tolist() if packed else None
    ref = band_reference(q, k, v, cos, sin, None, False, (100, 63), grad_out=g, cu=cu)
    for what, got, want in zip(("out", "dq", "dk", "dv"), runs[0], ref):
        assert_close_to(got, want, torch.float32, what)


# ---- 13. the unfused (CUDA) paths, on CPU ----

DENSE_UNFUSED = [
    ((4, 2), 64, 64, True, (5, -1), False, False),
    ((4, 2), 64, 64, True, (5, 3), True, False),  # causal: the right window as given, ignored
    ((4, 1), 32, 32, False, (7, 2), False, True),
    ((2, 2), 24, 16, False, (-1, 0), True, True),
    ((8, 2), 64, 32, False, (0, 0), False, False),
    ((4, 4), 32, 32, True, (64, 64), False, False),
]


@pytest.fixture(params=[None, 16], ids=["one_block", "blocks_of_16"])
def band_rows(request, monkeypatch):
    """The unfused path's query rows per SDPA call: its default (1024: one block here), or 16
    (many blocks, their edges inside every window)."""
    if request.param is not None:
        monkeypatch.setattr(unfused_module(), "_BAND_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("heads, head_dim, rotary_dim, causal, window, positions, interleaved", DENSE_UNFUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unfused_dense_matches_reference(heads, head_dim, rotary_dim, causal, window, positions, interleaved,
                                         dtype, band_rows):
    q, k, v = qkv(2, 130, *heads, head_dim, dtype=dtype)
    cos, sin = tables(rotary_dim, 300)
    pos = torch.randint(0, 300, (2, 130)) if positions else None
    check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=window, interleaved=interleaved,
                            fn="sdpa")


PACKED_UNFUSED = [
    ([0, 5, 5, 17, 40], (4, 2), True, (3, -1), False),
    ([0, 5, 5, 17, 40], (4, 1), False, (2, 3), True),
    ([0, 70, 71, 200], (2, 2), True, (10, 8), True),  # causal: right ignored
    ([0, 0, 9, 30, 30], (4, 2), False, (-1, 1), False),
    ([0, 50], (4, 4), False, (60, 60), False),
]


@pytest.mark.parametrize("cu, heads, causal, window, positions", PACKED_UNFUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unfused_packed_matches_reference(cu, heads, causal, window, positions, dtype, band_rows):
    total = cu[-1]
    q, k, v = packed_qkv(total, *heads, 32, dtype=dtype)
    cos, sin = tables(32, 300)
    pos = torch.randint(0, 300, (total,)) if positions else None
    check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=window, cu=cu, fn="varlen")


def test_unfused_paths_equal_fused_on_cpu():
    cos, sin = tables(64, 300)
    for causal, window in ((True, (40, -1)), (False, (9, 70))):
        q, k, v = qkv(2, 300, 4, 2, 64)
        g = torch.randn_like(q)
        fused = run(q, k, v, cos, sin, g=g, causal=causal, window_size=window)[:4]
        plain = run(q, k, v, cos, sin, g=g, fn="sdpa", causal=causal, window_size=window)[:4]
        for what, a, b in zip(("out", "dq", "dk", "dv"), fused, plain):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"dense {what}: {m}")
        cu = cu_tensor([0, 7, 7, 299, 300])
        qp, kp, vp, gp = (t[0] for t in (q, k, v, g))
        fused = run(qp, kp, vp, cos, sin, g=gp, causal=causal, window_size=window, cu_seqlens=cu)[:4]
        plain = run(qp, kp, vp, cos, sin, g=gp, fn="varlen", causal=causal, window_size=window, cu_seqlens=cu)[:4]
        for what, a, b in zip(("out", "dq", "dk", "dv"), fused, plain):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"packed {what}: {m}")


@pytest.mark.parametrize("options", [{}, dict(softcap=2.0)], ids=["sdpa", "blocks"])
@pytest.mark.parametrize("window, min_rows, budget, want_rows, sdpa_rows", [
    ((9, 0), None, None, 256, 256),  # _MIN_BAND_ROWS rows: one block
    ((9, 0), 16, None, 16, 16),  # not fewer than _MIN_BAND_ROWS
    ((40, 0), 16, None, 41, 41),  # about the band's width (41 keys per query row)
    # the score budget (the block attention's only), for blocks of up to 41 + 41 - 1 keys
    ((40, 0), 16, 2 * 4 * 20 * (41 + 41 - 1), 20, 41),
    ((200, 0), 16, None, 130, 130),  # a band as wide as the sequence
])
def test_unfused_blocks_follow_the_band_width(monkeypatch, options, window, min_rows, budget, want_rows, sdpa_rows):
    # a block of r rows computes r x (r + width - 1) scores: the unfused paths take blocks of
    # about the band's width (GPT-OSS's window of 128 took blocks of 1024 rows: 9x the
    # scores seen), at least _MIN_BAND_ROWS rows, at most _BAND_ROWS; the block attention's
    # also within _BLOCK_SCORES (batch x heads x rows x the keys of a block)
    _, band = unfused_with(monkeypatch, _MIN_BAND_ROWS=min_rows, _BLOCK_SCORES=budget)
    rows, blocks = set(), band.query_blocks

    def spy(S, r, left, right):
        rows.add(r)
        return blocks(S, r, left, right)

    monkeypatch.setattr(band, "query_blocks", spy)
    q, k, v = qkv(2, 130, 4, 2, 32)
    cos, sin = tables(32, 130)
    check_against_reference(q, k, v, cos, sin, window=window, fn="sdpa", **options)
    assert rows == {want_rows if options else sdpa_rows}


def test_unfused_block_masks_are_the_band():
    # the block attention (capped, sunk or deterministic calls) masks each block's scores
    # only in the columns at the band's edges, every row of the block seeing the others,
    # with masks shared by the blocks of the same geometry (BandMasks, one per call; the
    # windowed SDPA path takes its masks whole): over every block of short sequences, -inf
    # exactly where the band rule hides the key
    band = importlib.import_module("pirope._band_attention")
    for S, rows, left, right in itertools.product((1, 5, 17), (1, 3, 4, 16), (-1, 0, 1, 3, 20), (-1, 0, 2, 20)):
        masks = band.BandMasks(left, right, "cpu")
        for q0, q1, k0, k1 in band.query_blocks(S, rows, left, right):
            got = band._mask_unseen_(torch.zeros(2, q1 - q0, k1 - k0), q0, q1, k0, k1, masks)
            i, j = torch.arange(q0, q1)[:, None], torch.arange(k0, k1)[None, :]
            seen = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
            where = (S, rows, left, right, q0)
            assert torch.equal(got == float("-inf"), ~seen.expand(2, -1, -1)), where
            assert (got[:, seen.expand(1, -1, -1)[0]] == 0).all(), where
            assert torch.equal(masks(q0, q1, k0, k1), seen), where


# ---- 14. bad input ----

BAD_WINDOWS = [5, (1,), (1, 2, 3), (1.0, 2), (1, 2.0), (True, 0), (0, True), (-2, 0), (0, -2), (-100, 5), "ab",
               None, torch.tensor([1, 2]), (), [1, "2"], (None, 1)]


@pytest.mark.parametrize("window", BAD_WINDOWS, ids=repr)
@pytest.mark.parametrize("packed", [False, True])
def test_rejects_bad_window_size(window, packed):
    q, k, v, cos, sin, kw = small_call(packed)
    with pytest.raises(WINDOW_ERRORS, match="window_size"):
        pirope.rope_attention(q, k, v, cos, sin, window_size=window, **kw)
    with pytest.raises(WINDOW_ERRORS, match="window_size"):
        pirope.rope_attention(q, k, v, cos, sin, causal=False, window_size=window, **kw)


def test_accepts_lists_like_tuples():
    q, k, v = qkv(1, 20, 2, 1, 32)
    cos, sin = tables(32, 20)
    a = pirope.rope_attention(q, k, v, cos, sin, causal=False, window_size=[3, 4])
    b = pirope.rope_attention(q, k, v, cos, sin, causal=False, window_size=(3, 4))
    assert torch.equal(a, b)


@pytest.mark.parametrize("left, right", [(-2, -1), (-1, -2), (-5, 3), (3, -7)])
@pytest.mark.parametrize("packed", [False, True])
def test_raw_ops_reject_window_below_minus_one(left, right, packed):
    cos, sin = tables(32, 16)
    if packed:
        q, k, v = packed_qkv(16, 4, 2, 32)
        cu = cu_tensor([0, 5, 16])
    else:
        q, k, v = qkv(2, 8, 4, 2, 32)
        cu = None
    args = (q, k, v, cos, sin, None, True, 0.125, False, False, cu)
    out, lse = torch.ops.pirope.rope_attention(*args)
    with pytest.raises(RuntimeError, match="window_size"):
        torch.ops.pirope.rope_attention(*args, window_left=left, window_right=right)
    with pytest.raises(RuntimeError, match="window_size"):
        torch.ops.pirope.rope_attention_backward(out, q, k, v, out, lse, cos, sin, None, True, 0.125, False, False,
                                                 cu, window_left=left, window_right=right)


# ---- 15. CUDA ----

CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available() or not cuda_ready(), reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("causal, window", [(True, (63, -1)), (True, (17, 4)), (False, (40, 3)), (False, (0, 300))],
                         ids=["c63", "c17_4", "f40_3", "f0_300"])
@pytest.mark.parametrize("opt_in", ["0", "1"])
def test_cuda_dense_matches_reference(monkeypatch, dtype, causal, window, opt_in):
    # with PIROPE_CUDA_ATTENTION=1 too: the fused CUDA kernels refuse a window, so the
    # call must run unfused
    monkeypatch.setenv("PIROPE_CUDA_ATTENTION", opt_in)
    q, k, v = qkv(2, 300, 4, 2, 64, dtype=dtype, device="cuda")
    cos, sin = tables(64, 300, "cuda")
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window)


@pytest.mark.skipif(not torch.cuda.is_available() or not cuda_ready(), reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("causal, window", [(True, (63, -1)), (True, (5, 9)), (False, (40, 3))],
                         ids=["c63", "c5_9", "f40_3"])
def test_cuda_packed_matches_reference(dtype, causal, window):
    cu = [0, 5, 5, 200, 301, 600]
    q, k, v = packed_qkv(cu[-1], 4, 2, 64, dtype=dtype, device="cuda")
    cos, sin = tables(64, 600, "cuda")
    pos = torch.randint(0, 600, (cu[-1],), device="cuda")
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window, cu=cu)
    check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=window, cu=cu)


@pytest.mark.skipif(not torch.cuda.is_available() or not cuda_ready(), reason=CUDA_SKIP_REASON)
def test_cuda_raw_op_refuses_a_window():
    q, k, v = qkv(2, 64, 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    cos, sin = tables(64, 64, "cuda")
    with pytest.raises(RuntimeError, match="window_size"):
        torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, True, 0.125, False, False, None,
                                        window_left=3, window_right=-1)
    with pytest.raises(RuntimeError, match="window_size"):
        torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, False, 0.125, False, False, None,
                                        window_left=-1, window_right=3)


def test_attention_rel_covers_every_dtype():
    # guards the tolerance table this file relies on
    assert set(ATTENTION_REL) >= {torch.float64, torch.float32, torch.float16, torch.bfloat16}
