"""Inputs and helpers of the rope_attention tests: PI tables, dense and packed q/k/v,
cu_seqlens helpers, the dense call per packed sequence, and the float64 reference of
window_size and softcap with the helpers that run pirope against it (shared by
test_rope_attention*.py)."""

import importlib

import torch

import pirope
from reference import assert_attention_close, rope_reference


def tables(rotary_dim, n, device="cpu", dtype=torch.float32):
    """cos/sin of n positions, PI by 4 (linear scaling)."""
    inv_freq, _ = pirope.rope_frequencies(rotary_dim, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, n)
    return cos.to(device, dtype), sin.to(device, dtype)


def qkv(b, s, hq, hkv, d, dtype=torch.float32, device="cpu", requires_grad=False):
    """Dense (b, s, heads, d) q and k, v with hq and hkv heads."""
    mk = lambda h: torch.randn(b, s, h, d, dtype=dtype, device=device, requires_grad=requires_grad)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def packed_qkv(total, hq, hkv, d, dtype=torch.float32, device="cpu"):
    """Packed (total, heads, d) q and k, v."""
    mk = lambda h: torch.randn(total, h, d, dtype=dtype, device=device)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def small_call(packed, dtype=torch.float32):
    """(q, k, v, cos, sin, kw) of a small call for argument checks: dense (2, 8, 4 / 2 heads, 32)
    or packed (16 tokens in sequences of 5 and 11, kw holding cu_seqlens)."""
    cos, sin = tables(32, 16)
    if packed:
        q, k, v = packed_qkv(16, 4, 2, 32, dtype=dtype)
        return q, k, v, cos, sin, dict(cu_seqlens=cu_tensor([0, 5, 16]))
    q, k, v = qkv(2, 8, 4, 2, 32, dtype=dtype)
    return q, k, v, cos, sin, {}


def cu_tensor(cu, device="cpu", dtype=torch.int32):
    return torch.tensor(cu, dtype=dtype, device=device)


def spans(cu):
    """[(start, end)] of the sequences of cu_seqlens."""
    cu = [int(c) for c in cu]
    return list(zip(cu[:-1], cu[1:]))


def dense_per_sequence(q, k, v, cos, sin, cu, pos, g, **kw):
    """Dense pirope.rope_attention per packed sequence (batch 1, same keywords), outputs
    and gradients (for grad_out g) stitched back into the packed layout."""
    outs, dqs, dks, dvs = (torch.zeros_like(t) for t in (q, q, k, v))
    for a, b in spans(cu):
        if a == b:
            continue
        qi, ki, vi = (t[a:b].detach().clone()[None].requires_grad_() for t in (q, k, v))
        pi = None if pos is None else pos.reshape(-1)[a:b]
        o = pirope.rope_attention(qi, ki, vi, cos, sin, pi, **kw)
        o.backward(g[a:b][None])
        outs[a:b], dqs[a:b], dks[a:b], dvs[a:b] = o[0].detach(), qi.grad[0], ki.grad[0], vi.grad[0]
    return outs, dqs, dks, dvs


def many_threads():
    """The thread count to compare against 1 thread: this process's, at least 2 (pytest
    workers run with their share of the cores, one thread each on 2 cores: tests/pytest_workers.sh)."""
    return max(2, torch.get_num_threads())


def use_packed_products(monkeypatch, dtype):
    """rope_attention on CPU takes the AVX512 products where this CPU has them (its
    default), else their portable version (PIROPE_CPU_GEMM=portable): the packed
    operands and the backward that splits over threads, which BLAS products never take."""
    monkeypatch.delenv("PIROPE_CPU_GEMM", raising=False)
    if pirope.cpu_gemm()[str(dtype)[6:]] == "blas":
        monkeypatch.setenv("PIROPE_CPU_GEMM", "portable")
    assert pirope.cpu_gemm()[str(dtype)[6:]] != "blas"


def at_thread_counts(counts, fn):
    """[fn() with torch.set_num_threads(n) for n in counts]; the thread count restored after."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)


def token_positions(cu, total, position_ids=None):
    """int64 (total,) position of every packed token: restarting at 0 in every sequence
    when position_ids is None."""
    if position_ids is not None:
        return position_ids.detach().to(torch.int64).cpu().reshape(total)
    pos = torch.zeros(total, dtype=torch.int64)
    for a, b in spans(cu):
        pos[a:b] = torch.arange(b - a)
    return pos


# ---- the float64 reference of window_size and softcap ----

def wid(w):
    return f"{w[0]}_{w[1]}"


def band(query_idx, key_idx, causal, window):
    """Boolean visibility by flash-attn's window rule on token indices: key j is visible
    to query i iff (left == -1 or j >= i - left) and (right == -1 or j <= i + right) and
    (not causal or j <= i)."""
    left, right = window
    i, j = query_idx[:, None], key_idx[None, :]
    visible = torch.ones(len(query_idx), len(key_idx), dtype=torch.bool)
    if left != -1:
        visible &= j >= i - left
    if right != -1:
        visible &= j <= i + right
    if causal:
        visible &= j <= i
    return visible


def visibility(s_or_cu, causal, window):
    """(S, S) visibility of a dense sequence of S tokens, or (T, T) of packed sequences
    (cu: a list): same sequence, token indices restarting at each sequence start."""
    if isinstance(s_or_cu, int):
        idx = torch.arange(s_or_cu)
        return band(idx, idx, causal, window)
    total = int(s_or_cu[-1])
    seq = torch.full((total,), -1, dtype=torch.int64)
    local = torch.zeros(total, dtype=torch.int64)
    for n, (a, b) in enumerate(spans(s_or_cu)):
        seq[a:b] = n
        local[a:b] = torch.arange(b - a)
    return (seq[:, None] == seq[None, :]) & band(local, local, causal, window)


def band_reference(q, k, v, cos, sin, position_ids=None, causal=True, window=(-1, -1), softmax_scale=None,
                   interleaved=False, softcap=0.0, grad_out=None, cu=None, with_lse=False, sinks=None):
    """float64 RoPE + band-masked attention (the window rule above; scores capped to
    softcap * tanh(s / softcap) first when softcap > 0; with sinks ((H,)), GPT-OSS's way:
    one more score column per row holding its head's sink, dropped after the softmax),
    dense (B, S, H, D) or packed (T, H, D) with cu (a list). Returns out (and lse with
    with_lse), or with grad_out (out, dq, dk, dv), and dsinks last with sinks: gradients by
    autograd, dq and dk rotated back by the inverse rotation."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    packed = cu is not None
    if packed:
        pos = token_positions(cu, q.shape[0], position_ids)
        visible = visibility(cu, causal, window)
    else:
        pos = position_ids
        visible = visibility(q.shape[1], causal, window)
    need = grad_out is not None
    qr = rope_reference(q, cos, sin, pos, interleaved).requires_grad_(need)
    kr = rope_reference(k, cos, sin, pos, interleaved).requires_grad_(need)
    v64 = v.detach().to(torch.float64).cpu().requires_grad_(need)
    sinks64 = None if sinks is None else sinks.detach().to(torch.float64).cpu().requires_grad_(need)
    hdim = 1 if packed else 2
    group = qr.shape[hdim] // kr.shape[hdim]
    kk, vv = kr.repeat_interleave(group, dim=hdim), v64.repeat_interleave(group, dim=hdim)
    if packed:
        scores = torch.einsum("shd,thd->hst", qr, kk) * scale
    else:
        scores = torch.einsum("bshd,bthd->bhst", qr, kk) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks64 is not None:
        column = sinks64[:, None, None] if packed else sinks64[None, :, None, None]
        scores = torch.cat([scores, column.expand(*scores.shape[:-1], 1)], dim=-1)
    lse = scores.logsumexp(-1)
    p = scores.softmax(-1)
    if sinks64 is not None:
        p = p[..., :-1]
    out = torch.einsum("hst,thd->shd", p, vv) if packed else torch.einsum("bhst,bthd->bshd", p, vv)
    if with_lse:
        return out.detach(), lse.detach()
    if not need:
        return out.detach()
    inputs = (qr, kr, v64) + (() if sinks64 is None else (sinks64,))
    gq, gk, gv, *gs = torch.autograd.grad(out, inputs, grad_out.detach().to(torch.float64).cpu())
    dq = rope_reference(gq, cos, sin, pos, interleaved, conjugate=True)
    dk = rope_reference(gk, cos, sin, pos, interleaved, conjugate=True)
    return (out.detach(), dq, dk, gv, *gs)


# ---- running pirope against it ----

def unfused_module():
    # pirope.rope_attention is the function; the module holds the unfused (CUDA) paths
    return importlib.import_module("pirope.rope_attention")


def unfused_with(monkeypatch, **constants):
    """(unfused_module(), pirope._band_attention), the first with its block constants
    (_BAND_ROWS, _MIN_BAND_ROWS, _BLOCK_SCORES) set to those given (None: left as is)."""
    mod = unfused_module()
    for name, value in constants.items():
        if value is not None:
            monkeypatch.setattr(mod, name, value)
    return mod, importlib.import_module("pirope._band_attention")


def run(q, k, v, cos, sin, pos=None, g=None, fn="public", **kw):
    """(out, dq, dk, dv, grad_out) of pirope.rope_attention(..., **kw), or of the unfused
    paths (fn="sdpa": _sdpa_fallback; fn="varlen": _varlen_unfused); with kw["sinks"],
    their gradient last."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sinks = kw.get("sinks")
    if sinks is not None:
        sinks = kw["sinks"] = sinks.detach().clone().requires_grad_()
    if fn == "public":
        out = pirope.rope_attention(q, k, v, cos, sin, pos, **kw)
    else:
        mod = unfused_module()
        causal, window = kw.get("causal", True), tuple(kw.get("window_size", (-1, -1)))
        scale = kw.get("softmax_scale") or q.shape[-1] ** -0.5
        interleaved, softcap = kw.get("interleaved", False), kw.get("softcap", 0.0)
        deterministic = kw.get("deterministic", False)
        if fn == "sdpa":
            out = mod._sdpa_fallback(q, k, v, cos, sin, pos, causal, scale, interleaved, window, softcap,
                                     deterministic, sinks)
        else:
            out = mod._varlen_unfused(q, k, v, cos, sin, pos, kw["cu_seqlens"], causal, scale, interleaved,
                                      window, softcap, deterministic, sinks)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    g = torch.randn_like(out) if g is None else g
    out.backward(g)
    return (out.detach(), q.grad, k.grad, v.grad, g) + (() if sinks is None else (sinks.grad,))


def check_against_reference(q, k, v, cos, sin, pos=None, causal=True, window=(-1, -1), scale=None,
                            interleaved=False, softcap=0.0, cu=None, fn="public", deterministic=False, sinks=None):
    """Outputs and gradients (of sinks too, when given) of run(...) within ATTENTION_REL of
    band_reference; returns run's (out, dq, dk, dv, grad_out[, dsinks])."""
    kw = dict(causal=causal, softmax_scale=scale, interleaved=interleaved, window_size=window, softcap=softcap,
              deterministic=deterministic)
    if sinks is not None:
        kw["sinks"] = sinks
    if cu is not None:
        kw["cu_seqlens"] = cu_tensor(cu, q.device)
    got = run(q, k, v, cos, sin, pos, fn=fn, **kw)
    ref = band_reference(q, k, v, cos, sin, pos, causal, window, scale, interleaved, softcap, grad_out=got[4], cu=cu,
                         sinks=sinks)
    for what, a, want in zip(("out", "dq", "dk", "dv", "dsinks"), got[:4] + got[5:], ref):
        assert_attention_close(a, want, q.dtype, f"{what} (causal={causal}, window={window}, softcap={softcap})")
    return got


def assert_all_equal(a, b, what=("out", "dq", "dk", "dv")):
    for name, x, y in zip(what, a, b):
        assert torch.equal(x, y), f"{name} differs"


def assert_compiled_like_eager(cases):
    """For each (f, (q, k, v), extra) of cases: the loss f(q, k, v, *extra) and its gradients
    under torch.compile(f, fullgraph=True, backend="aot_eager") equal eager's (to 1e-5).
    Dynamo's caches are reset before and after."""
    compiled = {}
    torch._dynamo.reset()
    try:
        for f, tensors, extra in cases:
            q, k, v = (t.requires_grad_() for t in tensors)
            loss = f(q, k, v, *extra)
            loss.backward()
            eager = [loss.detach()] + [t.grad.clone() for t in (q, k, v)]
            q.grad = k.grad = v.grad = None
            if f not in compiled:
                compiled[f] = torch.compile(f, fullgraph=True, backend="aot_eager")
            loss = compiled[f](q, k, v, *extra)
            loss.backward()
            for what, a, b in zip(("loss", "dq", "dk", "dv"), eager, [loss.detach(), q.grad, k.grad, v.grad]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{f.__name__} {what}: {m}")
    finally:
        torch._dynamo.reset()
