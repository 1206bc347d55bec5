"""Inputs and helpers of the rope_attention tests: PI tables, dense and packed q/k/v,
cu_seqlens helpers, the dense call per packed sequence (shared by test_rope_attention*.py)."""

import torch

import pirope


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
