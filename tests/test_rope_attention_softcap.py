"""pirope.rope_attention with softcap: attention-logit soft-capping as in Gemma 2
(attn_logit_softcapping) and flash-attn.

Every score s = softmax_scale * (rotated q) . (rotated k) becomes softcap * tanh(s /
softcap) before the causal / window mask and the softmax; 0 (the default) or None: no
cap. Outputs, gradients and lse are checked against an independent float64 reference
(band_reference in attention_inputs.py, shared with the window tests: rope_reference's
rotation, explicit scores, the tanh cap, an explicit boolean visibility mask from the
window rule, softmax, @ v; gradients by autograd through it), across the CPU kernels'
tiles, dtypes, cap values, GQA / MQA, head dims, partial rotary, interleaved pairs,
position_ids forms, windows and packed sequences; then bitwise properties (no cap is the
plain call, the backward does not depend on the thread count), gradcheck, opcheck,
torch.compile, torch.func, the unfused (CUDA) paths run on CPU, bad input, and CUDA
(skipped without a GPU)."""

import math

import pytest
import torch

import pirope
from attention_inputs import (assert_all_equal, assert_compiled_like_eager, at_thread_counts, band_reference,
                              check_against_reference, cu_tensor, dense_per_sequence, packed_qkv, qkv, run, spans,
                              small_call, tables, unfused_module, unfused_with, use_packed_products, visibility, wid)
from conftest import CUDA_SKIP_REASON, cuda_ready
from reference import ATTENTION_REL, attention_reference, rope_reference
from reference import assert_attention_close as assert_close_to

func = torch.func
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINIEST = 2.0 ** -149
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not cuda_ready(), reason=CUDA_SKIP_REASON)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def scaled(tensors, factor):
    """q (the first tensor) times factor: scores that large make the cap matter."""
    q, *rest = tensors
    return (q * factor, *rest)


# ---- 1. the reference itself ----

@pytest.mark.parametrize("causal", [True, False])
def test_reference_without_cap_is_attention_reference(causal):
    q, k, v = qkv(2, 13, 4, 2, 16, dtype=torch.float64)
    cos, sin = tables(12, 20, dtype=torch.float64)
    pos = torch.randint(0, 20, (2, 13))
    g = torch.randn(2, 13, 4, 16, dtype=torch.float64)
    theirs = attention_reference(q, k, v, cos, sin, pos, causal, 0.3, True, grad_out=g)
    for cap in (0.0, 1e9):  # no cap, and a cap far above every score
        mine = band_reference(q, k, v, cos, sin, pos, causal, (-1, -1), 0.3, True, cap, grad_out=g)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_reference_caps_each_score_before_the_mask():
    # one query, written out: softmax over the visible keys of cap * tanh(scale * q.k / cap)
    q, k, v = qkv(1, 6, 1, 1, 8, dtype=torch.float64)
    q = q * 5
    cos, sin = tables(8, 6, dtype=torch.float64)
    cap, scale = 0.7, 0.4
    out = band_reference(q, k, v, cos, sin, causal=False, window=(2, 1), softmax_scale=scale, softcap=cap)
    qr, kr = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    for i in range(6):
        keys = [j for j in range(6) if i - 2 <= j <= i + 1]
        s = torch.tensor([cap * math.tanh(scale * float(qr[0, i, 0] @ kr[0, j, 0]) / cap) for j in keys],
                         dtype=torch.float64)
        want = (s.softmax(0)[:, None] * v[0, keys, 0].to(torch.float64)).sum(0)
        torch.testing.assert_close(out[0, i, 0], want, atol=1e-13, rtol=1e-13)


def test_reference_packed_is_dense_per_sequence():
    cu = [0, 5, 5, 17]
    q, k, v = scaled(packed_qkv(17, 4, 2, 16, dtype=torch.float64), 3)
    cos, sin = tables(16, 17, dtype=torch.float64)
    for causal, window in ((True, (2, -1)), (False, (3, 1)), (False, (-1, -1))):
        ref = band_reference(q, k, v, cos, sin, None, causal, window, softcap=1.5, cu=cu)
        for a, b in spans(cu):
            dense = band_reference(q[None, a:b], k[None, a:b], v[None, a:b], cos, sin, None, causal, window,
                                      softcap=1.5)[0]
            torch.testing.assert_close(ref[a:b], dense, atol=1e-13, rtol=1e-13)


# ---- 2. premise: the cap changes the result (so the comparisons below can fail) ----

@pytest.mark.parametrize("softcap, factor", [(0.5, 1), (1.0, 3), (1.5, 2), (2.0, 3), (5.0, 4), (50.0, 40)])
def test_capped_result_differs_clearly_from_uncapped(softcap, factor):
    q, k, v = scaled(qkv(1, 130, 4, 2, 64, dtype=torch.float64), factor)
    cos, sin = tables(64, 130)
    g = torch.randn_like(q)
    for causal, window in ((True, (-1, -1)), (False, (20, 7))):
        capped = band_reference(q, k, v, cos, sin, None, causal, window, softcap=softcap, grad_out=g)
        plain = band_reference(q, k, v, cos, sin, None, causal, window, grad_out=g)
        for what, a, b in zip(("out", "dq", "dk", "dv"), capped, plain):
            diff = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
            assert diff > 0.05, f"{what}: the cap {softcap} changes the reference by {diff:.3g} only"
        # and pirope applies it
        got = run(q, k, v, cos, sin, g=g, causal=causal, window_size=window, softcap=softcap)[:4]
        got_plain = run(q, k, v, cos, sin, g=g, causal=causal, window_size=window)[:4]
        for what, a, b in zip(("out", "dq", "dk", "dv"), got, got_plain):
            diff = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
            assert diff > 0.05, f"{what}: pirope's output with softcap={softcap} barely differs ({diff:.3g})"


# ---- 3. matches the float64 reference ----

SEQ_WINDOWS = [
    (1, (-1, -1)), (1, (0, 0)), (7, (2, 1)), (63, (-1, -1)), (65, (-1, -1)), (65, (64, 0)),
    (257, (-1, -1)), (257, (255, 1)), (300, (-1, -1)), (300, (63, 200)), (600, (-1, -1)), (600, (257, 63)),
]


@pytest.mark.parametrize("seqlen, window", SEQ_WINDOWS, ids=[f"s{s}-w{wid(w)}" for s, w in SEQ_WINDOWS])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_seqlen_window(seqlen, window, causal):
    q, k, v = scaled(qkv(1, seqlen, 2, 1, 32), 3)
    cos, sin = tables(32, seqlen)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window, softcap=2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [(-1, -1), (63, 5)], ids=wid)
def test_matches_reference_every_dtype(dtype, causal, window):
    q, k, v = scaled(qkv(1, 300, 4, 2, 64), 2)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    cos, sin = tables(64, 300)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window, softcap=1.5)


@pytest.mark.parametrize("softcap, factor", [(0.5, 1), (5.0, 4), (50.0, 40)], ids=["cap0.5", "cap5", "cap50"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (False, (40, 9))],
                         ids=["causal", "full", "f40_9"])
def test_matches_reference_cap_values(softcap, factor, dtype, causal, window):
    q, k, v = scaled(qkv(2, 150, 4, 2, 64, dtype=dtype), factor)
    cos, sin = tables(64, 150)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window, softcap=softcap)


def test_matches_reference_int_cap_and_explicit_scale():
    q, k, v = scaled(qkv(2, 70, 4, 2, 32), 2)
    cos, sin = tables(32, 70, dtype=torch.float64)
    check_against_reference(q, k, v, cos, sin, causal=True, window=(20, -1), scale=0.3, softcap=3)
    check_against_reference(q, k, v, cos, sin, causal=False, scale=0.9, softcap=0.25)
    a = pirope.rope_attention(q, k, v, cos, sin, softcap=3)
    assert torch.equal(a, pirope.rope_attention(q, k, v, cos, sin, softcap=3.0))


@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (2, 2)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_gqa_mqa(heads, causal):
    q, k, v = scaled(qkv(2, 130, *heads, 32), 3)
    cos, sin = tables(32, 130)
    check_against_reference(q, k, v, cos, sin, causal=causal, softcap=2.0)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=(40, 17), softcap=2.0)


@pytest.mark.parametrize("head_dim, rotary_dim", [(16, 16), (64, 64), (80, 64), (128, 128), (256, 128), (24, 16)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_head_dims_partial_rotary_interleaved(head_dim, rotary_dim, interleaved, causal):
    s = 70 if head_dim >= 128 else 100
    q, k, v = scaled(qkv(1, s, 4, 2, head_dim), 3)
    cos, sin = tables(rotary_dim, s)
    check_against_reference(q, k, v, cos, sin, causal=causal, interleaved=interleaved, softcap=1.0)


@pytest.mark.parametrize("form", ["seq", "batch_seq", "one_seq", "int32_batch_seq"])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_position_ids(form, causal):
    b, s, n = 2, 80, 200
    cos, sin = tables(32, n)
    pos = {
        "seq": torch.randperm(n)[:s],
        "batch_seq": torch.randint(0, n, (b, s)),
        "one_seq": torch.arange(100, 100 + s)[None],
        "int32_batch_seq": torch.stack([torch.randperm(n)[:s], torch.arange(s).flip(0)]).to(torch.int32),
    }[form]
    q, k, v = scaled(qkv(b, s, 4, 2, 32), 3)
    check_against_reference(q, k, v, cos, sin, pos, causal=causal, softcap=2.0, interleaved=form == "seq")
    check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=(9, 4), softcap=2.0)


# ---- 4. packed sequences ----

CU_WINDOWS = [
    ([0, 5, 5, 17, 40], (-1, -1)),  # an empty sequence
    ([0, 5, 5, 17, 40], (3, 2)),
    ([0, 300, 301, 600], (-1, -1)),  # across query and key tiles, a length-1 sequence
    ([0, 300, 301, 600], (64, 257)),
    ([0, 0, 63, 63, 128, 385], (255, 0)),  # empty first sequence
    ([0, 1, 2, 3, 70], (-1, -1)),
]


@pytest.mark.parametrize("cu, window", CU_WINDOWS, ids=[f"{'-'.join(map(str, c))}-w{wid(w)}" for c, w in CU_WINDOWS])
@pytest.mark.parametrize("causal", [True, False])
def test_cu_seqlens_matches_reference(cu, window, causal):
    q, k, v = scaled(packed_qkv(cu[-1], 4, 2, 32), 3)
    cos, sin = tables(32, cu[-1])
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window, cu=cu, softcap=2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_cu_seqlens_matches_reference_every_dtype(dtype, causal):
    cu = [0, 9, 9, 80, 330]
    q, k, v = scaled(packed_qkv(cu[-1], 4, 1, 64), 2)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    cos, sin = tables(64, 330)
    check_against_reference(q, k, v, cos, sin, causal=causal, window=(63, 17), cu=cu, softcap=1.5)
    check_against_reference(q, k, v, cos, sin, causal=causal, cu=cu, softcap=1.5)


@pytest.mark.parametrize("form", ["flat_random", "one_total_random", "flat_global_offset"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_cu_seqlens_position_forms_and_int64_cu(form, interleaved):
    cu = [0, 5, 5, 17, 40, 90]
    total = cu[-1]
    cos, sin = tables(16, 256)
    pos = {
        "flat_random": torch.randint(0, 256, (total,)),
        "one_total_random": torch.randint(0, 256, (1, total)),
        "flat_global_offset": torch.arange(total) + 100,
    }[form]
    q, k, v = scaled(packed_qkv(total, 4, 2, 32), 3)
    for causal in (True, False):
        check_against_reference(q, k, v, cos, sin, pos, causal=causal, interleaved=interleaved, cu=cu, softcap=2.0)
    # int64 cu_seqlens: the same call bit for bit
    g = torch.randn_like(q)
    kw = dict(causal=False, window_size=(4, 6), softcap=2.0, interleaved=interleaved)
    assert_all_equal(run(q, k, v, cos, sin, pos, g=g, cu_seqlens=cu_tensor(cu), **kw)[:4],
                     run(q, k, v, cos, sin, pos, g=g, cu_seqlens=cu_tensor(cu, dtype=torch.int64), **kw)[:4])


@pytest.mark.parametrize("cu", [[0, 5, 5, 17, 40], [0, 300, 301, 600], [0, 0, 3, 3]],
                         ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (False, (2, 70))],
                         ids=["causal", "full", "f2_70"])
def test_cu_seqlens_equals_dense_call_per_sequence(cu, causal, window):
    total = cu[-1]
    q, k, v = scaled(packed_qkv(total, 4, 2, 64), 3)
    cos, sin = tables(64, 700)
    pos = torch.randint(0, 700, (total,))
    kw = dict(causal=causal, softmax_scale=0.11, window_size=window, softcap=1.5)
    out, gq, gk, gv, g = run(q, k, v, cos, sin, pos, cu_seqlens=cu_tensor(cu), **kw)
    dense = dense_per_sequence(q, k, v, cos, sin, cu, pos, g, **kw)
    for what, got, want in zip(("out", "dq", "dk", "dv"), (out, gq, gk, gv), dense):
        tol = dict(atol=1e-6, rtol=1e-6) if what == "out" else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


# ---- 5. no cap is the plain call; a huge cap is no cap ----

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_softcap_none_and_zero_are_the_plain_call_bitwise(causal, packed):
    if packed:
        q, k, v = scaled(packed_qkv(400, 4, 2, 32), 3)
        extra = dict(cu_seqlens=cu_tensor([0, 7, 7, 300, 400]))
    else:
        q, k, v = scaled(qkv(2, 300, 4, 2, 32), 3)
        extra = {}
    cos, sin = tables(32, 400)
    g = torch.randn_like(q)
    for window in ((-1, -1), (20, 5)):
        kw = dict(causal=causal, window_size=window, **extra)
        plain = run(q, k, v, cos, sin, g=g, **kw)[:4]
        for cap in (None, 0.0, 0):
            assert_all_equal(run(q, k, v, cos, sin, g=g, softcap=cap, **kw)[:4], plain)
    # the raw op: softcap=0.0 is the keyword omitted
    cu = extra.get("cu_seqlens")
    args = (q, k, v, cos, sin, None, causal, 0.2, False, False, cu)
    out, lse = torch.ops.pirope.rope_attention(*args)
    out0, lse0 = torch.ops.pirope.rope_attention(*args, softcap=0.0)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    grads = torch.ops.pirope.rope_attention_backward(g, q, k, v, out, lse, cos, sin, None, causal, 0.2, False, False,
                                                     cu)
    grads0 = torch.ops.pirope.rope_attention_backward(g, q, k, v, out, lse, cos, sin, None, causal, 0.2, False,
                                                      False, cu, softcap=0.0)
    assert_all_equal(grads, grads0, ("dq", "dk", "dv"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_huge_softcap_equals_uncapped_within_rounding(dtype, packed):
    # scores are O(1): 1e6 * tanh(s / 1e6) = s (1 - s^2 / 3e12 + ...), below float64's
    # rounding of a sum and far below float32's
    if packed:
        q, k, v = packed_qkv(300, 4, 2, 32, dtype=dtype)
        extra = dict(cu_seqlens=cu_tensor([0, 100, 100, 300]))
    else:
        q, k, v = qkv(2, 300, 4, 2, 32, dtype=dtype)
        extra = {}
    cos, sin = tables(32, 300)
    g = torch.randn_like(q)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for causal, window in ((True, (-1, -1)), (False, (30, 2))):
        kw = dict(causal=causal, window_size=window, **extra)
        plain = run(q, k, v, cos, sin, g=g, **kw)[:4]
        huge = run(q, k, v, cos, sin, g=g, softcap=1e6, **kw)[:4]
        for what, a, b in zip(("out", "dq", "dk", "dv"), huge, plain):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


# ---- 6. lse and the backward of the raw ops ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, -1)),
                                            (False, (3, 200))], ids=["causal", "full", "c5", "f3_200"])
def test_raw_op_lse_is_logsumexp_of_capped_scores(dtype, causal, window):
    cap = 1.5
    q, k, v = scaled(qkv(2, 300, 4, 2, 32, dtype=dtype), 3)
    cos, sin = tables(32, 300)
    kw = dict(window_left=window[0], window_right=window[1], softcap=cap)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, 0.2, False, False, None, **kw)
    assert lse.shape == (2, 4, 300) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_out, ref_lse = band_reference(q, k, v, cos, sin, None, causal, window, 0.2, softcap=cap, with_lse=True)
    assert_close_to(out, ref_out, dtype, "out")
    assert_close_to(lse, ref_lse, dtype, "lse")
    # capped scores lie in (-cap, cap): log(n) - cap < lse < log(n) + cap for n visible keys
    n = visibility(300, causal, window).sum(-1).to(torch.float64)
    lse64 = lse.to(torch.float64)
    assert bool(((lse64 < n.log() + cap + 1e-5) & (lse64 > n.log() - cap - 1e-5)).all())
    # packed: (nheads_q, total)
    cu = [0, 5, 5, 200, 300]
    qp, kp, vp = (t[0] for t in (q, k, v))
    out, lse = torch.ops.pirope.rope_attention(qp, kp, vp, cos, sin, None, causal, 0.2, False, False,
                                               cu_tensor(cu), **kw)
    assert lse.shape == (4, 300)
    ref_out, ref_lse = band_reference(qp, kp, vp, cos, sin, None, causal, window, 0.2, softcap=cap, cu=cu,
                                         with_lse=True)
    assert_close_to(out, ref_out, dtype, "packed out")
    assert_close_to(lse, ref_lse, dtype, "packed lse")


def test_raw_backward_op_matches_reference():
    q, k, v = scaled(qkv(1, 300, 4, 1, 32), 3)
    cos, sin = tables(32, 300)
    for cu, window in ((None, (-1, -1)), (None, (70, 9)), ([0, 120, 300], (-1, -1)), ([0, 120, 300], (70, 9))):
        args = (q, k, v) if cu is None else tuple(t[0] for t in (q, k, v))
        cut = None if cu is None else cu_tensor(cu)
        kw = dict(window_left=window[0], window_right=window[1], softcap=2.0)
        out, lse = torch.ops.pirope.rope_attention(*args, cos, sin, None, False, 0.2, False, False, cut, **kw)
        g = torch.randn_like(out)
        dq, dk, dv = torch.ops.pirope.rope_attention_backward(g, *args, out, lse, cos, sin, None, False, 0.2,
                                                              False, False, cut, **kw)
        ref = band_reference(*args, cos, sin, None, False, window, 0.2, softcap=2.0, grad_out=g, cu=cu)
        for what, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
            assert_close_to(got, want, torch.float32, f"{what} (cu={cu}, window={window})")


# ---- 7. gradcheck ----

@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (2, -1)), (False, (1, 2))],
                         ids=["causal", "full", "c2", "f1_2"])
def test_gradcheck_float64(causal, window):
    q = (torch.randn(2, 8, 2, 8, dtype=torch.float64) * 3).requires_grad_()  # GQA: 2 query heads per kv head
    k, v = (torch.randn(2, 8, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cos, sin = tables(6, 12, dtype=torch.float64)  # partial rotary: 6 of 8
    pos = torch.tensor([[8, 0, 3, 2, 1, 5, 4, 11], [0, 1, 2, 3, 4, 5, 6, 7]])
    fn = lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, pos, causal=causal,  # noqa: E731
                                               window_size=window, softcap=0.7)
    assert torch.autograd.gradcheck(fn, (q, k, v))
    # packed
    cu = cu_tensor([0, 4, 4, 11])
    qp = (torch.randn(11, 2, 8, dtype=torch.float64) * 3).requires_grad_()
    kp, vp = (torch.randn(11, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fn = lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, causal=causal,  # noqa: E731
                                               window_size=window, cu_seqlens=cu, softcap=0.7)
    assert torch.autograd.gradcheck(fn, (qp, kp, vp))


# ---- 8. opcheck ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_with_softcap(dtype, packed):
    cos, sin = tables(32, 16, dtype=dtype)
    if packed:
        make = lambda: scaled(packed_qkv(12, 4, 2, 48, dtype=dtype), 3)  # noqa: E731
        cu, pos = cu_tensor([0, 3, 3, 10, 12], dtype=torch.int64), torch.randint(0, 16, (12,))
    else:
        make = lambda: scaled(qkv(2, 7, 4, 2, 48, dtype=dtype), 3)  # noqa: E731
        cu, pos = None, torch.randint(0, 16, (2, 7))
    for rg in (False, True):
        q, k, v = (t.detach().requires_grad_(rg) for t in make())
        for causal, (left, right), cap in ((True, (-1, -1), 1.0), (False, (1, 3), 0.5), (False, (-1, -1), 30.0)):
            torch.library.opcheck(torch.ops.pirope.rope_attention.default,
                                  (q, k, v, cos, sin, pos, causal, 0.2, False, False, cu),
                                  dict(window_left=left, window_right=right, softcap=cap))
    q, k, v = make()
    kw = dict(window_left=2, window_right=1, softcap=1.0)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, pos, False, 0.2, True, False, cu, **kw)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pirope.rope_attention_backward.default,
                          (g, q, k, v, out, lse, cos, sin, pos, False, 0.2, True, False, cu), kw)


# ---- 9. torch.compile ----

def test_torch_compile_fullgraph_forward_and_backward():
    cos, sin = tables(32, 64)
    proj = torch.nn.Linear(32, 32)

    def dense(q, k, v):
        return pirope.rope_attention(proj(q) * 3, k, v, cos, sin, causal=True, softcap=1.5).square().sum()

    def packed(q, k, v, cu):
        return pirope.rope_attention(proj(q) * 3, k, v, cos, sin, causal=False, window_size=(3, 7),
                                     cu_seqlens=cu, softcap=1.5).square().sum()

    cases = [(dense, qkv(2, 40, 4, 2, 32), ()),
             (packed, packed_qkv(40, 4, 2, 32), (cu_tensor([0, 5, 5, 17, 40]),))]
    assert_compiled_like_eager(cases)


# ---- 10. torch.func ----

def test_vmap_matches_loop():
    cos, sin = tables(16, 40, dtype=torch.float64)
    qs = torch.randn(3, 2, 20, 4, 16, dtype=torch.float64) * 3
    ks, vs = (torch.randn(3, 2, 20, 2, 16, dtype=torch.float64) for _ in range(2))
    for causal, window in ((True, (-1, -1)), (False, (2, 5))):
        kw = dict(causal=causal, window_size=window, softcap=1.5)
        out = func.vmap(lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, **kw))(qs, ks, vs)
        loop = torch.stack([pirope.rope_attention(q, k, v, cos, sin, **kw) for q, k, v in zip(qs, ks, vs)])
        torch.testing.assert_close(out, loop, atol=1e-12, rtol=1e-12)
        ref = torch.stack([band_reference(q, k, v, cos, sin, None, causal, window, softcap=1.5)
                           for q, k, v in zip(qs, ks, vs)])
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("packed", [False, True])
def test_func_grad_matches_eager_and_reference(packed):
    cos, sin = tables(16, 40, dtype=torch.float64)
    if packed:
        q, k, v = scaled(packed_qkv(30, 4, 2, 16, dtype=torch.float64), 3)
        cu = [0, 11, 11, 30]
        extra = dict(cu_seqlens=cu_tensor(cu))
    else:
        q, k, v = scaled(qkv(2, 30, 4, 2, 16, dtype=torch.float64), 3)
        cu, extra = None, {}
    g = torch.randn_like(q)
    for causal, window in ((True, (-1, -1)), (False, (0, 6))):
        kw = dict(causal=causal, window_size=window, softcap=1.5, **extra)
        loss = lambda q, k, v: (pirope.rope_attention(q, k, v, cos, sin, **kw) * g).sum()  # noqa: E731
        grads = func.grad(loss, argnums=(0, 1, 2))(q, k, v)
        _, gq, gk, gv, _ = run(q, k, v, cos, sin, g=g, **kw)
        for a, b in zip(grads, (gq, gk, gv)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        ref = band_reference(q, k, v, cos, sin, None, causal, window, softcap=1.5, grad_out=g, cu=cu)[1:]
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_per_sample_gradients_vmap_of_grad():
    cos, sin = tables(16, 40, dtype=torch.float64)
    qs, gs = (torch.randn(4, 1, 17, 4, 16, dtype=torch.float64) for _ in range(2))
    qs = qs * 3
    k, v = (torch.randn(1, 17, 2, 16, dtype=torch.float64) for _ in range(2))
    loss = lambda q, k, v, g: (pirope.rope_attention(q, k, v, cos, sin, causal=False,  # noqa: E731
                                                     window_size=(3, 1), softcap=1.5) * g).sum()
    dq, dk, dv = func.vmap(func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None, 0))(qs, k, v, gs)
    for i in range(4):
        _, rq, rk, rv = band_reference(qs[i], k, v, cos, sin, None, False, (3, 1), softcap=1.5, grad_out=gs[i])
        for a, b in zip((dq[i], dk[i], dv[i]), (rq, rk, rv)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# ---- 11. the CPU backward does not depend on the thread count ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (300, -1)),
                                            (False, (255, 256))], ids=["causal", "full", "c300", "f255_256"])
def test_backward_bit_identical_over_thread_counts_mqa(monkeypatch, dtype, causal, window):
    # batch 1, one kv head, 600 tokens: the split two-pass backward with 2+ threads
    # (the AVX512 products or their portable version: BLAS ones never split), one pass with 1
    use_packed_products(monkeypatch, dtype)
    q, k, v = scaled(qkv(1, 600, 2, 1, 64), 2)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    cos, sin = tables(64, 600)
    g = torch.randn(1, 600, 2, 64, dtype=dtype)
    kw = dict(causal=causal, window_size=window, softcap=1.5)
    runs = at_thread_counts((1, 2, 3, 4), lambda: run(q, k, v, cos, sin, g=g, **kw)[:4])
    for n, other in zip((2, 3, 4), runs[1:]):
        for what, a, b in zip(("out", "dq", "dk", "dv"), runs[0], other):
            assert torch.equal(a, b), f"{what}: 1 thread vs {n} threads"
    ref = band_reference(q, k, v, cos, sin, None, causal, window, softcap=1.5, grad_out=g)
    for what, got, want in zip(("out", "dq", "dk", "dv"), runs[0], ref):
        assert_close_to(got, want, dtype, what)


@pytest.mark.parametrize("packed", [False, True])
def test_backward_bit_identical_over_thread_counts_gqa(packed):
    if packed:
        q, k, v = scaled(packed_qkv(700, 4, 1, 64), 2)
        cu = [0, 300, 301, 700]
        extra = dict(cu_seqlens=cu_tensor(cu))
    else:
        q, k, v = scaled(qkv(2, 350, 4, 2, 64), 2)
        cu, extra = None, {}
    cos, sin = tables(64, 700)
    g = torch.randn_like(q)
    kw = dict(causal=False, window_size=(100, 63), softcap=1.5, deterministic=True, **extra)
    runs = at_thread_counts((1, 2, 3, 8), lambda: run(q, k, v, cos, sin, g=g, **kw)[:4])
    for other in runs[1:]:
        assert_all_equal(runs[0], other)
    ref = band_reference(q, k, v, cos, sin, None, False, (100, 63), softcap=1.5, grad_out=g, cu=cu)
    for what, got, want in zip(("out", "dq", "dk", "dv"), runs[0], ref):
        assert_close_to(got, want, torch.float32, what)


# ---- 12. the unfused (CUDA) paths, on CPU ----

@pytest.fixture(params=["default", "band_rows_16", "scores_mid"])
def capped_blocks(request, monkeypatch):
    """The unfused soft-capped path's query rows per block: its defaults (one block here),
    _BAND_ROWS = 16, and a score budget that gives blocks of a few dozen rows (not a
    multiple of 16; the block sizes themselves: test_unfused_blocks_follow_the_score_budget)."""
    mod = unfused_module()
    if request.param == "band_rows_16":
        monkeypatch.setattr(mod, "_BAND_ROWS", 16)
    elif request.param == "scores_mid":
        monkeypatch.setattr(mod, "_BLOCK_SCORES", 37 * 8 * 130)
    return request.param


def check_unfused(q, k, v, cos, sin, pos, fn, kw, cu=None):
    """The unfused path (fn) against the float64 reference and against the fused CPU op
    (float64: to 1e-12), outputs and gradients for the same grad_out."""
    unfused = run(q, k, v, cos, sin, pos, fn=fn, **kw)
    g = unfused[4]
    ref = band_reference(q, k, v, cos, sin, pos, kw["causal"], kw["window_size"], None, kw.get("interleaved", False),
                            kw["softcap"], grad_out=g, cu=cu)
    fused = run(q, k, v, cos, sin, pos, g=g, **kw)
    tol = dict(atol=1e-12, rtol=1e-12) if q.dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for what, got, want, same in zip(("out", "dq", "dk", "dv"), unfused, ref, fused):
        assert_close_to(got, want, q.dtype, f"unfused {what} vs reference")
        torch.testing.assert_close(got, same, **tol, msg=lambda m: f"unfused {what} vs fused: {m}")


DENSE_UNFUSED = [
    ((4, 2), 64, 64, True, (-1, -1), False, False),
    ((4, 2), 64, 64, False, (-1, -1), True, False),
    ((4, 2), 64, 64, True, (5, 3), True, False),  # causal: the right window as given, ignored
    ((4, 1), 32, 32, False, (7, 2), False, True),
    ((2, 2), 24, 16, False, (-1, 0), True, True),
    ((4, 4), 32, 32, True, (64, 64), False, False),
]


@pytest.mark.parametrize("heads, head_dim, rotary_dim, causal, window, positions, interleaved", DENSE_UNFUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unfused_dense_matches_reference_and_fused(heads, head_dim, rotary_dim, causal, window, positions,
                                                   interleaved, dtype, capped_blocks):
    q, k, v = scaled(qkv(2, 130, *heads, head_dim, dtype=dtype), 3)
    cos, sin = tables(rotary_dim, 300)
    pos = torch.randint(0, 300, (2, 130)) if positions else None
    kw = dict(causal=causal, window_size=window, interleaved=interleaved, softcap=2.0)
    check_unfused(q, k, v, cos, sin, pos, "sdpa", kw)


PACKED_UNFUSED = [
    ([0, 5, 5, 17, 40], (4, 2), True, (-1, -1), False),
    ([0, 5, 5, 17, 40], (4, 1), False, (2, 3), True),
    ([0, 70, 71, 200], (2, 2), True, (10, 8), True),  # causal: right ignored
    ([0, 0, 9, 30, 30], (4, 2), False, (-1, -1), False),
    ([0, 130], (4, 4), False, (60, 60), False),
]


@pytest.mark.parametrize("cu, heads, causal, window, positions", PACKED_UNFUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unfused_packed_matches_reference_and_fused(cu, heads, causal, window, positions, dtype, capped_blocks):
    total = cu[-1]
    q, k, v = scaled(packed_qkv(total, *heads, 32, dtype=dtype), 3)
    cos, sin = tables(32, 300)
    pos = torch.randint(0, 300, (total,)) if positions else None
    kw = dict(causal=causal, window_size=window, softcap=2.0, cu_seqlens=cu_tensor(cu))
    check_unfused(q, k, v, cos, sin, pos, "varlen", kw, cu=cu)


@pytest.mark.parametrize("band_rows, budget, want_rows", [
    (None, None, 130),  # 1024 rows: one block
    (16, None, 16),
    (None, 1, 16),  # never fewer than 16 rows
    (None, 50 * 8 * 130, 50),  # batch 2 x 4 heads x 130 keys per row: 50 rows
    (40, 50 * 8 * 130, 40),  # _BAND_ROWS still bounds them
])
@pytest.mark.parametrize("options", [dict(softcap=2.0), dict(deterministic=True)], ids=["capped", "deterministic"])
def test_unfused_blocks_follow_the_score_budget(monkeypatch, band_rows, budget, want_rows, options):
    # rows = max(16, min(_BAND_ROWS, _BLOCK_SCORES // (batch * heads * keys))): the forward's
    # blocks of query rows (all keys: not causal), then the backward's, the same blocks once
    # more (all three gradients from one recomputation of each block's scores); the same
    # blocks for a deterministic call without a cap (tests/test_rope_attention_deterministic.py)
    _, band_attention = unfused_with(monkeypatch, _BAND_ROWS=band_rows, _BLOCK_SCORES=budget)
    blocks = []
    scores = band_attention._block_scores

    def spy(q, k, *args, **kwargs):
        blocks.append((q.shape[-2], k.shape[-2]))
        return scores(q, k, *args, **kwargs)

    monkeypatch.setattr(band_attention, "_block_scores", spy)
    q, k, v = scaled(qkv(2, 130, 4, 2, 32), 3)
    cos, sin = tables(32, 130)
    out, gq, gk, gv, g = run(q, k, v, cos, sin, fn="sdpa", causal=False, **options)
    sizes = [want_rows] * (130 // want_rows) + ([130 % want_rows] if 130 % want_rows else [])
    by_queries = [(n, 130) for n in sizes]
    assert blocks == by_queries + by_queries
    ref = band_reference(q, k, v, cos, sin, None, False, softcap=options.get("softcap", 0.0), grad_out=g)
    for what, got, ref_t in zip(("out", "dq", "dk", "dv"), (out, gq, gk, gv), ref):
        assert_close_to(got, ref_t, torch.float32, what)


@pytest.mark.parametrize("dtype, cap", [(torch.float32, 1e38), (torch.float32, FLOAT32_MAX), (torch.float64, 1e308)],
                         ids=["f32_1e38", "f32_max", "f64_1e308"])
def test_unfused_huge_cap_gradients_stay_finite(dtype, cap):
    # the cap's derivative is taken as 1 - tanh^2, not through cap * (... / cap) (which
    # overflows): a cap far above every score is no cap, gradients included
    q, k, v = scaled(qkv(1, 40, 2, 1, 32, dtype=dtype), 3)
    cos, sin = tables(32, 40)
    g = torch.randn_like(q)
    got = run(q, k, v, cos, sin, g=g, fn="sdpa", softcap=cap)[:4]
    plain = run(q, k, v, cos, sin, g=g, fn="sdpa")[:4]
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, plain):
        assert torch.isfinite(a).all(), what
        assert_close_to(a, b.to(torch.float64), dtype, what)


def test_unfused_tiny_cap_is_finite():
    # a cap below every |score|: each seen score is +-cap (or 0), gradients through 1 - tanh^2 = 0
    q, k, v = scaled(qkv(1, 40, 2, 1, 32), 3)
    q[0, 5] = 0  # a row of zero scores: 0 / cap = 0, not NaN
    cos, sin = tables(32, 40)
    g = torch.randn_like(q)
    for cap in (FLOAT32_TINIEST, 1e-39, 1e-3):
        outs = run(q, k, v, cos, sin, g=g, fn="sdpa", softcap=cap)[:4]
        fused = run(q, k, v, cos, sin, g=g, softcap=cap)[:4]
        for what, a, b in zip(("out", "dq", "dk", "dv"), outs, fused):
            assert torch.isfinite(a).all(), (cap, what)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{cap} {what}: {m}")


@pytest.mark.parametrize("softcap", [0.0, 50.0], ids=["deterministic", "capped"])
def test_unfused_huge_softmax_scale_stays_finite(softcap):
    # the block attention folds the softmax scale into q only where that is at most 1: q * 1e10
    # overflows float32 at |q| = 1e30, where every score times 1e10 is finite (~1e10 here);
    # all outputs and gradients finite, and out, dq and dv as the fused CPU kernels give them.
    # dk is dS^T (q * 1e10) with dS = P (dP - rowsum(dO * O)) rounding noise of one-hot rows (0 in
    # exact arithmetic): noise of order 1e32 that differs between builds, so finite only
    torch.manual_seed(0)
    q = torch.tensor([1e30, 0.0]).repeat(1, 6, 2, 1)
    k, v = torch.randn(1, 6, 1, 2) * 1e-30, torch.randn(1, 6, 1, 2)
    cos, sin = torch.ones(6, 1), torch.zeros(6, 1)
    g = torch.randn_like(q)
    kw = dict(softmax_scale=1e10, softcap=softcap, deterministic=True)
    blocks = run(q, k, v, cos, sin, g=g, fn="sdpa", **kw)[:4]
    fused = run(q, k, v, cos, sin, g=g, **kw)[:4]
    for what, a, b in zip(("out", "dq", "dk", "dv"), blocks, fused):
        assert torch.isfinite(a).all(), what
        if what != "dk":
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("softcap, window", [(0.0, (-1, -1)), (0.0, (5, 0)), (1.5, (-1, -1)), (1.5, (5, 0))],
                         ids=["plain", "window", "cap", "cap_window"])
def test_unfused_path_compiles_fullgraph(softcap, window):
    # what rope_attention runs on CUDA, traced by torch.compile in one graph (the argument
    # checks included), forward and backward equal to eager
    mod = unfused_module()
    cos, sin = tables(32, 40)

    def f(q, k, v):
        return mod._sdpa_fallback(q, k, v, cos, sin, None, True, 0.2, False, window, softcap).square().sum()

    assert_compiled_like_eager([(f, scaled(qkv(2, 40, 4, 2, 32), 3), ())])


def test_unfused_capped_path_under_torch_func():
    # func.grad, and vmap of it, through the capped unfused path: the reference's gradients
    mod = unfused_module()
    cos, sin = tables(16, 20, dtype=torch.float64)
    qs, gs = (torch.randn(3, 1, 20, 4, 16, dtype=torch.float64) * 3 for _ in range(2))
    k, v = (torch.randn(1, 20, 2, 16, dtype=torch.float64) for _ in range(2))

    def loss(q, k, v, g):
        return (mod._sdpa_fallback(q, k, v, cos, sin, None, False, 0.3, False, (4, 2), 1.5) * g).sum()

    grads = func.vmap(func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None, 0))(qs, k, v, gs)
    for i in range(3):
        ref = band_reference(qs[i], k, v, cos, sin, None, False, (4, 2), 0.3, softcap=1.5, grad_out=gs[i])[1:]
        for what, a, b in zip(("dq", "dk", "dv"), (t[i] for t in grads), ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("batched", ["q", "k", "v", "grad"])
def test_unfused_capped_path_vmap_of_grad_batched_in_one_argument(batched):
    # the backward sums dk and dv over the query blocks into accumulators made from the
    # first block's parts: batched under vmap exactly when those parts are, whichever one
    # argument vmap batches
    mod = unfused_module()
    cos, sin = tables(16, 20, dtype=torch.float64)
    args = {n: torch.randn(1, 20, 2 if n != "q" else 4, 16, dtype=torch.float64) * 3 for n in ("q", "k", "v")}
    args["grad"] = torch.randn(1, 20, 4, 16, dtype=torch.float64)
    args[batched] = torch.randn((3,) + args[batched].shape, dtype=torch.float64) * 3

    def loss(q, k, v, g):
        return (mod._sdpa_fallback(q, k, v, cos, sin, None, False, 0.3, False, (4, 2), 1.5) * g).sum()

    dims = tuple(0 if n == batched else None for n in ("q", "k", "v", "grad"))
    grads = func.vmap(func.grad(loss, argnums=(0, 1, 2)), in_dims=dims)(*args.values())
    for i in range(3):
        q, k, v, g = (t[i] if n == batched else t for n, t in args.items())
        ref = band_reference(q, k, v, cos, sin, None, False, (4, 2), 0.3, softcap=1.5, grad_out=g)[1:]
        for what, a, b in zip(("dq", "dk", "dv"), (t[i] for t in grads), ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"{what}: {m}")

# ---- 13. bad input ----

@pytest.mark.parametrize("softcap", [-1.0, -1e-30, -5, float("nan"), float("inf"), float("-inf")], ids=repr)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rejects_negative_or_non_finite_softcap(softcap, packed, dtype):
    q, k, v, cos, sin, kw = small_call(packed, dtype)
    for causal in (True, False):
        with pytest.raises(ValueError, match="softcap"):
            pirope.rope_attention(q, k, v, cos, sin, causal=causal, softcap=softcap, **kw)


@pytest.mark.parametrize("softcap", ["1.0", "", [1.0], (1.0,), True, False, object()],
                         ids=lambda v: "object()" if type(v) is object else repr(v))  # stable ids
@pytest.mark.parametrize("packed", [False, True])
def test_rejects_non_number_softcap(softcap, packed):
    q, k, v, cos, sin, kw = small_call(packed)
    with pytest.raises(TypeError, match="softcap"):
        pirope.rope_attention(q, k, v, cos, sin, softcap=softcap, **kw)


@pytest.mark.parametrize("softcap", [3.5e38, 1e39, 1e300, 2.0 ** -150, 1e-46, 1e-300], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_rejects_softcap_outside_float32_range_unless_float64(softcap, dtype, packed):
    q, k, v, cos, sin, kw = small_call(packed, dtype)
    with pytest.raises(ValueError, match="softcap"):
        pirope.rope_attention(q, k, v, cos, sin, softcap=softcap, **kw)


@pytest.mark.parametrize("packed", [False, True])
def test_float32_range_edges_accepted(packed):
    # the largest float32 and the smallest positive (subnormal) float32 are in range
    q, k, v, cos, sin, kw = small_call(packed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for cap in (FLOAT32_MAX, FLOAT32_TINIEST):
        out = pirope.rope_attention(q, k, v, cos, sin, causal=False, softcap=cap, **kw)
        out.square().sum().backward()
        for what, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            assert bool(t.isfinite().all()), f"{what} not finite with softcap={cap}"
        q.grad = k.grad = v.grad = None
    plain = pirope.rope_attention(q, k, v, cos, sin, causal=False, **kw)
    torch.testing.assert_close(pirope.rope_attention(q, k, v, cos, sin, causal=False, softcap=FLOAT32_MAX, **kw),
                               plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_float64_accepts_extreme_softcap(packed):
    q, k, v, cos, sin, kw = small_call(packed, torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cos, sin = cos.double(), sin.double()
    cu = kw["cu_seqlens"].tolist() if packed else None
    for causal in (True, False):
        for cap in (1e300, 1e-300):
            out = pirope.rope_attention(q, k, v, cos, sin, causal=causal, softcap=cap, **kw)
            out.square().sum().backward()
            for what, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
                assert bool(t.isfinite().all()), f"{what} not finite with softcap={cap}"
            q.grad = k.grad = v.grad = None
        # 1e300: no cap
        torch.testing.assert_close(pirope.rope_attention(q, k, v, cos, sin, causal=causal, softcap=1e300, **kw),
                                   pirope.rope_attention(q, k, v, cos, sin, causal=causal, **kw),
                                   atol=1e-12, rtol=1e-12)
        # 1e-300: every capped score is within 1e-300 of 0, so every visible key weighs the same
        visible = visibility(cu if packed else q.shape[1], causal, (-1, -1)).to(torch.float64)
        weights = visible / visible.sum(-1, keepdim=True)
        group = q.shape[-2] // k.shape[-2]
        vv = v.detach().repeat_interleave(group, dim=-2)
        mean = torch.einsum("st,thd->shd", weights, vv) if packed else torch.einsum("st,bthd->bshd", weights, vv)
        got = pirope.rope_attention(q, k, v, cos, sin, causal=causal, softcap=1e-300, **kw)
        torch.testing.assert_close(got, mean, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("softcap", [-1.0, float("nan"), float("inf")], ids=repr)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # (float64: no float32 range check to fall back on)
def test_raw_ops_reject_bad_softcap(softcap, packed, dtype):
    q, k, v, cos, sin, kw = small_call(packed, dtype)
    cu = kw.get("cu_seqlens")
    args = (q, k, v, cos, sin, None, True, 0.125, False, False, cu)
    out, lse = torch.ops.pirope.rope_attention(*args)
    with pytest.raises(RuntimeError, match="softcap"):
        torch.ops.pirope.rope_attention(*args, softcap=softcap)
    with pytest.raises(RuntimeError, match="softcap"):
        torch.ops.pirope.rope_attention_backward(out, q, k, v, out, lse, cos, sin, None, True, 0.125, False, False,
                                                 cu, softcap=softcap)


# ---- 14. CUDA ----

CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (17, 4)), (False, (40, 3))],
                         ids=["causal", "full", "c17_4", "f40_3"])
@pytest.mark.parametrize("opt_in", ["0", "1"])
def test_cuda_dense_matches_reference(monkeypatch, dtype, causal, window, opt_in):
    # with PIROPE_CUDA_ATTENTION=1 too: the fused CUDA kernels refuse a soft-cap, so the
    # call must run unfused
    monkeypatch.setenv("PIROPE_CUDA_ATTENTION", opt_in)
    q, k, v = scaled(qkv(2, 300, 4, 2, 64, dtype=dtype, device="cuda"), 2)
    cos, sin = tables(64, 300, "cuda")
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window, softcap=1.5)


@needs_cuda
def test_cuda_tiny_cap_is_finite():
    # CUDA divides by a Python number as a product with its reciprocal (inf for a tiny cap):
    # the unfused path divides by a tensor
    q, k, v = (t.requires_grad_() for t in qkv(1, 40, 2, 1, 32, device="cuda"))
    cos, sin = tables(32, 40, "cuda")
    for cap in (FLOAT32_TINIEST, 1e-39):
        out = pirope.rope_attention(q, k, v, cos, sin, softcap=cap)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(t).all() for t in (out, *grads)), cap


@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, 9))],
                         ids=["causal", "full", "c5_9"])
def test_cuda_packed_matches_reference(dtype, causal, window):
    cu = [0, 5, 5, 200, 301, 600]
    q, k, v = scaled(packed_qkv(cu[-1], 4, 2, 64, dtype=dtype, device="cuda"), 2)
    cos, sin = tables(64, 600, "cuda")
    pos = torch.randint(0, 600, (cu[-1],), device="cuda")
    check_against_reference(q, k, v, cos, sin, causal=causal, window=window, cu=cu, softcap=1.5)
    check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=window, cu=cu, softcap=1.5)


@needs_cuda
def test_cuda_raw_op_refuses_softcap():
    q, k, v = qkv(2, 64, 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    cos, sin = tables(64, 64, "cuda")
    for causal in (True, False):
        with pytest.raises(RuntimeError, match="softcap"):
            torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, 0.125, False, False, None, softcap=1.5)


def test_attention_rel_covers_every_dtype():
    # guards the tolerance table this file relies on
    assert set(ATTENTION_REL) >= {torch.float64, torch.float32, torch.float16, torch.bfloat16}
