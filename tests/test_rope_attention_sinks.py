"""pirope.rope_attention(..., sinks=s): attention sinks, as in GPT-OSS.

Each query row's softmax also has one key of logit s[h] (h: the row's head) and no value:
out = sum_j exp(score_j - lse) v_j with lse = log(sum_j exp(score_j) + exp(s[h])). The
reference (band_reference in attention_inputs.py) appends that column to float64 scores
and drops it after the softmax, as transformers' GPT-OSS eager attention does; it is
itself checked against transformers' own function. Outputs, q/k/v gradients and the
sinks' gradient are compared over dtypes, GQA, windows, soft-caps, packed sequences and the
CPU kernels' tiles; then bitwise properties (-inf sinks are no sinks, thread counts),
gradcheck, opcheck, torch.compile, torch.func, the unfused (CUDA) path run on CPU, bad
input, and CUDA (skipped without a GPU)."""

import pytest
import torch

import pirope
from attention_inputs import (assert_all_equal, assert_compiled_like_eager, at_thread_counts, band_reference,
                              check_against_reference, cu_tensor, many_threads, packed_qkv, qkv, run, small_call,
                              tables, unfused_module)
from conftest import CUDA_SKIP_REASON, cuda_ready
from reference import assert_attention_close, rope_reference

func = torch.func


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sinks_for(heads, dtype=torch.float32, device="cpu"):
    """Sinks around the scores' scale (GPT-OSS initialises them like weights; trained ones
    reach a few units), so that they change the result without swamping it; float32, or
    float64 for float64 inputs (their gradient comes in their dtype)."""
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(heads, dtype=dtype, device=device) * 2


# ---- 1. the reference itself ----

def test_reference_is_transformers_gpt_oss_eager_attention():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = qkv(2, 11, 4, 2, 16, dtype=torch.float64)
    cos, sin = tables(16, 11, dtype=torch.float64)
    sinks = sinks_for(4, torch.float64)
    mask = torch.full((11, 11), float("-inf"), dtype=torch.float64).triu(1)  # causal, additive
    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups, module.training = sinks, 2, False
    qr, kr = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    theirs, _ = eager_attention_forward(module, qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), mask,
                                        scaling=16 ** -0.5)
    mine = band_reference(q, k, v, cos, sin, sinks=sinks)
    torch.testing.assert_close(mine, theirs, atol=1e-13, rtol=1e-13)


# ---- 2. outputs and gradients against the reference ----

CASES = [  # (heads, head_dim, rotary_dim, seqlen, causal, window, softcap)
    ((4, 2), 64, 64, 70, True, (-1, -1), 0.0),
    ((4, 4), 32, 32, 300, False, (-1, -1), 0.0),  # past the tiles: 64 query rows, 256 keys
    ((8, 2), 64, 32, 300, True, (40, 0), 0.0),  # GPT-OSS's sliding layers (window 128 there)
    ((4, 1), 48, 48, 90, False, (9, 5), 0.0),
    ((4, 2), 32, 32, 130, True, (-1, -1), 1.5),  # with a soft-cap: the sink is not capped
    ((2, 2), 3, 2, 17, True, (-1, -1), 0.0),  # odd head dim, one pair rotated
]


@pytest.mark.parametrize("heads, head_dim, rotary_dim, seqlen, causal, window, softcap", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_reference(heads, head_dim, rotary_dim, seqlen, causal, window, softcap, dtype):
    q, k, v = qkv(2, seqlen, *heads, head_dim, dtype=dtype)
    cos, sin = tables(rotary_dim, seqlen + 5)
    pos = torch.randint(0, seqlen + 5, (2, seqlen))
    check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=window, softcap=softcap,
                            sinks=sinks_for(heads[0], dtype))


@pytest.mark.parametrize("cu", [[0, 5, 5, 17, 40], [0, 300, 301, 420]])
@pytest.mark.parametrize("window", [(-1, -1), (20, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sequences_match_reference(cu, window, dtype):
    q, k, v = packed_qkv(cu[-1], 4, 2, 32, dtype=dtype)
    cos, sin = tables(32, 400)
    check_against_reference(q, k, v, cos, sin, window=window, cu=cu, sinks=sinks_for(4))


@pytest.mark.parametrize("sinks_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_sinks_of_another_dtype_are_taken_and_get_a_gradient_of_theirs(sinks_dtype):
    # a bfloat16 model's sinks parameter is bfloat16; the math is float32 all the same, and
    # the sinks' gradient is rounded to their dtype
    q, k, v = qkv(1, 40, 4, 2, 32)
    cos, sin = tables(32, 40)
    sinks = sinks_for(4).to(sinks_dtype)
    got = run(q, k, v, cos, sin, sinks=sinks)
    ref = band_reference(q, k, v, cos, sin, grad_out=got[4], sinks=sinks)
    for what, a, want in zip(("out", "dq", "dk", "dv"), got[:4], ref):
        assert_attention_close(a, want, torch.float32, what)
    assert got[5].dtype == sinks_dtype
    assert_attention_close(got[5], ref[4], sinks_dtype if sinks_dtype != torch.float64 else torch.float32, "dsinks")


# ---- 3. properties ----

def test_minus_inf_sinks_are_no_sinks_bit_for_bit():
    q, k, v = qkv(2, 300, 8, 2, 64)
    cos, sin = tables(64, 300)
    plain = run(q, k, v, cos, sin, window_size=(50, 0))
    none = run(q, k, v, cos, sin, g=plain[4], window_size=(50, 0), sinks=torch.full((8,), float("-inf")))
    assert_all_equal(plain, none)
    assert torch.equal(none[5], torch.zeros(8))  # exp(-inf - lse) = 0


def test_lse_includes_the_sink():
    q, k, v = qkv(2, 33, 4, 2, 16, dtype=torch.float64)
    cos, sin = tables(16, 33, dtype=torch.float64)
    sinks = sinks_for(4, torch.float64)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, True, 0.25, False, False, None, -1, -1, 0.0,
                                               sinks)
    ref_out, ref_lse = band_reference(q, k, v, cos, sin, softmax_scale=0.25, with_lse=True, sinks=sinks)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    _, plain_lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, True, 0.25, False)
    torch.testing.assert_close(lse, torch.logaddexp(plain_lse, sinks[None, :, None]), atol=1e-12, rtol=1e-12)


def test_a_dominant_sink_takes_the_attention():
    # a sink far above every score: the head attends to nothing (out ~ 0, lse = the sink)
    q, k, v = qkv(1, 20, 2, 1, 16)
    cos, sin = tables(16, 20)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, True, 0.25, False, False, None, -1, -1, 0.0,
                                               torch.tensor([1e4, 0.0]))
    assert out[:, :, 0].abs().max() == 0 and torch.equal(lse[:, 0], torch.full((1, 20), 1e4))
    assert out[:, :, 1].abs().max() > 0.01


def test_gradients_do_not_depend_on_the_thread_count():
    q, k, v = qkv(2, 300, 4, 2, 64)
    cos, sin = tables(64, 300)
    sinks = sinks_for(4)
    g = torch.randn(2, 300, 4, 64)
    runs = at_thread_counts((many_threads(), 1),
                            lambda: run(q, k, v, cos, sin, g=g, sinks=sinks, window_size=(90, 0)))
    assert_all_equal(runs[0], runs[1], what=("out", "dq", "dk", "dv", "g", "dsinks"))


def test_gradcheck_through_q_k_v_and_the_sinks():
    q, k, v = (t.requires_grad_() for t in qkv(1, 9, 4, 2, 8, dtype=torch.float64))
    cos, sin = tables(8, 9, dtype=torch.float64)
    sinks = sinks_for(4, torch.float64).requires_grad_()
    for kw in (dict(), dict(window_size=(3, 0)), dict(causal=False, softcap=1.5)):
        assert torch.autograd.gradcheck(
            lambda q, k, v, s: pirope.rope_attention(q, k, v, cos, sin, sinks=s, **kw), (q, k, v, sinks))
    total = torch.tensor([0, 4, 9])
    qp, kp, vp = (t.detach()[0].requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: pirope.rope_attention(q, k, v, cos, sin, cu_seqlens=total, sinks=s), (qp, kp, vp, sinks))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(packed, requires_grad):
    cos, sin = tables(16, 12)
    if packed:
        q, k, v = packed_qkv(12, 4, 2, 16)
        rest = (None, True, 0.25, False, False, cu_tensor([0, 5, 12]), -1, -1, 0.0)
    else:
        q, k, v = qkv(2, 12, 4, 2, 16)
        rest = (None, True, 0.25, False, False, None, 3, -1, 0.0)
    sinks = sinks_for(4)
    tensors = [t.requires_grad_(requires_grad) for t in (q, k, v, sinks)]
    torch.library.opcheck(torch.ops.pirope.rope_attention, (*tensors[:3], cos, sin, *rest, tensors[3]))


def test_compiles_fullgraph_like_eager():
    cos, sin = tables(32, 40)

    def f(q, k, v, sinks):
        return pirope.rope_attention(q, k, v, cos, sin, sinks=sinks, window_size=(9, 0)).square().sum()

    assert_compiled_like_eager([(f, qkv(2, 40, 4, 2, 32), (sinks_for(4).requires_grad_(),))])


def test_per_sample_gradients_under_vmap():
    # vmap(grad) over a batch of q with shared k, v and sinks (the batching rule folds the
    # vmapped dim into the heads and repeats the sinks): each sample's gradients equal
    # those of that sample alone, the sinks' included
    cos, sin = tables(16, 20, dtype=torch.float64)
    qs, gs = (torch.randn(3, 1, 20, 4, 16, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 20, 2, 16, dtype=torch.float64) for _ in range(2))
    sinks = sinks_for(4, torch.float64)

    def loss(q, k, v, s, g):
        return (pirope.rope_attention(q, k, v, cos, sin, sinks=s) * g).sum()

    grads = func.vmap(func.grad(loss, argnums=(0, 1, 2, 3)), in_dims=(0, None, None, None, 0))(qs, k, v, sinks, gs)
    for i in range(3):
        ref = band_reference(qs[i], k, v, cos, sin, grad_out=gs[i], sinks=sinks)[1:]
        for what, a, b in zip(("dq", "dk", "dv", "dsinks"), (t[i] for t in grads), ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"{what}: {m}")
    out = func.vmap(lambda q: pirope.rope_attention(q, k, v, cos, sin, sinks=sinks))(qs)
    for i in range(3):
        torch.testing.assert_close(out[i], band_reference(qs[i], k, v, cos, sin, sinks=sinks), atol=1e-12,
                                   rtol=1e-12)


def test_second_derivatives_through_the_sinks_raise():
    # the sinks' gradient reads lse, a function of q, k and the sinks: differentiating it as
    # plain ops would take lse as a constant (silently wrong), so it refuses like dq, dk, dv
    q, k, v = (t.requires_grad_() for t in qkv(1, 6, 2, 2, 8, dtype=torch.float64))
    cos, sin = tables(8, 6, dtype=torch.float64)
    sinks = sinks_for(2, torch.float64).requires_grad_()
    (g,) = torch.autograd.grad(pirope.rope_attention(q, k, v, cos, sin, sinks=sinks).square().sum(), sinks,
                               create_graph=True)
    for wrt in (sinks, q):
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(g.sum(), wrt, retain_graph=True)
    loss = lambda s: pirope.rope_attention(q.detach(), k.detach(), v.detach(), cos, sin, sinks=s).square().sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="double backward"):
        func.jacrev(func.grad(loss))(sinks.detach())


# ---- 4. the unfused (CUDA) path, on CPU ----

@pytest.mark.parametrize("window, softcap, deterministic", [((-1, -1), 0.0, False), ((9, 0), 0.0, False),
                                                             ((-1, -1), 1.5, False), ((-1, -1), 0.0, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unfused_dense_path_matches_reference(window, softcap, deterministic, dtype, monkeypatch):
    def refuse(*args, **kwargs):  # SDPA has no sinks: the block attention must run
        raise AssertionError("scaled_dot_product_attention was called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)
    q, k, v = qkv(2, 130, 8, 2, 32, dtype=dtype)
    cos, sin = tables(32, 130)
    check_against_reference(q, k, v, cos, sin, window=window, softcap=softcap, deterministic=deterministic,
                            fn="sdpa", sinks=sinks_for(8, dtype))


def test_unfused_path_refuses_second_derivatives():
    mod = unfused_module()
    q, k, v = (t.requires_grad_() for t in qkv(1, 6, 2, 2, 8, dtype=torch.float64))
    cos, sin = tables(8, 6, dtype=torch.float64)
    sinks = sinks_for(2, torch.float64).requires_grad_()
    out = mod._sdpa_fallback(q, k, v, cos, sin, None, True, 0.3, False, (-1, -1), 1.5, True, sinks)
    grads = torch.autograd.grad(out.square().sum(), (q, sinks), create_graph=True)
    for g in grads:
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(g.sum(), q, retain_graph=True)


@pytest.mark.parametrize("softcap", [0.0, 1.5], ids=["plain", "capped"])
@pytest.mark.parametrize("batched", ["q", "k", "v", "sinks", "grad"])
@pytest.mark.parametrize("how", ["grad", "vjp"])
def test_unfused_path_per_sample_gradients_batched_in_one_argument(how, batched, softcap):
    # the block attention steps in place on each block's scores only where they hold every
    # input of the other operand (under vmap an unbatched tensor cannot take a batched one
    # in place): per-sample gradients right whichever one argument vmap batches, the sinks
    # (which reach the log-sum-exp, not the scores) included; through vmap of grad (whose
    # seed, the gradient of a batched loss, is batched) and of vjp with an unbatched
    # cotangent (dO unbatched, its products with v too, unless v is batched)
    mod = unfused_module()
    cos, sin = tables(16, 20, dtype=torch.float64)
    args = {n: torch.randn(1, 20, 2 if n != "q" else 4, 16, dtype=torch.float64) * 3 for n in ("q", "k", "v")}
    args["sinks"] = sinks_for(4, torch.float64)
    args["grad"] = torch.randn(1, 20, 4, 16, dtype=torch.float64)
    args[batched] = torch.stack([args[batched] * (1 + i / 4) for i in range(3)])

    def attention(q, k, v, s):
        return mod._sdpa_fallback(q, k, v, cos, sin, None, True, 0.3, False, (6, 0), softcap, True, s)

    def grads_of(q, k, v, s, g):
        if how == "grad":
            return func.grad(lambda *a: (attention(*a) * g).sum(), argnums=(0, 1, 2, 3))(q, k, v, s)
        return func.vjp(attention, q, k, v, s)[1](g)

    dims = tuple(0 if n == batched else None for n in args)
    grads = func.vmap(grads_of, in_dims=dims)(*args.values())
    for i in range(3):
        q, k, v, s, g = (t[i] if n == batched else t for n, t in args.items())
        ref = band_reference(q, k, v, cos, sin, None, True, (6, 0), 0.3, softcap=softcap, grad_out=g, sinks=s)[1:]
        for what, a, b in zip(("dq", "dk", "dv", "dsinks"), (t[i] for t in grads), ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"{batched} {what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unfused_packed_path_matches_reference(dtype):
    q, k, v = packed_qkv(60, 4, 2, 32, dtype=dtype)
    cos, sin = tables(32, 60)
    check_against_reference(q, k, v, cos, sin, cu=[0, 5, 5, 41, 60], fn="varlen", window=(7, 0),
                            sinks=sinks_for(4, dtype))


@pytest.mark.parametrize("fn", ["public", "sdpa", "varlen", "varlen_public"])
def test_no_query_heads_give_empty_gradients(fn):
    # nheads_q = 0 (a multiple of any nheads_kv) with (0,) sinks: empty output and gradients,
    # zero ones for k and v, on the fused (CPU) and the unfused (CUDA) paths alike
    packed = fn.startswith("varlen")
    make = (lambda h: packed_qkv(9, h, 2, 8, dtype=torch.float64)) if packed else \
        (lambda h: qkv(1, 9, h, 2, 8, dtype=torch.float64))
    q, k, v = make(0)
    cos, sin = tables(8, 9, dtype=torch.float64)
    kw = dict(sinks=torch.zeros(0, dtype=torch.float64), window_size=(3, 0))
    if packed:
        kw["cu_seqlens"] = cu_tensor([0, 4, 9], q.device)
    out, dq, dk, dv, _, dsinks = run(q, k, v, cos, sin, fn="public" if fn == "varlen_public" else fn, **kw)
    assert out.shape == q.shape and dq.shape == q.shape and dsinks.shape == (0,)
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))

# ---- 5. bad input ----

@pytest.mark.parametrize("packed", [False, True])
def test_bad_sinks_are_refused_naming_the_argument(packed):
    q, k, v, cos, sin, kw = small_call(packed)
    for sinks, error, match in [
        (torch.zeros(3), RuntimeError, r"sinks must be 1-D \(nheads_q,\) = \(4,\)"),
        (torch.zeros(1, 4), RuntimeError, r"sinks must be 1-D"),
        (torch.zeros(4, dtype=torch.int64), RuntimeError, "sinks must be float32, float64, float16 or bfloat16"),
        (torch.zeros(4, device="meta"), RuntimeError, "sinks must be on cpu like q"),
        (torch.tensor([0.0, float("nan"), 0.0, 0.0]), RuntimeError, "sinks must be finite or -inf"),
        (torch.tensor([0.0, float("inf"), 0.0, 0.0]), RuntimeError, "sinks must be finite or -inf"),
        (torch.tensor([0.0, 1e300, 0.0, 0.0], dtype=torch.float64), RuntimeError,
         r"sinks must be at most 3.40282e\+38 \(the largest float32: Float inputs are computed in float32\), "
         r"got 1e\+300"),
        ([0.0, 0.0, 0.0, 0.0], TypeError, "sinks must be a torch.Tensor"),
        (torch.zeros(4).to_sparse(), TypeError, "sinks must be a dense"),
    ]:
        with pytest.raises(error, match=match):
            pirope.rope_attention(q, k, v, cos, sin, sinks=sinks, **kw)


def test_forward_mode_ad_through_sinks_is_refused():
    q, k, v = qkv(1, 8, 4, 2, 16)
    cos, sin = tables(16, 8)
    with pytest.raises(NotImplementedError, match="sinks"):
        func.jvp(lambda s: pirope.rope_attention(q, k, v, cos, sin, sinks=s), (sinks_for(4),), (torch.ones(4),))


# ---- 6. CUDA (the unfused block attention; the fused kernels take no sinks) ----

@pytest.mark.skipif(not cuda_ready(), reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window, cu", [((-1, -1), None), ((100, 0), None), ((-1, -1), [0, 300, 301, 700])])
def test_cuda_matches_reference(dtype, window, cu):
    cos, sin = tables(64, 1024, device="cuda")
    if cu is None:
        q, k, v = qkv(2, 700, 8, 2, 64, dtype=dtype, device="cuda")
    else:
        q, k, v = packed_qkv(cu[-1], 8, 2, 64, dtype=dtype, device="cuda")
    check_against_reference(q, k, v, cos, sin, window=window, cu=cu, sinks=sinks_for(8, device="cuda"))


@pytest.mark.skipif(not cuda_ready(), reason=CUDA_SKIP_REASON)
def test_cuda_raw_op_refuses_sinks():
    q, k, v = qkv(1, 8, 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    cos, sin = tables(64, 8, device="cuda")
    with pytest.raises(RuntimeError, match="sinks .* supported by the CPU kernels only"):
        torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, True, 0.125, False, False, None, -1, -1, 0.0,
                                        torch.zeros(4, device="cuda"))
