"""pirope.rope_attention: fused RoPE + softmax attention against a float64 reference
(outputs and gradients), autograd, opcheck, torch.compile and bad input.

The fused op has a CPU kernel; on CUDA the public function falls back to
apply_rope_qk + SDPA, so the public-API tests also run there."""

import pytest
import torch

import pirope
from attention_inputs import at_thread_counts, many_threads, qkv, tables, unfused_module, use_packed_products
from reference import assert_attention_close as assert_close_to
from reference import attention_reference


def check_against_reference(q, k, v, cos, sin, pos=None, causal=True, scale=None, interleaved=False):
    """Output and the three gradients of pirope.rope_attention vs the reference
    (max error relative to max(1, max |reference|) within reference.ATTENTION_REL[dtype])."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = pirope.rope_attention(q, k, v, cos, sin, pos, causal=causal, softmax_scale=scale,
                                interleaved=interleaved)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    g = torch.randn_like(out)
    out.backward(g)
    ref, dq, dk, dv = attention_reference(q, k, v, cos, sin, pos, causal, scale, interleaved, grad_out=g)
    assert_close_to(out, ref, q.dtype, "out")
    assert_close_to(q.grad, dq, q.dtype, "dq")
    assert_close_to(k.grad, dk, q.dtype, "dk")
    assert_close_to(v.grad, dv, q.dtype, "dv")


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(8, 2), (4, 1), (4, 4)])
def test_matches_reference_head_dims_gqa(head_dim, causal, heads):
    q, k, v = qkv(2, 33, *heads, head_dim)
    cos, sin = tables(head_dim, 40)
    check_against_reference(q, k, v, cos, sin, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_every_dtype(device, dtype, causal):
    q, k, v = qkv(2, 77, 4, 2, 64, dtype=dtype, device=device)
    cos, sin = tables(64, 77, device)
    check_against_reference(q, k, v, cos, sin, causal=causal)


@pytest.mark.parametrize("seqlen", [1, 7, 129, 1000])
def test_any_seqlen(seqlen):
    # Not multiples of the tiles: partial query and key blocks, causal and full.
    q, k, v = qkv(1, seqlen, 2, 1, 64)
    cos, sin = tables(64, seqlen)
    for causal in (True, False):
        check_against_reference(q, k, v, cos, sin, causal=causal)


@pytest.mark.parametrize("form", ["none", "seq", "batch_seq", "one_seq", "int32"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_position_ids_forms(device, form, interleaved):
    b, s = 2, 21
    cos, sin = tables(64, 64, device)
    pos = {
        "none": None,
        "seq": torch.randperm(64, device=device)[:s],
        "batch_seq": torch.randint(0, 64, (b, s), device=device),
        "one_seq": torch.arange(10, 10 + s, device=device)[None],
        "int32": torch.randint(0, 64, (b, s), device=device, dtype=torch.int32),
    }[form]
    q, k, v = qkv(b, s, 4, 2, 64, device=device)
    check_against_reference(q, k, v, cos, sin, pos, interleaved=interleaved)


def test_partial_rotary_passes_features_through():
    q, k, v = qkv(2, 19, 4, 2, 80)
    cos, sin = tables(32, 19)  # rotary_dim 32 of 80
    check_against_reference(q, k, v, cos, sin, causal=True)
    check_against_reference(q, k, v, cos.double(), sin.double(), causal=False, interleaved=True)


def test_softmax_scale_default_and_explicit():
    q, k, v = qkv(1, 9, 2, 2, 64)
    cos, sin = tables(64, 9)
    default = pirope.rope_attention(q, k, v, cos, sin)
    explicit = pirope.rope_attention(q, k, v, cos, sin, softmax_scale=64 ** -0.5)
    torch.testing.assert_close(default, explicit, atol=0, rtol=0)
    check_against_reference(q, k, v, cos, sin, scale=0.3)


def test_softmax_scale_past_float32_only_for_float64():
    # float32/16 inputs are computed in float32, where 1e39 is inf: rejected (see
    # test_rejects_bad_keyword); float64 inputs are computed in float64 and accept it
    # (forward only: at this scale the softmax is one-hot and its gradient rounding noise)
    q, k, v = qkv(1, 9, 2, 2, 32, dtype=torch.float64)
    cos, sin = tables(32, 9)
    out = pirope.rope_attention(q, k, v, cos, sin, softmax_scale=1e39)
    assert_close_to(out, attention_reference(q, k, v, cos, sin, softmax_scale=1e39), torch.float64, "out")


def test_scores_past_float32_give_nan_rows_as_with_sdpa():
    # a scale within float32 whose scores are not (docstring of softmax_scale): the rows whose
    # scores overflow come out NaN, never a finite wrong value, as with torch's SDPA
    q, k, v = qkv(1, 12, 2, 2, 32)
    cos, sin = tables(32, 12)
    out = pirope.rope_attention(q, k, v, cos, sin, softmax_scale=3e38)
    qr, kr = pirope.apply_rope_qk(q, k, cos, sin)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=3e38).transpose(1, 2)
    nan_rows = out.isnan().any(-1)
    assert nan_rows.any() and torch.equal(nan_rows, out.isnan().all(-1))  # whole rows, never part
    # every row SDPA loses is lost here too (the kernels may overflow a little earlier: a
    # BLAS tile product may apply the scale before summing), and the rows kept agree
    assert not (sdpa.isnan().any(-1) & ~nan_rows).any()
    torch.testing.assert_close(out[~nan_rows], sdpa[~nan_rows])


@pytest.mark.parametrize("where", ["k", "v"])
def test_a_non_finite_key_or_value_reaches_the_rows_that_see_it(where):
    # NaN at key j (causal): every row i >= j that sees it is non-finite, as in float64 math. A
    # NaN key leaves the output of the rows before j exactly as it was; a NaN value, and a NaN
    # key in dq, also reach the other rows of their tile (0 x NaN in the products with P or dS:
    # torch's CPU SDPA and autograd spread it to every row), but never rows far before j
    S, j = 1200, 1100
    q, k, v = qkv(1, S, 2, 1, 32)
    cos, sin = tables(32, S)
    {"k": k, "v": v}[where][0, j, 0, 5] = float("nan")
    q.requires_grad_(True)
    out = pirope.rope_attention(q, k, v, cos, sin)
    (dq,) = torch.autograd.grad(out.sum(), q)
    for name, t in (("out", out), ("dq", dq)):
        bad = ~torch.isfinite(t[0]).all(-1).all(-1)              # per row
        assert bad[j:].all(), name
        assert not bad[:j - 512].any(), name
    if where == "k":
        assert torch.isfinite(out[0, :j]).all()


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(causal):
    q, k, v = qkv(2, 6, 4, 2, 12, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(8, 9, dtype=torch.float64)  # partial rotary: 8 of 12
    pos = torch.tensor([[8, 0, 3, 2, 1, 5], [0, 1, 2, 3, 4, 5]])
    fn = lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, pos, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_backward_is_deterministic():
    q, k, v = qkv(2, 300, 8, 2, 64, requires_grad=True)
    cos, sin = tables(64, 300)
    g = torch.randn(2, 300, 8, 64)

    def grads_of_one_run():
        q.grad = k.grad = v.grad = None
        pirope.rope_attention(q, k, v, cos, sin).backward(g)
        return [t.grad.clone() for t in (q, k, v)]

    threads = many_threads()
    grads = at_thread_counts((threads, threads, 1), grads_of_one_run)
    for other in grads[1:]:  # bit-identical, whatever the thread count
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
    # deterministic=True / False reach the op; on CPU both give these same gradients
    for flag in (True, False):
        q.grad = k.grad = v.grad = None
        pirope.rope_attention(q, k, v, cos, sin, deterministic=flag).backward(g)
        for a, b in zip(grads[0], (q.grad, k.grad, v.grad)):
            assert torch.equal(a, b)


# ---- CPU tile products: AVX512 kernels (avx512_gemm.h) or torch's BLAS ----
CPU_GEMM = pirope.cpu_gemm()  # what this CPU runs by default, per dtype
GEMM_ENV = {"avx512_bf16": None, "avx512": "avx512", "blas": "blas",  # PIROPE_CPU_GEMM
            "portable_bf16": "portable", "portable": "portable"}
# Every path is held to ATTENTION_REL. (A 1e-2 bound for bfloat16 failed about one run in a
# hundred for the 7-token, head-dim-6 case: over 4200 random draws of the smallest shapes
# on all three paths the worst error was 1.9e-2, float16 1.9e-3.)


def use_cpu_gemm(monkeypatch, dtype, path):
    """Makes rope_attention on CPU take `path` for `dtype`, or skips the test when
    this CPU cannot run it."""
    runs_here = {"blas": True, "avx512": CPU_GEMM["float32"] == "avx512",
                 "avx512_bf16": CPU_GEMM["bfloat16"] == "avx512_bf16", "portable": True, "portable_bf16": True}
    if not runs_here[path]:
        pytest.skip(f"this CPU cannot run the {path} products")
    if GEMM_ENV[path] is None:
        monkeypatch.delenv("PIROPE_CPU_GEMM", raising=False)
    else:
        monkeypatch.setenv("PIROPE_CPU_GEMM", GEMM_ENV[path])
    assert pirope.cpu_gemm()[str(dtype)[6:]] == path


# (the portable products run the AVX512 paths' packing and rounding on any CPU)
PATHS = [(torch.bfloat16, "avx512_bf16"), (torch.bfloat16, "avx512"), (torch.bfloat16, "blas"),
         (torch.float32, "avx512"), (torch.float32, "blas"), (torch.float16, "avx512"),
         (torch.float16, "blas"), (torch.bfloat16, "portable_bf16"), (torch.float32, "portable"),
         (torch.float16, "portable")]


@pytest.mark.parametrize("dtype, path", PATHS)
@pytest.mark.parametrize(
    "b, s, heads, head_dim, rotary_dim, causal",
    [
        (2, 1, (4, 2), 64, 64, True),
        (1, 7, (2, 1), 6, 6, True),  # head_dim below one vector
        (2, 129, (8, 2), 128, 128, True),  # partial tiles, GQA
        (1, 300, (4, 1), 80, 64, False),  # two key tiles, odd length, partial rotary
        (1, 257, (2, 2), 70, 70, True),  # odd pairs of features, odd length
        (1, 513, (4, 2), 128, 128, False),  # three key tiles
        (2, 33, (4, 2), 5, 4, True),  # odd head_dim
        (1, 300, (4, 2), 255, 254, True),  # odd head_dim past four vectors
    ],
)
def test_cpu_products_match_reference(monkeypatch, dtype, path, b, s, heads, head_dim, rotary_dim, causal):
    use_cpu_gemm(monkeypatch, dtype, path)
    q, k, v = qkv(b, s, *heads, head_dim, dtype=dtype)
    cos, sin = tables(rotary_dim, s)
    check_against_reference(q, k, v, cos, sin, causal=causal)


@pytest.mark.parametrize("dtype, path", PATHS)
def test_cpu_products_positions_layouts_and_views(monkeypatch, dtype, path):
    # position_ids per batch row, Meta's interleaved pairs, HF's transposed layout.
    use_cpu_gemm(monkeypatch, dtype, path)
    q, k, v = (torch.randn(2, h, 150, 64, dtype=dtype).transpose(1, 2) for h in (8, 2, 2))
    assert not q.is_contiguous()
    cos, sin = tables(64, 400)
    pos = torch.stack([torch.arange(150) * 2, torch.arange(150) + 100])
    check_against_reference(q, k, v, cos, sin, pos, interleaved=True)


def test_cpu_gemm_reports_the_path_per_dtype(monkeypatch):
    paths = pirope.cpu_gemm()
    assert set(paths) == {"float64", "float32", "float16", "bfloat16"}
    assert paths["float64"] == "blas" and paths["float16"] == paths["float32"]
    assert paths["float32"] in ("avx512", "blas")
    assert paths["bfloat16"] in ("avx512_bf16", paths["float32"])
    monkeypatch.setenv("PIROPE_CPU_GEMM", "avx512")
    assert pirope.cpu_gemm()["bfloat16"] == paths["float32"]
    monkeypatch.setenv("PIROPE_CPU_GEMM", "blas")
    assert set(pirope.cpu_gemm().values()) == {"blas"}
    monkeypatch.setenv("PIROPE_CPU_GEMM", "portable")  # on any CPU
    assert pirope.cpu_gemm() == {"float64": "blas", "float32": "portable", "float16": "portable",
                                 "bfloat16": "portable_bf16"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
def test_cpu_gemm_switch_rejects_unknown_values(monkeypatch, dtype):
    q, k, v = qkv(1, 5, 2, 1, 8, dtype=dtype)
    cos, sin = tables(8, 5)
    monkeypatch.setenv("PIROPE_CPU_GEMM", "BLAS")
    with pytest.raises(RuntimeError, match="PIROPE_CPU_GEMM must be 'auto', 'avx512', 'blas' or 'portable', got 'BLAS'"):
        pirope.rope_attention(q, k, v, cos, sin)
    monkeypatch.setenv("PIROPE_CPU_GEMM", "auto")
    assert pirope.cpu_gemm() == CPU_GEMM
    pirope.rope_attention(q, k, v, cos, sin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_packed_products_are_taken_and_deterministic(monkeypatch, dtype):
    q, k, v = qkv(1, 300, 4, 2, 64, dtype=dtype, requires_grad=True)
    cos, sin = tables(64, 300)
    g = torch.randn(1, 300, 4, 64, dtype=dtype)

    def run():
        q.grad = k.grad = v.grad = None
        out = pirope.rope_attention(q, k, v, cos, sin)
        out.backward(g)
        return [out.detach().clone()] + [t.grad.clone() for t in (q, k, v)]

    monkeypatch.setenv("PIROPE_CPU_GEMM", "blas")
    blas = run()
    use_packed_products(monkeypatch, dtype)
    threads = many_threads()
    runs = at_thread_counts((threads, threads, 1), run)
    for other in runs[1:]:  # bit-identical, whatever the thread count
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    # Another kernel (other summation order; for bfloat16 also rounding where BLAS
    # keeps float32) ran: the results differ, slightly.
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], blas))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_backward_split_over_threads_is_bit_identical(monkeypatch, dtype, causal):
    # With few kv heads (MQA, batch 1) the backward splits into a dk/dv pass over key
    # blocks and a dq pass over query blocks when threads would idle; the gradients
    # must be the ones of the one-task-per-head order, bit for bit. (BLAS products
    # always run the one-pass backward.)
    use_packed_products(monkeypatch, dtype)
    # (1100 tokens: 3 key blocks with 2 threads, 5 with 4; small heads keep it quick under ASan)
    q, k, v = qkv(1, 1100, 2, 1, 32, dtype=dtype)
    cos, sin = tables(32, 1100)
    g = torch.randn(1, 1100, 2, 32, dtype=dtype)

    def grads_of_one_run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        pirope.rope_attention(qq, kk, vv, cos, sin, causal=causal).backward(g)
        return [t.grad for t in (qq, kk, vv)]

    grads = at_thread_counts((1, 2, 4), grads_of_one_run)  # one pass; two passes with 2 and 4 blocks
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
    _, dq, dk, dv = attention_reference(q, k, v, cos, sin, None, causal, None, False, grad_out=g)
    for what, got, want in zip(("dq", "dk", "dv"), grads[-1], (dq, dk, dv)):
        assert_close_to(got, want, dtype, what)


def test_non_contiguous_inputs(device):
    # Transposes of (batch, heads, seqlen, headdim) and a sliced feature dim.
    b, s, d = 2, 45, 64
    qt = torch.randn(b, 4, s, d, device=device).transpose(1, 2)
    kt = torch.randn(b, 2, s, d, device=device).transpose(1, 2)
    vt = torch.randn(b, 2, s, 2 * d, device=device).transpose(1, 2)[..., ::2]
    assert not qt.is_contiguous() and vt.stride(-1) == 2
    cos, sin = tables(d, s, device)
    check_against_reference(qt, kt, vt, cos, sin, causal=True)
    check_against_reference(qt, kt, vt, cos, sin, causal=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_table_of_width_zero_rotates_nothing(dtype):
    # rotary_dim 0: every feature passes through, so the op is plain attention (what the transformers
    # integration runs on q and k it rotated itself): the reference with rotary_dim 0, output and
    # gradients; and exactly so for infinite features, where a rotation by angle 0 (x * 1 + y * 0) gives NaN
    q, k, v = qkv(2, 33, 4, 2, 64, dtype=dtype)
    empty = torch.empty(1, 0)
    pos = torch.zeros(33, dtype=torch.int64)
    check_against_reference(q, k, v, empty, empty, pos)
    q = q.float().abs() + 0.1  # positive scores against the infinite key feature: that key scores -inf
    k, v = k.float().clone(), v.float()
    k[:, 1, 0, 1] = float("-inf")
    out = pirope.rope_attention(q, k, v, empty, empty, pos)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    assert not out.isnan().any() and not want.isnan().any()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)  # a rotation by 0, by contrast: NaN where the key is -inf
    assert pirope.rope_attention(q, k, v, one, zero, pos)[:, 1:].isnan().any()


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_or_seqlen(shape):
    q, k, v = qkv(*shape, 4, 2, 64, requires_grad=True)
    cos, sin = tables(64, 8)
    out = pirope.rope_attention(q, k, v, cos, sin)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_never_materialises_seqlen_squared():
    # 4096^2 float32 scores per head would be 64 MiB. What the op allocates through
    # torch (out, lse) is linear in seqlen; its per-thread scratch (plain vectors,
    # not seen by the profiler) is a few (seqlen x headdim) rows and tiles, which
    # benchmarks/bench_attention.py measures as resident memory.
    q, k, v = qkv(1, 4096, 1, 1, 64)
    cos, sin = tables(64, 4096)
    with torch.profiler.profile(profile_memory=True) as prof:
        pirope.rope_attention(q, k, v, cos, sin)
    peak = max((e.cpu_memory_usage for e in prof.key_averages()), default=0)
    assert peak < 16 * 2**20


def test_opcheck():
    cos, sin = tables(32, 12)
    pos = torch.randint(0, 12, (2, 7))
    for rg in (False, True):
        q, k, v = qkv(2, 7, 4, 2, 48, requires_grad=rg)
        torch.library.opcheck(torch.ops.pirope.rope_attention.default,
                              (q, k, v, cos, sin, pos, True, 0.2, False))
        torch.library.opcheck(torch.ops.pirope.rope_attention.default,
                              (q, k, v, cos, sin, None, False, 0.5, True))
    # The backward op (no double backward: see test_double_backward_raises).
    q, k, v = qkv(2, 7, 4, 2, 48)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, pos, True, 0.2, False)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pirope.rope_attention_backward.default,
                          (g, q, k, v, out, lse, cos, sin, pos, True, 0.2, False))
    qt = torch.randn(2, 4, 7, 48).transpose(1, 2)  # fake must predict the real strides
    torch.library.opcheck(torch.ops.pirope.rope_attention.default,
                          (qt, qt[:, :, :2], qt[:, :, 2:], cos, sin, None, True, 0.2, False))


def test_double_backward_raises():
    q, k, v = qkv(1, 5, 2, 1, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(16, 5, dtype=torch.float64)
    out = pirope.rope_attention(q, k, v, cos, sin)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gq.sum().backward()


def test_lse_is_not_differentiable():
    # the raw op's auxiliary output, in both autograd routes (C++; torch.func's Python one)
    q, k, v = qkv(1, 5, 2, 1, 16, requires_grad=True)
    cos, sin = tables(16, 5)
    args = (k, v, cos, sin, None, True, 0.25, False)
    out, lse = torch.ops.pirope.rope_attention(q, *args)
    assert out.requires_grad and not lse.requires_grad

    from pirope._autograd import functorch  # the torch.func route of pirope.rope_attention

    def loss(q):
        out, lse = functorch.call("rope_attention", q, *args)
        assert not lse.requires_grad
        return out.sum()

    torch.func.grad(loss)(q.detach())


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    cos, sin = tables(32, 16)
    proj = torch.nn.Linear(32, 32)

    def f(q, k, v):
        return pirope.rope_attention(proj(q), k, v, cos, sin, causal=True).square().sum()

    q, k, v = qkv(2, 16, 4, 2, 32, requires_grad=True)
    f(q, k, v).backward()
    eager = [t.grad.clone() for t in (q, k, v)]
    q.grad = k.grad = v.grad = None
    torch.compile(f, fullgraph=True)(q, k, v).backward()
    for a, b in zip(eager, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_autocast_casts_q_k_v_like_sdpa(device):
    # Under torch.autocast, q, k and v take the autocast dtype (as torch's SDPA takes
    # them), differentiably: the same output and gradients as the call in that dtype.
    low = torch.bfloat16 if device == "cpu" else torch.float16
    cos, sin = tables(64, 40, device)
    q, k, v = qkv(2, 33, 4, 2, 64, device=device, requires_grad=True)
    g = torch.randn(2, 33, 4, 64, device=device, dtype=low)
    with torch.autocast(device, dtype=low):
        out = pirope.rope_attention(q, k, v, cos, sin)
        mixed = pirope.rope_attention(q.to(low), k, v, cos, sin)  # a bf16 q with float32 k, v
        wide = pirope.rope_attention(*(t.double() for t in (q, k, v)), cos, sin)  # float64 stays
    out.backward(g)
    ql, kl, vl = (t.detach().to(low).requires_grad_() for t in (q, k, v))
    ref = pirope.rope_attention(ql, kl, vl, cos, sin)
    ref.backward(g)
    assert out.dtype == low and mixed.dtype == low and wide.dtype == torch.float64
    assert torch.equal(out, ref) and torch.equal(mixed, ref)
    for leaf, low_leaf in ((q, ql), (k, kl), (v, vl)):
        assert leaf.grad.dtype == torch.float32 and torch.equal(leaf.grad, low_leaf.grad.float())
    assert_close_to(ref, attention_reference(ql, kl, vl, cos, sin), low, "out")
    torch._dynamo.reset()
    with torch.autocast(device, dtype=low):
        compiled = torch.compile(lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin), fullgraph=True)(q, k, v)
    assert compiled.dtype == low
    exact = dict(atol=0, rtol=0) if device == "cpu" else {}  # CUDA: inductor may reorder SDPA's sums
    torch.testing.assert_close(compiled, ref, **exact)


# ---- bad input: exceptions name the argument ----

def _args(**over):
    q, k, v = qkv(2, 8, 4, 2, 64)
    cos, sin = tables(64, 16)
    a = dict(q=q, k=k, v=v, cos=cos, sin=sin, position_ids=None)
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(k=torch.randn(3, 8, 2, 64)), RuntimeError, "k must have the batch and seqlen of q"),
        (dict(v=torch.randn(2, 9, 2, 64)), RuntimeError, "v must have the batch and seqlen of q"),
        (dict(k=torch.randn(2, 8, 3, 64), v=torch.randn(2, 8, 3, 64)), RuntimeError,
         "nheads_q must be a multiple of nheads_kv"),
        (dict(v=torch.randn(2, 8, 1, 64)), RuntimeError, "k and v must have the same number of heads"),
        (dict(k=torch.randn(2, 8, 2, 32)), RuntimeError, "k must have the head dim of q"),
        (dict(v=torch.randn(2, 8, 2, 80)), RuntimeError, "v must have the head dim of q"),
        (dict(q=torch.randn(8, 4, 64)), RuntimeError, "q must be \\(batch, seqlen, nheads_q, headdim\\)"),
        (dict(q=torch.randint(0, 3, (2, 8, 4, 64))), RuntimeError, "q must be float32, float64, float16 or bfloat16"),
        (dict(v=torch.randn(2, 8, 2, 64, dtype=torch.float64)), RuntimeError, "v must have the dtype of q"),
        (dict(k=torch.empty(2, 8, 2, 64, device="meta")), RuntimeError, "k must be on cpu"),
        (dict(cos=torch.randn(16, 32, device="meta")), RuntimeError, "cos must be on cpu"),
        (dict(position_ids=torch.arange(8, device="meta")), RuntimeError, "position_ids must be on cpu"),
        (dict(k="k"), TypeError, "k must be a torch.Tensor"),
        (dict(sin=None), TypeError, "sin must be a torch.Tensor"),
        (dict(position_ids=[0, 1]), TypeError, "position_ids must be a torch.Tensor"),
        (dict(position_ids=torch.arange(9)), RuntimeError, "position_ids must be \\(seqlen,\\)"),
        (dict(position_ids=torch.arange(8) + 9), IndexError, "position_ids must be in \\[0, 16\\)"),
        (dict(cos=torch.randn(4, 32), sin=torch.randn(4, 32)), IndexError, "cos/sin have only 4 rows"),
        (dict(cos=torch.randn(16, 40), sin=torch.randn(16, 40)), RuntimeError, "exceeds the head dim 64"),
        # no head dim for the default softmax_scale (headdim ** -0.5)
        (dict(q=torch.randn(2, 8, 4, 0), k=torch.randn(2, 8, 2, 0), v=torch.randn(2, 8, 2, 0)), ValueError,
         "with headdim >= 1, got shape \\(2, 8, 4, 0\\)"),
        (dict(q=torch.tensor(1.0)), ValueError, "with headdim >= 1, got shape \\(\\)"),
    ],
)
def test_rejects_bad_input(over, exc, match):
    a = _args(**over)
    with pytest.raises(exc, match=match):
        pirope.rope_attention(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["position_ids"])


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(k=torch.randn(2, 8, 3, 64), v=torch.randn(2, 8, 3, 64)), "nheads_q must be a multiple of nheads_kv"),
        (dict(v=torch.randn(2, 8, 1, 64)), "k and v must have the same number of heads"),
        (dict(v=torch.randn(2, 8, 2, 80)), "v must have the head dim of q"),
        (dict(k=torch.randn(2, 8, 2, 64, dtype=torch.float64)), "k must have the dtype of q"),
        (dict(position_ids=torch.arange(8) + 9), "position_ids must be in \\[0, 16\\)"),
    ],
)
def test_the_unfused_path_refuses_what_the_op_refuses(over, match):
    # the CUDA path (_sdpa_fallback: apply_rope_qk, then SDPA, which broadcasts some shapes into a
    # result) checks the arguments as the op does, with its messages
    a = _args(**over)
    with pytest.raises((RuntimeError, IndexError), match=match):
        unfused_module()._sdpa_fallback(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["position_ids"], True, 0.125,
                                        False, (4, 0))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(softmax_scale=0.0), ValueError, "softmax_scale must be > 0"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be > 0"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite"),
        (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be finite"),
        (dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a number"),
        (dict(softmax_scale=1e39), ValueError, "softmax_scale must be at most 3.4"),  # inf in float32
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(interleaved=None), TypeError, "interleaved must be a bool"),
        (dict(deterministic="yes"), TypeError, "deterministic must be a bool"),
    ],
)
def test_rejects_bad_keyword(kwargs, exc, match):
    a = _args()
    with pytest.raises(exc, match=match):
        pirope.rope_attention(a["q"], a["k"], a["v"], a["cos"], a["sin"], **kwargs)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(k=(2, 7, 2, 64)), "k must have the batch and seqlen of q"),
        (dict(k=(2, 8, 3, 64), v=(2, 8, 3, 64)), "nheads_q must be a multiple of nheads_kv"),
        (dict(v=(2, 8, 2, 32)), "v must have the head dim of q"),
        (dict(cos=(64, 40), sin=(64, 40)), "rotary_dim"),
        (dict(dtype=torch.int32), "q must be float32, float64, float16 or bfloat16"),
    ],
)
def test_meta_tensors_are_checked_like_real_ones(over, match):
    # the fake kernels (meta tensors, torch.compile's tracing) reject what the kernels reject
    shapes = dict(q=(2, 8, 4, 64), k=(2, 8, 2, 64), v=(2, 8, 2, 64), cos=(64, 16), sin=(64, 16))
    dtype = over.pop("dtype", torch.float32)
    shapes.update(over)
    t = {n: torch.empty(s, device="meta", dtype=dtype if n in "qkv" else torch.float32) for n, s in shapes.items()}
    with pytest.raises(RuntimeError, match=match):
        pirope.rope_attention(t["q"], t["k"], t["v"], t["cos"], t["sin"])
    with pytest.raises(RuntimeError, match=match):
        lse = torch.empty(2, 4, 8, device="meta")
        torch.ops.pirope.rope_attention_backward(t["q"], t["q"], t["k"], t["v"], t["q"], lse, t["cos"], t["sin"],
                                                 None, True, 0.1, False)


def test_meta_tensors_give_the_output_shapes():
    q, k, v = (torch.empty(2, 8, h, 64, device="meta", dtype=torch.bfloat16) for h in (4, 2, 2))
    cos = sin = torch.empty(64, 32, device="meta")
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, True, 0.125, False, False)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4, 8) and lse.dtype == torch.float32


def test_op_rejects_bad_scale_and_lse():
    a = _args()
    args = (a["q"], a["k"], a["v"], a["cos"], a["sin"], None, True)
    with pytest.raises(RuntimeError, match="softmax_scale must be finite and > 0"):
        torch.ops.pirope.rope_attention(*args, float("nan"), False)
    with pytest.raises(RuntimeError, match="softmax_scale must be at most 3.4"):
        torch.ops.pirope.rope_attention(*args, 1e39, False)
    out, lse = torch.ops.pirope.rope_attention(*args, 0.1, False)
    bw = lambda lse: torch.ops.pirope.rope_attention_backward(  # noqa: E731
        out, a["q"], a["k"], a["v"], out, lse, a["cos"], a["sin"], None, True, 0.1, False)
    with pytest.raises(RuntimeError, match="lse must be \\(batch, nheads_q, seqlen\\)"):
        bw(lse[:, :2])
    with pytest.raises(RuntimeError, match="lse must be Float"):
        bw(lse.double())


@pytest.mark.skipif(not (torch.backends.cuda.is_built() and pirope.build_info()["with_cuda"]),
                    reason="needs CUDA builds of torch (fake CUDA tensors) and of pirope (its CUDA dispatch)")
@pytest.mark.parametrize("opt_in", ["1", "0"])
def test_cuda_dispatch_traces_fullgraph_without_a_gpu(monkeypatch, opt_in):
    """On CUDA, pirope.rope_attention chooses between its fused kernels and apply_rope_qk +
    SDPA from shapes, dtypes and the environment only, so torch.compile(fullgraph=True)
    traces it. Checked here without a GPU: Dynamo traces the call on fake CUDA tensors
    (unaligned row views and the transposed Hugging Face layout included, where reading
    data_ptr or strides would break the graph) and the graph holds the fused op exactly
    when PIROPE_CUDA_ATTENTION=1. The compiled kernels themselves run in
    tests/test_rope_attention_cuda.py on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("PIROPE_CUDA_ATTENTION", opt_in)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v, cos, sin):
        return pirope.rope_attention(q[:, 1:], k[:, 1:], v.transpose(1, 2)[:, 1:], cos, sin)

    with FakeTensorMode():
        cos, sin = (torch.randn(64, 64, device="cuda") for _ in range(2))
        q, k = (torch.randn(2, 33, h, 128, device="cuda", dtype=torch.bfloat16) for h in (8, 2))
        v = torch.randn(2, 2, 33, 128, device="cuda", dtype=torch.bfloat16)
        out = torch.compile(f, fullgraph=True, backend=record)(q, k, v, cos, sin)
        assert (out.shape, out.dtype, out.device.type) == ((2, 32, 8, 128), torch.bfloat16, "cuda")
    assert len(graphs) == 1
    targets = {n.target for n in graphs[0].graph.nodes if n.op == "call_function"}
    fused = torch.ops.pirope.rope_attention.default in targets or torch.ops.pirope.rope_attention in targets
    sdpa = torch.nn.functional.scaled_dot_product_attention in targets
    assert (fused, sdpa) == ((True, False) if opt_in == "1" else (False, True)), targets
