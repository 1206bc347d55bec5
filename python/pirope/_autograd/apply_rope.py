"""Autograd of the rotary ops under torch.func (the ops' own autograd, for eager,
torch.compile and LibTorch, is C++: csrc/pirope/autograd/apply_rope_kernel.cpp, the
same rules). A rotation is linear and orthogonal, so the gradient of apply_rope is
apply_rope_backward (rotation by -angle) and vice versa, which also makes double
backward work; forward mode (jvp) rotates the tangent by the same op. cos, sin and
position_ids get no gradient."""

from . import functorch


def _setup(ctx, inputs, output):
    # Works for the single and the qk ops: the tables follow the rotated tensors.
    n = 2 if len(inputs) == 6 else 1
    cos, sin, position_ids, interleaved = inputs[n:]
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.interleaved = interleaved
    ctx.n_rotated = n


def _apply_rope_bw(ctx, grad):
    cos, sin, pos = ctx.saved_tensors
    return functorch.call("apply_rope_backward", grad, cos, sin, pos, ctx.interleaved), None, None, None, None


def _apply_rope_backward_bw(ctx, grad):
    cos, sin, pos = ctx.saved_tensors
    return functorch.call("apply_rope", grad, cos, sin, pos, ctx.interleaved), None, None, None, None


def _apply_rope_qk_bw(ctx, gq, gk):
    cos, sin, pos = ctx.saved_tensors
    gq, gk = functorch.call("apply_rope_qk_backward", gq, gk, cos, sin, pos, ctx.interleaved)
    return gq, gk, None, None, None, None


def _apply_rope_qk_backward_bw(ctx, gq, gk):
    cos, sin, pos = ctx.saved_tensors
    gq, gk = functorch.call("apply_rope_qk", gq, gk, cos, sin, pos, ctx.interleaved)
    return gq, gk, None, None, None, None


def _setup_forward_mode(ctx, inputs, output):
    # _setup, plus what the jvp needs (forward-mode AD goes through torch.func's Function).
    _setup(ctx, inputs, output)
    ctx.save_for_forward(*inputs[ctx.n_rotated:ctx.n_rotated + 3])


def _jvp(name):
    """A rotation is linear in what it rotates: the output's tangent is the same op on
    the inputs' tangents (autograd materialises the tangent of an input without one as
    zeros: the Function keeps materialize_grads on)."""
    def jvp(ctx, *tangents):
        cos, sin, pos = ctx.saved_tensors
        return functorch.call(name, *tangents[:ctx.n_rotated], cos, sin, pos, ctx.interleaved)
    return jvp


for _name, _backward, _tables in (("apply_rope", _apply_rope_bw, (1, 2)),
                                  ("apply_rope_backward", _apply_rope_backward_bw, (1, 2)),
                                  ("apply_rope_qk", _apply_rope_qk_bw, (2, 3)),
                                  ("apply_rope_qk_backward", _apply_rope_qk_backward_bw, (2, 3))):
    functorch.register(_name, _backward, _setup_forward_mode, tables=_tables, jvp=_jvp(_name))
