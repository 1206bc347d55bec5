"""The fused CUDA kernels of rope_attention (csrc/pirope/cuda/rope_attention_*: forward
and backward) against the float64 reference. Skipped cleanly without a GPU."""

import copy
import math
import os

import pytest
import torch

import pirope
from conftest import CUDA_SKIP_REASON, cuda_ready
from cuda_ws_smoke import DIMS_BSHD, locate
from reference import attention_reference, rope_reference

pytestmark = pytest.mark.skipif(not cuda_ready(), reason=CUDA_SKIP_REASON)


@pytest.fixture(autouse=True)
def fused_kernels_on(monkeypatch):
    """The wrapper uses the fused kernels only when PIROPE_CUDA_ATTENTION=1."""
    monkeypatch.setenv("PIROPE_CUDA_ATTENTION", "1")


def ws_variant():
    """What "ws" means in these tests: PIROPE_ATTENTION_SM90=ws (both directions on the
    warp-specialised kernels), unless benchmarks/gpu_check.sh's bounded first runs passed
    only one direction (PIROPE_WS_VARIANT=ws_fwd / ws_bwd) or neither (skip; reported
    there), so that a hanging kernel cannot stall the whole test step."""
    return os.environ.get("PIROPE_WS_VARIANT", "ws")


def use_kernels(monkeypatch, sm90):
    """PIROPE_ATTENTION_SM90 for this test ("ws": ws_variant())."""
    if sm90 == "ws":
        sm90 = ws_variant()
        if sm90 == "skip":
            pytest.skip("PIROPE_WS_VARIANT=skip: gpu_check.sh's bounded ws runs failed (see its log)")
    monkeypatch.setenv("PIROPE_ATTENTION_SM90", sm90)


def tables(rotary_dim, n):
    inv_freq, _ = pirope.rope_frequencies(rotary_dim, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, n)
    return cos.cuda(), sin.cuda()


def check_forward(q, k, v, causal):
    """The forward op (default scale, tables for the sequence) against float64: the
    output, and lse against the log-sum-exp of the scaled scores of the rotated q, k.
    Returns (out, lse)."""
    n, d = q.shape[1], q.shape[3]
    cos, sin = tables(d, n)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, d ** -0.5, False)
    ref = attention_reference(q, k, v, cos, sin, causal=causal)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-2
    qr, kr = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    kr = kr.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bshd,bthd->bhst", qr, kr) * d ** -0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(lse.double().cpu(), scores.logsumexp(-1), atol=2e-2, rtol=1e-2)
    return out, lse


def rel_err(out, ref, floor=1e-3):
    """Norm-wise relative error; the floor (per element, on the scale of the unit-variance
    inputs) keeps a reference that is exactly 0 (dq for a single key) from dividing by 0."""
    ref = ref.double().cpu()
    return ((out.double().cpu() - ref).norm() / ref.norm().clamp_min(floor * ref.numel() ** 0.5)).item()


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
    check_forward(q, k, v, causal)


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


def test_wrapper_uses_the_kernels_for_training(monkeypatch):
    q, k, v = (torch.randn(2, 200, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cos, sin = tables(128, 200)
    grad = torch.randn_like(q)
    calls = []
    real = torch.ops.pirope.rope_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    results = {}
    for enabled in ("0", "1"):
        monkeypatch.setenv("PIROPE_CUDA_ATTENTION", enabled)
        monkeypatch.setattr(torch.ops.pirope, "rope_attention", spy)
        calls.clear()
        out = pirope.rope_attention(q, k, v, cos, sin)
        results[enabled] = (out, *torch.autograd.grad(out, (q, k, v), grad))
        assert len(calls) == (enabled == "1")  # "0": apply_rope_qk + SDPA
    for fused, fallback in zip(results["1"], results["0"]):
        assert rel_err(fused, fallback.double().cpu()) < 2e-2


def grads_reference(q, k, v, cos, sin, grad, **kw):
    return attention_reference(q, k, v, cos, sin, grad_out=grad, **kw)


def run_kernels(q, k, v, cos, sin, grad, pos=None, causal=True, scale=None, interleaved=False,
                deterministic=False):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, pos, causal, scale, interleaved)
    grads = torch.ops.pirope.rope_attention_backward(grad, q, k, v, out, lse, cos, sin, pos, causal, scale,
                                                     interleaved, deterministic)
    return (out, *grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen", [1, 7, 129, 1000])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_matches_float64_reference(dtype, head_dim, causal, seqlen, heads, deterministic):
    hq, hk = heads
    q = torch.randn(2, seqlen, hq, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, seqlen, hk, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(2, seqlen, hk, head_dim, device="cuda", dtype=dtype)
    grad = torch.randn_like(q)
    cos, sin = tables(head_dim, seqlen)
    got = run_kernels(q, k, v, cos, sin, grad, causal=causal, deterministic=deterministic)
    ref = grads_reference(q, k, v, cos, sin, grad, causal=causal)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert not torch.isnan(g).any(), name
        assert rel_err(g, r) < 2e-2, name


@pytest.mark.parametrize("sm90", ["1", "0", "ws"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_long_sequence_many_tiles_per_block(monkeypatch, sm90, causal, deterministic):
    # 2300 tokens, 8 q heads per kv head: each dkdv block walks ~150 (head, query tile)
    # items through its two smem stages, crossing head boundaries mid-stream; the
    # forward's 128-row blocks and the dq kernel's key stages likewise run long. On an
    # sm_90 GPU, both kernel families: the Hopper (wgmma) ones and the mma.sync ones.
    use_kernels(monkeypatch, sm90)
    q = torch.randn(1, 2300, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2300, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad = torch.randn_like(q)
    cos, sin = tables(128, 2300)
    got = run_kernels(q, k, v, cos, sin, grad, causal=causal, deterministic=deterministic)
    ref = grads_reference(q, k, v, cos, sin, grad, causal=causal)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert not torch.isnan(g).any(), name
        assert rel_err(g, r) < 2e-2, name


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads", [(8, 2), (8, 1)])
def test_backward_partial_rotary_positions_gqa(interleaved, heads):
    hq, hk = heads
    q = torch.randn(2, 300, hq, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 300, hk, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 300, hk, 128, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(q)
    cos, sin = tables(64, 4096)  # 64 of 128 features rotate
    pos = torch.randint(0, 4096, (2, 300), device="cuda")
    got = run_kernels(q, k, v, cos, sin, grad, pos, True, 0.1, interleaved)
    ref = grads_reference(q, k, v, cos, sin, grad, position_ids=pos, causal=True, softmax_scale=0.1,
                          interleaved=interleaved)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(g, r) < 2e-2, name


def test_deterministic_backward_is_bit_identical():
    q = torch.randn(1, 2048, 16, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2048, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad = torch.randn_like(q)
    cos, sin = tables(128, 2048)
    first = run_kernels(q, k, v, cos, sin, grad, deterministic=True)
    for _ in range(3):
        again = run_kernels(q, k, v, cos, sin, grad, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    fast = run_kernels(q, k, v, cos, sin, grad, deterministic=False)
    for a, b in zip(first, fast):  # the atomic path sums in another order: close, not equal
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_deterministic_keyword_and_global_flag_reach_the_backward(monkeypatch):
    seen = []
    real = torch.ops.pirope.rope_attention_backward

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(torch.ops.pirope, "rope_attention_backward", spy)
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    cos, sin = tables(64, 64)
    pirope.rope_attention(q, k, v, cos, sin, deterministic=True).sum().backward()
    pirope.rope_attention(q, k, v, cos, sin).sum().backward()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        pirope.rope_attention(q, k, v, cos, sin).sum().backward()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [True, False, True]


@pytest.mark.parametrize("sm90", ["1", "0", "ws"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("prepass", ["0", "1"])
def test_k_prepass_and_on_load_rotation_agree(monkeypatch, prepass, head_dim, sm90):
    q, k, v = (torch.randn(2, 500, 4, head_dim, device="cuda", dtype=torch.float16) for _ in range(3))
    grad = torch.randn_like(q)
    cos, sin = tables(head_dim, 500)
    monkeypatch.setenv("PIROPE_ATTENTION_K_PREPASS", prepass)
    use_kernels(monkeypatch, sm90)
    got = run_kernels(q, k, v, cos, sin, grad)
    ref = grads_reference(q, k, v, cos, sin, grad)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(g, r) < 2e-2, name


def cuda_kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("sm90", ["1", "0", "ws"])
def test_hopper_kernels_run_where_built(monkeypatch, sm90):
    """On an sm_90 GPU with a build that has sm_90a code, the forward and the dkdv step
    run on the wgmma kernels (unless PIROPE_ATTENTION_SM90=0; =ws: on the
    warp-specialised TMA kernels); anywhere else never."""
    built = "9.0a" in pirope.build_info()["cuda_archs"].split(";")
    hopper = sm90 != "0" and built and torch.cuda.get_device_capability() == (9, 0)
    q, k, v = (torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cos, sin = tables(128, 256)
    use_kernels(monkeypatch, sm90)
    names = cuda_kernel_names(lambda: run_kernels(q, k, v, cos, sin, torch.randn_like(q)))
    found = [any(f"rope_attention_{kernel}_kernel" in n for n in names)
             for kernel in ("fwd_sm90", "bwd_dkdv_sm90", "fwd_sm90_ws", "bwd_dkdv_sm90_ws")]
    ws_fwd = hopper and sm90 == "ws" and ws_variant() in ("ws", "ws_fwd")
    ws_bwd = hopper and sm90 == "ws" and ws_variant() in ("ws", "ws_bwd")
    assert found == [hopper and not ws_fwd, hopper and not ws_bwd, ws_fwd, ws_bwd], sorted(names)


def test_unknown_kernel_choice_is_an_error(monkeypatch):
    # On every GPU and build (not only where the Hopper kernels exist), so that a typo
    # cannot silently measure the wrong kernels.
    monkeypatch.setenv("PIROPE_ATTENTION_SM90", "wgmma")
    q, k, v = (torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    cos, sin = tables(64, 256)
    with pytest.raises(RuntimeError, match="PIROPE_ATTENTION_SM90 must be 0, 1, ws, ws_fwd or ws_bwd, got 'wgmma'"):
        torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, True, 0.125, False)


def test_unknown_ws_dq_choice_is_an_error(monkeypatch):
    # Likewise for the warp-specialised backward's dQ path, in both backward modes.
    q, k, v = (torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    cos, sin = tables(64, 256)
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, True, 0.125, False)
    monkeypatch.setenv("PIROPE_WS_DQ", "red")
    for deterministic in (False, True):
        with pytest.raises(RuntimeError, match="PIROPE_WS_DQ must be tma or atomic, got 'red'"):
            torch.ops.pirope.rope_attention_backward(torch.randn_like(q), q, k, v, out, lse, cos, sin, None, True,
                                                     0.125, False, deterministic)


def check_ws_forward(monkeypatch, q, k, v, causal):
    """PIROPE_ATTENTION_SM90=ws (the TMA forward where it runs, the other kernels
    elsewhere): output and lse against float64, then against the other Hopper forward,
    which does the same math in the same order per tile (much closer than float64 is)."""
    use_kernels(monkeypatch, "ws")
    out, lse = check_forward(q, k, v, causal)
    use_kernels(monkeypatch, "1")
    cos, sin = tables(q.shape[-1], q.shape[1])
    out1, lse1 = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, q.shape[-1] ** -0.5, False)
    torch.testing.assert_close(out, out1, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, lse1, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen", [65, 1000, 2300])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_warp_specialized_forward_matches_float64_reference(monkeypatch, dtype, head_dim, causal, seqlen, heads):
    # seqlen from just above the k pre-pass threshold (the Hopper kernels need it) to 18
    # 128-key tiles, odd tails (TMA fills rows past seqlen with zeros), GQA.
    hq, hk = heads
    q, k, v = (torch.randn(2, seqlen, h, head_dim, device="cuda", dtype=dtype) for h in (hq, hk, hk))
    check_ws_forward(monkeypatch, q, k, v, causal)


def check_ws_kernels(monkeypatch, q, k, v, grad, causal, deterministic=False):
    """PIROPE_ATTENTION_SM90=ws (the warp-specialised TMA forward and dkdv kernels where
    they run): output and the three gradients against float64, then against the other
    Hopper kernels (same math and per-tile order: much closer than float64 is)."""
    cos, sin = tables(q.shape[-1], q.shape[1])
    use_kernels(monkeypatch, "ws")
    got = run_kernels(q, k, v, cos, sin, grad, causal=causal, deterministic=deterministic)
    ref = grads_reference(q, k, v, cos, sin, grad, causal=causal)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert not torch.isnan(g).any(), locate(name, g, r, DIMS_BSHD)
        assert rel_err(g, r) < 2e-2, locate(name, g, r, DIMS_BSHD)
    use_kernels(monkeypatch, "1")
    other = run_kernels(q, k, v, cos, sin, grad, causal=causal, deterministic=deterministic)
    for name, g, o in zip(("out", "dq", "dk", "dv"), got, other):
        assert rel_err(g, o) < 5e-3, locate(name, g, o, DIMS_BSHD)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen", [65, 1000])
@pytest.mark.parametrize("dq", ["tma", "atomic", "deterministic"])
def test_warp_specialized_backward_matches_float64_reference(monkeypatch, dtype, head_dim, causal, seqlen, dq):
    # GQA 8/2: each dkdv block walks 4 q heads x its query tiles through the two TMA
    # stages; head dim 64 computes dQ on one warpgroup, 128 on both. dQ: TMA reductions
    # (the default), float2 atomics (PIROPE_WS_DQ=atomic), or the deterministic dq kernel.
    if dq != "deterministic":
        monkeypatch.setenv("PIROPE_WS_DQ", dq)
    q = torch.randn(2, seqlen, 8, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, seqlen, 2, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    check_ws_kernels(monkeypatch, q, k, v, torch.randn_like(q), causal, dq == "deterministic")


@pytest.mark.parametrize("layout", ["bhsd", "qkv", "batch1"])
@pytest.mark.parametrize("causal", [True, False])
def test_warp_specialized_kernels_take_the_strides_tma_sees(monkeypatch, layout, causal):
    # v and dO go to TMA as the caller's tensors (q and k as the pre-pass's rotated
    # copies): the transposed Hugging Face layout, views into one fused qkv projection,
    # and extents of 1 (batch 1, one kv head) whose strides torch leaves arbitrary.
    hq, hk, d, n = 8, 2, 128, 1000
    if layout == "bhsd":
        q, k, v, grad = (torch.randn(2, h, n, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                         for h in (hq, hk, hk, hq))
    elif layout == "qkv":
        qkv = torch.randn(2, n, hq + 2 * hk, d, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.split([hq, hk, hk], dim=2)
        grad = torch.randn(2, n, 2 * hq, d, device="cuda", dtype=torch.bfloat16)[:, :, hq:]
    else:
        q = torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 1, n, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        grad = torch.randn_like(q)
    check_ws_forward(monkeypatch, q, k, v, causal)
    check_ws_kernels(monkeypatch, q, k, v, grad, causal)


def test_backward_out_of_range_position_poisons_only_what_it_touches():
    q, k, v = (torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    grad = torch.randn_like(q)
    cos, sin = tables(64, 300)
    pos = torch.arange(300, device="cuda")
    pos[265] = 1000
    out, dq, dk, dv = run_kernels(q, k, v, cos, sin, grad, pos[None])
    assert torch.isnan(dq[0, 265]).all() and torch.isnan(dk[0, 265]).all()
    # Queries that never share a tile with token 265 stay finite: within a tile 0 * NaN
    # may spread (poisoning more than needed is allowed, less is not). Token 265 is in
    # the third 128-key block of the dkdv kernel, which (causal) meets queries >= 256 only.
    assert not torch.isnan(dq[0, :256]).any()
    assert not torch.isnan(out[0, :256]).any()


def test_opcheck_and_compile_on_cuda():
    q, k, v = (torch.randn(1, 96, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cos, sin = tables(64, 96)
    torch.library.opcheck(torch.ops.pirope.rope_attention.default,
                          (q, k, v, cos, sin, None, True, 0.125, False, False))
    out, lse = torch.ops.pirope.rope_attention(q.detach(), k.detach(), v.detach(), cos, sin, None, True,
                                               0.125, False)
    torch.library.opcheck(torch.ops.pirope.rope_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cos, sin,
                           None, True, 0.125, False, True))

    def f(q, k, v):
        return pirope.rope_attention(q, k, v, cos, sin).float().square().sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_unaligned_and_strided_views_are_copied_not_misread():
    # q, k, v at an odd element offset (rows not 16-byte aligned) and a transposed view:
    # the op copies what its 16-byte loads cannot address.
    buf = torch.randn(3 * 2 * 100 * 4 * 64 + 1, device="cuda", dtype=torch.float16)
    q, k, v = buf[1:].view(3, 2, 100, 4, 64).unbind(0)
    vt = torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.float16).transpose(1, 2)
    grad = torch.randn_like(q)
    cos, sin = tables(64, 100)
    got = run_kernels(q, k, vt, cos, sin, grad)
    ref = grads_reference(q, k, vt, cos, sin, grad)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(g, r) < 2e-2, name


def test_hf_llama_trains_through_the_fused_kernels():
    """A Hugging Face LLaMA (bf16, head dim 64, GQA) extended by PI with attention="fused"
    gives the loss and gradients of the same model on pirope rope + SDPA."""
    transformers = pytest.importorskip("transformers")
    from pirope.integrations.transformers import apply_position_interpolation

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 1000), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    results = {}
    for attention in ("sdpa", "fused"):
        model = apply_position_interpolation(copy.deepcopy(base), 4.0, attention=attention)
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        q_grad = model.model.layers[0].self_attn.q_proj.weight.grad.float()
        results[attention] = (out.loss.float(), q_grad)
    (loss_s, grad_s), (loss_f, grad_f) = results["sdpa"], results["fused"]
    torch.testing.assert_close(loss_f, loss_s, atol=2e-2, rtol=1e-2)
    assert ((grad_f - grad_s).norm() / grad_s.norm()).item() < 5e-2
