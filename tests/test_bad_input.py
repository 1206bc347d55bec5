"""Every public function rejects bad input with an exception that names the argument.
Nothing may crash, read out of bounds or silently return a wrong result."""

import pytest
import torch

import pirope


@pytest.fixture
def tabs():
    inv_freq, _ = pirope.rope_frequencies(64)
    return pirope.rope_cos_sin(inv_freq, 16)


def x_(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=x_(16, 64)), RuntimeError, "x must be .batch, seqlen, nheads, headdim."),
        (dict(x=x_(1, 2, 16, 2, 64)), RuntimeError, "x must be"),
        (dict(x=torch.randint(0, 5, (1, 4, 2, 64))), RuntimeError, "x must be float32, float64, float16 or bfloat16"),
        (dict(x=x_(1, 4, 2, 30)), RuntimeError, "rotary_dim = 2 \\* cos.size\\(1\\) = 64 exceeds the head dim 30"),
        (dict(position_ids=torch.arange(4.0)), RuntimeError, "position_ids must be int32 or int64"),
        (dict(position_ids=torch.arange(5)), RuntimeError, "position_ids must be \\(seqlen,\\)"),
        (dict(position_ids=torch.zeros(3, 4, dtype=torch.long)), RuntimeError, "position_ids must be"),
        (dict(position_ids=torch.zeros(1, 1, 4, dtype=torch.long)), RuntimeError, "position_ids must be"),
        (dict(position_ids=torch.tensor([0, 1, 2, 16])), IndexError, "position_ids must be in \\[0, 16\\)"),
        (dict(position_ids=torch.tensor([0, -1, 2, 3])), IndexError, "position_ids must be in \\[0, 16\\)"),
        (dict(x=x_(1, 17, 2, 64)), IndexError, "position_ids is None, so positions run 0..16"),
        (dict(cos="cos"), TypeError, "cos must be a torch.Tensor"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (dict(position_ids=[0, 1, 2, 3]), TypeError, "position_ids must be a torch.Tensor"),
        (dict(interleaved=1), TypeError, "interleaved must be a bool"),
        (dict(inplace="yes"), TypeError, "inplace must be a bool"),
        (dict(cos=torch.randn(16)), RuntimeError, "cos must be \\(max_positions, rotary_dim // 2\\)"),
        (dict(sin=torch.randn(16, 16)), RuntimeError, "cos and sin must have the same shape"),
        (dict(cos=torch.randn(16, 32, dtype=torch.float16)), RuntimeError, "cos must be float32 \\(or float64\\)"),
        (dict(sin=torch.randn(16, 32, dtype=torch.float64)), RuntimeError, "cos and sin must have the same dtype"),
        (dict(cos=torch.randn(16, 32, device="meta")), RuntimeError, "cos must be on cpu"),
    ],
)
def test_apply_rope_rejects(tabs, kwargs, exc, match):
    cos, sin = tabs
    args = dict(x=x_(1, 4, 2, 64), cos=cos, sin=sin, position_ids=None, interleaved=False, inplace=False)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pirope.apply_rope(args.pop("x"), args.pop("cos"), args.pop("sin"), args.pop("position_ids"), **args)


def test_packed_position_ids_shape(tabs):
    cos, sin = tabs
    with pytest.raises(RuntimeError, match="packed input .* position_ids must be \\(total_tokens,\\)"):
        pirope.apply_rope(x_(6, 2, 64), cos, sin, torch.zeros(1, 6, dtype=torch.long))


def test_apply_rope_qk_rejects_mismatches(tabs):
    cos, sin = tabs
    q = x_(2, 4, 8, 64)
    with pytest.raises(RuntimeError, match="q and k must agree on batch, seqlen and headdim"):
        pirope.apply_rope_qk(q, x_(2, 5, 2, 64), cos, sin)
    with pytest.raises(RuntimeError, match="q and k must agree on batch, seqlen and headdim"):
        pirope.apply_rope_qk(q, x_(2, 4, 2, 32), cos, sin)
    with pytest.raises(RuntimeError, match="q and k must have the same dtype"):
        pirope.apply_rope_qk(q, x_(2, 4, 2, 64, dtype=torch.float16), cos, sin)
    with pytest.raises(RuntimeError, match="q and k must have the same rank"):
        pirope.apply_rope_qk(q, x_(4, 2, 64), cos, sin)
    with pytest.raises(RuntimeError, match="k must be on cpu"):
        pirope.apply_rope_qk(q, torch.empty(2, 4, 2, 64, device="meta"), cos, sin)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        pirope.apply_rope_qk(q, None, cos, sin)
    with pytest.raises(TypeError, match="apply_rope_qk: q must be a torch.Tensor, got list"):
        pirope.apply_rope_qk([1.0], q, cos, sin)
    with pytest.raises(TypeError, match="apply_rope_qk: q must be a dense \\(strided\\) tensor"):
        pirope.apply_rope_qk(q.to_sparse(), q, cos, sin)


def test_inplace_rejects_overlapping_memory(tabs):
    cos, sin = tabs
    expanded = x_(1, 4, 1, 64).expand(1, 4, 3, 64)
    with pytest.raises(RuntimeError, match="x has elements that share memory"):
        pirope.apply_rope(expanded, cos, sin, inplace=True)
    q = x_(1, 4, 2, 64)
    with pytest.raises(RuntimeError, match="q and k share memory"):
        pirope.apply_rope_qk(q, q, cos, sin, inplace=True)


def test_inplace_sees_memory_shared_by_two_storages(tabs):
    # torch.from_numpy of one array twice: two storages over the same bytes, where torch's
    # overlap checks see nothing; rotating both in place would rotate each element twice
    np = pytest.importorskip("numpy")
    cos, sin = tabs
    a = np.random.default_rng(0).standard_normal((1, 8, 2, 64), dtype=np.float32)
    q, k = torch.from_numpy(a), torch.from_numpy(a)
    assert q.untyped_storage()._cdata != k.untyped_storage()._cdata  # two storages indeed
    with pytest.raises(RuntimeError, match="q and k share memory"):
        pirope.apply_rope_qk(q, k, cos, sin, inplace=True)
    buf = np.random.default_rng(1).standard_normal(8 * 64 + cos.numel(), dtype=np.float32)
    x, table = torch.from_numpy(buf)[: 8 * 64].view(1, 8, 1, 64), torch.from_numpy(buf)[: cos.numel()].view_as(cos)
    with pytest.raises(RuntimeError, match="x shares memory with cos"):
        pirope.apply_rope(x, table, sin, inplace=True)
    assert np.array_equal(a, q.numpy())  # nothing written
    # disjoint halves of one array through two storages: rotated, each once
    b = np.random.default_rng(2).standard_normal((2, 1, 8, 2, 64), dtype=np.float32)
    q, k = torch.from_numpy(b)[0], torch.from_numpy(b)[1]
    want_q, want_k = pirope.apply_rope_qk(q.clone(), k.clone(), cos, sin)
    pirope.apply_rope_qk(q, k, cos, sin, inplace=True)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_inplace_refuses_memory_shared_with_the_tables_or_positions(tabs):
    # rotated in place, x must not overlap what the kernel reads while it writes: rows of
    # cos read after being overwritten would give a wrong result with no error
    cos, sin = tabs
    buf = torch.randn(8 * 64 + cos.numel())
    x = buf[: 8 * 64].view(1, 8, 1, 64)
    for name, table, call in [
        ("cos", buf[: cos.numel()].view_as(cos), lambda x, t: pirope.apply_rope(x, t, sin, inplace=True)),
        ("sin", buf[256: 256 + sin.numel()].view_as(sin), lambda x, t: pirope.apply_rope(x, cos, t, inplace=True)),
        ("cos", buf[: cos.numel()].view_as(cos),
         lambda x, t: pirope.apply_rope_qk(x[:, :4], x[:, 4:].clone(), t, sin, inplace=True)),
    ]:
        before = x.clone()
        with pytest.raises(RuntimeError, match=f"shares memory with {name} and cannot be rotated in place"):
            call(x, table)
        assert torch.equal(x, before)
    positions = torch.arange(4 * 64)
    over_positions = positions.view(torch.float64).view(1, 4, 1, 64)  # x on the positions' bytes
    with pytest.raises(RuntimeError, match="shares memory with position_ids"):
        pirope.apply_rope(over_positions, cos.double(), sin.double(), positions[:4], inplace=True)
    # the views path (q a view that requires grad): k's overlap is found before q is written
    q = (torch.randn(1, 8, 2, 64, requires_grad=True) * 1)[:, :, :1]
    k = buf[: 8 * 64].view(1, 8, 1, 64)
    before = q.detach().clone()
    with pytest.raises(RuntimeError, match="k shares memory with cos"):
        pirope.apply_rope_qk(q, k, buf[: cos.numel()].view_as(cos), sin, inplace=True)
    assert torch.equal(q.detach(), before)
    # separate memory, or disjoint parts of one buffer, are fine
    y = buf[cos.numel(): cos.numel() + 4 * 64].view(1, 4, 1, 64)
    table = buf[: cos.numel()].view_as(cos)
    want = pirope.apply_rope(y.clone(), table.clone(), sin)
    pirope.apply_rope(y, table, sin, inplace=True)
    assert torch.equal(y, want)


@pytest.mark.parametrize("layout", ["sparse", "nested"])
def test_non_dense_tensors_are_refused_naming_the_argument(tabs, layout):
    cos, sin = tabs
    x = x_(2, 4, 2, 64)
    make = (lambda t: t.to_sparse()) if layout == "sparse" else (lambda t: torch.nested.nested_tensor([t[0], t[1]]))
    calls = [(lambda: pirope.apply_rope(make(x), cos, sin), "x"),
             (lambda: pirope.apply_rope(x, make(cos), sin), "cos"),
             (lambda: pirope.apply_rope_qk(x, make(x), cos, sin), "k"),
             (lambda: pirope.rope_attention(x, x, make(x), cos, sin), "v")]
    if layout == "sparse":  # (1-D tensors have no nested form; torch dispatches no nested tensor to a Python op)
        inv_freq, _ = pirope.rope_frequencies(64)
        calls += [(lambda: torch.ops.pirope.check_rope_inplace(x, make(x), cos, sin, None), "k"),
                  (lambda: torch.ops.pirope.check_rope_inplace(x, x, cos, sin, make(torch.arange(4))), "position_ids"),
                  (lambda: pirope.apply_rope(x, cos, sin, make(torch.arange(4))), "position_ids"),
                  (lambda: pirope.rope_cos_sin(make(inv_freq), 8), "inv_freq"),
                  (lambda: pirope.rope_cos_sin(inv_freq, make(torch.arange(4))), "positions")]
    for call, name in calls:
        with pytest.raises(TypeError, match=f"{name} must be a dense \\(strided\\) tensor"):
            call()


def test_inplace_overlap_that_torch_calls_too_hard(tabs):
    # rows that overlap without an expanded (stride 0) dim: torch's check answers "too
    # hard"; pirope compares the rows, or the elements, exactly
    cos, sin = tabs
    storage = torch.randn(4096)
    rows = storage.as_strided((1, 4, 1, 64), (0, 32, 64, 1))  # token rows overlap by half
    with pytest.raises(RuntimeError, match="x has elements that share memory"):
        pirope.apply_rope(rows, cos, sin, inplace=True)
    elems = storage.as_strided((1, 4, 1, 64), (0, 64, 64, 2))  # feature stride 2, rows overlap
    with pytest.raises(RuntimeError, match="x has elements that share memory"):
        pirope.apply_rope(elems, cos, sin, inplace=True)
    # layouts torch can't decide but that are disjoint still rotate in place, exactly
    for x in (storage.as_strided((1, 4, 1, 64), (0, 100, 64, 1)),       # rows with gaps
              storage.as_strided((1, 4, 1, 64), (0, 130, 64, 2)),       # feature stride 2, disjoint
              torch.randn(2, 4, 2, 128)[..., ::2]):                     # every other feature
        want = pirope.apply_rope(x.clone(), cos, sin)
        pirope.apply_rope(x, cos, sin, inplace=True)
        assert torch.equal(x, want)


def test_inplace_interleaved_feature_views_are_disjoint(tabs):
    # q and k as the even and odd features of one buffer: no element shared
    cos, sin = tabs
    buf = x_(1, 4, 2, 128)
    q, k = buf[..., 0::2], buf[..., 1::2]
    rq, rk = pirope.apply_rope_qk(q.clone(), k.clone(), cos, sin)
    pirope.apply_rope_qk(q, k, cos, sin, inplace=True)
    assert torch.equal(q, rq) and torch.equal(k, rk)
    wide = x_(1, 4, 2, 130)
    with pytest.raises(RuntimeError, match="q and k share memory"):  # but these overlap
        pirope.apply_rope_qk(wide[..., 0:128:2], wide[..., 2:130:2], cos, sin, inplace=True)


def test_inplace_q_and_k_views_of_one_tensor(tabs):
    cos, sin = tabs
    # q, k and v as views of one fused projection: disjoint, so in place is fine
    qkv = x_(2, 4, 6 + 2 + 2, 64)
    q, k = qkv[:, :, :6], qkv[:, :, 6:8]
    rq, rk = pirope.apply_rope_qk(q.clone(), k.clone(), cos, sin)
    pirope.apply_rope_qk(q, k, cos, sin, inplace=True)
    assert torch.equal(q, rq) and torch.equal(k, rk)
    # overlapping head ranges, or rows that overlap by a few features, are rejected
    for a, b in [(qkv[:, :, :6], qkv[:, :, 5:7]), (qkv[:, :, :2, :64], qkv.view(2, 4, -1)[:, :, 32:96].view(2, 4, 1, 64))]:
        with pytest.raises(RuntimeError, match="q and k share memory"):
            pirope.apply_rope_qk(a, b, cos, sin, inplace=True)


def test_raising_leaves_inputs_untouched(tabs):
    cos, sin = tabs
    x = x_(1, 4, 2, 64)
    x0 = x.clone()
    with pytest.raises(IndexError):
        pirope.apply_rope(x, cos, sin, torch.tensor([0, 1, 99, 2]), inplace=True)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("form", ["shared", "batched last row", "broadcast", "packed", "int32", "huge", "negative",
                                  "no heads"])
@pytest.mark.parametrize("op", ["apply_rope", "apply_rope_qk"])
@pytest.mark.parametrize("inplace", [False, True])
def test_out_of_range_position_ids_raise_index_error_in_every_form(tabs, form, op, inplace):
    # on CPU a position outside [0, max_positions) raises, whatever the position_ids
    # form or dtype and whichever op, also for inputs without elements (zero heads: nothing
    # to read, but the positions are as wrong), and nothing is written
    cos, sin = tabs  # 16 rows
    b, s = 2, 4
    good = torch.arange(s)
    pos, packed = {
        "shared": (torch.tensor([0, 16, 1, 2]), False),
        "batched last row": (torch.stack([good, torch.tensor([3, 2, 1, 16])]), False),
        "broadcast": (torch.tensor([[15, 16, 0, 1]]), False),
        "packed": (torch.tensor([0, 1, 2, 3, 0, 1, 17, 3]), True),
        "int32": (torch.tensor([[0, 1, 2, 3], [16, 0, 1, 2]], dtype=torch.int32), False),
        "huge": (torch.tensor([0, 2**40, 1, 2]), False),
        "negative": (torch.tensor([0, 1, -1, 2], dtype=torch.int32), False),
        "no heads": (torch.tensor([0, 16, 1, 2]), False),
    }[form]
    shape = (b * s,) if packed else (b, s)
    heads = (0, 0) if form == "no heads" else (2, 1)
    q, k = x_(*shape, heads[0], 64), x_(*shape, heads[1], 64)
    before = q.clone(), k.clone()
    call = (lambda: pirope.apply_rope(q, cos, sin, pos, inplace=inplace)) if op == "apply_rope" else (
        lambda: pirope.apply_rope_qk(q, k, cos, sin, pos, inplace=inplace))
    with pytest.raises(IndexError, match="position_ids must be in \\[0, 16\\)"):
        call()
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])


_RAW_NONE_CASES = {
    "apply_rope x": (lambda x, c, l: torch.ops.pirope.apply_rope(None, c, c, None, False), "x"),
    "apply_rope cos": (lambda x, c, l: torch.ops.pirope.apply_rope(x, None, c, None, False), "cos"),
    "apply_rope_backward sin": (lambda x, c, l: torch.ops.pirope.apply_rope_backward(x, c, None, None, False),
                                "sin"),
    "apply_rope_ x": (lambda x, c, l: torch.ops.pirope.apply_rope_(None, c, c, None, False), "x"),
    "apply_rope_qk k": (lambda x, c, l: torch.ops.pirope.apply_rope_qk(x, None, c, c, None, False), "k"),
    "apply_rope_qk_ k": (lambda x, c, l: torch.ops.pirope.apply_rope_qk_(x, None, c, c, None, False), "k"),
    "apply_rope_qk_backward grad_q": (
        lambda x, c, l: torch.ops.pirope.apply_rope_qk_backward(None, x, c, c, None, False), "grad_q"),
    "rope_attention q": (lambda x, c, l: torch.ops.pirope.rope_attention(None, x, x, c, c, None, True, 0.1, False),
                         "q"),
    "rope_attention v": (lambda x, c, l: torch.ops.pirope.rope_attention(x, x, None, c, c, None, True, 0.1, False),
                         "v"),
    "rope_attention_backward lse": (lambda x, c, l: torch.ops.pirope.rope_attention_backward(
        x, x, x, x, x, None, c, c, None, True, 0.1, False), "lse"),
    "rope_attention_backward grad_out": (lambda x, c, l: torch.ops.pirope.rope_attention_backward(
        None, x, x, x, x, l, c, c, None, True, 0.1, False), "grad_out"),
    # (a Python op: torch passes None through its Tensor arguments)
    "check_rope_inplace q": (lambda x, c, l: torch.ops.pirope.check_rope_inplace(None, x, c, c, None), "q"),
    "check_rope_inplace k": (lambda x, c, l: torch.ops.pirope.check_rope_inplace(x, None, c, c, None), "k"),
    "check_rope_inplace sin": (lambda x, c, l: torch.ops.pirope.check_rope_inplace(x, x, c, None, None), "sin"),
}


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", list(_RAW_NONE_CASES))
def test_raw_ops_name_a_none_tensor_argument(tabs, case, requires_grad):
    # every error names its argument (README, "Contract details"), also for the torch.ops layer
    # (the pirope.* functions refuse None themselves: test_apply_rope_rejects). The
    # autograd and in-place kernels run before the shared checks and must not trip on it.
    call, name = _RAW_NONE_CASES[case]
    op = case.split()[0]
    x = x_(1, 4, 2, 64).requires_grad_(requires_grad and not op.endswith("_"))  # in place: no grad
    lse = torch.zeros(1, 2, 4)
    with pytest.raises(RuntimeError, match=rf"^\S*{op}: {name} must be a tensor, got None"):
        call(x, tabs[0], lse)


def test_rope_frequencies_rejects():
    with pytest.raises(ValueError, match="rope_type"):
        pirope.rope_frequencies(64, scaling={"rope_type": "nope", "factor": 2.0})
    with pytest.raises(ValueError, match="factor"):
        pirope.rope_frequencies(64, scaling={"rope_type": "linear", "factor": 0.5})
    with pytest.raises((ValueError, KeyError), match="factor"):
        pirope.rope_frequencies(64, scaling={"rope_type": "linear"})
    with pytest.raises((ValueError, TypeError), match="scaling"):
        pirope.rope_frequencies(64, scaling="linear")
    with pytest.raises((ValueError, TypeError), match="rotary_dim|head_dim"):
        pirope.rope_frequencies(63)


@pytest.mark.parametrize("call, prefix", [
    (lambda: pirope.rope_frequencies(0), "rope_frequencies: head_dim"),
    (lambda: pirope.rope_frequencies(64, scaling={"rope_type": "linear"}), "rope_frequencies: scaling"),
    (lambda: pirope.rope_frequencies(64, base="1e4"), "rope_frequencies: base"),
    (lambda: pirope.RotaryEmbedding(63, max_position_embeddings=8), "RotaryEmbedding: rotary_dim"),
    (lambda: pirope.RotaryEmbedding(64, max_position_embeddings=8, scaling={"rope_type": "yarn"}),
     "RotaryEmbedding: scaling"),
])
def test_errors_say_which_function_refused(call, prefix):
    # the scaling checks are shared: the message still starts with the public function's name
    with pytest.raises((TypeError, ValueError)) as e:
        call()
    assert str(e.value).startswith(prefix), str(e.value)


def test_numpy_scalars_are_taken_like_python_numbers():
    # what NumPy-using code passes (np.int64 from a shape or an argmax, np.float32 from a config)
    np = pytest.importorskip("numpy")
    inv_freq, _ = pirope.rope_frequencies(64)
    cos, sin = pirope.rope_cos_sin(inv_freq, np.int64(7), np.float32(1.5))
    want_cos, want_sin = pirope.rope_cos_sin(inv_freq, 7, 1.5)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    q = torch.randn(1, 6, 2, 64)
    cos, sin = pirope.rope_cos_sin(inv_freq, 6)
    torch.testing.assert_close(pirope.rope_attention(q, q, q, cos, sin, softmax_scale=np.float64(0.2)),
                               pirope.rope_attention(q, q, q, cos, sin, softmax_scale=0.2), rtol=0, atol=0)
    rotary = pirope.RotaryEmbedding(np.int32(64), max_position_embeddings=np.int64(16))
    assert (rotary.head_dim, rotary.max_position_embeddings) == (64, 16)
    assert type(rotary.head_dim) is int
    with pytest.raises(TypeError, match="positions must be an int"):
        pirope.rope_cos_sin(inv_freq, np.float64(7))
    with pytest.raises(TypeError, match="positions must be an int"):
        pirope.rope_cos_sin(inv_freq, np.bool_(True))


def test_rope_cos_sin_rejects():
    inv_freq, _ = pirope.rope_frequencies(64)
    with pytest.raises(TypeError, match="inv_freq must be a torch.Tensor"):
        pirope.rope_cos_sin([1.0], 4)
    with pytest.raises(ValueError, match="inv_freq must be 1-D"):
        pirope.rope_cos_sin(inv_freq[None], 4)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        pirope.rope_cos_sin(inv_freq, -1)
    with pytest.raises(TypeError, match="positions must be an int"):
        pirope.rope_cos_sin(inv_freq, 2.5)
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        pirope.rope_cos_sin(inv_freq, torch.arange(4.0))
    with pytest.raises(ValueError, match="positions must be an int or a 1-D tensor"):
        pirope.rope_cos_sin(inv_freq, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="positions must hold values to make cpu tables"):
        pirope.rope_cos_sin(inv_freq, torch.arange(4, device="meta"))
    for n in (2**50, 2**62):  # more than any address space; a size that overflows int64 bytes
        with pytest.raises(RuntimeError, match=f"tables of {n} positions x 32 pairs do not fit in cpu memory"):
            pirope.rope_cos_sin(inv_freq, n)
    with pytest.raises(ValueError, match="attention_factor must be finite"):
        pirope.rope_cos_sin(inv_freq, 4, float("nan"))
    # tables that would be zero, negated or inf rather than an error
    for factor in (0.0, -1.0):
        with pytest.raises(ValueError, match="attention_factor must be > 0"):
            pirope.rope_cos_sin(inv_freq, 4, factor)
    with pytest.raises(ValueError, match="attention_factor must be at most"):
        pirope.rope_cos_sin(inv_freq, 4, 1e39)
    with pytest.raises(ValueError, match="attention_factor must be finite"):
        pirope.rope_cos_sin(inv_freq, 4, 10**400)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="inv_freq must be finite"):
            pirope.rope_cos_sin(torch.cat([inv_freq[:-1], inv_freq.new_tensor([bad])]), 4)


@pytest.mark.parametrize("kwargs, name", [
    (dict(scaling={"rope_type": "linear", "factor": 10**400}), "factor"),
    (dict(base=10**400), "base"),
    (dict(scaling={"rope_type": "dynamic", "factor": 2.0}, seq_len=10**400), "seq_len"),
    (dict(scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=10**400),
     "max_position_embeddings"),
    (dict(scaling={"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1, "high_freq_factor": 4,
                   "original_max_position_embeddings": 10**400}), "original_max_position_embeddings"),
    (dict(head_dim=10**20), "head_dim"),
    (dict(scaling={"rope_type": "yarn", "factor": 2.0, "beta_slow": 1e-320}), "beta_slow"),
])
def test_rope_frequencies_rejects_numbers_past_the_float_and_int64_range(kwargs, name):
    # no OverflowError from deep inside the math: a ValueError that names the argument
    kwargs = {"head_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=name):
        pirope.rope_frequencies(kwargs.pop("head_dim"), **kwargs)


def test_dynamic_seq_len_of_a_narrow_integer_dtype_is_not_wrapped():
    # a uint8 length must not overflow against the window (4096 is no uint8) (transformers' tensor path
    # with int64 is the reference)
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    for seq_len in (100, 250):
        got = pirope.rope_frequencies(8, scaling=scaling, max_position_embeddings=4096,
                                      seq_len=torch.tensor(seq_len, dtype=torch.uint8))
        want = pirope.rope_frequencies(8, scaling=scaling, max_position_embeddings=4096,
                                       seq_len=torch.tensor(seq_len, dtype=torch.int64))
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_rotary_embedding_rejects():
    with pytest.raises(TypeError, match="head_dim must be an int"):
        pirope.RotaryEmbedding(64.0, max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings must be >= 1"):
        pirope.RotaryEmbedding(64, max_position_embeddings=0)
    with pytest.raises(TypeError, match="RotaryEmbedding: interleaved must be a bool, got int"):
        pirope.RotaryEmbedding(64, max_position_embeddings=16, interleaved=1)
    rope = pirope.RotaryEmbedding(64, max_position_embeddings=16)
    with pytest.raises(ValueError, match="q must be"):
        rope(x_(4, 64), x_(4, 64))
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        rope(x_(1, 4, 2, 64), "k")
    with pytest.raises(TypeError, match="RotaryEmbedding: position_ids must be a torch.Tensor, got list"):
        rope(x_(1, 4, 2, 64), x_(1, 4, 2, 64), [0, 1, 2, 3])
    with pytest.raises(TypeError, match="RotaryEmbedding.rotate: position_ids must be a dense \\(strided\\) tensor"):
        rope.rotate(x_(1, 4, 2, 64), torch.arange(4).to_sparse())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, c: pirope.apply_rope(x.int(), c, c), "x must be float32, float64, float16 or bfloat16"),
        (lambda x, c: pirope.apply_rope(x[0, 0], c, c), "x must be \\(batch, seqlen, nheads, headdim\\)"),
        (lambda x, c: pirope.apply_rope(x[..., :16], c, c), "rotary_dim = 2 \\* cos.size\\(1\\) = 32 exceeds"),
        (lambda x, c: pirope.apply_rope(x, c, c[:, :8]), "cos and sin must have the same shape"),
        (lambda x, c: pirope.apply_rope_qk(x, x[:, :7], c, c), "q and k must agree on batch, seqlen and headdim"),
        (lambda x, c: pirope.apply_rope_qk(x, x[..., :16], c[:, :8], c[:, :8]),
         "q and k must agree on batch, seqlen and headdim"),
        (lambda x, c: pirope.apply_rope_qk(x, x.double(), c, c), "q and k must have the same dtype"),
        (lambda x, c: pirope.apply_rope_qk(x, x, c, c.double()), "cos and sin must have the same dtype"),
        (lambda x, c: pirope.apply_rope_qk(x, x, c, c, inplace=True), "share memory"),
    ],
)
def test_meta_tensors_are_checked_like_real_ones(call, match):
    # the fake kernels (meta tensors, torch.compile's tracing) reject what the kernels reject
    x, c = torch.empty(2, 8, 4, 32), torch.empty(16, 16)
    with pytest.raises(RuntimeError, match=match):
        call(x, c)  # the real kernel
    if match != "share memory":  # (a memory check: the kernels' own, not the fake's)
        with pytest.raises(RuntimeError, match=match):
            call(x.to("meta"), c.to("meta"))


def _e(*shape, dev, dtype=torch.float32):
    return torch.randn(*shape).to(dtype).to(dev)


def _tabs(dev, width=16):
    return _e(32, width, dev=dev), _e(32, width, dev=dev)


def _same(n, *shape, dev, dtype=torch.float32):
    """n random tensors of one shape (q, k, v; or their gradients and outputs too)."""
    return tuple(_e(*shape, dev=dev, dtype=dtype) for _ in range(n))


_QKV4 = lambda dev: _same(3, 1, 4, 2, 32, dev=dev)  # noqa: E731
_FAKE_CASES = {
    "apply_rope float position_ids": lambda d: pirope.apply_rope(
        _e(1, 4, 2, 32, dev=d), *_tabs(d), torch.zeros(4, device=d)),
    "apply_rope position_ids of another length": lambda d: pirope.apply_rope(
        _e(1, 4, 2, 32, dev=d), *_tabs(d), torch.zeros(5, dtype=torch.long, device=d)),
    "apply_rope_qk 2-D position_ids for packed input": lambda d: pirope.apply_rope_qk(
        _e(4, 2, 32, dev=d), _e(4, 1, 32, dev=d), *_tabs(d), torch.zeros(1, 4, dtype=torch.long, device=d)),
    "apply_rope seqlen past the table without position_ids": lambda d: pirope.apply_rope(
        _e(1, 40, 2, 32, dev=d), *_tabs(d)),
    "apply_rope seqlen one past the table without position_ids": lambda d: pirope.apply_rope(
        _e(1, 33, 2, 32, dev=d), *_tabs(d)),
    "apply_rope_qk zero heads, seqlen past the table without position_ids": lambda d: pirope.apply_rope_qk(
        _e(1, 40, 0, 32, dev=d), _e(1, 40, 0, 32, dev=d), *_tabs(d)),
    "rope_attention float position_ids": lambda d: pirope.rope_attention(
        *_QKV4(d), *_tabs(d), torch.zeros(4, device=d)),
    "rope_attention position_ids of another batch": lambda d: pirope.rope_attention(
        *_QKV4(d), *_tabs(d), torch.zeros(3, 4, dtype=torch.long, device=d)),
    "raw rope_attention negative scale": lambda d: torch.ops.pirope.rope_attention(
        *_QKV4(d), *_tabs(d), None, True, -1.0, False),
    "raw rope_attention headdim 0": lambda d: torch.ops.pirope.rope_attention(
        _e(1, 4, 2, 0, dev=d), _e(1, 4, 2, 0, dev=d), _e(1, 4, 2, 0, dev=d), *_tabs(d, 0), None, True, 1.0, False),
    "raw backward lse of another shape": lambda d: torch.ops.pirope.rope_attention_backward(
        *_QKV4(d), *_QKV4(d)[:2], _e(3, dev=d), *_tabs(d), None, True, 0.1, False),
    "raw backward float64 lse": lambda d: torch.ops.pirope.rope_attention_backward(
        *_QKV4(d), *_QKV4(d)[:2], _e(1, 2, 4, dev=d, dtype=torch.float64), *_tabs(d), None, True, 0.1, False),
    "raw backward float64 grad_out": lambda d: torch.ops.pirope.rope_attention_backward(
        _e(1, 4, 2, 32, dev=d, dtype=torch.float64), *_QKV4(d), _e(1, 4, 2, 32, dev=d), _e(1, 2, 4, dev=d),
        *_tabs(d), None, True, 0.1, False),
    "raw backward float16 out": lambda d: torch.ops.pirope.rope_attention_backward(
        *_QKV4(d), _e(1, 4, 2, 32, dev=d), _e(1, 4, 2, 32, dev=d, dtype=torch.half), _e(1, 2, 4, dev=d),
        *_tabs(d), None, True, 0.1, False),
    "raw backward lse of another seqlen": lambda d: torch.ops.pirope.rope_attention_backward(
        *_QKV4(d), *_QKV4(d)[:2], _e(1, 2, 5, dev=d), *_tabs(d), None, True, 0.1, False),
    "raw backward packed lse of another total": lambda d: torch.ops.pirope.rope_attention_backward(
        *_same(5, 4, 2, 32, dev=d), _e(2, 5, dev=d), *_tabs(d), None, True, 0.1, False,
        cu_seqlens=torch.tensor([0, 4], device=d)),
    # what the Python API refuses before the op: the raw op's (and its fake's) own checks
    "raw rope_attention window_right -2": lambda d: torch.ops.pirope.rope_attention(
        *_QKV4(d), *_tabs(d), None, False, 0.1, False, window_right=-2),
    "raw rope_attention negative softcap": lambda d: torch.ops.pirope.rope_attention(  # (float64: no range check)
        *_same(3, 1, 4, 2, 32, dev=d, dtype=torch.float64), *_tabs(d), None, True, 0.1, False,
        softcap=-1.0),
    "raw rope_attention softcap below float32's range": lambda d: torch.ops.pirope.rope_attention(
        *_QKV4(d), *_tabs(d), None, True, 0.1, False, softcap=1e-50),
    "raw rope_attention scale past float32's range": lambda d: torch.ops.pirope.rope_attention(
        *_QKV4(d), *_tabs(d), None, True, 1e39, False),
    "raw rope_attention integer sinks": lambda d: torch.ops.pirope.rope_attention(
        *_QKV4(d), *_tabs(d), None, True, 0.1, False, sinks=torch.zeros(2, dtype=torch.long, device=d)),
    "raw rope_attention sinks of another head count": lambda d: torch.ops.pirope.rope_attention(
        *_QKV4(d), *_tabs(d), None, True, 0.1, False, sinks=_e(3, dev=d)),
    "raw rope_attention float cu_seqlens": lambda d: torch.ops.pirope.rope_attention(
        *_same(3, 4, 2, 32, dev=d), *_tabs(d), None, True, 0.1, False,
        cu_seqlens=torch.tensor([0.0, 4.0], device=d)),
    "rope_attention packed position_ids of another length": lambda d: pirope.rope_attention(
        *_same(3, 4, 2, 32, dev=d), *_tabs(d), torch.zeros(5, dtype=torch.long, device=d),
        cu_seqlens=torch.tensor([0, 4], device=d)),
}


@pytest.mark.parametrize("case", list(_FAKE_CASES))
def test_meta_tensors_reject_what_the_cpu_kernels_reject(case):
    # the fake kernels (meta tensors, torch.compile's tracing) make the kernels' checks
    call = _FAKE_CASES[case]
    with pytest.raises((RuntimeError, IndexError, ValueError, TypeError)) as cpu:
        call("cpu")
    with pytest.raises((RuntimeError, IndexError, ValueError, TypeError)) as meta:
        call("meta")
    # about the same argument of the same op ("op: argument must ...")
    subject = lambda e: str(e.value).split(" must ")[0]  # noqa: E731
    assert subject(meta) == subject(cpu)


_FAKE_ACCEPTS = {
    "apply_rope seqlen filling the table": lambda d: pirope.apply_rope(_e(1, 32, 2, 32, dev=d), *_tabs(d)),
    "apply_rope empty batch, seqlen past the table": lambda d: pirope.apply_rope(_e(0, 40, 2, 32, dev=d), *_tabs(d)),
    "apply_rope_qk empty packed input past the table": lambda d: pirope.apply_rope_qk(
        _e(0, 2, 32, dev=d), _e(0, 1, 32, dev=d), *_tabs(d)),
    "raw rope_attention float64 softcap below float32's range": lambda d: torch.ops.pirope.rope_attention(
        *_same(3, 1, 4, 2, 32, dev=d, dtype=torch.float64), *_tabs(d), None, True, 0.1, False,
        softcap=1e-50),
}


@pytest.mark.parametrize("case", list(_FAKE_ACCEPTS))
def test_meta_tensors_accept_what_the_cpu_kernels_accept(case):
    # the fake kernels' checks stop where the kernels' stop: at the boundary, and for calls
    # with nothing to rotate (the kernels return before reading a table row)
    call = _FAKE_ACCEPTS[case]
    cpu, meta = call("cpu"), call("meta")
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (cpu, meta))):
        assert (b.shape, b.dtype, b.device.type) == (a.shape, a.dtype, "meta")


def test_rope_attention_rejects_a_softmax_scale_past_the_float_range():
    q = torch.randn(1, 4, 2, 32)
    cos, sin = pirope.rope_cos_sin(pirope.rope_frequencies(32)[0], 4)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        pirope.rope_attention(q, q, q, cos, sin, softmax_scale=10**400)
