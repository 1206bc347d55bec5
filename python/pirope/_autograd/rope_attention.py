"""Autograd of the fused attention under torch.func (the op's own autograd, for eager,
torch.compile and LibTorch, is C++: csrc/pirope/autograd/rope_attention_kernel.cpp, the
same rules): the backward is its own op, which recomputes the probabilities from the
saved log-sum-exp. q, k and v get gradients, and attention sinks theirs (_sinks_grad); the
tables and positions do not, and lse (an auxiliary output) is not differentiable."""

from . import functorch


def _sinks_grad_math(grad_out, out, lse, sinks, packed):
    """-sum over each head's rows of exp(sink - lse) * rowsum(grad_out * out): the gradient
    of the sinks (autograd/rope_attention_kernel.cpp's sinks_grad). lse: (batch, heads,
    seqlen), or (heads, total) when packed."""
    d = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # (batch, seqlen, heads) or (total, heads)
    if packed:
        return -((sinks.to(lse.dtype)[:, None] - lse).exp() * d.t()).sum(1).to(sinks.dtype)
    return -((sinks.to(lse.dtype)[None, :, None] - lse).exp() * d.transpose(1, 2)).sum((0, 2)).to(sinks.dtype)


_sinks_grad = functorch.first_order("rope_attention", _sinks_grad_math)


def _setup(ctx, inputs, output):
    q, k, v, cos, sin, position_ids, causal, softmax_scale, interleaved, *rest = inputs
    out, lse = output
    cu_seqlens = rest[1] if len(rest) > 1 else None
    # (window_left, window_right): the op's defaults (-1) where the call passed none
    ctx.window = tuple((list(rest[2:4]) + [-1, -1])[:2])
    ctx.softcap = rest[4] if len(rest) > 4 else 0.0
    sinks = rest[5] if len(rest) > 5 else None
    ctx.save_for_backward(q, k, v, out, lse, cos, sin, position_ids, cu_seqlens, sinks)
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale
    ctx.interleaved = interleaved
    ctx.deterministic = bool(rest[0]) if rest else False
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(lse)


def _rope_attention_bw(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cos, sin, position_ids, cu_seqlens, sinks = ctx.saved_tensors
    dq, dk, dv = functorch.call(
        "rope_attention_backward", grad_out.contiguous(), q, k, v, out, lse, cos, sin, position_ids, ctx.causal,
        ctx.softmax_scale, ctx.interleaved, ctx.deterministic, cu_seqlens, *ctx.window,
        ctx.softcap)
    grads = (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)
    if sinks is not None:  # the last input
        grads = grads[:-1] + (_sinks_grad(grad_out, out, lse, sinks, cu_seqlens is not None),)
    return grads


functorch.register("rope_attention", _rope_attention_bw, _setup, tables=(3, 4))


def _setup_backward(ctx, inputs, output):
    pass


def _rope_attention_backward_bw(ctx, *grads):
    # Double backward would need the derivative of the recomputed softmax: not
    # implemented. Raise rather than let autograd treat the op as constant.
    functorch.no_double_backward("rope_attention")


functorch.register("rope_attention_backward", _rope_attention_backward_bw, _setup_backward, tables=(6, 7))
