"""Gradients, opcheck and torch.compile of the rotary ops."""

import contextlib

import pytest
import torch

import pirope
from reference import rope_reference


def tables(rotary_dim, n, device):
    inv_freq, _ = pirope.rope_frequencies(rotary_dim, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, n)
    return cos.to(device), sin.to(device)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(device, interleaved):
    q = torch.randn(2, 5, 3, 12, device=device, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 1, 12, device=device, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(8, 7, device)  # partial rotary: 8 of 12 features
    cos, sin = cos.double(), sin.double()
    pos = torch.tensor([[6, 0, 3, 2, 1], [0, 1, 2, 3, 4]], device=device)
    fn = lambda q, k: pirope.apply_rope_qk(q, k, cos, sin, pos, interleaved=interleaved)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))
    x = q.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pirope.apply_rope(x, cos, sin, pos, interleaved=interleaved), (x,))


def test_backward_is_the_inverse_rotation(device):
    # d(out)/dx applied to g is R(-angle) g: compare with the float64 reference
    x = torch.randn(2, 9, 4, 64, device=device, requires_grad=True)
    cos, sin = tables(64, 9, device)
    g = torch.randn(2, 9, 4, 64, device=device)
    pirope.apply_rope(x, cos, sin).backward(g)
    ref = rope_reference(g, cos, sin, conjugate=True)
    torch.testing.assert_close(x.grad.double().cpu(), ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_tables_are_constants_with_no_gradient(device, inplace):
    # cos and sin that require grad (e.g. a learnable table) get no gradient from the
    # rotary ops (said by a warning), while x / q / k still get the inverse rotation
    cos, sin = tables(16, 6, device)
    cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    pos = torch.tensor([5, 0, 2, 1, 3, 4], device=device)
    q0 = torch.randn(2, 6, 3, 24, device=device, requires_grad=True)
    k0 = torch.randn(2, 6, 1, 24, device=device, requires_grad=True)
    gq, gk = torch.randn_like(q0), torch.randn_like(k0)
    q, k = (q0 * 1, k0 * 1) if inplace else (q0, k0)  # non-leaf copies may be rotated in place
    with pytest.warns(UserWarning, match="apply_rope: cos and sin require grad, but the tables are constants") as rec:
        out = pirope.apply_rope(q, cos, sin, pos, inplace=inplace)
    assert rec[0].filename == __file__  # said at the caller's line
    out.backward(gq)
    assert cos.grad is None and sin.grad is None
    torch.testing.assert_close(q0.grad.double().cpu(), rope_reference(gq, cos, sin, pos, conjugate=True),
                               atol=2e-6, rtol=2e-6)
    q0.grad = None
    q, k = (q0 * 1, k0 * 1) if inplace else (q0, k0)
    with pytest.warns(UserWarning, match="apply_rope_qk: cos and sin require grad") as rec:
        oq, ok = pirope.apply_rope_qk(q, k, cos, sin, pos, inplace=inplace)
    assert rec[0].filename == __file__
    torch.autograd.backward((oq, ok), (gq, gk))
    assert cos.grad is None and sin.grad is None
    torch.testing.assert_close(q0.grad.double().cpu(), rope_reference(gq, cos, sin, pos, conjugate=True),
                               atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(k0.grad.double().cpu(), rope_reference(gk, cos, sin, pos, conjugate=True),
                               atol=2e-6, rtol=2e-6)


def test_qk_backward_with_one_output_unused(device):
    q = torch.randn(1, 4, 2, 16, device=device, requires_grad=True)
    k = torch.randn(1, 4, 2, 16, device=device, requires_grad=True)
    cos, sin = tables(16, 4, device)
    oq, _ = pirope.apply_rope_qk(q, k, cos, sin)
    oq.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert k.grad is None or torch.count_nonzero(k.grad) == 0


@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_is_differentiable(device, interleaved):
    q0 = torch.randn(2, 6, 4, 32, device=device, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(2, 6, 2, 32, device=device, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(32, 6, device)
    q, k = q0 * 1.0, k0 * 1.0  # non-leaf copies may be rotated in place
    pirope.apply_rope_qk(q, k, cos, sin, interleaved=interleaved, inplace=True)
    (q.sum() + (k * k).sum()).backward()
    q1 = q0.detach().clone().requires_grad_()
    k1 = k0.detach().clone().requires_grad_()
    rq, rk = pirope.apply_rope_qk(q1, k1, cos, sin, interleaved=interleaved)
    (rq.sum() + (rk * rk).sum()).backward()
    torch.testing.assert_close(q0.grad, q1.grad)
    torch.testing.assert_close(k0.grad, k1.grad)
    # one tensor alone: the gradient is the inverse rotation (float64 reference)
    q0.grad = None
    g = torch.randn_like(q0)
    pirope.apply_rope(q0 * 1.0, cos, sin, interleaved=interleaved, inplace=True).backward(g)
    torch.testing.assert_close(q0.grad.cpu(), rope_reference(g, cos, sin, conjugate=True, interleaved=interleaved),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["projection views", "fused qkv", "hf transposed", "q only a view",
                                    "k only a view", "q needs no grad"])
def test_inplace_qk_on_views_is_differentiable(device, layout, interleaved):
    # q and k as training code makes them: views of a projection's output. Autograd
    # forbids one Function returning two in-place-modified views; the results and
    # gradients must still equal the out-of-place op's.
    x = torch.randn(2, 6, 3 * 64, device=device, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(16, 6, device)
    pos = torch.tensor([5, 0, 2, 1, 3, 4], device=device)

    def views(h):
        if layout == "projection views":
            return (h[..., :128] * 1.0).view(2, 6, 4, 32), (h[..., 128:] * 1.0).view(2, 6, 2, 32)
        if layout == "fused qkv":
            qkv = (h * 1.0).view(2, 6, 6, 32)
            return qkv[:, :, :4], qkv[:, :, 4:]
        if layout == "hf transposed":
            q = (h[..., :128] * 1.0).view(2, 6, 4, 32).transpose(1, 2).contiguous().transpose(1, 2)
            return q, (h[..., 128:] * 1.0).view(2, 6, 2, 32).transpose(1, 2).contiguous().transpose(1, 2)
        if layout == "k only a view":
            return (h[..., :128] * 1.0).reshape(2, 6, 4, 32).clone(), (h[..., 128:] * 1.0).view(2, 6, 2, 32)
        if layout == "q needs no grad":  # (only k takes a gradient)
            return (h[..., :128].detach() * 1.0).view(2, 6, 4, 32), (h[..., 128:] * 1.0).reshape(2, 6, 2, 32).clone()
        return (h[..., :128] * 1.0).view(2, 6, 4, 32), (h[..., 128:] * 1.0).reshape(2, 6, 2, 32).clone()

    def loss(q, k):
        return (q * torch.arange(32, device=device)).sum() + (k * k).sum()

    q, k = views(x)
    outs = pirope.apply_rope_qk(q, k, cos, sin, pos, interleaved=interleaved, inplace=True)
    assert outs[0] is q and outs[1] is k
    loss(q, k).backward()
    grad_inplace, x.grad = x.grad, None
    rq, rk = pirope.apply_rope_qk(*views(x), cos, sin, pos, interleaved=interleaved)
    loss(rq, rk).backward()
    torch.testing.assert_close(q.detach(), rq.detach(), rtol=0, atol=0)
    torch.testing.assert_close(k.detach(), rk.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad_inplace, x.grad, rtol=0, atol=0)


def test_opcheck_every_rotary_op(device):
    cos, sin = tables(32, 12, device)
    pos = torch.randint(0, 12, (2, 5), device=device)
    for rg in (False, True):
        q = torch.randn(2, 5, 4, 48, device=device, requires_grad=rg)
        k = torch.randn(2, 5, 2, 48, device=device, requires_grad=rg)
        torch.library.opcheck(torch.ops.pirope.apply_rope.default, (q, cos, sin, pos, False))
        torch.library.opcheck(torch.ops.pirope.apply_rope_backward.default, (q, cos, sin, None, True))
        torch.library.opcheck(torch.ops.pirope.apply_rope_qk.default, (q, k, cos, sin, pos, True))
        torch.library.opcheck(torch.ops.pirope.apply_rope_qk_backward.default, (q, k, cos, sin, None, False))
    q = torch.randn(2, 5, 4, 48, device=device)
    k = torch.randn(2, 5, 2, 48, device=device)
    torch.library.opcheck(torch.ops.pirope.apply_rope_.default, (q.clone(), cos, sin, pos, False))
    torch.library.opcheck(torch.ops.pirope.apply_rope_qk_.default, (q.clone(), k.clone(), cos, sin, pos, True))
    # transposed input: the fake kernel must predict the real output's strides
    qt = torch.randn(2, 4, 5, 48, device=device).transpose(1, 2)
    torch.library.opcheck(torch.ops.pirope.apply_rope.default, (qt, cos, sin, None, False))


class TinyAttentionBlock(torch.nn.Module):
    def __init__(self, heads=4, kv_heads=2, head_dim=32):
        super().__init__()
        dim = heads * head_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = torch.nn.Linear(dim, dim)
        self.k = torch.nn.Linear(dim, kv_heads * head_dim)
        self.v = torch.nn.Linear(dim, kv_heads * head_dim)
        self.rope = pirope.RotaryEmbedding(head_dim, max_position_embeddings=64,
                                           scaling={"rope_type": "linear", "factor": 2.0})

    def forward(self, x, position_ids=None):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim)
        q, k = self.rope(q, k, position_ids)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, s, -1)


def test_torch_compile_fullgraph_forward_and_backward(device):
    torch._dynamo.reset()
    model = TinyAttentionBlock().to(device)
    x = torch.randn(2, 24, 128, device=device)
    pos = torch.arange(24, device=device).expand(2, 24)
    eager = model(x, pos)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, pos)
    out.sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def test_torch_compile_inplace_op(device):
    torch._dynamo.reset()
    cos, sin = tables(32, 16, device)

    def f(q, k):
        q = q * 2
        k = k + 1
        pirope.apply_rope_qk(q, k, cos, sin, inplace=True)
        return q, k

    q = torch.randn(1, 16, 2, 32, device=device)
    k = torch.randn(1, 16, 1, 32, device=device)
    eq, ek = f(q, k)
    cq, ck = torch.compile(f, fullgraph=True)(q, k)
    torch.testing.assert_close(cq, eq)
    torch.testing.assert_close(ck, ek)


def test_torch_compile_inplace_qk_with_autograd(device):
    # the views path (one launch per tensor) is what compiled code takes under autograd
    torch._dynamo.reset()
    cos, sin = tables(32, 16, device)

    def f(q, k):
        q, k = q * 2, k + 1
        q, k = pirope.apply_rope_qk(q, k, cos, sin, inplace=True)
        return (q * q).sum() + (k ** 3).sum()

    q = torch.randn(1, 16, 2, 32, device=device, requires_grad=True)
    k = torch.randn(1, 16, 1, 32, device=device, requires_grad=True)
    want = f(q, k)
    want_grads = torch.autograd.grad(want, (q, k))
    got = torch.compile(f, fullgraph=True)(q, k)
    got_grads = torch.autograd.grad(got, (q, k))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("inplace", [False, True])
@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
def test_torch_compile_with_a_data_dependent_token_count(device, inplace):
    # packed tokens picked by a boolean mask (padding dropped): a count the compiled graph
    # learns only when it runs, so the checks cannot branch on it while it is traced
    torch._dynamo.reset()
    cos, sin = tables(32, 16, device)

    def f(q, k, keep):
        q, k = (q * 2)[keep], (k + 1)[keep]  # (tokens, heads, head_dim)
        q, k = pirope.apply_rope_qk(q, k, cos, sin, inplace=inplace)
        return q, k

    q = torch.randn(16, 2, 32, device=device, requires_grad=True)
    k = torch.randn(16, 1, 32, device=device, requires_grad=True)
    keep = torch.rand(16, device=device) > 0.3
    gq, gk = torch.randn(int(keep.sum()), 2, 32, device=device), torch.randn(int(keep.sum()), 1, 32, device=device)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, keep)
    grads = torch.autograd.grad(got, (q, k), (gq, gk))
    for t, want_of, g, grad, scale in zip(got, ((q * 2)[keep], (k + 1)[keep]), (gq, gk), grads, (2.0, 1.0)):
        torch.testing.assert_close(t.double().cpu(), rope_reference(want_of, cos, sin), atol=1e-5, rtol=1e-5)
        want_grad = torch.zeros(grad.shape, dtype=torch.float64)
        want_grad[keep.cpu()] = scale * rope_reference(g, cos, sin, conjugate=True)
        torch.testing.assert_close(grad.double().cpu(), want_grad, atol=1e-5, rtol=1e-5)


def test_inplace_qk_with_autograd_rejects_overlapping_views(device):
    # rotated one view at a time, elements shared by q and k would be rotated twice
    cos, sin = tables(16, 8, device)
    h = torch.randn(1, 8, 6, 16, device=device, requires_grad=True)
    base = h * 1
    with pytest.raises(RuntimeError, match="q and k share memory"):
        pirope.apply_rope_qk(base[:, :, :4], base[:, :, 2:6], cos, sin, inplace=True)
    base = h * 1
    with pytest.raises(RuntimeError, match="q and k share memory"):
        pirope.apply_rope_qk(base[:, :, :4], base[:, :, :4], cos, sin, inplace=True)
    # disjoint views of one buffer (a fused qkv) are fine, as are head slices of two
    # buffers (torch answers "too hard" for any non-dense pair; offsets of different
    # storages must not be compared)
    base = h * 1
    q, k = pirope.apply_rope_qk(base[:, :, :4], base[:, :, 4:6], cos, sin, inplace=True)
    torch.testing.assert_close(q.double(), rope_reference((h * 1)[:, :, :4].detach(), cos, sin))
    for grad in (True, False):
        a, b = (torch.randn(1, 8, 4, 16, device=device, requires_grad=grad) * 1 for _ in range(2))
        original = b[:, :, :2].detach().clone()
        q, k = pirope.apply_rope_qk(a[:, :, :2], b[:, :, :2], cos, sin, inplace=True)
        torch.testing.assert_close(k.detach().double(), rope_reference(original, cos, sin))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_inplace_qk_with_autograd_refuses_what_eager_refuses(device, dynamic):
    # compiled, the views path writes q then k as two functionalized launches: shared
    # elements would come out rotated twice, so the checks run as the graph is traced
    cos, sin = tables(8, 8, device)
    h = torch.randn(1, 5, 6, 8, device=device, requires_grad=True)

    def rotate(q_heads, k_heads):
        def f(x):
            y = x * 1
            pirope.apply_rope_qk(y[:, :, q_heads], y[:, :, k_heads], cos, sin, inplace=True)
            return y
        return f

    def mismatched(q, k):
        return pirope.apply_rope_qk(q * 1, k * 1, cos, sin, inplace=True)

    q = torch.randn(2, 5, 3, 8, device=device, requires_grad=True)
    for f, args, match in ((rotate(slice(0, 3), slice(2, 5)), (h,), "q and k share memory"),
                           (rotate(slice(0, 6), slice(0, 6)), (h,), "q and k share memory"),
                           (mismatched, (q, torch.randn(2, 5, 1, 8, device=device, dtype=torch.float64)),
                            "same dtype"),
                           (mismatched, (q, torch.randn(2, 4, 1, 8, device=device)), "must agree on batch, seqlen")):
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=match):
            f(*args)
        with pytest.raises(RuntimeError, match=match):
            torch.compile(f, fullgraph=True, dynamic=dynamic)(*args)
    # disjoint views of one buffer (a fused qkv) compile and equal eager
    torch._dynamo.reset()
    f = rotate(slice(0, 3), slice(3, 6))
    got = torch.compile(f, fullgraph=True, dynamic=dynamic)(h)
    torch.testing.assert_close(got, f(h), rtol=0, atol=0)


def test_inplace_qk_with_autograd_checks_everything_before_writing(device):
    # q and k are rotated one launch each on this path: a k the single launch would
    # reject must leave q untouched (and a packed k over q's memory must not pass)
    cos, sin = tables(16, 8, device)
    h = torch.randn(1, 8, 2, 16, device=device, requires_grad=True)
    cases = [(lambda b: (b, b.view(8, 2, 16)), "same rank"),
             (lambda b: (b, torch.randn(1, 8, 2, 16, device=device, dtype=torch.float64)), "same dtype"),
             (lambda b: (b, torch.randn(1, 8, 1, 12, device=device)), "agree on batch, seqlen and headdim")]
    for make, match in cases:
        base = h * 1
        q, k = make(base)
        before = q.detach().clone()
        with pytest.raises(RuntimeError, match=match):
            pirope.apply_rope_qk(q, k, cos, sin, inplace=True)
        assert torch.equal(q.detach(), before)


@pytest.mark.parametrize("make", [
    lambda h: (h * 1).unbind(2),
    lambda h: (h * 1).flatten(2, 3).chunk(3, dim=2),
    lambda h: (h * 1).flatten(2, 3).split(2, dim=2),
], ids=["unbind", "chunk", "split"])
@pytest.mark.parametrize("call", ["x", "q", "k", "qk"])
def test_inplace_refuses_views_autograd_cannot_rebase_before_writing(device, make, call):
    # q, k, v = qkv.unbind(2): torch refuses to modify such a view in place while it requires
    # grad, and raises before writing (as q.mul_ does); so must the rotation, or code that
    # catches the error and retries out of place would rotate twice. "k": q is a plain slice
    # (rotated one launch per tensor), k such a view: q must stay untouched too
    cos, sin = tables(16, 7, device)
    h = torch.randn(2, 7, 3, 2, 16, device=device, requires_grad=True)  # a fused q | k | v
    views = make(h)
    plain = (h * 1)[:, :, 0]
    q, k = {"x": (views[0], views[1]), "q": (views[0], plain), "k": (plain, views[1]),
            "qk": (views[0], views[1])}[call]
    before = [t.detach().clone() for t in (q, k)]
    with pytest.raises(RuntimeError, match="is a view made by a function that returns several views"):
        if call == "x":
            pirope.apply_rope(q, cos, sin, inplace=True)
        else:
            pirope.apply_rope_qk(q, k, cos, sin, inplace=True)
    for t, b in zip((q, k), before):
        assert torch.equal(t.detach(), b)
    with pytest.raises(RuntimeError):  # torch's own in-place ops refuse the same views
        make(h)[0].mul_(2)
    with torch.no_grad():  # without grad the rotation is allowed, as torch's own ops are
        q = make(h)[0]
        want = pirope.apply_rope(q.clone(), cos, sin)
        pirope.apply_rope(q, cos, sin, inplace=True)
        assert torch.equal(q, want)


def test_inplace_refuses_views_made_in_no_grad_mode_before_writing(device):
    cos, sin = tables(16, 7, device)
    y = torch.randn(2, 7, 3, 16, device=device, requires_grad=True) * 1
    with torch.no_grad():
        q = y[:, :, :2]
    before = q.detach().clone()
    with pytest.raises(RuntimeError, match="view made by no_grad mode"):
        pirope.apply_rope(q, cos, sin, inplace=True)
    assert torch.equal(q.detach(), before)


def _leaf_under_no_grad(device):
    return torch.randn(1, 7, 4, 16, device=device, requires_grad=True), torch.no_grad()


def _plain_multi_output_view(device):
    return torch.randn(2, 1, 7, 4, 16, device=device).unbind(0)[0], contextlib.nullcontext()


def _multi_output_view_under_no_grad(device):
    return (torch.randn(2, 1, 7, 4, 16, device=device, requires_grad=True) * 1).unbind(0)[0], torch.no_grad()


def _view_made_in_inference_mode(device):
    base = torch.randn(1, 7, 4, 16, device=device, requires_grad=True) * 1
    with torch.inference_mode():
        view = base[:, :, :2]
    return view, contextlib.nullcontext()


def _view_made_in_no_grad_mode(device):
    base = torch.randn(1, 7, 4, 16, device=device, requires_grad=True) * 1
    with torch.no_grad():
        view = base[:, :, :2]
    return view, contextlib.nullcontext()


class _Slice(torch.autograd.Function):
    """Returns a view of its input (the last dim's first half): what a custom Function's
    output that is a view is to autograd."""

    @staticmethod
    def forward(ctx, x):
        return x[..., : x.shape[-1] // 2]

    @staticmethod
    def backward(ctx, g):
        return torch.cat([g, torch.zeros_like(g)], dim=-1)


def _view_returned_by_a_custom_function(device):
    return _Slice.apply(torch.randn(1, 7, 4, 32, device=device, requires_grad=True) * 1), contextlib.nullcontext()


# how a tensor is made -> why the rotation refuses it in place (as torch's own in-place ops do)
_MADE = {_leaf_under_no_grad: None, _plain_multi_output_view: None, _multi_output_view_under_no_grad: None,
         _view_made_in_inference_mode: "view made by inference mode",
         _view_made_in_no_grad_mode: "view made by no_grad mode",
         _view_returned_by_a_custom_function: "view made by a custom autograd Function"}


@pytest.mark.parametrize("make", list(_MADE))
@pytest.mark.parametrize("call", ["x", "qk"])
def test_inplace_rotation_follows_torchs_inplace_rules(device, make, call):
    # whether torch's own in-place op (t.mul_) takes a tensor decides whether the rotation
    # does: a leaf that requires grad under no_grad (an optimizer's update), a view that
    # requires no grad, are taken; views autograd cannot rebase are refused, before writing,
    # saying why
    cos, sin = tables(16, 7, device)
    t, mode = make(device)
    with mode:
        try:
            t.mul_(1.0)
            torch_takes = True
        except RuntimeError:
            torch_takes = False
    assert torch_takes == (_MADE[make] is None)
    t, mode = make(device)
    before = t.detach().clone()
    want = rope_reference(before, cos, sin)
    with mode:
        if torch_takes:
            out = pirope.apply_rope(t, cos, sin, inplace=True) if call == "x" else \
                pirope.apply_rope_qk(t, before.clone(), cos, sin, inplace=True)[0]
            assert out is t
            torch.testing.assert_close(t.detach().double().cpu(), want, atol=1e-6, rtol=1e-6)
        else:
            with pytest.raises(RuntimeError, match=f"{_MADE[make]} and cannot be rotated in place"):
                if call == "x":
                    pirope.apply_rope(t, cos, sin, inplace=True)
                else:
                    pirope.apply_rope_qk(t, before.clone(), cos, sin, inplace=True)
            assert torch.equal(t.detach(), before)


def test_inplace_qk_refuses_an_inference_k_before_rotating_q(device):
    # q a view that requires grad (one launch per tensor), k an inference tensor: neither
    # may be written, and the error names k
    cos, sin = tables(16, 7, device)
    q = (torch.randn(2, 7, 4, 16, device=device, requires_grad=True) * 1)[:, :, :2]
    with torch.inference_mode():
        k = torch.randn(2, 7, 2, 16, device=device)
    before = q.detach().clone(), k.clone()
    with pytest.raises(RuntimeError, match="apply_rope_qk: k is an inference tensor"):
        pirope.apply_rope_qk(q, k, cos, sin, inplace=True)
    assert torch.equal(q.detach(), before[0]) and torch.equal(k, before[1])
    with pytest.raises(RuntimeError, match="apply_rope_qk: q is an inference tensor"):
        pirope.apply_rope_qk(k, q.detach().clone(), cos, sin, inplace=True)
    assert torch.equal(k, before[1])


def test_inplace_rotation_bumps_the_version_counter(device):
    # like any in-place op: a tensor saved for backward and then rotated in place makes
    # backward raise instead of using the rotated values
    cos, sin = tables(16, 8, device)
    for rotate in (lambda x: pirope.apply_rope(x, cos, sin, inplace=True),
                   lambda x: pirope.apply_rope_qk(x[:, :, :2], x[:, :, 2:], cos, sin, inplace=True),
                   lambda x: torch.ops.pirope.apply_rope_(x, cos, sin, None, False)):
        for inference in (False, True):  # also inside inference_mode, as for torch's ops
            x = torch.randn(1, 8, 4, 16, device=device)
            w = torch.randn(1, 8, 4, 16, device=device, requires_grad=True)
            z = (x * w).sum()  # saves x
            before = x._version
            if inference:
                with torch.inference_mode():
                    rotate(x)
            else:
                rotate(x)
            assert x._version > before
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                z.backward()


def test_raw_inplace_ops_refuse_what_torchs_inplace_ops_refuse(device):
    cos, sin = tables(16, 8, device)
    x = torch.randn(1, 8, 2, 16, device=device, requires_grad=True) * 1
    with pytest.raises(RuntimeError, match="x requires grad"):
        torch.ops.pirope.apply_rope_(x, cos, sin, None, False)
    with pytest.raises(RuntimeError, match="q requires grad"):
        torch.ops.pirope.apply_rope_qk_(x, x.detach().clone(), cos, sin, None, False)
    with torch.inference_mode():
        t = torch.randn(1, 8, 2, 16, device=device)
    with pytest.raises(RuntimeError, match="inference tensor"):
        torch.ops.pirope.apply_rope_(t, cos, sin, None, False)
    with pytest.raises(RuntimeError, match="inference tensor"):
        pirope.apply_rope(t, cos, sin, inplace=True)
    with torch.inference_mode():  # inside inference mode it is allowed, as for torch
        pirope.apply_rope(t, cos, sin, inplace=True)


def test_forward_mode_ad_of_the_rotary_ops_rotates_the_tangent(device):
    # torch gives custom ops no jvp rule (zero tangents, no error): the rotary ops bring
    # their own (a rotation is linear: the tangent is rotated by the same angle)
    import torch.autograd.forward_ad as fwAD
    cos, sin = tables(16, 8, device)
    x = torch.randn(1, 8, 2, 16, device=device, dtype=torch.float64)
    k = torch.randn(1, 8, 1, 16, device=device, dtype=torch.float64)
    t = torch.randn_like(x)
    pos = torch.tensor([3, 0, 7, 1, 2, 5, 4, 6], device=device)
    rotated_t = rope_reference(t, cos, sin, pos)
    out, tangent = torch.func.jvp(lambda a: pirope.apply_rope(a, cos, sin, pos), (x,), (t,))
    torch.testing.assert_close(tangent.cpu(), rotated_t, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.cpu(), rope_reference(x, cos, sin, pos), atol=1e-12, rtol=1e-12)
    (_, _), (tq, tk) = torch.func.jvp(lambda a: pirope.apply_rope_qk(a, k, cos, sin, pos), (x,), (t,))
    torch.testing.assert_close(tq.cpu(), rotated_t, atol=1e-12, rtol=1e-12)
    assert torch.count_nonzero(tk) == 0  # k is a constant of this jvp
    jac = torch.func.jacfwd(lambda a: pirope.apply_rope(a, cos, sin))(x[:, :2])
    torch.testing.assert_close(jac, torch.func.jacrev(lambda a: pirope.apply_rope(a, cos, sin))(x[:, :2]),
                               atol=1e-12, rtol=1e-12)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, t)
        torch.testing.assert_close(fwAD.unpack_dual(pirope.apply_rope(dual, cos, sin, pos)).tangent.cpu(),
                                   rotated_t, atol=1e-12, rtol=1e-12)
        # k without a tangent: its output's tangent is zero (or none), as for any op
        rq, rk = pirope.apply_rope_qk(fwAD.make_dual(x, t), k, cos, sin, pos)
        torch.testing.assert_close(fwAD.unpack_dual(rq).tangent.cpu(), rotated_t, atol=1e-12, rtol=1e-12)
        tk = fwAD.unpack_dual(rk).tangent
        assert tk is None or torch.count_nonzero(tk) == 0
        inplace = fwAD.make_dual(x.clone(), t.clone())
        pirope.apply_rope_qk(inplace, k.clone(), cos, sin, pos, inplace=True)
        torch.testing.assert_close(fwAD.unpack_dual(inplace).tangent.cpu(), rotated_t, atol=1e-12, rtol=1e-12)


def test_forward_mode_ad_of_rope_attention_is_refused_not_silently_zero(device):
    import torch.autograd.forward_ad as fwAD
    cos, sin = tables(16, 8, device)
    x = torch.randn(1, 8, 2, 16, device=device, dtype=torch.float64)
    t = torch.randn_like(x)
    call = lambda a: pirope.rope_attention(a, a, a, cos, sin)  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(call, (x,), (t,))
    # a jvp with respect to something else: the op's inputs carry no tangent
    y = torch.randn(3, device=device, dtype=torch.float64)
    out, tangent = torch.func.jvp(lambda b: call(x).sum() * b.sum(), (y,), (torch.ones_like(y),))
    torch.testing.assert_close(tangent, call(x).sum() * 3)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jacfwd(call)(x[:, :2])
    # nested transforms: a tangent from an outer jvp, a jvp over vmap or over grad (with the
    # dual-tensor check alone, torch raises its own errors there, which say nothing of pirope)
    ones = torch.ones_like
    nested = [lambda: torch.func.jvp(lambda a: torch.func.jvp(lambda b: call(a).sum() * b.sum(), (y,), (ones(y),))[1],
                                     (x,), (t,)),
              lambda: torch.func.jvp(torch.func.vmap(call), (x.expand(2, *x.shape),), (t.expand(2, *t.shape),)),
              lambda: torch.func.jvp(torch.func.grad(lambda a: call(a).sum()), (x,), (t,))]
    for f in nested:
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            f()
    # ... and a tensor of another transform that carries no tangent of the jvp is fine
    got = torch.func.grad(lambda a: torch.func.jvp(lambda b: call(a).sum() * b.sum(), (y,), (ones(y),))[1])(x)
    torch.testing.assert_close(got, 3 * torch.func.grad(lambda a: call(a).sum())(x), atol=1e-12, rtol=1e-12)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD .* with respect to q"):
            call(fwAD.make_dual(x, t))
        call(x)  # tensors without a tangent are fine inside a dual level


def test_inplace_on_a_leaf_that_requires_grad_raises_before_writing(device):
    # torch's rule for in-place ops, checked before the kernel runs: nothing is written
    cos, sin = tables(16, 8, device)
    leaf = torch.randn(1, 8, 4, 16, device=device, requires_grad=True)
    other = torch.randn(1, 8, 4, 16, device=device, requires_grad=True) * 1
    calls = [(lambda: pirope.apply_rope(leaf, cos, sin, inplace=True), "x is a leaf"),
             (lambda: pirope.apply_rope_qk(other[:, :, :2], leaf, cos, sin, inplace=True), "k is a leaf"),
             (lambda: pirope.apply_rope_qk(leaf[:, :, :2], other[:, :, 2:], cos, sin, inplace=True),
              "q is a view of a leaf")]
    for call, match in calls:
        before = (leaf.detach().clone(), other.detach().clone())
        with pytest.raises(RuntimeError, match=match):
            call()
        assert torch.equal(leaf.detach(), before[0]) and torch.equal(other.detach(), before[1])


def test_forward_mode_ad_through_the_tables_is_refused(device):
    # cos and sin are constants to the ops: a tangent on them would be dropped silently
    import torch.autograd.forward_ad as fwAD
    cos, sin = tables(16, 8, device)
    x = torch.randn(1, 8, 2, 16, device=device)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda c: pirope.apply_rope(x, c, sin), (cos,), (torch.ones_like(cos),))
    with pytest.raises(NotImplementedError, match="apply_rope_qk: forward-mode AD .* with respect to sin"):
        torch.func.jvp(lambda s: pirope.apply_rope_qk(x, x, cos, s), (sin,), (torch.ones_like(sin),))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            pirope.rope_attention(x, x, x, fwAD.make_dual(cos, torch.ones_like(cos)), sin)


def test_constant_tables_warn_only_where_a_gradient_could_be_wanted():
    import warnings

    cos, sin = tables(16, 6, "cpu")
    x = torch.randn(1, 6, 2, 16, requires_grad=True)
    q, k, v = (torch.randn(1, 6, 2, 16, requires_grad=True) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pirope.apply_rope(x, cos, sin)  # constant tables: nothing said
        pirope.rope_attention(q, k, v, cos, sin)
        with torch.no_grad():  # no gradient wanted at all
            pirope.apply_rope(x, cos.requires_grad_(), sin)
    with pytest.warns(UserWarning, match=r"rope_attention: cos requires grad, but the tables are constants"):
        pirope.rope_attention(q, k, v, cos, sin)
