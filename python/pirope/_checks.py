"""Argument checks of the Python API: clear exceptions that name the argument."""

from __future__ import annotations

import contextlib
import numbers
import operator
import warnings

import torch


def _kind(value) -> str:
    """The type of ``value`` for a message: its name, qualified where it is not a builtin
    (numpy.bool is not bool)."""
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def tensor(op: str, name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {_kind(value)}")
    # the ops take dense tensors only (torch's own error for a sparse, nested or mkldnn
    # one names the backend, not the argument)
    if value.layout != torch.strided or value.is_nested:
        layout = "nested" if value.is_nested else value.layout
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got a {layout} one")


def flag(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {_kind(value)}")


def integer(op: str, name: str, value, *, minimum: int | None = None) -> int:
    # any integral number (a NumPy integer too), not a bool
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {_kind(value)}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def window(op: str, name: str, value) -> tuple[int, int]:
    """flash-attn's window_size: a (left, right) pair of ints, each -1 (unbounded) or >= 0."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{op}: {name} must be a (left, right) pair of ints (-1: unbounded), got {value!r}")
    left, right = (integer(op, f"{name}[{i}]", v, minimum=-1) for i, v in enumerate(value))
    return left, right


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINIEST = 2.0**-149  # the smallest positive float32 (subnormal)


def softcap(op: str, name: str, value, dtype: torch.dtype) -> float:
    """An attention-logit soft-cap: None or 0 (no cap), or finite and > 0 -- within float32's
    positive range unless ``dtype`` (the inputs') is float64, as every other dtype is
    computed in float32."""
    if value is None:
        return 0.0
    value = number(op, name, value)
    if value < 0:
        raise ValueError(f"{op}: {name} must be 0 (no soft-cap) or > 0, got {value}")
    if value and dtype != torch.float64 and not FLOAT32_TINIEST <= value <= FLOAT32_MAX:
        raise ValueError(f"{op}: {name} must be 0 or within float32's positive range ({FLOAT32_TINIEST} to "
                         f"{FLOAT32_MAX}: {dtype} inputs are computed in float32), got {value}")
    return value


def number(op: str, name: str, value, *, positive: bool = False) -> float:
    # any real number (a NumPy scalar too), not a bool
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {_kind(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int past the float range
        raise ValueError(f"{op}: {name} must be finite (within the float range), got {value}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    return value


@contextlib.contextmanager
def prefixed(op: str):
    """Puts ``op: `` in front of a TypeError / ValueError raised by shared checks that do
    not know which public function called them (the scaling validation, whose messages
    never name one)."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise type(e)(f"{op}: {e}") from None


def _jvp_levels() -> set:
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return {level.level() for level in stack if level.key() == torch._C._functorch.TransformType.Jvp}


def _carries_jvp_tangent(t, levels) -> bool:
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.maybe_get_level(t) in levels:
            return True
        t = functorch.get_unwrapped(t)
    return False


def constant_tables(op: str, cos, sin, *, stacklevel: int = 3) -> None:
    """cos and sin are constants (no gradient flows to them, DESIGN.md): tables that require
    grad (built from a learnable inv_freq, say) would get none silently, so it is said, once per
    call site. Not inside torch.compile, where a warning breaks the graph, nor under torch.func
    transforms, whose gradients with respect to the tables raise (python/pirope/_autograd)."""
    if not (cos.requires_grad or sin.requires_grad):  # the usual case, first: every call passes here
        return
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return
    names = [name for name, t in (("cos", cos), ("sin", sin)) if t.requires_grad]
    if names:
        warnings.warn(f"{op}: {' and '.join(names)} {'require' if len(names) > 1 else 'requires'} grad, but the "
                      "tables are constants and get no gradient (detach them, or rotate with PyTorch ops to learn "
                      "the frequencies)", UserWarning, stacklevel=stacklevel)


def no_forward_ad(op: str, *named, what: str = "") -> None:
    """Refuses forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad)
    through the ``(name, tensor)`` pairs given: torch gives custom ops no jvp rule and
    would return zero (or no) tangents silently, so a tensor that carries a tangent is
    refused here (tensors without one, e.g. constants inside a jvp, pass). ``what``
    says why. Not checked inside torch.compile, which cannot trace the check."""
    if torch.compiler.is_compiling():
        return
    levels = _jvp_levels()
    dual = torch.autograd.forward_ad._current_level >= 0
    for name, t in named:
        if t is None:
            continue
        if (levels and _carries_jvp_tangent(t, levels)) or (
                dual and torch.autograd.forward_ad.unpack_dual(t).tangent is not None):
            raise NotImplementedError(
                f"{op}: forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) with respect to "
                f"{name} is not supported{what}; use reverse mode (loss.backward(), torch.autograd.grad)")
