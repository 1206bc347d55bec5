"""torch.func transforms of the pirope ops: grad / vjp / jacrev (reverse mode), vmap
and their compositions (per-sample gradients), hessian, against float64 references.
(Forward mode alone: tests/test_apply_rope_autograd.py.)"""

import warnings

import pytest
import torch

import pirope
from reference import attention_reference, rope_reference

func = torch.func


def tables(device, n=40, rotary_dim=16):
    inv_freq, _ = pirope.rope_frequencies(rotary_dim, scaling={"rope_type": "linear", "factor": 2.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, n)
    return cos.to(device), sin.to(device)


def rand(*shape, device):
    return torch.randn(*shape, device=device, dtype=torch.float64)


def rotate(x, cos, sin, position_ids=None):
    """Differentiable float64 rotation written the obvious way (Hugging Face pairs),
    rotary_dim == headdim; position_ids None or (seqlen,)."""
    s = x.shape[-3]
    pos = torch.arange(s, device=x.device) if position_ids is None else position_ids
    c = torch.cat([cos[pos], cos[pos]], -1).double().unsqueeze(-2)
    sn = torch.cat([sin[pos], sin[pos]], -1).double().unsqueeze(-2)
    x1, x2 = x.chunk(2, -1)
    return x * c + torch.cat([-x2, x1], -1) * sn


@pytest.fixture(autouse=True)
def no_fallback_warning():
    # The ops have batching rules: torch's slow per-sample fallback (which warns) is
    # never taken for a pirope op.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule for pirope")
        yield


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_grad_of_apply_rope_is_the_inverse_rotation(device, interleaved, inplace):
    cos, sin = tables(device)
    x, w = rand(2, 9, 3, 16, device=device), rand(2, 9, 3, 16, device=device)
    pos = torch.randint(0, 40, (2, 9), device=device)

    def loss(x):
        if inplace:
            x = x * 1.0
            pirope.apply_rope(x, cos, sin, pos, interleaved=interleaved, inplace=True)
            return (x * w).sum()
        return (pirope.apply_rope(x, cos, sin, pos, interleaved=interleaved) * w).sum()

    ref = rope_reference(w, cos, sin, pos, interleaved, conjugate=True)
    torch.testing.assert_close(func.grad(loss)(x).cpu(), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("inplace", [False, True])
def test_grad_of_apply_rope_qk_gqa(device, inplace):
    cos, sin = tables(device)
    q, k = rand(2, 9, 4, 16, device=device), rand(2, 9, 2, 16, device=device)
    wq, wk = rand(2, 9, 4, 16, device=device), rand(2, 9, 2, 16, device=device)

    def loss(q, k):
        if inplace:
            q, k = q * 1.0, k * 1.0
        q, k = pirope.apply_rope_qk(q, k, cos, sin, inplace=inplace)
        return (q * wq).sum() + (k * wk).sum()

    gq, gk = func.grad(loss, argnums=(0, 1))(q, k)
    torch.testing.assert_close(gq.cpu(), rope_reference(wq, cos, sin, conjugate=True), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gk.cpu(), rope_reference(wk, cos, sin, conjugate=True), atol=1e-12, rtol=1e-12)


def _rope_qk_as_one(x, cos, sin):
    # q (the first two heads) and k (the third, GQA) rotated by the qk op, side by side again
    q, k = pirope.apply_rope_qk(x[:, :, :2], x[:, :, 2:], cos, sin)
    return torch.cat([q, k], 2)


@pytest.mark.parametrize("op", [pirope.apply_rope, _rope_qk_as_one], ids=["apply_rope", "apply_rope_qk"])
def test_jacrev_and_second_derivatives_of_the_rotation(device, op):
    cos, sin = tables(device)
    x, w = rand(1, 3, 3, 16, device=device), rand(1, 3, 3, 16, device=device)
    jac = func.jacrev(lambda x: op(x, cos, sin))(x)
    torch.testing.assert_close(jac, func.jacrev(lambda x: rotate(x, cos, sin))(x), atol=1e-12, rtol=1e-12)
    # hessian by reverse over reverse: the backward is itself differentiable
    loss = lambda r: lambda x: (r(x, cos, sin) * w).pow(2).sum()  # noqa: E731
    ref = func.jacrev(func.jacrev(loss(rotate)))(x)
    torch.testing.assert_close(func.jacrev(func.jacrev(loss(op)))(x), ref, atol=1e-12, rtol=1e-12)
    # torch.func.hessian is forward over reverse: the rotary ops have a jvp too
    torch.testing.assert_close(func.hessian(loss(op))(x), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("in_dim", [0, 2, 4])
def test_vmap_of_apply_rope_matches_per_sample_calls(device, in_dim):
    cos, sin = tables(device)
    xs = rand(3, 2, 7, 4, 16, device=device)
    pos = torch.randint(0, 40, (2, 7), device=device)
    out = func.vmap(lambda x: pirope.apply_rope(x, cos, sin, pos), in_dims=in_dim)(xs.movedim(0, in_dim))
    ref = torch.stack([rope_reference(x, cos, sin, pos) for x in xs])
    torch.testing.assert_close(out.cpu(), ref, atol=1e-12, rtol=1e-12)
    # packed (total_tokens, heads, headdim) samples, and q/k with one of them shared
    packed = func.vmap(lambda x: pirope.apply_rope(x, cos, sin, pos[0]))(xs[:, 0])
    torch.testing.assert_close(packed.cpu(), torch.stack([rope_reference(x, cos, sin, pos[0]) for x in xs[:, 0]]),
                               atol=1e-12, rtol=1e-12)
    k = rand(2, 7, 1, 16, device=device)
    qs, ks = func.vmap(lambda q: pirope.apply_rope_qk(q, k, cos, sin, pos))(xs)
    torch.testing.assert_close(qs.cpu(), ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ks.cpu(), rope_reference(k, cos, sin, pos).expand(3, -1, -1, -1, -1),
                               atol=1e-12, rtol=1e-12)


def test_vmap_of_inplace_rotation(device):
    # q and k as head slices of one vmapped buffer, rotated in place
    cos, sin = tables(device)
    qkv = rand(3, 2, 7, 6, 16, device=device)

    def rotate_qk(t):
        pirope.apply_rope_qk(t[:, :, :4], t[:, :, 4:], cos, sin, inplace=True)
        return t

    out = func.vmap(rotate_qk)(qkv.clone())
    torch.testing.assert_close(out.cpu(), torch.stack([rope_reference(t, cos, sin) for t in qkv]),
                               atol=1e-12, rtol=1e-12)


def test_vmap_over_nothing_gives_empty_outputs(device):
    # a vmapped dim of size 0 (as for torch's own ops): shapes, no error
    cos, sin = tables(device)
    q, k = rand(0, 1, 7, 4, 16, device=device), rand(1, 7, 2, 16, device=device)
    no_pos = torch.zeros(0, 7, dtype=torch.long, device=device)
    assert func.vmap(lambda x: pirope.apply_rope(x, cos, sin))(q).shape == (0, 1, 7, 4, 16)
    assert func.vmap(lambda p: pirope.apply_rope_qk(k, k, cos, sin, p))(no_pos)[1].shape == (0, 1, 7, 2, 16)
    assert func.vmap(lambda x: pirope.rope_attention(x, k, k, cos, sin))(q).shape == (0, 1, 7, 4, 16)
    grads = func.vmap(func.grad(lambda x: pirope.rope_attention(x, k, k, cos, sin).sum()))(q)
    assert grads.shape == (0, 1, 7, 4, 16)
    if device == "cpu":  # packed sequences: a batched cu_seqlens has no valid all-zero sample
        no_cu = torch.zeros(0, 3, dtype=torch.long)
        qp, kp = rand(7, 4, 16, device=device), k[0]
        packed = func.vmap(lambda c: pirope.rope_attention(qp, kp, kp, cos, sin, cu_seqlens=c))(no_cu)
        assert packed.shape == (0, 7, 4, 16) and packed.dtype == qp.dtype


def test_vmap_over_position_ids_and_tables(device):
    cos, sin = tables(device)
    x = rand(2, 7, 4, 16, device=device)
    pos = torch.randint(0, 40, (3, 7), device=device)
    out = func.vmap(lambda p: pirope.apply_rope(x, cos, sin, p))(pos)
    torch.testing.assert_close(out.cpu(), torch.stack([rope_reference(x, cos, sin, p) for p in pos]),
                               atol=1e-12, rtol=1e-12)
    scaled = torch.stack([cos, 0.5 * cos]), torch.stack([sin, 0.5 * sin])
    out = func.vmap(lambda c, s: pirope.apply_rope(x, c, s))(*scaled)
    ref = torch.stack([rope_reference(x, c, s) for c, s in zip(*scaled)])
    torch.testing.assert_close(out.cpu(), ref, atol=1e-12, rtol=1e-12)


def test_per_sample_gradients_of_apply_rope(device):
    cos, sin = tables(device)
    xs, ws = rand(5, 1, 7, 4, 16, device=device), rand(5, 1, 7, 4, 16, device=device)
    grads = func.vmap(func.grad(lambda x, w: (pirope.apply_rope(x, cos, sin) * w).pow(2).sum()))(xs, ws)
    ref = func.vmap(func.grad(lambda x, w: (rotate(x, cos, sin) * w).pow(2).sum()))(xs, ws)
    torch.testing.assert_close(grads, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_and_vjp_of_rope_attention_gqa(device, causal, deterministic):
    cos, sin = tables(device)
    q, k, v = rand(2, 9, 4, 16, device=device), rand(2, 9, 2, 16, device=device), rand(2, 9, 2, 16, device=device)
    g = rand(2, 9, 4, 16, device=device)
    pos = torch.randint(0, 40, (2, 9), device=device)
    kw = dict(causal=causal, deterministic=deterministic)
    out_ref, dq, dk, dv = attention_reference(q, k, v, cos, sin, pos, causal=causal, grad_out=g)
    grads = func.grad(lambda q, k, v: (pirope.rope_attention(q, k, v, cos, sin, pos, **kw) * g).sum(),
                      argnums=(0, 1, 2))(q, k, v)
    out, vjp = func.vjp(lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin, pos, **kw), q, k, v)
    torch.testing.assert_close(out.cpu(), out_ref, atol=1e-12, rtol=1e-12)
    for got in (grads, vjp(g)):
        for a, b in zip(got, (dq, dk, dv)):
            torch.testing.assert_close(a.cpu(), b, atol=1e-12, rtol=1e-12)


OPTIONS = {
    "window": dict(causal=False, window_size=(3, 1)),
    "softcap": dict(softcap=0.8),
    "sinks": dict(sinks=True),
    "packed": dict(packed=True),
    "packed_sinks_softcap_window": dict(packed=True, sinks=True, softcap=1.5, window_size=(2, 0)),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_grad_of_rope_attention_with_each_option_equals_eager_autograd(device, options):
    """torch.func takes the Python autograd.Function (_autograd/rope_attention.py), eager
    calls the C++ one, whose gradients the option's own test file checks against float64
    references: the two must agree for every option the op passes to its backward
    (window, soft-cap, packed sequences) and for the sinks' gradient."""
    options = dict(options)
    cos, sin = tables(device)
    shape = (9,) if options.pop("packed", False) else (2, 9)
    if len(shape) == 1:
        options["cu_seqlens"] = torch.tensor([0, 4, 9], device=device, dtype=torch.int32)
    q, k, v = (3 * rand(*shape, h, 16, device=device) for h in (4, 2, 2))
    g = rand(*shape, 4, 16, device=device)
    inputs = [q, k, v]
    if options.pop("sinks", False):
        inputs.append(rand(4, device=device))

    def call(q, k, v, sinks=None):
        return pirope.rope_attention(q, k, v, cos, sin, **options, **({"sinks": sinks} if sinks is not None else {}))

    leaves = [t.clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(call(*leaves), leaves, g)
    got = func.grad(lambda *xs: (call(*xs) * g).sum(), argnums=tuple(range(len(inputs))))(*inputs)
    assert len(got) == len(expected)
    for name, a, b in zip("q k v sinks".split(), got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"{name}: {m}")


def test_jacrev_of_rope_attention(device):
    cos, sin = tables(device)
    q, k, v = rand(1, 3, 2, 16, device=device), rand(1, 3, 1, 16, device=device), rand(1, 3, 1, 16, device=device)

    def ref(q):
        qr, kr = rotate(q, cos, sin), rotate(k, cos, sin).expand(-1, -1, 2, -1)  # 2 query heads per kv head
        scores = torch.einsum("bshd,bthd->bhst", qr, kr) * 16 ** -0.5
        scores = scores.masked_fill(torch.ones(3, 3, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v.expand(-1, -1, 2, -1))

    jac = func.jacrev(lambda q: pirope.rope_attention(q, k, v, cos, sin))(q)
    torch.testing.assert_close(jac, func.jacrev(ref)(q), atol=1e-12, rtol=1e-12)


def test_vmap_of_rope_attention(device):
    cos, sin = tables(device)
    qs, ks, vs = rand(3, 2, 7, 4, 16, device=device), rand(3, 2, 7, 2, 16, device=device), rand(3, 2, 7, 2, 16, device=device)
    pos = torch.randint(0, 40, (3, 7), device=device)
    out = func.vmap(lambda q, k, v: pirope.rope_attention(q, k, v, cos, sin))(qs, ks, vs)
    ref = torch.stack([attention_reference(q, k, v, cos, sin) for q, k, v in zip(qs, ks, vs)])
    torch.testing.assert_close(out.cpu(), ref, atol=1e-12, rtol=1e-12)
    # k, v shared by the vmapped queries (still one head-folded launch), and vmapped positions
    out = func.vmap(lambda q: pirope.rope_attention(q, ks[0], vs[0], cos, sin), in_dims=2)(qs.movedim(0, 2))
    ref = torch.stack([attention_reference(q, ks[0], vs[0], cos, sin) for q in qs])
    torch.testing.assert_close(out.cpu(), ref, atol=1e-12, rtol=1e-12)
    out = func.vmap(lambda p: pirope.rope_attention(qs[0], ks[0], vs[0], cos, sin, p))(pos)
    ref = torch.stack([attention_reference(qs[0], ks[0], vs[0], cos, sin, p) for p in pos])
    torch.testing.assert_close(out.cpu(), ref, atol=1e-12, rtol=1e-12)


def test_per_sample_gradients_of_rope_attention(device):
    # the usual torch.func recipe: vmap(grad(loss)) over examples, weights shared
    cos, sin = tables(device)
    qs, gs = rand(4, 1, 9, 4, 16, device=device), rand(4, 1, 9, 4, 16, device=device)
    k, v = rand(1, 9, 2, 16, device=device), rand(1, 9, 2, 16, device=device)
    loss = lambda q, k, v, g: (pirope.rope_attention(q, k, v, cos, sin) * g).sum()  # noqa: E731
    dq, dk, dv = func.vmap(func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None, 0))(qs, k, v, gs)
    for i in range(4):
        _, rq, rk, rv = attention_reference(qs[i], k, v, cos, sin, grad_out=gs[i])
        for a, b in zip((dq[i], dk[i], dv[i]), (rq, rk, rv)):
            torch.testing.assert_close(a.cpu(), b, atol=1e-12, rtol=1e-12)


def test_second_derivatives_of_rope_attention_raise(device):
    cos, sin = tables(device)
    q = rand(1, 3, 2, 16, device=device)
    with pytest.raises(NotImplementedError, match="double backward"):
        func.jacrev(func.grad(lambda q: pirope.rope_attention(q, q, q, cos, sin).sum()))(q)


def test_inplace_under_a_transform_refuses_an_x_whose_elements_overlap(device):
    # the rotation is copied back under torch.func, not written by the kernel that checks x
    cos, sin = tables(device)

    def rotate(flat):
        x = (flat * 1).as_strided((1, 5, 2, 16), (0, 16, 8, 1))  # heads overlap by half a head
        return pirope.apply_rope(x, cos, sin, inplace=True).sum()

    with pytest.raises(RuntimeError, match="x has elements that share memory"):
        rotate(rand(200, device=device))
    with pytest.raises(RuntimeError, match="x has elements that share memory"):
        func.grad(rotate)(rand(200, device=device))
    with pytest.raises(RuntimeError, match="x has elements that share memory"):
        func.vmap(rotate)(rand(3, 200, device=device))


def test_inplace_under_a_transform_refuses_the_inputs_it_differentiates(device):
    # grad's input is a leaf that requires grad: torch's in-place ops refuse it (x.mul_), and
    # so does the rotation, naming it, before anything is written
    import torch.autograd.forward_ad as fwAD
    cos, sin = tables(device)
    x, k = rand(1, 9, 2, 16, device=device), rand(1, 9, 1, 16, device=device)
    before = x.clone(), k.clone()
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        func.grad(lambda x: x.mul_(2).sum())(x)
    with pytest.raises(RuntimeError, match="apply_rope: x is a leaf tensor that requires grad"):
        func.grad(lambda x: pirope.apply_rope(x, cos, sin, inplace=True).sum())(x)
    with pytest.raises(RuntimeError, match="apply_rope_qk: k is a leaf tensor that requires grad"):
        func.grad(lambda k: pirope.apply_rope_qk(x * 1, k, cos, sin, inplace=True)[1].sum())(k)
    leaf = x.clone().requires_grad_()
    with fwAD.dual_level():  # (a dual level is a transform too: the rotation is copied back)
        with pytest.raises(RuntimeError, match="apply_rope_qk: q is a leaf tensor that requires grad"):
            pirope.apply_rope_qk(leaf, k, cos, sin, inplace=True)
    assert torch.equal(x, before[0]) and torch.equal(k, before[1]) and torch.equal(leaf.detach(), before[0])


def test_inplace_qk_under_a_transform_refuses_overlap(device):
    cos, sin = tables(device)
    qkv = rand(2, 7, 6, 16, device=device)
    rotate_overlapping = lambda a: pirope.apply_rope_qk(a[:, :, :4], a[:, :, 2:], cos, sin, inplace=True)  # noqa: E731
    with pytest.raises(RuntimeError, match="share"):
        func.grad(lambda t: rotate_overlapping(t * 1)[0].sum())(qkv)
    with pytest.raises(RuntimeError, match="share"):
        func.vmap(rotate_overlapping)(qkv[None])


def test_reduced_precision_under_vmap(device):
    cos, sin = tables(device, rotary_dim=64)
    dtype = torch.bfloat16
    qs = torch.randn(2, 1, 33, 4, 64, device=device, dtype=dtype)
    k, v = torch.randn(2, 1, 33, 2, 64, device=device, dtype=dtype).unbind(0)
    out = func.vmap(lambda q: pirope.rope_attention(q, k, v, cos, sin))(qs)
    for i in range(2):
        torch.testing.assert_close(out[i], pirope.rope_attention(qs[i], k, v, cos, sin), atol=2e-2, rtol=2e-2)
        ref = attention_reference(qs[i], k, v, cos, sin)
        torch.testing.assert_close(out[i].double().cpu(), ref, atol=3e-2, rtol=3e-2)


def test_functionalize_takes_the_ops_themselves(device):
    # functionalize (and make_fx over it) is not an autograd transform: the ops' own path
    cos, sin = tables(device)
    q, k, v = rand(1, 7, 4, 16, device=device), rand(1, 7, 2, 16, device=device), rand(1, 7, 2, 16, device=device)
    out = func.functionalize(lambda q: pirope.rope_attention(q, k, v, cos, sin))(q)
    torch.testing.assert_close(out.cpu(), attention_reference(q, k, v, cos, sin), atol=1e-12, rtol=1e-12)
    rot = func.functionalize(lambda x: pirope.apply_rope(x, cos, sin))(q)
    torch.testing.assert_close(rot.cpu(), rope_reference(q, cos, sin), atol=1e-12, rtol=1e-12)


def test_gradients_with_respect_to_the_tables_are_refused(device):
    # cos and sin are constants: torch.func would return zeros for them silently
    cos, sin = (t.double() for t in tables(device))
    x = rand(1, 5, 2, 16, device=device)
    calls = [lambda c: pirope.apply_rope(x, c, sin).sum(),
             lambda c: pirope.apply_rope_qk(x, x, cos, c)[1].sum(),
             lambda c: pirope.rope_attention(x, x, x, c, sin).sum()]
    for call in calls:
        # the refusal alone: not also the eager warning that tables requiring grad get none
        with warnings.catch_warnings(), pytest.raises(NotImplementedError, match="with respect to (cos|sin)"):
            warnings.filterwarnings("error", message=".*tables are constants")
            func.grad(call)(cos)


def test_inplace_qk_under_vmap_writes_both_or_neither(device):
    # q vmapped, k shared, positions vmapped: k cannot take a per-sample result, so the
    # call fails, and q is left as it was
    cos, sin = tables(device)
    qs, k = rand(3, 1, 7, 2, 16, device=device), rand(1, 7, 1, 16, device=device)
    pos = torch.randint(0, 40, (3, 7), device=device)
    before = qs.clone(), k.clone()
    with pytest.raises(RuntimeError, match="vmap"):
        func.vmap(lambda q, p: pirope.apply_rope_qk(q, k, cos, sin, p, inplace=True))(qs, pos)
    assert torch.equal(qs, before[0]) and torch.equal(k, before[1])
