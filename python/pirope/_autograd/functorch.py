"""The ops' autograd under torch.func transforms (grad, vjp, jacrev, jvp, hessian, vmap).

The ops' autograd is C++ (csrc/pirope/autograd: one place for Python, torch.compile and
LibTorch), and functorch refuses C++ autograd Functions ("cannot use C++
torch::autograd::Function with functorch transforms"). So every op also gets a Python
autograd.Function here, made of the same rules (python/pirope/_autograd/<op>.py: a
setup_context and a backward calling the same backward op), and the Python API calls
the op through it while a torch.func autograd transform (grad, jvp and their kin) or a
forward_ad dual level is active; everywhere else (vmap alone and functionalize included)
it calls the op itself. The backwards call their ops through
:func:`call` too, so gradients of gradients (hessian, jacrev of grad) take the same
route. Forward mode goes the same way for the rotary ops, whose jvp is the rotation of
the tangent; for rope_attention it is refused (``_checks.no_forward_ad``)."""

from __future__ import annotations

import torch

_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}


def register(name: str, backward, setup_context, *, tables: tuple[int, int], jvp=None) -> None:
    """The autograd.Function of ``torch.ops.pirope.<name>`` for torch.func (and, with
    ``jvp``, for forward-mode AD). ``tables``: the positions of cos and sin among the
    op's arguments: constants, so differentiating with respect to them raises (torch.func
    would return zeros for them)."""
    op = getattr(torch.ops.pirope, name)

    def forward(*args):
        return op(*args)

    def backward_checked(ctx, *grads):
        for i, what in zip(tables, ("cos", "sin")):
            if ctx.needs_input_grad[i]:
                raise NotImplementedError(
                    f"{name}: gradients with respect to {what} are not supported (the tables are constants)")
        return backward(ctx, *grads)

    _FUNCTIONS[name] = type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_checked),
        **({"jvp": staticmethod(jvp)} if jvp is not None else {}),
        # vmap of the Function (jacrev, vmap of grad) runs forward/backward under vmap,
        # which the ops' batching rules (pirope._vmap) take.
        "generate_vmap_rule": True,
    })


def _kinds() -> set:
    """The kinds of torch.func transforms active here (not for torch.compile to trace:
    its callers ask is_compiling first)."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return set()
    return {level.key() for level in torch._C._functorch.get_interpreter_stack()}


_AUTOGRAD_KINDS = {torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp}


def transforming() -> bool:
    """Whether autograd runs through torch.func here: a grad/vjp/jacrev or jvp/jacfwd
    transform, or a torch.autograd.forward_ad dual level. (vmap alone and functionalize
    take the ops themselves: their batching rules and C++ autograd.) Never inside
    torch.compile, which must not trace the set operation below either (torch 2.11's
    Dynamo cannot hash a TransformType)."""
    if torch.compiler.is_compiling():
        return False
    return torch.autograd.forward_ad._current_level >= 0 or bool(_kinds() & _AUTOGRAD_KINDS)


def vmapping() -> bool:
    """Whether a torch.func.vmap is active here (outside torch.compile, as transforming)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.TransformType.Vmap in _kinds()


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under torch.func's wrappers (for a vmapped one: all of it)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def no_double_backward(op: str):
    raise NotImplementedError(f"{op}: double backward (gradients of gradients) is not supported")


def first_order(op: str, fn):
    """``fn`` (part of a backward, made of differentiable torch ops) as the ``apply`` of an
    autograd.Function whose own backward raises: gradients of gradients would otherwise run
    through those ops with lse, a function of q, k and the sinks, taken as a constant."""
    def backward(ctx, *grads):
        no_double_backward(op)

    return type(f"{fn.__name__}_function", (torch.autograd.Function,), {
        "forward": staticmethod(fn),
        "setup_context": staticmethod(lambda ctx, inputs, output: None),
        "backward": staticmethod(backward),
        "generate_vmap_rule": True,
    }).apply


def call(name: str, *args):
    """``torch.ops.pirope.<name>(*args)``, differentiable under torch.func too."""
    if transforming():
        return _FUNCTIONS[name].apply(*args)
    return getattr(torch.ops.pirope, name)(*args)
