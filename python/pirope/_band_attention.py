"""Blocks of a banded attention, for the unfused paths of rope_attention (CUDA calls the
fused kernels do not take): which keys a block of query rows sees and its mask, and an
attention over such blocks as an autograd.Function, for what SDPA has not: a soft-cap,
attention sinks, and a backward without float atomics (bit-identical gradients run to run).

Query i sees key j when i - left <= j <= i + right (a bound of -1: none). Tensors are
(..., heads, seqlen, headdim); k and v may have fewer heads than q (GQA/MQA: a divisor of
them), never repeated: the query heads of a group are the rows of one product with their
key/value head."""

from __future__ import annotations

import torch

from ._autograd.functorch import first_order
from ._fake.rope_attention import _math_dtype


def query_blocks(S: int, rows: int, left: int, right: int):
    """(q0, q1, k0, k1) of each block of ``rows`` query rows and the keys its band covers."""
    for q0 in range(0, S, rows):
        q1 = min(S, q0 + rows)
        yield q0, q1, (0 if left < 0 else max(0, q0 - left)), (S if right < 0 else min(S, q1 + right))


def band_mask(q0: int, q1: int, k0: int, k1: int, left: int, right: int, device) -> torch.Tensor:
    """(q1 - q0, k1 - k0) bool: True where query q0 + a sees key k0 + b."""
    i = torch.arange(q0, q1, device=device)[:, None]
    j = torch.arange(k0, k1, device=device)[None, :]
    seen = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    return seen


class BandMasks:
    """The band_mask of each block of one call (``unseen``: its negation), made once per
    block geometry: query q0 + a sees key k0 + b by (q0 - k0) + a - b alone, so blocks of
    the same size at the same offset from their keys (the full blocks inside the band)
    share one mask, and a call makes a handful of masks, not a few launches per block."""

    def __init__(self, left: int, right: int, device):
        self.left, self.right, self.device = left, right, device
        self._made: dict = {}

    def __call__(self, q0: int, q1: int, k0: int, k1: int, unseen: bool = False) -> torch.Tensor:
        key = (q1 - q0, k1 - k0, q0 - k0, unseen)
        mask = self._made.get(key)
        if mask is None:
            mask = band_mask(q0, q1, k0, k1, self.left, self.right, self.device)
            mask = self._made[key] = ~mask if unseen else mask
        return mask


def _grouped_matmul(a, b):
    """a (..., heads_kv, group, rows, n) @ b (..., heads_kv, n, m) -> (..., heads_kv, group,
    rows, m): the query heads of a group stacked as the rows of one product."""
    return torch.matmul(a.flatten(-3, -2), b).unflatten(-2, a.shape[-3:-1])


def _group_summed_matmul(a, b):
    """The sum over the group of a^T b: a (..., heads_kv, group, rows, n), b (...,
    heads_kv, group, rows, m) -> (..., heads_kv, n, m), in one product."""
    return torch.matmul(a.flatten(-3, -2).transpose(-1, -2), b.flatten(-3, -2))


def _grouped(t: torch.Tensor, heads_kv: int, dim: int) -> torch.Tensor:
    """t with its query-head dimension ``dim`` split into (heads_kv, group): a view."""
    return t.unflatten(dim, (heads_kv, t.shape[dim] // heads_kv if heads_kv else 1))


def _mask_unseen_(s, q0: int, q1: int, k0: int, k1: int, masks: BandMasks):
    """-inf in place where queries [q0, q1) do not see keys [k0, k1) of s (..., rows,
    keys): only in the columns at the band's edges, the others being seen by every row
    (with causal blocks of 1024 rows over 8192 keys, one column in eight)."""
    left, right = masks.left, masks.right
    # every row sees column j when (q1 - 1) - left <= j <= q0 + right
    lo = k0 if left < 0 else min(k1, max(k0, q1 - 1 - left))
    hi = k1 if right < 0 else min(k1, max(k0, q0 + right + 1))
    if lo >= hi:  # no column seen by every row: the whole block once (not two overlapping edges)
        lo = hi = k1
    for c0, c1 in ((k0, lo), (hi, k1)):
        if c1 > c0:
            s[..., c0 - k0:c1 - k0].masked_fill_(masks(q0, q1, c0, c1, unseen=True), float("-inf"))
    return s


def _scaled_q(q, scale, math):
    """(q in the math type, the factor its products with k still need, or None): q times the
    softmax scale where that is at most 1 in magnitude, which cannot overflow (a pass over
    rows x d, not over the rows x keys scores); a larger scale multiplies the scores (q * 1e10
    may overflow where every score times 1e10 is finite)."""
    q = q.to(math)
    return (q * scale, None) if abs(scale) <= 1 else (q, scale)


def _block_scores(q, k, block, masks, math, cap=None, slope=False, scale=None):
    """The block's scores q k^T (times ``scale``, unless None) in the math type, (...,
    heads_kv, group, rows, keys) for q (..., heads_kv, group, rows, d; in the math type, as
    _scaled_q gives it) and k (..., heads_kv, keys, d), capped to cap *
    tanh(s / cap) when ``cap`` is given, -inf where the queries of ``block`` (q0, q1, k0,
    k1) do not see the key (``masks``: the call's BandMasks); with ``slope``, also the
    derivative of the cap, 1 - tanh^2 (None without a cap). ``cap``: a 0-dim tensor on the
    device (CUDA divides by a Python number as a product with its reciprocal, which is inf
    for a tiny cap). Elementwise steps in place, on the product's own output."""
    s = _grouped_matmul(q, k.to(math).transpose(-1, -2))
    if scale is not None:
        s.mul_(scale)
    d = None
    if cap is not None:
        t = s.div_(cap).tanh_()
        if slope:
            d = torch.addcmul(torch.ones((), dtype=math, device=t.device), t, t, value=-1)  # 1 - t^2
        s = t.mul_(cap)
    s = _mask_unseen_(s, *block, masks)
    return (s, d) if slope else s


def _as(t: torch.Tensor, dtype) -> torch.Tensor:
    """t in dtype, never by a no-op .to(): that returns t itself, and torch 2.11's Dynamo,
    which lifts an autograd.Function's intermediates into its outputs, then routes the
    output's gradient to the intermediate (silently wrong gradients under torch.compile)."""
    return t if t.dtype == dtype else t.to(dtype)


def _cap(softcap, math, device):
    """The cap as a 0-dim tensor of the math type on the device; None for no cap (0)."""
    return torch.full((), softcap, dtype=math, device=device) if softcap else None


class BlockAttention(torch.autograd.Function):
    """(out, lse) of softmax(q k^T * scale, within the band) v -- each score s capped to
    softcap * tanh(s / softcap) first when softcap > 0; with ``sinks`` ((heads_q,) or None),
    each row's softmax also has one key of logit sinks[head] and no value -- computed in
    float32 (float64 for float64 input) like the fused kernels, over blocks of ``rows``
    query rows so that only one block's scores exist at a time; out in q's dtype, lse
    (..., seqlen) in the math type. The backward recomputes each block's probabilities from
    lse once (as the fused kernels do; the derivative of the cap is 1 - tanh^2, exact for
    any cap) and takes all three gradients from them: dq block by block, dk and dv summed
    over the query blocks in their order, with plain products and adds: no float atomics,
    the same bits run to run. A sink's gradient: -sum over its head's rows of
    exp(sink - lse) * rowsum(dO * O)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, sinks, scale, softcap, left, right, rows):
        S, math, hkv = q.shape[-2], _math_dtype(q.dtype), k.shape[-3]
        cap = _cap(softcap, math, q.device)
        # (heads_kv, group, 1, 1)
        sink = None if sinks is None else _grouped(sinks.to(math), hkv, 0)[..., None, None]
        qg = _grouped(q, hkv, -3)
        masks = BandMasks(left, right, q.device)
        outs, lses = [], []
        for block in query_blocks(S, rows, left, right):
            q0, q1, k0, k1 = block
            qs, rest = _scaled_q(qg[..., q0:q1, :], scale, math)
            s = _block_scores(qs, k[..., k0:k1, :], block, masks, math, cap, scale=rest)
            m = s.amax(dim=-1, keepdim=True)  # finite: every row sees its own key
            if sink is not None:
                m = torch.maximum(m, sink)
            # in place only where s holds every input of m: under vmap an unbatched s cannot
            # take a batched operand in place (the same rule below)
            e = (s.sub_(m) if sink is None else s - m).exp_()
            total = e.sum(dim=-1, keepdim=True)
            if sink is not None:
                total = total + torch.exp(sink - m)
            outs.append(_grouped_matmul(e, v[..., k0:k1, :].to(math)) / total)
            lses.append((m + torch.log(total)).squeeze(-1))
        if not outs:  # no query row
            return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=math)
        out, lse = torch.cat(outs, dim=-2).flatten(-4, -3), torch.cat(lses, dim=-1).flatten(-3, -2)
        return _as(out, q.dtype), lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, sinks, scale, softcap, left, right, rows = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.options = (scale, softcap, left, right, rows)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        return _BLOCK_BACKWARD(grad_out, *ctx.saved_tensors, *ctx.options) + (None,) * 5


def _block_backward(grad_out, q, k, v, out, lse, sinks, scale, softcap, left, right, rows):
    """(dq, dk, dv, dsinks) of BlockAttention (dsinks None without sinks)."""
    S, math, hkv = q.shape[-2], _math_dtype(q.dtype), k.shape[-3]
    cap = _cap(softcap, math, q.device)
    do = grad_out.to(math)
    delta = (do * out.to(math)).sum(-1)  # rowsum(dO * O), as the fused backward's D
    # the query heads of a key/value head as one group
    qg, dog = _grouped(q, hkv, -3), _grouped(do, hkv, -3)
    lseg, deltag = _grouped(lse, hkv, -2), _grouped(delta, hkv, -2)
    masks = BandMasks(left, right, q.device)

    dq, dk, dv = [], None, None
    for block in query_blocks(S, rows, left, right):
        q0, q1, k0, k1 = block
        # P and dS of queries [q0, q1) x keys [k0, k1), each step in place
        qs, rest = _scaled_q(qg[..., q0:q1, :], scale, math)
        s, slope = _block_scores(qs, k[..., k0:k1, :], block, masks, math, cap, slope=True, scale=rest)
        lse_rows = lseg[..., q0:q1, None]  # (of q, k and the sinks)
        p = (s.sub_(lse_rows) if sinks is None else s - lse_rows).exp_()
        dp = _grouped_matmul(dog[..., q0:q1, :], v[..., k0:k1, :].to(math).transpose(-1, -2))
        # (delta: of dO and every input of p)
        ds = (dp - deltag[..., q0:q1, None]).mul_(p)  # 0 where not seen (p = 0)
        if slope is not None:
            ds.mul_(slope)
        dq.append(_grouped_matmul(ds, k[..., k0:k1, :].to(math)) * scale)
        # summed over the group's query heads (q scaled, or the scale still to multiply)
        dk_part = _group_summed_matmul(ds, qs)
        if rest is not None:
            dk_part = dk_part * rest
        dv_part = _group_summed_matmul(p, dog[..., q0:q1, :])
        if dk is None:  # from a part, so that under vmap they are batched as the parts are
            dk, dv = dk_part.new_zeros(k.shape, dtype=math), dv_part.new_zeros(v.shape, dtype=math)
        dk[..., k0:k1, :] += dk_part
        dv[..., k0:k1, :] += dv_part
    dsinks = None
    if sinks is not None:  # summed over the rows of each head and the leading dims
        per_head = (torch.exp(sinks.to(math)[:, None] - lse) * delta).sum(-1)  # (..., heads)
        if per_head.dim() > 1:  # (not reshape(-1, heads): -1 is ambiguous with no query heads)
            per_head = per_head.flatten(0, -2).sum(0)
        dsinks = _as(-per_head, sinks.dtype)
    if dk is None:  # no query row
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dsinks
    return _as(torch.cat(dq, dim=-2).flatten(-4, -3), q.dtype), _as(dk, k.dtype), _as(dv, v.dtype), dsinks


# the backward as a node of its own, whose backward raises (its products take lse as a constant)
_BLOCK_BACKWARD = first_order("rope_attention", _block_backward)
