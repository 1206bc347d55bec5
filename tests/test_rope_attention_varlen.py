"""pirope.rope_attention with cu_seqlens: variable-length (packed) sequences, as in
flash-attn's varlen API. q (total, nheads_q, headdim), k and v (total, nheads_kv,
headdim); sequence i is rows cu_seqlens[i] .. cu_seqlens[i+1]-1 and attention never
crosses sequences.

Outputs and gradients are checked against an independent float64 reference written
here (rope_reference's rotation at each token's position, then plain softmax attention
with a block-diagonal mask over the packed tokens), against the dense call per
sequence, and through autograd, opcheck and torch.compile. The CUDA path (unfused:
apply_rope_qk + attention per sequence) is also checked on CPU through
rope_attention._varlen_unfused."""

import importlib

import pytest
import torch

import pirope
from attention_inputs import (at_thread_counts, cu_tensor, dense_per_sequence, many_threads, packed_qkv, spans, tables,
                              token_positions, use_packed_products)
from reference import assert_attention_close as assert_close_to
from reference import rope_reference

ERRORS = (ValueError, TypeError, IndexError, RuntimeError)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def unfused():
    # pirope.rope_attention is the function; the module holds the unfused CUDA path.
    return importlib.import_module("pirope.rope_attention")._varlen_unfused


# ---- independent float64 reference ----

def varlen_reference(q, k, v, cos, sin, cu, position_ids=None, causal=True, softmax_scale=None,
                     interleaved=False, grad_out=None):
    """float64 RoPE + attention over packed sequences: every token rotated at its
    position, scores over all packed tokens masked to the token's own sequence (and
    to keys at or before it when causal). Returns the output (total, Hq, D), or with
    grad_out (out, dq, dk, dv), the gradients rotated back to the input basis."""
    total, hq, d = q.shape
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    pos = token_positions(cu, total, position_ids)
    need = grad_out is not None
    qr = rope_reference(q, cos, sin, pos, interleaved).requires_grad_(need)
    kr = rope_reference(k, cos, sin, pos, interleaved).requires_grad_(need)
    v64 = v.detach().to(torch.float64).cpu().requires_grad_(need)
    seq = torch.full((total,), -1, dtype=torch.int64)
    for i, (a, b) in enumerate(spans(cu)):
        seq[a:b] = i
    idx = torch.arange(total)
    visible = seq[:, None] == seq[None, :]
    if causal:
        visible &= idx[None, :] <= idx[:, None]
    group = hq // k.shape[1]
    kk, vv = kr.repeat_interleave(group, dim=1), v64.repeat_interleave(group, dim=1)
    scores = torch.einsum("shd,thd->hst", qr, kk) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("hst,thd->shd", scores.softmax(-1), vv)
    if not need:
        return out
    gq, gk, gv = torch.autograd.grad(out, (qr, kr, v64), grad_out.detach().to(torch.float64).cpu())
    dq = rope_reference(gq, cos, sin, pos, interleaved, conjugate=True)
    dk = rope_reference(gk, cos, sin, pos, interleaved, conjugate=True)
    return out.detach(), dq, dk, gv


def run_varlen(q, k, v, cos, sin, cu, pos=None, causal=True, scale=None, interleaved=False, fn="public", g=None,
               deterministic=None):
    """(out, dq, dk, dv, grad_out) of the public function (or of _varlen_unfused)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if fn == "public":
        out = pirope.rope_attention(q, k, v, cos, sin, pos, causal=causal, softmax_scale=scale,
                                    interleaved=interleaved, deterministic=deterministic, cu_seqlens=cu)
    else:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        out = unfused()(q, k, v, cos, sin, pos, cu, causal, scale, interleaved)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    g = torch.randn_like(out) if g is None else g
    out.backward(g)
    return out, q.grad, k.grad, v.grad, g


def check_against_reference(q, k, v, cos, sin, cu, pos=None, causal=True, scale=None, interleaved=False,
                            fn="public"):
    out, gq, gk, gv, g = run_varlen(q, k, v, cos, sin, cu, pos, causal, scale, interleaved, fn)
    ref, dq, dk, dv = varlen_reference(q, k, v, cos, sin, cu, pos, causal, scale, interleaved, grad_out=g)
    assert_close_to(out, ref, q.dtype, "out")
    assert_close_to(gq, dq, q.dtype, "dq")
    assert_close_to(gk, dk, q.dtype, "dk")
    assert_close_to(gv, dv, q.dtype, "dv")


def test_reference_is_block_diagonal_dense_attention():
    # The reference itself: one sequence is the plain dense causal attention, and a
    # packed pair is the two sequences computed apart (guards the mask construction).
    from reference import attention_reference
    q, k, v = packed_qkv(12, 4, 2, 16, dtype=torch.float64)
    cos, sin = tables(16, 12, dtype=torch.float64)
    for causal in (True, False):
        ref = varlen_reference(q, k, v, cos, sin, [0, 5, 12], causal=causal)
        for a, b in ((0, 5), (5, 12)):
            dense = attention_reference(q[None, a:b], k[None, a:b], v[None, a:b], cos, sin, causal=causal)[0]
            torch.testing.assert_close(ref[a:b], dense, atol=1e-13, rtol=1e-13)


# ---- 1. matches the float64 reference ----

CU_CASES = [
    [0, 5, 5, 17, 40],  # a zero-length sequence in the middle
    [0, 40],  # one sequence
    [0, 300, 301, 600],  # crossing the 64-row query tiles and 256-key tiles, a length-1 sequence
    [0, 1, 2, 3, 70],  # length-1 sequences, then one across a query tile
]


@pytest.mark.parametrize("cu", CU_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (2, 2)])
def test_matches_reference_cu_seqlens_gqa(cu, causal, heads):
    q, k, v = packed_qkv(cu[-1], *heads, 64)
    cos, sin = tables(64, cu[-1])
    check_against_reference(q, k, v, cos, sin, cu_tensor(cu), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cu", [[0, 5, 5, 17, 90], [0, 70, 71, 330]], ids=["short", "tiles"])
def test_matches_reference_every_dtype(device, dtype, causal, cu):
    q, k, v = packed_qkv(cu[-1], 4, 2, 64, dtype=dtype, device=device)
    cos, sin = tables(64, cu[-1], device)
    check_against_reference(q, k, v, cos, sin, cu_tensor(cu, device), causal=causal)


@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (64, 32), (24, 24), (24, 16), (5, 4)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_head_dims_partial_rotary_interleaved(head_dim, rotary_dim, interleaved, causal):
    cu = [0, 9, 9, 80, 83]
    q, k, v = packed_qkv(cu[-1], 4, 2, head_dim)
    cos, sin = tables(rotary_dim, 100)
    check_against_reference(q, k, v, cos, sin, cu_tensor(cu), causal=causal, interleaved=interleaved)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_many_short_sequences(causal):
    # hundreds of sequences of 0-3 tokens: many sequences per query and key tile
    lens = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(1))
    cu = [0] + torch.cumsum(lens, 0).tolist()
    q, k, v = packed_qkv(cu[-1], 4, 1, 32)
    cos, sin = tables(32, 8)
    check_against_reference(q, k, v, cos, sin, torch.tensor(cu), causal=causal)


def test_matches_reference_explicit_softmax_scale_and_float64_tables():
    cu = [0, 13, 40, 41]
    q, k, v = packed_qkv(cu[-1], 4, 2, 32)
    cos, sin = tables(32, 41, dtype=torch.float64)
    check_against_reference(q, k, v, cos, sin, cu_tensor(cu), causal=True, scale=0.3)
    check_against_reference(q, k, v, cos, sin, cu_tensor(cu), causal=False, scale=0.05)


# ---- 2. equals the dense call per sequence ----

@pytest.mark.parametrize("cu", [[0, 5, 5, 17, 40], [0, 300, 301, 600], [0, 64, 128, 129, 385]],
                         ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("positions", [False, True])
def test_equals_dense_call_per_sequence(cu, causal, positions):
    total = cu[-1]
    q, k, v = packed_qkv(total, 4, 2, 64)
    cos, sin = tables(64, 700)
    pos = torch.randint(0, 700, (total,)) if positions else None
    kw = dict(causal=causal, softmax_scale=0.11, interleaved=positions)
    out, gq, gk, gv, g = run_varlen(q, k, v, cos, sin, cu_tensor(cu), pos, causal, 0.11, positions)
    dense = dense_per_sequence(q, k, v, cos, sin, cu, pos, g, **kw)
    for what, got, want in zip(("out", "dq", "dk", "dv"), (out, gq, gk, gv), dense):
        tol = dict(atol=1e-6, rtol=1e-6) if what == "out" else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.detach(), want, **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("causal", [True, False])
def test_single_sequence_equals_dense_batch_one(causal):
    total = 333
    q, k, v = packed_qkv(total, 8, 2, 64)
    cos, sin = tables(64, total)
    out, gq, gk, gv, g = run_varlen(q, k, v, cos, sin, cu_tensor([0, total]), causal=causal)
    dense = dense_per_sequence(q, k, v, cos, sin, [0, total], None, g, causal=causal)
    for what, got, want in zip(("out", "dq", "dk", "dv"), (out, gq, gk, gv), dense):
        tol = dict(atol=1e-6, rtol=1e-6) if what == "out" else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.detach(), want, **tol, msg=lambda m: f"{what}: {m}")


def test_raw_op_lse_matches_dense_per_sequence():
    # The raw op's lse is (nheads_q, total), float32: per sequence, the dense op's lse.
    cu = [0, 7, 7, 90, 100]
    q, k, v = packed_qkv(100, 4, 2, 32)
    cos, sin = tables(32, 100)
    for dtype, lse_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64)):
        qq, kk, vv = (t.to(dtype) for t in (q, k, v))
        out, lse = torch.ops.pirope.rope_attention(qq, kk, vv, cos, sin, None, True, 0.2, False, False,
                                                   cu_tensor(cu))
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == (4, 100) and lse.dtype == lse_dtype
        for a, b in spans(cu):
            o, l = torch.ops.pirope.rope_attention(qq[None, a:b], kk[None, a:b], vv[None, a:b], cos, sin, None,
                                                   True, 0.2, False, False)
            tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-13, rtol=1e-13)
            torch.testing.assert_close(out[a:b], o[0], **tol)
            torch.testing.assert_close(lse[:, a:b], l[0], **tol)


# ---- 3. position forms, cu_seqlens dtypes ----

# RoPE attention depends on position differences only: random positions tell a kernel
# that uses them from one that ignores them; the offset forms check that they are taken.
@pytest.mark.parametrize("form", ["none", "flat_random", "flat_int32", "one_total_random", "one_total_offset",
                                  "flat_global_offset"])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_position_forms(device, form, cu_dtype):
    cu = [0, 5, 5, 17, 40, 90]
    total = cu[-1]
    cos, sin = tables(64, 256, device)
    restart = token_positions(cu, total).to(device)
    pos = {
        "none": None,
        "flat_random": torch.randint(0, 256, (total,), device=device),
        "flat_int32": torch.randint(0, 256, (total,), device=device, dtype=torch.int32),
        "one_total_random": torch.randint(0, 256, (1, total), device=device),
        "one_total_offset": (restart + 100)[None],  # (1, total): restarting at 100
        "flat_global_offset": torch.arange(total, device=device) + 100,  # not restarting
    }[form]
    q, k, v = packed_qkv(total, 4, 2, 64, device=device)
    check_against_reference(q, k, v, cos, sin, cu_tensor(cu, device, cu_dtype), pos)


def test_no_position_ids_restart_in_every_sequence():
    # None is the explicit restart positions (a shift of a sequence's positions leaves its
    # attention unchanged but for rounding, so the reference checks cannot tell).
    cu = cu_tensor([0, 30, 31, 100])
    q, k, v = packed_qkv(100, 4, 2, 64)
    cos, sin = tables(64, 100)
    restart = token_positions([0, 30, 31, 100], 100)
    implicit = pirope.rope_attention(q, k, v, cos, sin, cu_seqlens=cu)
    explicit = pirope.rope_attention(q, k, v, cos, sin, restart, cu_seqlens=cu)
    explicit_1t = pirope.rope_attention(q, k, v, cos, sin, restart[None].int(), cu_seqlens=cu)
    torch.testing.assert_close(implicit, explicit, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(implicit, explicit_1t, atol=1e-6, rtol=1e-6)
    assert_close_to(implicit, varlen_reference(q, k, v, cos, sin, [0, 30, 31, 100], restart), torch.float32, "out")


# ---- 4. non-contiguous inputs ----

@pytest.mark.parametrize("causal", [True, False])
def test_non_contiguous_inputs(device, causal):
    cu = [0, 11, 11, 75, 140]
    total, d = cu[-1], 64
    q = torch.randn(4, total, d, device=device).transpose(0, 1)  # (H, T, D) -> (T, H, D)
    qkv = torch.randn(total + 6, 8, d, device=device)  # fused projection, sliced in rows and heads
    k, v = qkv[3:3 + total, 2:4], qkv[3:3 + total, 5:7]
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    cos, sin = tables(d, total, device)
    check_against_reference(q, k, v, cos, sin, cu_tensor(cu, device), causal=causal)
    # a strided cu_seqlens (every other entry of a bigger tensor)
    strided = torch.tensor([c for x in cu for c in (x, 999)], device=device)[::2]
    assert not strided.is_contiguous()
    check_against_reference(q, k, v, cos, sin, strided, causal=causal)


# ---- 5. zero-length sequences and empty input ----

@pytest.mark.parametrize("cu", [[0, 0, 6, 6, 6, 19, 19], [0, 0, 1], [0, 10, 10]], ids=lambda c: "-".join(map(str, c)))
def test_zero_length_sequences(cu):
    q, k, v = packed_qkv(cu[-1], 4, 2, 64)
    cos, sin = tables(64, 32)
    for causal in (True, False):
        check_against_reference(q, k, v, cos, sin, cu_tensor(cu), causal=causal)


@pytest.mark.parametrize("cu", [[0], [0, 0, 0]], ids=["no_sequences", "two_empty"])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_all_empty(cu, cu_dtype):
    q, k, v = (torch.randn(0, h, 64, requires_grad=True) for h in (4, 2, 2))
    cos, sin = tables(64, 8)
    out = pirope.rope_attention(q, k, v, cos, sin, cu_seqlens=cu_tensor(cu, dtype=cu_dtype))
    assert out.shape == (0, 4, 64) and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    o, lse = torch.ops.pirope.rope_attention(q.detach(), k.detach(), v.detach(), cos, sin, None, True, 0.125,
                                             False, False, cu_tensor(cu, dtype=cu_dtype))
    assert o.shape == (0, 4, 64) and lse.shape == (4, 0)


# ---- 6. gradcheck ----

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("positions", [False, True])
def test_gradcheck_float64(causal, positions):
    cu = cu_tensor([0, 3, 3, 7])
    q = torch.randn(7, 2, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(7, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cos, sin = tables(6, 9, dtype=torch.float64)  # partial rotary: 6 of 8
    pos = torch.tensor([8, 0, 3, 2, 1, 5, 4]) if positions else None
    fn = lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, pos, causal=causal, cu_seqlens=cu)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---- 7. deterministic backward ----

def test_deterministic_backward_is_bit_identical():
    cu = cu_tensor([0, 130, 131, 400])
    q, k, v = packed_qkv(400, 8, 2, 64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cos, sin = tables(64, 400)
    g = torch.randn(400, 8, 64)

    def grads_of_one_run(flag):
        q.grad = k.grad = v.grad = None
        pirope.rope_attention(q, k, v, cos, sin, deterministic=flag, cu_seqlens=cu).backward(g)
        return [t.grad.clone() for t in (q, k, v)]

    n = many_threads()
    grads = [at_thread_counts((threads,), lambda: grads_of_one_run(flag))[0]
             for threads, flag in ((n, True), (n, True), (1, True), (n, False))]
    for other in grads[1:]:  # bit-identical, whatever the thread count (and the flag, on CPU)
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
    _, dq, dk, dv = varlen_reference(q, k, v, cos, sin, cu, grad_out=g)
    for what, got, want in zip(("dq", "dk", "dv"), grads[0], (dq, dk, dv)):
        assert_close_to(got, want, torch.float32, what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_split_over_threads_is_bit_identical(monkeypatch, dtype):
    # Packed sequences run as one batch row: with one kv head the CPU backward may split
    # into a dk/dv pass over key blocks and a dq pass over query blocks (key blocks
    # spanning sequence boundaries); the gradients must not depend on the thread count.
    # (BLAS products always run the one-pass backward: this test takes the AVX512 ones, or
    # their portable version.)
    use_packed_products(monkeypatch, dtype)
    cu = [0, 300, 301, 700, 1100]
    q, k, v = packed_qkv(1100, 4, 1, 64, dtype=dtype)
    cos, sin = tables(64, 1100)
    g = torch.randn(1100, 4, 64, dtype=dtype)
    grads = at_thread_counts((1, 2, 4), lambda: run_varlen(q, k, v, cos, sin, cu_tensor(cu), deterministic=True,
                                                           g=g)[1:4])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
    _, dq, dk, dv = varlen_reference(q, k, v, cos, sin, cu, grad_out=g)
    for what, got, want in zip(("dq", "dk", "dv"), grads[0], (dq, dk, dv)):
        assert_close_to(got, want, dtype, what)


# ---- 8. opcheck ----

@pytest.mark.parametrize("dtype, cu_dtype", [(torch.float32, torch.int32), (torch.float64, torch.int64)])
def test_opcheck(dtype, cu_dtype):
    cos, sin = tables(32, 16, dtype=dtype)
    cu = cu_tensor([0, 3, 3, 10, 12], dtype=cu_dtype)
    pos = torch.randint(0, 16, (12,))
    for rg in (False, True):
        q, k, v = (t.requires_grad_(rg) for t in packed_qkv(12, 4, 2, 48, dtype=dtype))
        torch.library.opcheck(torch.ops.pirope.rope_attention.default,
                              (q, k, v, cos, sin, pos, True, 0.2, False, False, cu))
        torch.library.opcheck(torch.ops.pirope.rope_attention.default,
                              (q, k, v, cos, sin, None, False, 0.5, True, True, cu))
    q, k, v = packed_qkv(12, 4, 2, 48, dtype=dtype)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, pos, True, 0.2, False, False, cu)
    assert lse.shape == (4, 12) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pirope.rope_attention_backward.default,
                          (g, q, k, v, out, lse, cos, sin, pos, True, 0.2, False, False, cu))
    qt = torch.randn(4, 12, 48, dtype=dtype).transpose(0, 1)  # fake must predict the real strides
    torch.library.opcheck(torch.ops.pirope.rope_attention.default,
                          (qt, qt[:, :2], qt[:, 2:], cos, sin, None, True, 0.2, False, False, cu))


def test_raw_backward_op_matches_reference():
    # rope_attention_backward with cu_seqlens: the reference's gradients.
    cu = [0, 20, 20, 57]
    q, k, v = packed_qkv(57, 4, 1, 32)
    cos, sin = tables(32, 57)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, False, 0.2, False, False, cu_tensor(cu))
    g = torch.randn_like(out)
    dq, dk, dv = torch.ops.pirope.rope_attention_backward(g, q, k, v, out, lse, cos, sin, None, False, 0.2,
                                                          False, False, cu_tensor(cu))
    ref, rq, rk, rv = varlen_reference(q, k, v, cos, sin, cu, None, False, 0.2, grad_out=g)
    for what, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref, rq, rk, rv)):
        assert_close_to(got, want, torch.float32, what)


# ---- 9. torch.compile ----

def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    cos, sin = tables(32, 64)
    proj = torch.nn.Linear(32, 32)

    def f(q, k, v, cu, pos):
        return pirope.rope_attention(proj(q), k, v, cos, sin, pos, causal=True, cu_seqlens=cu).square().sum()

    q, k, v = (t.requires_grad_() for t in packed_qkv(40, 4, 2, 32))
    compiled = torch.compile(f, fullgraph=True)
    for cu, pos in ((cu_tensor([0, 5, 5, 17, 40]), None),
                    (cu_tensor([0, 20, 21, 22, 40]), None),  # same shape, other lengths
                    (cu_tensor([0, 33, 40, 40, 40]), torch.randint(0, 64, (40,)))):
        q.grad = k.grad = v.grad = None
        loss = f(q, k, v, cu, pos)
        loss.backward()
        eager = [loss.detach()] + [t.grad.clone() for t in (q, k, v)]
        q.grad = k.grad = v.grad = None
        loss = compiled(q, k, v, cu, pos)
        loss.backward()
        for a, b in zip(eager, [loss.detach(), q.grad, k.grad, v.grad]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- 10. the unfused (CUDA) path, on CPU ----

@pytest.mark.parametrize(
    "cu, heads, head_dim, rotary_dim, causal, positions, interleaved",
    [
        ([0, 5, 5, 17, 40], (4, 2), 64, 64, True, False, False),
        ([0, 5, 5, 17, 40], (4, 1), 64, 64, False, False, False),
        ([0, 70, 71, 200], (2, 2), 24, 16, True, True, True),
        ([0, 0, 9, 30, 30], (4, 2), 32, 32, False, True, False),
        ([0, 50], (4, 4), 64, 32, True, False, True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unfused_path_matches_reference(cu, heads, head_dim, rotary_dim, causal, positions, interleaved, dtype):
    total = cu[-1]
    q, k, v = packed_qkv(total, *heads, head_dim, dtype=dtype)
    cos, sin = tables(rotary_dim, 300)
    pos = torch.randint(0, 300, (total,)) if positions else None
    check_against_reference(q, k, v, cos, sin, cu_tensor(cu), pos, causal, interleaved=interleaved, fn="unfused")


def test_unfused_path_equals_fused_on_cpu():
    cu = cu_tensor([0, 7, 7, 99, 130])
    q, k, v = packed_qkv(130, 4, 2, 64)
    cos, sin = tables(64, 130)
    g = torch.randn(130, 4, 64)
    fused = run_varlen(q, k, v, cos, sin, cu, g=g)[:4]
    plain = run_varlen(q, k, v, cos, sin, cu, fn="unfused", g=g)[:4]
    for what, a, b in zip(("out", "dq", "dk", "dv"), fused, plain):
        torch.testing.assert_close(a.detach(), b.detach(), atol=2e-5, rtol=2e-5, msg=lambda m: f"{what}: {m}")


# ---- 11. bad input: exceptions name the argument ----

def _varlen_args(**over):
    total = 16
    q, k, v = packed_qkv(total, 4, 2, 64)
    cos, sin = tables(64, 32)
    a = dict(q=q, k=k, v=v, cos=cos, sin=sin, position_ids=None, cu_seqlens=cu_tensor([0, 5, 16]))
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(cu_seqlens=torch.tensor([[0, 5, 16]], dtype=torch.int32)), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0.0, 5.0, 16.0])), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([False, True, True])), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 16], dtype=torch.int16)), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([1, 5, 16], dtype=torch.int32)), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 10, 5, 16], dtype=torch.int32)), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, -1, 16], dtype=torch.int64)), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 15], dtype=torch.int32)), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 17], dtype=torch.int32)), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 16, 20], dtype=torch.int64)), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([], dtype=torch.int32)), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=[0, 5, 16]), ERRORS, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 16], device="meta")), ERRORS, "cu_seqlens"),
        (dict(q=torch.randn(1, 16, 4, 64)), ERRORS, "total"),
        (dict(k=torch.randn(15, 2, 64)), ERRORS, r"\bk\b"),
        (dict(v=torch.randn(17, 2, 64)), ERRORS, r"\bv\b"),
        (dict(k=torch.randn(1, 16, 2, 64), v=torch.randn(1, 16, 2, 64)), ERRORS, r"\bk\b"),
        (dict(k=torch.randn(16, 3, 64), v=torch.randn(16, 3, 64)), ERRORS, "nheads"),
        (dict(position_ids=torch.arange(16).reshape(2, 8)), ERRORS, "position_ids"),
        (dict(position_ids=torch.arange(17)), ERRORS, "position_ids"),
        (dict(position_ids=torch.arange(16) + 20), IndexError, "position_ids"),
        (dict(position_ids=torch.arange(16) - 1), IndexError, "position_ids"),
    ],
    ids=["cu_2d", "cu_float", "cu_bool", "cu_int16", "cu_first_not_0", "cu_decreasing", "cu_negative",
         "cu_last_short", "cu_last_long", "cu_extra_past_total", "cu_empty", "cu_list", "cu_other_device",
         "q_4d", "k_total", "v_total", "k_v_4d", "nheads", "pos_2_by_half", "pos_too_long", "pos_too_big",
         "pos_negative"],
)
def test_rejects_bad_input(over, exc, match):
    a = _varlen_args(**over)
    with pytest.raises(exc, match=match):
        pirope.rope_attention(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["position_ids"],
                              cu_seqlens=a["cu_seqlens"])


@pytest.mark.parametrize("cu", [[0, 10, 5, 16], [0, 5, 17], [0, 5, 15], [1, 5, 16], [0, -3, 16]])
def test_raw_ops_reject_bad_cu_seqlens_values(cu):
    # The ops check the values themselves (no out-of-bounds reads from a bad cu_seqlens).
    a = _varlen_args()
    args = (a["q"], a["k"], a["v"], a["cos"], a["sin"], None, True, 0.125, False, False)
    out, lse = torch.ops.pirope.rope_attention(*args, cu_tensor([0, 5, 16]))
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.pirope.rope_attention(*args, torch.tensor(cu))
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.pirope.rope_attention_backward(out, *args[:3], out, lse, *args[3:], torch.tensor(cu))


# ---- 12. attention never crosses sequences ----

@pytest.mark.parametrize("causal", [True, False])
def test_attention_never_crosses_sequences(causal):
    cu = [0, 37, 100, 101, 170]  # sequence boundaries inside the query and key tiles
    total = cu[-1]
    q, k, v = packed_qkv(total, 4, 2, 64)
    cos, sin = tables(64, total)
    g = torch.randn(total, 4, 64)
    base = run_varlen(q, k, v, cos, sin, cu_tensor(cu), causal=causal, g=g)[:4]
    for i, (a, b) in enumerate(spans(cu)):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[a:b] = torch.randn_like(t[a:b]) * 3
        g2 = g.clone()
        g2[a:b] = torch.randn_like(g2[a:b])
        other = run_varlen(q2, k2, v2, cos, sin, cu_tensor(cu), causal=causal, g=g2)[:4]
        keep = torch.ones(total, dtype=torch.bool)
        keep[a:b] = False  # every other sequence's out, dq, dk, dv unchanged, bit for bit
        for what, x, y in zip(("out", "dq", "dk", "dv"), base, other):
            assert torch.equal(x[keep], y[keep]), f"perturbing sequence {i} changed {what} elsewhere"
        assert not torch.equal(base[0][a:b], other[0][a:b])


def test_tables_need_rows_for_the_longest_sequence_only():
    # positions restart per sequence: 25 tokens in sequences of at most 10 need 10 rows
    q, k, v = packed_qkv(25, 2, 1, 16)
    cos, sin = tables(16, 10)
    out = pirope.rope_attention(q, k, v, cos, sin, cu_seqlens=cu_tensor([0, 10, 20, 25]))
    ref = varlen_reference(q, k, v, cos, sin, [0, 10, 20, 25])
    assert_close_to(out, ref, torch.float32)
    with pytest.raises(IndexError, match="longest sequence in cu_seqlens has 11 tokens"):
        pirope.rope_attention(q, k, v, cos, sin, cu_seqlens=cu_tensor([0, 11, 20, 25]))


@pytest.mark.parametrize("fn", ["public", "unfused"])
@pytest.mark.parametrize("bad, match", [
    (dict(v=torch.randn(20, 4, 16)), "same number of heads"),
    (dict(v=torch.randn(20, 2, 8)), "head dim of q"),
    (dict(k=torch.randn(20, 3, 16), v=torch.randn(20, 3, 16)), "multiple of nheads_kv"),
    (dict(k=torch.randn(20, 0, 16), v=torch.randn(20, 0, 16)), "multiple of nheads_kv"),
    (dict(k=torch.randn(20, 2, 16, dtype=torch.float64)), "dtype of q"),
])
def test_packed_shapes_are_checked_on_every_path(fn, bad, match):
    # the CUDA path (_varlen_unfused) must refuse what the fused CPU op refuses, not let
    # SDPA broadcast it into some result
    args = dict(q=torch.randn(20, 4, 16), k=torch.randn(20, 2, 16), v=torch.randn(20, 2, 16))
    args.update(bad)
    cos, sin = tables(16, 64)
    cu = cu_tensor([0, 5, 20])
    with pytest.raises(ERRORS, match=match):
        if fn == "public":
            pirope.rope_attention(args["q"], args["k"], args["v"], cos, sin, cu_seqlens=cu)
        else:
            unfused()(args["q"], args["k"], args["v"], cos, sin, None, cu, True, 0.25, False)


@pytest.mark.parametrize("cu, match", [
    ([1, 5, 16], "must start at 0, got 1"),
    ([0, 10, 5, 16], "must be non-decreasing, got 10 then 5 at index 2"),
    ([0, -3, 16], "must be non-decreasing, got 0 then -3 at index 1"),
    ([0, 5, 15], r"must end at the total tokens of q \(16\), got 15"),
    ([0, 5, 17], r"must end at the total tokens of q \(16\), got 17")])
def test_unfused_path_checks_cu_seqlens_values_as_the_op(cu, match):
    # (the CUDA path reads them on the host: the op's own checks, its messages)
    a = _varlen_args()
    with pytest.raises(ValueError, match="rope_attention: cu_seqlens " + match):
        unfused()(a["q"], a["k"], a["v"], a["cos"], a["sin"], None, torch.tensor(cu), True, 0.125, False)


def test_unfused_path_on_no_tokens_still_has_gradients():
    q, k, v = (torch.randn(0, h, 16, requires_grad=True) for h in (4, 2, 2))
    cos, sin = tables(16, 8)
    out = unfused()(q, k, v, cos, sin, None, cu_tensor([0, 0]), True, 0.25, False)
    assert out.shape == (0, 4, 16) and out.requires_grad
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_unfused_path_tables_need_rows_for_the_longest_sequence_only():
    q, k, v = packed_qkv(25, 2, 1, 16)
    cos, sin = tables(16, 10)
    out = unfused()(q, k, v, cos, sin, None, cu_tensor([0, 10, 20, 25]), True, 0.25, False)
    assert_close_to(out, varlen_reference(q, k, v, cos, sin, [0, 10, 20, 25]), torch.float32)
    with pytest.raises(IndexError, match="longest sequence in cu_seqlens has 11 tokens"):
        unfused()(q, k, v, cos, sin, None, cu_tensor([0, 11, 20, 25]), True, 0.25, False)


def test_packed_shape_errors_show_the_shapes_passed():
    cos, sin = tables(16, 64)
    with pytest.raises(RuntimeError, match=r"got shapes \[20, 2, 16\] and \[20, 4, 16\]"):
        pirope.rope_attention(torch.randn(20, 4, 16), torch.randn(20, 2, 16), torch.randn(20, 4, 16), cos, sin,
                              cu_seqlens=cu_tensor([0, 20]))


@pytest.mark.parametrize("causal", [True, False])
def test_mixed_lengths_split_by_cost_over_any_thread_count(causal):
    # the CPU kernels split packed sequences of mixed lengths over the threads by cost, not
    # by count: outputs and gradients must not depend on the split (1, 2, 3 or 8 threads)
    cu = [0, 700, 701, 900, 964, 980, 981, 1000]
    q, k, v = packed_qkv(1000, 4, 2, 32)
    cos, sin = tables(32, 1000)
    g = torch.randn_like(q)
    runs = at_thread_counts((1, 2, 3, 8), lambda: run_varlen(q, k, v, cos, sin, cu_tensor(cu), causal=causal,
                                                             g=g)[:4])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    out, dq, dk, dv = varlen_reference(q, k, v, cos, sin, cu, causal=causal, grad_out=g)
    for what, got, want in zip(("out", "dq", "dk", "dv"), runs[0], (out, dq, dk, dv)):
        assert_close_to(got, want, torch.float32, what)
