"""Batching rules of the fused attention: the vmapped dim joins the heads of q, k and v
(and of lse). Query head ``v * nheads_q + h`` then reads key head ``(v * nheads_q + h) //
group = v * nheads_kv + h // group``: the same grouped-query pairing within each index,
and attention sinks (one per query head, shared by the batch) repeat once per index."""

import torch

from . import _fold

ops = torch.ops.pirope


# Where sinks sit among the arguments after q, k, v (cos, sin, position_ids, causal,
# softmax_scale, interleaved, deterministic, cu_seqlens, window_left, window_right, softcap).
_SINKS = 11


def _foldable(info, tensors, dims, rest_dims) -> bool:
    return info.batch_size > 0 and all(d is None for d in rest_dims) and all(
        len(_fold.sample_shape(t, d)) == 4 for t, d in zip(tensors, dims))


def _rope_attention(info, in_dims, q, k, v, *rest):
    if not _foldable(info, (q, k, v), in_dims[:3], in_dims[3:]):
        return _fold.loop(ops.rope_attention, info, in_dims, (q, k, v, *rest))
    nheads_q = _fold.sample_shape(q, in_dims[0])[2]
    if len(rest) > _SINKS and rest[_SINKS] is not None:
        rest = (*rest[:_SINKS], rest[_SINKS].repeat(info.batch_size), *rest[_SINKS + 1:])
    out, lse = ops.rope_attention(*_fold.fold_each(info, (q, k, v), in_dims[:3], (2, 2, 2)), *rest)
    (out, out_dim), (lse, lse_dim) = (_fold.out_of_heads(out, info.batch_size, 2, nheads_q),
                                      _fold.out_of_heads(lse, info.batch_size, 1, nheads_q))
    return (out, lse), (out_dim, lse_dim)


def _rope_attention_backward(info, in_dims, grad_out, q, k, v, out, lse, *rest):
    tensors = (grad_out, q, k, v, out, lse)
    if not (_foldable(info, tensors[:5], in_dims[:5], in_dims[6:]) and len(_fold.sample_shape(lse, in_dims[5])) == 3):
        return _fold.loop(ops.rope_attention_backward, info, in_dims, (*tensors, *rest))
    grads = ops.rope_attention_backward(*_fold.fold_each(info, tensors, in_dims[:6], (2, 2, 2, 2, 2, 1)), *rest)
    nheads = [_fold.sample_shape(t, d)[2] for t, d in zip((q, k, v), in_dims[1:4])]
    outs = [_fold.out_of_heads(g, info.batch_size, 2, h) for g, h in zip(grads, nheads)]
    return tuple(g for g, _ in outs), tuple(d for _, d in outs)


torch.library.register_vmap("pirope::rope_attention", _rope_attention)
torch.library.register_vmap("pirope::rope_attention_backward", _rope_attention_backward)
