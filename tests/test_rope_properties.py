"""Property-based tests (hypothesis) of apply_rope / apply_rope_qk against the float64
reference: random shapes (0- and 1-sized dims included), strides (transposes, stepped
slices, expanded dims), dtypes, layouts, rotary fractions and position_ids forms.

The CI profile runs a bounded number of examples; a longer one is available by hand:
    HYPOTHESIS_PROFILE=long python -m pytest tests/test_rope_properties.py
"""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pirope
from reference import rope_reference, tolerance

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def rope_case(draw):
    batch = draw(st.integers(0, 3))
    seqlen = draw(st.integers(0, 40))
    hq = draw(st.integers(1, 5))
    hk = draw(st.integers(1, 5))
    head_dim = draw(st.integers(1, 48))
    half = draw(st.integers(0, head_dim // 2))
    dtype = draw(st.sampled_from(DTYPES))
    interleaved = draw(st.booleans())
    packed = draw(st.booleans())
    view = draw(st.sampled_from(["contiguous", "transposed", "stepped", "expanded"]))
    pos_form = draw(st.sampled_from(["none", "shared", "batched", "broadcast", "int32"]))
    max_pos = max(1, seqlen) + draw(st.integers(0, 50))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(batch=batch, seqlen=seqlen, hq=hq, hk=hk, head_dim=head_dim, half=half, dtype=dtype,
                interleaved=interleaved, packed=packed, view=view, pos_form=pos_form, max_pos=max_pos,
                seed=seed)


def make_input(g, case, heads):
    b, s, d, dtype = case["batch"], case["seqlen"], case["head_dim"], case["dtype"]
    if case["packed"]:
        b = 1
    view = case["view"]
    if view == "transposed":
        x = torch.randn(b, heads, s, d, generator=g).to(dtype).transpose(1, 2)
    elif view == "stepped":
        x = torch.randn(b, 2 * s, heads, 2 * d, generator=g).to(dtype)[:, ::2, :, ::2]
    elif view == "expanded":
        x = torch.randn(b, s, 1, d, generator=g).to(dtype).expand(b, s, heads, d)
    else:
        x = torch.randn(b, s, heads, d, generator=g).to(dtype)
    return x[0] if case["packed"] else x


def make_positions(g, case):
    b, s, p = case["batch"], case["seqlen"], case["max_pos"]
    form = case["pos_form"]
    if case["packed"]:
        return None if form == "none" else torch.randint(0, p, (s,), generator=g)
    if form == "none":
        return None
    if form == "shared":
        return torch.randint(0, p, (s,), generator=g)
    if form == "broadcast":
        return torch.randint(0, p, (1, s), generator=g)
    dtype = torch.int32 if form == "int32" else torch.int64
    return torch.randint(0, p, (b, s), generator=g, dtype=dtype)


@given(rope_case())
def test_qk_matches_reference_outputs_and_gradients(case):
    g = torch.Generator().manual_seed(case["seed"])
    q = make_input(g, case, case["hq"])
    k = make_input(g, case, case["hk"])
    pos = make_positions(g, case)
    n = case["max_pos"] if pos is not None else max(case["seqlen"], 1)
    inv_freq = torch.rand(case["half"], generator=g)
    cos, sin = pirope.rope_cos_sin(inv_freq, n)
    il = case["interleaved"]

    oq, ok = pirope.apply_rope_qk(q, k, cos, sin, pos, interleaved=il)
    tol = tolerance(case["dtype"])
    torch.testing.assert_close(oq.double(), rope_reference(q, cos, sin, pos, il), **tol)
    torch.testing.assert_close(ok.double(), rope_reference(k, cos, sin, pos, il), **tol)

    # gradients: the backward is the rotation by -angle
    qg = q.detach().clone().requires_grad_()
    kg = k.detach().clone().requires_grad_()
    gq, gk = torch.randn(oq.shape, generator=g).to(q.dtype), torch.randn(ok.shape, generator=g).to(k.dtype)
    rq, rk = pirope.apply_rope_qk(qg, kg, cos, sin, pos, interleaved=il)
    torch.autograd.backward((rq, rk), (gq, gk))
    torch.testing.assert_close(qg.grad.double(), rope_reference(gq, cos, sin, pos, il, conjugate=True), **tol)
    torch.testing.assert_close(kg.grad.double(), rope_reference(gk, cos, sin, pos, il, conjugate=True), **tol)

    # the single-tensor op agrees bit for bit with the fused q/k pass
    assert torch.equal(pirope.apply_rope(q, cos, sin, pos, interleaved=il), oq)


@given(rope_case(), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_non_finite_values_stay_in_their_row(case, bad):
    if case["batch"] == 0 or case["seqlen"] == 0 or case["half"] == 0 or case["packed"]:
        return
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["batch"], case["seqlen"], case["hq"], case["head_dim"], generator=g).to(case["dtype"])
    x[0, 0, 0, 0] = bad
    cos, sin = pirope.rope_cos_sin(torch.rand(case["half"], generator=g), case["seqlen"])
    out = pirope.apply_rope(x, cos, sin, interleaved=case["interleaved"])
    finite = torch.isfinite(out)
    # only the features paired with the bad one (same token, same head) may be non-finite
    assert finite[1:].all() and finite[:, 1:].all() and finite[:, :, 1:].all()
    partner = 1 if case["interleaved"] else case["half"]
    row = finite[0, 0, 0].clone()
    row[0] = True
    row[partner] = True
    assert row.all()


@st.composite
def attention_case(draw):
    hk = draw(st.integers(1, 3))
    return dict(
        batch=draw(st.integers(0, 2)), seqlen=draw(st.integers(0, 70)), hk=hk,
        group=draw(st.integers(1, 3)), head_dim=draw(st.sampled_from([1, 8, 24, 64, 80])),
        rot_frac=draw(st.sampled_from([0.0, 0.5, 1.0])), dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()), interleaved=draw(st.booleans()),
        transposed=draw(st.booleans()), pos_form=draw(st.sampled_from(["none", "shared", "batched"])),
        seed=draw(st.integers(0, 2**31 - 1)))


ATTN_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@settings(max_examples=25 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else 1000)
@given(attention_case())
def test_rope_attention_matches_reference_outputs_and_gradients(case):
    from reference import attention_reference

    g = torch.Generator().manual_seed(case["seed"])
    b, s, hk, d = case["batch"], case["seqlen"], case["hk"], case["head_dim"]
    hq = hk * case["group"]

    def mk(h):
        if case["transposed"]:
            t = torch.randn(b, h, s, d, generator=g).to(case["dtype"]).transpose(1, 2)
        else:
            t = torch.randn(b, s, h, d, generator=g).to(case["dtype"])
        return t.requires_grad_()

    q, k, v = mk(hq), mk(hk), mk(hk)
    half = int(d * case["rot_frac"]) // 2
    n = max(s, 1) + 5
    cos, sin = pirope.rope_cos_sin(torch.rand(half, generator=g), n)
    pos = {"none": None, "shared": torch.randint(0, n, (s,), generator=g),
           "batched": torch.randint(0, n, (b, s), generator=g)}[case["pos_form"]]
    kw = dict(causal=case["causal"], interleaved=case["interleaved"])
    out = pirope.rope_attention(q, k, v, cos, sin, pos, **kw)
    grad = torch.randn(out.shape, generator=g).to(out.dtype)
    out.backward(grad)
    ref = attention_reference(q, k, v, cos, sin, pos, grad_out=grad, **kw)
    tol = ATTN_TOL[case["dtype"]]
    for got, want in zip((out, q.grad, k.grad, v.grad), ref):
        assert got.shape == want.shape
        err = (got.double() - want).abs().max().item() if want.numel() else 0.0
        scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
        assert err <= tol * scale, (err, scale)
