"""pirope.rope_attention(..., deterministic=True) where the call runs unfused (CUDA).

SDPA's CUDA backends add dq with float atomics unless torch's global deterministic mode is
on, so an explicit deterministic=True does not take SDPA: it takes pirope's fused kernels
(their deterministic backward) where they apply (float16/bfloat16, head dim 64 or 128, no
window, cap or cu_seqlens: _cuda_kernel_applies), else _band_attention.BlockAttention
(float32 blocks of query rows, recomputed in the backward by plain products).

The block attention runs on CPU here, as the other unfused-path tests run it, against the
float64 reference (band_reference), with SDPA replaced by a function that fails, so that
it cannot be what ran; the routing rule is checked on CPU tensors (it reads dtypes and
shapes only); on CUDA (skipped without a GPU) the public call's gradients are
bit-identical run to run and match the reference."""

import pytest
import torch

import pirope
from attention_inputs import (assert_all_equal, assert_compiled_like_eager, check_against_reference, cu_tensor,
                              packed_qkv, qkv, run, tables, unfused_module)
from conftest import CUDA_SKIP_REASON, cuda_ready

func = torch.func


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_sdpa(monkeypatch):
    """scaled_dot_product_attention fails when called: the call under test must not use it."""
    def refuse(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention was called")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)


@pytest.fixture(params=[None, 16], ids=["one_block", "blocks_of_16"])
def band_rows(request, monkeypatch):
    """Query rows per block: the default (one block here), or 16 (many blocks)."""
    if request.param is not None:
        monkeypatch.setattr(unfused_module(), "_BAND_ROWS", request.param)


# ---- the block attention, on CPU ----

DENSE = [  # (heads, head_dim, rotary_dim, causal, window, positions, interleaved)
    ((4, 2), 64, 64, True, (-1, -1), False, False),
    ((4, 2), 64, 64, False, (-1, -1), True, False),
    ((4, 1), 32, 32, False, (7, 2), False, True),
    ((4, 4), 48, 16, True, (20, 0), True, False),
    ((2, 2), 24, 24, False, (-1, 0), True, True),
]


@pytest.mark.parametrize("heads, head_dim, rotary_dim, causal, window, positions, interleaved", DENSE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_deterministic_matches_reference_without_sdpa(heads, head_dim, rotary_dim, causal, window,
                                                            positions, interleaved, dtype, band_rows, no_sdpa):
    q, k, v = qkv(2, 130, *heads, head_dim, dtype=dtype)
    cos, sin = tables(rotary_dim, 300)
    pos = torch.randint(0, 300, (2, 130)) if positions else None
    first = check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=window,
                                    interleaved=interleaved, fn="sdpa", deterministic=True)
    again = run(q, k, v, cos, sin, pos, g=first[4], fn="sdpa", causal=causal, window_size=window,
                interleaved=interleaved, deterministic=True)
    assert_all_equal(first, again)


PACKED = [  # (cu_seqlens, heads, causal, window, positions)
    ([0, 5, 5, 17, 40], (4, 2), True, (-1, -1), False),
    ([0, 5, 5, 17, 40], (4, 1), False, (2, 3), True),
    ([0, 70, 71, 200], (2, 2), True, (10, 0), True),
    ([0, 0, 9, 30, 30], (4, 2), False, (-1, -1), False),
]


@pytest.mark.parametrize("cu, heads, causal, window, positions", PACKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_deterministic_matches_reference_without_sdpa(cu, heads, causal, window, positions, dtype,
                                                             band_rows, no_sdpa):
    total = cu[-1]
    q, k, v = packed_qkv(total, *heads, 32, dtype=dtype)
    cos, sin = tables(32, 300)
    pos = torch.randint(0, 300, (total,)) if positions else None
    check_against_reference(q, k, v, cos, sin, pos, causal=causal, window=window, cu=cu, fn="varlen",
                            deterministic=True)


@pytest.mark.parametrize("scale", [2.5, 40.0])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_a_softmax_scale_above_one_gives_the_references_gradients(scale, softcap, band_rows, no_sdpa):
    # a scale above 1 multiplies the scores, not q (where q * scale could overflow: _scaled_q), so the
    # backward multiplies dk's products by it in q's place; q divided by it keeps the scores' size
    q, k, v = qkv(2, 70, 4, 2, 32, dtype=torch.float64)
    cos, sin = tables(32, 70)
    check_against_reference(q / scale, k, v, cos, sin, causal=True, scale=scale, softcap=softcap, fn="sdpa",
                            deterministic=True)


def test_soft_capped_deterministic_call_is_the_capped_call():
    # a cap already runs the block attention: deterministic=True changes nothing
    q, k, v = (t * 3 for t in qkv(2, 70, 4, 2, 32))
    cos, sin = tables(32, 70)
    kw = dict(fn="sdpa", window_size=(9, 0), softcap=2.0)
    capped = run(q, k, v, cos, sin, **kw)
    assert_all_equal(capped, run(q, k, v, cos, sin, g=capped[4], deterministic=True, **kw))


def test_without_deterministic_the_unfused_path_is_sdpa(monkeypatch):
    # deterministic=False (and None: torch's global mode, which SDPA follows itself) keep SDPA
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    q, k, v = qkv(1, 40, 4, 2, 32)
    cos, sin = tables(32, 40)
    check_against_reference(q, k, v, cos, sin, fn="sdpa")
    check_against_reference(q, k, v, cos, sin, window=(5, 0), fn="sdpa")
    assert len(calls) == 2


def test_deterministic_block_path_compiles_fullgraph():
    mod = unfused_module()
    cos, sin = tables(32, 40)

    def f(q, k, v):
        return mod._sdpa_fallback(q, k, v, cos, sin, None, True, 0.2, False, (-1, -1), 0.0, True).square().sum()

    assert_compiled_like_eager([(f, qkv(2, 40, 4, 2, 32), ())])


def test_deterministic_block_path_under_torch_func():
    # per-sample gradients (vmap of grad) through the block attention: each sample's equal the
    # gradients of that sample alone
    mod = unfused_module()
    cos, sin = tables(16, 20, dtype=torch.float64)
    qs, gs = (torch.randn(3, 1, 20, 4, 16, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 20, 2, 16, dtype=torch.float64) for _ in range(2))

    def loss(q, k, v, g):
        return (mod._sdpa_fallback(q, k, v, cos, sin, None, True, 0.3, False, (-1, -1), 0.0, True) * g).sum()

    grads = func.vmap(func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None, 0))(qs, k, v, gs)
    for i in range(3):
        alone = func.grad(loss, argnums=(0, 1, 2))(qs[i], k, v, gs[i])
        for what, a, b in zip(("dq", "dk", "dv"), (t[i] for t in grads), alone):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"{what}: {m}")


# ---- which CUDA calls take the fused kernels (rules on dtypes and shapes) ----

@pytest.mark.parametrize("dtype, head_dim, rotary_dim, env, deterministic, fused", [
    (torch.bfloat16, 128, 128, None, False, False),  # the default: apply_rope_qk + SDPA
    (torch.bfloat16, 128, 128, None, True, True),  # deterministic: the fused kernels' backward
    (torch.float16, 64, 32, None, True, True),
    (torch.bfloat16, 128, 128, "0", True, True),
    (torch.bfloat16, 128, 128, "1", False, True),  # opted in
    (torch.float32, 128, 128, None, True, False),  # not taken by the fused kernels: block attention
    (torch.bfloat16, 96, 96, None, True, False),
    (torch.bfloat16, 128, 24, None, True, False),  # rotary dim not a multiple of 16
    (torch.float32, 128, 128, "1", False, False),
])
def test_cuda_routing(monkeypatch, dtype, head_dim, rotary_dim, env, deterministic, fused):
    if env is None:
        monkeypatch.delenv("PIROPE_CUDA_ATTENTION", raising=False)
    else:
        monkeypatch.setenv("PIROPE_CUDA_ATTENTION", env)
    q, k, v = qkv(1, 4, 4, 2, head_dim, dtype=dtype)
    cos, _ = tables(rotary_dim, 4)
    assert unfused_module()._cuda_kernel_applies(q, k, v, cos, False, deterministic) is fused


@pytest.mark.parametrize("rotary_dim, interleaved, fused", [(24, True, True), (24, False, False), (40, True, True),
                                                             (12, True, False), (32, False, True)])
def test_cuda_routing_of_rotary_dims_by_pair_layout(rotary_dim, interleaved, fused):
    # the kernels' rule (csrc/pirope/cuda/rope_attention_kernel.cpp): a rotary dim that is a multiple of 16
    # with rotate-half pairs, of 8 with interleaved ones
    q, k, v = qkv(1, 4, 4, 2, 128, dtype=torch.bfloat16)
    cos, _ = tables(rotary_dim, 4)
    assert unfused_module()._cuda_kernel_applies(q, k, v, cos, interleaved, True) is fused


def test_deterministic_none_follows_torchs_global_mode(monkeypatch):
    # what the op is asked for: torch.use_deterministic_algorithms' mode where the keyword is None
    from pirope._autograd import functorch

    seen, real = [], functorch.call
    monkeypatch.setattr(functorch, "call", lambda name, *args: seen.append(args[9]) or real(name, *args))
    q, k, v = qkv(1, 8, 4, 2, 64)
    cos, sin = tables(64, 8)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        pirope.rope_attention(q, k, v, cos, sin)
        torch.use_deterministic_algorithms(True)
        pirope.rope_attention(q, k, v, cos, sin)
        pirope.rope_attention(q, k, v, cos, sin, deterministic=False)
    finally:
        torch.use_deterministic_algorithms(before)
    assert seen == [False, True, False]


def test_cuda_routing_needs_float32_tables():
    # (float64 tables: the fused kernels read float32 rows)
    q, k, v = qkv(1, 4, 4, 2, 128, dtype=torch.bfloat16)
    cos, _ = tables(128, 4)
    assert unfused_module()._cuda_kernel_applies(q, k, v, cos, False, True)
    assert not unfused_module()._cuda_kernel_applies(q, k, v, cos.double(), False, True)


# ---- CUDA: the public call ----

CUDA_CASES = [  # (dtype, head_dim, window, cu_seqlens): the first runs the fused kernels
    (torch.bfloat16, 128, (-1, -1), None),
    (torch.float32, 64, (-1, -1), None),
    (torch.bfloat16, 128, (100, 0), None),
    (torch.float16, 64, (-1, -1), [0, 300, 301, 700]),
]


@pytest.mark.skipif(not cuda_ready(), reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("dtype, head_dim, window, cu", CUDA_CASES)
def test_cuda_deterministic_gradients_are_bit_identical(monkeypatch, dtype, head_dim, window, cu, no_sdpa):
    monkeypatch.delenv("PIROPE_CUDA_ATTENTION", raising=False)
    cos, sin = tables(head_dim, 1024, device="cuda")
    if cu is None:
        q, k, v = qkv(2, 700, 8, 2, head_dim, dtype=dtype, device="cuda")
    else:
        q, k, v = packed_qkv(cu[-1], 8, 2, head_dim, dtype=dtype, device="cuda")
    first = check_against_reference(q, k, v, cos, sin, window=window, cu=cu, deterministic=True)
    kw = dict(window_size=window, deterministic=True)
    if cu is not None:
        kw["cu_seqlens"] = cu_tensor(cu, "cuda")
    for _ in range(2):
        assert_all_equal(first, run(q, k, v, cos, sin, g=first[4], **kw))
