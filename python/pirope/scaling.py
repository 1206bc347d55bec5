"""RoPE frequency tables for every Hugging Face ``rope_scaling`` type.

This module computes the per-pair inverse frequencies ``theta_i`` of rotary position
embeddings (RoPE) and the attention factor that multiplies cos and sin, for plain RoPE
and for the scalings Hugging Face transformers implements in
``transformers/modeling_rope_utils.py``:

============ ===========================================================================
rope_type    what it does (notation: ``theta_i = base ** (-2i / d)``, factor ``s``,
             original context ``L``, ``d`` = rotary dim)
============ ===========================================================================
default      Plain RoPE: ``theta_i``.
linear       Position Interpolation (Chen et al. 2023): ``theta_i / s``.
dynamic      Dynamic NTK: ``base' = base * (s * l / L - (s - 1)) ** (d / (d - 2))`` with
             ``l = max(seq_len, L)``, ``L = max_position_embeddings``; recomputed as the
             sequence grows.
yarn         YaRN: per-pair linear-ramp blend of ``theta_i / s`` and ``theta_i`` between the
             correction dims of ``beta_fast`` and ``beta_slow``; attention factor
             ``0.1 * ln(s) + 1`` (or the mscale ratio, or ``attention_factor``).
llama3       Llama 3.1: pairs with wavelength below ``L / high_freq_factor`` keep
             ``theta_i``, above ``L / low_freq_factor`` use ``theta_i / s``, smooth blend
             in between.
longrope     LongRoPE (Phi-3): ``theta_i / f_i`` with ``f`` the ``short_factor`` list, or
             the ``long_factor`` list once ``seq_len > original_max_position_embeddings``;
             attention factor ``sqrt(1 + ln s / ln L)``.
proportional Gemma 4's global layers: ``base ** (-2i / head_dim) / s`` for the first
             ``int(partial_rotary_factor * head_dim // 2)`` pairs, 0 (no rotation) for
             the others; the table spans the whole head (``head_dim // 2`` pairs ``(i,
             i + head_dim/2)``), unlike partial rotary, which rotates the first
             rotary_dim features only.
============ ===========================================================================

The values are bit-identical to ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``
(and to ``LlamaRotaryEmbedding.compute_default_rope_parameters`` /
``GPTNeoXRotaryEmbedding.compute_default_rope_parameters`` for ``default``) for the same
configuration: the same float32 torch operations run in the same order. transformers is
never imported here.

This module is pure Python + PyTorch and imports nothing else from pirope.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "compute_inv_freq",
    "normalize_scaling",
    "scaling_needs_seq_len",
]

#: The ``rope_type`` values :func:`compute_inv_freq` accepts.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional")

_DEFAULT_BASE = 10000.0
_DEFAULT_PARTIAL_ROTARY_FACTOR = 1.0

# Keys every rope_type accepts in the dict (besides "rope_type" and its alias "type").
_COMMON_KEYS = frozenset({"rope_theta", "partial_rotary_factor"})

# rope_type -> (required keys, optional keys), as transformers' _validate_*_rope_parameters.
# "original_max_position_embeddings" is listed as required there, but transformers'
# standardize_rope_params() fills it in from max_position_embeddings before validating,
# so in practice it is optional (and so it is here).
_KEYS: dict[str, tuple[frozenset, frozenset]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "yarn": (
        frozenset({"factor"}),
        frozenset(
            {
                "original_max_position_embeddings",
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "truncate",
            }
        ),
    ),
    "llama3": (
        frozenset({"factor", "low_freq_factor", "high_freq_factor"}),
        frozenset({"original_max_position_embeddings"}),
    ),
    "longrope": (
        frozenset({"short_factor", "long_factor"}),
        frozenset({"original_max_position_embeddings", "attention_factor", "factor"}),
    ),
    # transformers validates no "factor" for it (and warns that it does not know the key) but its
    # computation divides by rope_parameters.get("factor", 1.0): Position Interpolation of Gemma 4
    "proportional": (frozenset(), frozenset({"factor"})),
}

# rope_types whose `factor` value may be None (transformers then derives it as
# max_position_embeddings / original_max_position_embeddings).
_FACTOR_MAY_BE_NONE = frozenset({"yarn", "longrope"})

_UNSUPPORTED_HF_TYPES = {
    "axial": "it is a multi-axis (vision) RoPE",
}


# --------------------------------------------------------------------------------------
# Argument checking helpers
# --------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integral(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_number(value: Any, name: str) -> int | float:
    """Returns ``value`` as a Python int (for integers) or float; rejects bool/NaN/inf."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    value = int(value) if _is_integral(value) else float(value)
    try:
        finite = math.isfinite(value)  # an int past the float range overflows here
    except OverflowError:
        finite = False
    if not finite:
        raise ValueError(f"{name} must be finite (within the float range), got {value!r}")
    return value


_INT64_MAX = 2**63 - 1


def _as_int(value: Any, name: str) -> int:
    if not _is_integral(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def _key(rope_type: str, key: str) -> str:
    return f"scaling[{key!r}] (rope_type {rope_type!r})"


# --------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------


def normalize_scaling(scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validates a Hugging Face style RoPE scaling dict and returns a clean copy.

    The returned dict is new (the input is never modified) and always has a
    ``"rope_type"`` key: the legacy alias ``"type"`` is resolved and removed, and a
    dict without either (e.g. ``{}`` or ``{"rope_theta": 5e5}``) means
    ``"default"``, as in transformers. Numbers are converted to plain Python ``int`` /
    ``float`` (so NumPy scalars work) and ``short_factor`` / ``long_factor`` to lists
    of floats. Defaults are *not* filled in, so the result is still a valid
    transformers ``rope_parameters`` dict.

    Checks done here need only the dict: known ``rope_type``, required keys present,
    no unknown keys (a misspelt key would otherwise be silently ignored), value types
    and ranges. Checks that also need the head dim, ``base`` or
    ``max_position_embeddings`` (``longrope`` list lengths, a ``factor`` derived from
    the windows) are done by :func:`compute_inv_freq`.

    Args:
        scaling: ``None`` or a mapping in transformers ``rope_scaling`` /
            ``rope_parameters`` form, e.g. ``{"rope_type": "linear", "factor": 4.0}``.

    Returns:
        ``None`` if ``scaling`` is ``None``, else the validated dict.

    Raises:
        TypeError: ``scaling`` is not a mapping, or a value has the wrong type.
        ValueError: unknown ``rope_type``, missing or unknown keys, or a value out of
            range (e.g. ``factor < 1``).
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise TypeError(
            "scaling must be None or a dict in Hugging Face rope_scaling form such as "
            f"{{'rope_type': 'linear', 'factor': 4.0}}, got {type(scaling).__name__} {scaling!r}"
        )
    for k in scaling:
        if not isinstance(k, str):
            raise TypeError(f"scaling keys must be str, got {type(k).__name__} {k!r}")

    rope_type = scaling.get("rope_type")
    alias = scaling.get("type")
    if "rope_type" in scaling and "type" in scaling and rope_type != alias:
        raise ValueError(
            f"scaling['rope_type']={rope_type!r} and its alias scaling['type']={alias!r} disagree; pass only one"
        )
    if "rope_type" not in scaling:
        rope_type = alias if "type" in scaling else "default"
    if not isinstance(rope_type, str):
        raise TypeError(f"scaling['rope_type'] must be a str, got {type(rope_type).__name__} {rope_type!r}")
    if rope_type not in _KEYS:
        why = _UNSUPPORTED_HF_TYPES.get(rope_type)
        extra = f" ({rope_type!r} is not supported by pirope: {why})" if why else ""
        raise ValueError(
            f"scaling['rope_type'] must be one of {', '.join(map(repr, SUPPORTED_ROPE_TYPES))}; "
            f"got {rope_type!r}{extra}"
        )

    required, optional = _KEYS[rope_type]
    allowed = required | optional | _COMMON_KEYS
    present = set(scaling) - {"rope_type", "type"}
    missing = sorted(required - present)
    unknown = sorted(present - allowed)
    if missing:
        also = (f" (it has key(s) {', '.join(map(repr, unknown))} that rope_type {rope_type!r} does not use: "
                "a misspelling?)") if unknown else ""
        raise ValueError(
            f"scaling is missing required key(s) {', '.join(map(repr, missing))} for rope_type {rope_type!r}{also}"
        )
    if unknown:
        hint = ""
        if rope_type == "default":
            hint = " (did you forget scaling['rope_type']?)"
        elif rope_type == "dynamic" and "original_max_position_embeddings" in unknown:
            hint = " (dynamic NTK uses the max_position_embeddings argument as the original window)"
        raise ValueError(
            f"scaling has key(s) {', '.join(map(repr, unknown))} that rope_type {rope_type!r} does not use; "
            f"accepted keys: {', '.join(map(repr, sorted(allowed | {'rope_type'})))}{hint}"
        )

    out: dict[str, Any] = {"rope_type": rope_type}
    for key in scaling:
        if key in ("rope_type", "type"):
            continue
        out[key] = _check_value(rope_type, key, scaling[key])

    if rope_type == "yarn":
        # transformers: `get("beta_fast") or 32`, `get("beta_slow") or 1` (0 and None mean default)
        beta_fast = out.get("beta_fast") or 32
        beta_slow = out.get("beta_slow") or 1
        if beta_fast < beta_slow:
            raise ValueError(
                f"scaling['beta_fast'] (rope_type 'yarn') must be >= scaling['beta_slow'], got "
                f"beta_fast={beta_fast} and beta_slow={beta_slow} (defaults 32 and 1)"
            )
    elif rope_type == "llama3":
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ValueError(
                "scaling['high_freq_factor'] (rope_type 'llama3') must be greater than "
                f"scaling['low_freq_factor'], got high_freq_factor={out['high_freq_factor']} and "
                f"low_freq_factor={out['low_freq_factor']}"
            )
    return out


def _check_value(rope_type: str, key: str, value: Any) -> Any:
    """Validates and canonicalises one value of the scaling dict."""
    name = _key(rope_type, key)
    if key == "factor":
        if value is None and rope_type in _FACTOR_MAY_BE_NONE:
            return None  # derived from max_position_embeddings / original_max_position_embeddings
        value = _as_number(value, name)
        if value < 1:
            what = (
                "Position Interpolation needs a scale factor s = L'/L >= 1"
                if rope_type == "linear"
                else "the scale factor is new_window / original_window >= 1"
            )
            raise ValueError(f"{name} must be >= 1 ({what}), got {value}")
        return value
    if key == "rope_theta":
        value = _as_number(value, name)
        if value <= 0:
            raise ValueError(f"{name} (the RoPE base) must be > 0, got {value}")
        return value
    if key == "partial_rotary_factor":
        value = _as_number(value, name)
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
        return value
    if key == "original_max_position_embeddings":
        value = _as_int(value, name)
        if value < 1:
            raise ValueError(f"{name} must be a positive int, got {value}")
        return value
    if key == "attention_factor":
        if value is None:
            return None
        value = _as_number(value, name)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        return value
    if key in ("beta_fast", "beta_slow"):
        if value is None:
            return None
        value = _as_number(value, name)
        if value < 0:
            raise ValueError(f"{name} must be > 0 (0 or None selects the default), got {value}")
        return value
    if key in ("mscale", "mscale_all_dim"):
        if value is None:
            return None
        return _as_number(value, name)
    if key == "truncate":
        if value is None:
            return None
        if not (isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))):
            raise TypeError(f"{name} must be a bool (or None), got {type(value).__name__} {value!r}")
        return bool(value)  # (a numpy bool as Python's)
    if key in ("low_freq_factor", "high_freq_factor"):
        value = _as_number(value, name)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        return value
    if key in ("short_factor", "long_factor"):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of numbers, got {type(value).__name__}")
        if len(value) == 0:
            raise ValueError(f"{name} must be a non-empty list of numbers (one per rotary pair)")
        out = []
        for i, v in enumerate(value):
            v = float(_as_number(v, f"{name}[{i}]"))
            if v <= 0:
                raise ValueError(f"{name}[{i}] must be > 0, got {v}")
            out.append(v)
        return out
    raise AssertionError(f"unhandled key {key!r}")  # pragma: no cover - _KEYS and this function agree


def scaling_needs_seq_len(scaling: Mapping[str, Any] | None) -> bool:
    """Tells whether the table of ``scaling`` depends on the sequence length.

    True for ``"dynamic"`` (the base grows with the sequence) and ``"longrope"`` (the
    short or long factor list is chosen by the sequence length): a module using them
    must call :func:`compute_inv_freq` again with ``seq_len`` when the sequence grows
    past the window it was built for. False for ``None`` and every other type.

    Args:
        scaling: ``None`` or a scaling dict (validated like :func:`normalize_scaling`).

    Raises:
        TypeError, ValueError: as :func:`normalize_scaling`.
    """
    normalized = normalize_scaling(scaling)
    return normalized is not None and normalized["rope_type"] in ("dynamic", "longrope")


# --------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------


def compute_inv_freq(
    head_dim: int,
    *,
    base: float = _DEFAULT_BASE,
    scaling: Mapping[str, Any] | None = None,
    max_position_embeddings: int = 2048,
    partial_rotary_factor: float = _DEFAULT_PARTIAL_ROTARY_FACTOR,
    seq_len: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Computes the RoPE inverse frequencies and attention factor, as transformers does.

    ``rotary_dim = int(head_dim * partial_rotary_factor)`` features of each head rotate
    (must be even and >= 2); the table has one frequency per rotated pair. The
    rotation angle of pair ``i`` at position ``m`` is ``m * inv_freq[i]``, and cos/sin
    are multiplied by ``attention_factor``.

    Scalings (``scaling["rope_type"]``; ``"type"`` is accepted as an alias; notation:
    ``d = rotary_dim``, ``theta_i = base ** (-2i / d)``, ``s = factor``):

    * ``None`` / ``"default"``: plain RoPE, ``inv_freq[i] = theta_i``.
    * ``"linear"`` (Position Interpolation): ``theta_i / s``, i.e. position ``m``
      behaves as ``m / s``. Keys: ``factor`` (required, >= 1). Use it to fine-tune a
      model pretrained with window ``L`` to ``s * L``.
    * ``"dynamic"`` (dynamic NTK, no fine-tuning): plain RoPE with base
      ``base * (s * l / L - (s - 1)) ** (d / (d - 2))`` where ``L`` is
      ``max_position_embeddings`` and ``l = max(seq_len, L)`` (``seq_len=None`` means
      ``L``, i.e. plain RoPE up to rounding). Keys: ``factor`` (required).
    * ``"yarn"``: ``inv_freq = theta_i / s * (1 - e_i) + theta_i * e_i`` where the
      extrapolation weight ``e_i`` falls linearly from 1 to 0 between the correction
      dims ``low``/``high`` of ``beta_fast``/``beta_slow`` rotations over the original
      window (floored/ceiled when ``truncate``). Keys: ``factor`` (required; ``None``
      derives it as ``max_position_embeddings / original_max_position_embeddings``),
      ``original_max_position_embeddings`` (default ``max_position_embeddings``),
      ``beta_fast`` (default 32), ``beta_slow`` (default 1), ``truncate`` (default
      True), ``attention_factor`` (default ``0.1 * ln(s) + 1``, or
      ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` when both ``mscale`` and
      ``mscale_all_dim`` are non-zero, with ``mscale(s, m) = 0.1 * m * ln(s) + 1``).
    * ``"llama3"`` (Llama 3.1/3.2/3.3 checkpoints): with wavelength
      ``w_i = 2 * pi / theta_i`` and ``L = original_max_position_embeddings``: pairs
      with ``w_i < L / high_freq_factor`` keep ``theta_i``, pairs with
      ``w_i > L / low_freq_factor`` use ``theta_i / s``, the ones between blend them
      with ``a = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
      Keys: ``factor``, ``low_freq_factor``, ``high_freq_factor`` (required),
      ``original_max_position_embeddings`` (default ``max_position_embeddings``).
    * ``"longrope"`` (Phi-3 / Phi-3.5 / Phi-4-mini): ``theta_i / f_i`` with ``f`` the
      ``short_factor`` list, or the ``long_factor`` list when
      ``seq_len > original_max_position_embeddings`` (``seq_len=None`` means short).
      ``attention_factor`` defaults to ``sqrt(1 + ln s / ln L)`` (1 when ``s <= 1``),
      with ``s = factor`` or, when ``factor`` is absent/None,
      ``max_position_embeddings / original_max_position_embeddings`` (Phi-3 configs
      rely on this: pass the model's ``max_position_embeddings``). Keys:
      ``short_factor``, ``long_factor`` (required, ``rotary_dim // 2`` positive
      numbers each), ``original_max_position_embeddings`` (default
      ``max_position_embeddings``), ``factor``, ``attention_factor``.
    * ``"proportional"`` (Gemma 4's full-attention layers): the table covers the whole
      head, ``head_dim // 2`` pairs ``(i, i + head_dim / 2)`` as plain RoPE's, so
      ``rotary_dim`` is ``head_dim`` (even) whatever ``partial_rotary_factor`` says:
      the first ``n = int(partial_rotary_factor * head_dim // 2)`` pairs get
      ``base ** (-2i / head_dim) / s``, the other pairs frequency 0 (cos 1, sin 0: not
      rotated). Partial rotary of the other types rotates the first ``rotary_dim``
      features instead, pairs ``(i, i + rotary_dim / 2)``. Keys: ``factor`` (optional,
      default 1: Position Interpolation of the rotated pairs; transformers computes
      with it but its config validation warns that it does not know the key).

    Every type also accepts ``rope_theta`` and ``partial_rotary_factor`` keys (the
    transformers 5 ``rope_parameters`` form keeps them in the dict). As in transformers,
    where ``config.rope_parameters["rope_theta"]`` wins over ``config.rope_theta``, the
    dict's value is used. Since a call cannot tell an explicit ``base=10000.0`` from the
    default, the dict value silently replaces ``base`` when ``base`` is 10000.0 (and
    ``partial_rotary_factor`` when it is 1.0); any other argument value that disagrees
    with the dict raises ``ValueError`` rather than picking one.

    Deliberate differences from transformers, which only logs a warning for these:
    unknown keys, ``factor < 1``, ``beta_fast < beta_slow``,
    ``high_freq_factor <= low_freq_factor``, non-positive ``attention_factor`` and
    ``longrope`` lists of the wrong length are errors here. ``truncate=None`` behaves as
    in transformers: falsy, i.e. *no* truncation (only a missing key means True).

    Args:
        head_dim: Size of each attention head (> 0).
        base: RoPE base ``theta`` (10000 for LLaMA 1/2, 1e6 for Code Llama, 500000 for
            Llama 3). Must be > 0 (and != 1 for ``"yarn"``).
        scaling: ``None`` or a dict in transformers ``rope_scaling`` /
            ``rope_parameters`` form, e.g. ``{"rope_type": "linear", "factor": 4.0}``.
        max_position_embeddings: The model's ``config.max_position_embeddings``: the
            original window for ``"dynamic"``, the default
            ``original_max_position_embeddings`` for ``"yarn"``/``"llama3"``/
            ``"longrope"``, and the numerator of their derived ``factor``.
        partial_rotary_factor: Fraction of the head dim that rotates, in (0, 1].
        seq_len: Current sequence length (a positive int), used by ``"dynamic"`` and
            ``"longrope"``, ignored by the others. A one-element integer tensor (HF
            models pass ``position_ids.max() + 1``) is also accepted and follows
            transformers' tensor code path, which for ``"dynamic"`` computes the new
            base in float32 rather than float64 -- pass a tensor to match what a
            Hugging Face model computes in its forward, an int to match its
            ``__init__`` and ``ROPE_INIT_FUNCTIONS(config, seq_len=int)``. The tensor
            is read on the CPU.

    Returns:
        ``(inv_freq, attention_factor)``: a float32 CPU tensor of shape
        ``(rotary_dim // 2,)`` (``(head_dim // 2,)`` for ``"proportional"``) and a
        Python float.

    Raises:
        TypeError: an argument or scaling value has the wrong type.
        ValueError: an argument or scaling value is out of range or inconsistent; the
            message names it.
    """
    return _compute_inv_freq(head_dim, base=base, scaling=scaling, max_position_embeddings=max_position_embeddings,
                             partial_rotary_factor=partial_rotary_factor, seq_len=seq_len)


def _compute_inv_freq(head_dim, *, base, scaling, max_position_embeddings, partial_rotary_factor, seq_len,
                      fractional_seq_len: bool = False) -> tuple[torch.Tensor, float]:
    """:func:`compute_inv_freq`; with ``fractional_seq_len`` a floating-point one-element
    ``seq_len`` tensor is taken as it is (the length transformers reads from floating-point
    position_ids, Qwen3-Omni's: ``max(position_ids) + 1`` with its fraction)."""
    # ---- arguments -------------------------------------------------------------------
    head_dim = _as_int(head_dim, "head_dim")
    if head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim}")
    base = _as_number(base, "base")
    if base <= 0:
        raise ValueError(f"base (the RoPE theta) must be > 0, got {base}")
    max_position_embeddings = _as_int(max_position_embeddings, "max_position_embeddings")
    if max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be a positive int, got {max_position_embeddings}")
    partial_rotary_factor = _as_number(partial_rotary_factor, "partial_rotary_factor")
    if not 0 < partial_rotary_factor <= 1:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")
    seq_len = _check_seq_len(seq_len, fractional_seq_len)

    params = normalize_scaling(scaling)
    if params is None:
        params = {"rope_type": "default"}
    rope_type = params["rope_type"]

    if "rope_theta" in params:
        theta = params["rope_theta"]
        if base != _DEFAULT_BASE and base != theta:
            raise ValueError(
                f"base={base} conflicts with scaling['rope_theta']={theta}; pass the RoPE base only once"
            )
        base = theta
    if "partial_rotary_factor" in params:
        prf = params["partial_rotary_factor"]
        if partial_rotary_factor != _DEFAULT_PARTIAL_ROTARY_FACTOR and partial_rotary_factor != prf:
            raise ValueError(
                f"partial_rotary_factor={partial_rotary_factor} conflicts with "
                f"scaling['partial_rotary_factor']={prf}; pass it only once"
            )
        partial_rotary_factor = prf

    if rope_type == "proportional":
        # the table spans the whole head; partial_rotary_factor tells how many of its pairs rotate
        if head_dim < 2 or head_dim % 2:
            raise ValueError(
                f"rope_type 'proportional' needs an even head_dim >= 2 (its table has one entry per pair "
                f"(i, i + head_dim/2) of the whole head), got head_dim={head_dim}"
            )
        dim = head_dim
        params = {**params, "partial_rotary_factor": partial_rotary_factor}
    else:
        dim = int(head_dim * partial_rotary_factor)
        if dim < 2 or dim % 2:
            raise ValueError(
                f"rotary_dim = int(head_dim * partial_rotary_factor) = int({head_dim} * {partial_rotary_factor}) = "
                f"{dim} must be even and >= 2"
            )

    fn = _COMPUTE[rope_type]
    try:
        inv_freq, attention_factor = fn(params, dim, base, max_position_embeddings, seq_len)
    except OverflowError:  # Python float arithmetic past float64 (a dynamic base), or an int past torch's int64
        raise ValueError(
            f"rope_type {rope_type!r} with base={base} overflows float64 (or, for an int value, torch's int64); "
            "check base, the scaling values and seq_len"
        ) from None
    inv_freq = inv_freq.to(dtype=torch.float32)
    attention_factor = float(attention_factor)
    if not (math.isfinite(attention_factor) and attention_factor > 0):
        raise ValueError(
            f"the attention factor computed for rope_type {rope_type!r} is {attention_factor}; "
            "check scaling['mscale'] / scaling['mscale_all_dim'] / scaling['attention_factor']"
        )
    # (proportional's unrotated pairs are 0 by design; _proportional checks its rotated ones)
    lowest_ok = inv_freq >= 0 if rope_type == "proportional" else inv_freq > 0
    if not bool(torch.isfinite(inv_freq).all()) or not bool(lowest_ok.all()):
        raise ValueError(
            f"rope_type {rope_type!r} with base={base} gave non-finite or non-positive frequencies; "
            "check base and the scaling values"
        )
    return inv_freq, attention_factor


def _check_seq_len(seq_len: Any, fractional: bool = False) -> int | torch.Tensor | None:
    if seq_len is None:
        return None
    if isinstance(seq_len, torch.Tensor):
        if seq_len.numel() != 1:
            raise ValueError(f"seq_len must be an int or a one-element tensor, got a tensor of shape {tuple(seq_len.shape)}")
        if seq_len.is_meta:
            raise ValueError("seq_len must hold a value, got a tensor on the meta device")
        if fractional and seq_len.dtype.is_floating_point:
            seq_len = seq_len.detach().to(device="cpu").reshape(())
            if not (math.isfinite(float(seq_len)) and float(seq_len) >= 1):
                raise ValueError(f"seq_len must be finite and >= 1, got {float(seq_len)}")
            return seq_len
        if seq_len.dtype.is_floating_point or seq_len.dtype.is_complex or seq_len.dtype == torch.bool:
            raise TypeError(f"seq_len tensor must have an integer dtype, got {seq_len.dtype}")
        # int64: narrower ints would overflow against the window (transformers computes in the
        # tensor's dtype: an int32 length times an int factor can wrap there, where pirope's does not)
        seq_len = seq_len.detach().to(device="cpu", dtype=torch.int64).reshape(())
        if int(seq_len) < 1:
            raise ValueError(f"seq_len must be >= 1, got {int(seq_len)}")
        return seq_len
    seq_len = _as_int(seq_len, "seq_len")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return seq_len


def _derived_factor(rope_type: str, max_position_embeddings: int, original: int) -> float:
    factor = max_position_embeddings / original
    if factor < 1:
        raise ValueError(
            f"scaling['factor'] (rope_type {rope_type!r}) is None or absent, so it is derived as "
            f"max_position_embeddings / original_max_position_embeddings = {max_position_embeddings} / {original} "
            f"= {factor} < 1; pass the model's max_position_embeddings or an explicit factor"
        )
    return factor


# The functions below repeat transformers' float operations literally (same Python
# number types, same torch ops, same order) so that the results are bit-identical.


def _default(params, dim, base, max_position_embeddings, seq_len):
    # LlamaRotaryEmbedding / GPTNeoXRotaryEmbedding.compute_default_rope_parameters
    attention_factor = 1.0
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device="cpu", dtype=torch.float) / dim))
    return inv_freq, attention_factor


def _linear(params, dim, base, max_position_embeddings, seq_len):
    # _compute_linear_scaling_rope_parameters
    factor = params["factor"]
    attention_factor = 1.0
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device="cpu", dtype=torch.int64).to(dtype=torch.float) / dim))
    inv_freq /= factor
    return inv_freq, attention_factor


def _dynamic(params, dim, base, max_position_embeddings, seq_len):
    # _compute_dynamic_ntk_parameters
    if dim <= 2:
        raise ValueError(
            f"rope_type 'dynamic' needs rotary_dim >= 4 (its base exponent is d / (d - 2)), got rotary_dim={dim}"
        )
    factor = params["factor"]
    attention_factor = 1.0
    if seq_len is None:
        seq_len = max_position_embeddings
    elif isinstance(seq_len, torch.Tensor):
        seq_len = torch.maximum(
            seq_len,
            torch.tensor(max_position_embeddings, dtype=seq_len.dtype, device=seq_len.device),
        )
    else:
        seq_len = max(seq_len, max_position_embeddings)
    base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device="cpu", dtype=torch.int64).to(dtype=torch.float) / dim))
    return inv_freq, attention_factor


def _yarn(params, dim, base, max_position_embeddings, seq_len):
    # _compute_yarn_parameters
    if base == 1:
        raise ValueError("rope_type 'yarn' needs base != 1 (its correction dims divide by ln(base))")
    factor = params["factor"]
    attention_factor = params.get("attention_factor")
    mscale = params.get("mscale")
    mscale_all_dim = params.get("mscale_all_dim")
    original_max_position_embeddings = params.get("original_max_position_embeddings", max_position_embeddings)

    if factor is None:
        factor = _derived_factor("yarn", max_position_embeddings, original_max_position_embeddings)

    def get_mscale(scale, mscale=1):
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            denominator = get_mscale(factor, mscale_all_dim)
            if denominator == 0:
                raise ValueError(
                    "scaling['mscale_all_dim'] (rope_type 'yarn') gives a zero attention-factor denominator "
                    f"0.1 * mscale_all_dim * ln(factor) + 1 for factor={factor}, mscale_all_dim={mscale_all_dim}"
                )
            attention_factor = float(get_mscale(factor, mscale) / denominator)
        else:
            attention_factor = get_mscale(factor)

    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def find_correction_dim(num_rotations, dim, base, max_position_embeddings):
        return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings, truncate):
        try:
            low = find_correction_dim(low_rot, dim, base, max_position_embeddings)
            high = find_correction_dim(high_rot, dim, base, max_position_embeddings)
        except ValueError:  # math.log(0): a rotation count so large that the window over it is 0
            low = high = math.nan
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(
                f"scaling['beta_fast']={beta_fast} / scaling['beta_slow']={beta_slow} (rope_type 'yarn') give a "
                f"non-finite correction range ({low}, {high}); use rotation counts of a normal size"
            )
        if truncate:
            low = math.floor(low)
            high = math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(min, max, dim):  # noqa: A002 - names as in transformers
        if min == max:
            max += 0.001  # Prevent singularity
        linear_func = (torch.arange(dim, device="cpu", dtype=torch.float32) - min) / (max - min)
        ramp_func = torch.clamp(linear_func, 0, 1)
        return ramp_func

    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)

    # transformers: config.rope_parameters.get("truncate", True) -- None is falsy.
    truncate = params.get("truncate", True)
    low, high = find_correction_range(beta_fast, beta_slow, dim, base, original_max_position_embeddings, truncate)

    inv_freq_extrapolation_factor = 1 - linear_ramp_factor(low, high, dim // 2).to(dtype=torch.float)
    inv_freq = (
        inv_freq_interpolation * (1 - inv_freq_extrapolation_factor)
        + inv_freq_extrapolation * inv_freq_extrapolation_factor
    )
    return inv_freq, attention_factor


def _longrope(params, dim, base, max_position_embeddings, seq_len):
    # _compute_longrope_parameters
    long_factor = params["long_factor"]
    short_factor = params["short_factor"]
    for key, values in (("short_factor", short_factor), ("long_factor", long_factor)):
        if len(values) != dim // 2:
            raise ValueError(
                f"scaling[{key!r}] (rope_type 'longrope') must have rotary_dim // 2 = {dim // 2} entries "
                f"(one per rotary pair), got {len(values)}"
            )
    factor = params.get("factor")
    attention_factor = params.get("attention_factor")
    original_max_position_embeddings = params.get("original_max_position_embeddings", max_position_embeddings)

    if attention_factor is None:
        if factor is None:  # (used for nothing else: with an attention factor given, none is derived)
            factor = _derived_factor("longrope", max_position_embeddings, original_max_position_embeddings)
        if factor <= 1.0:
            attention_factor = 1.0
        else:
            if original_max_position_embeddings == 1:
                raise ValueError(
                    "scaling['original_max_position_embeddings'] (rope_type 'longrope') must be > 1 to derive "
                    "the attention factor sqrt(1 + ln(factor) / ln(original_max_position_embeddings))"
                )
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))

    if seq_len and seq_len > original_max_position_embeddings:
        ext_factors = torch.tensor(long_factor, device="cpu", dtype=torch.float32)
    else:
        ext_factors = torch.tensor(short_factor, device="cpu", dtype=torch.float32)
    inv_freq_shape = torch.arange(0, dim, 2, device="cpu", dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (ext_factors * base**inv_freq_shape)
    return inv_freq, attention_factor


def _llama3(params, dim, base, max_position_embeddings, seq_len):
    # _compute_llama3_parameters
    attention_factor = 1.0
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device="cpu", dtype=torch.int64).to(dtype=torch.float) / dim))

    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params.get("original_max_position_embeddings", max_position_embeddings)

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    inv_freq_llama = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    return inv_freq_llama, attention_factor


def _proportional(params, head_dim, base, max_position_embeddings, seq_len):
    # _compute_proportional_rope_parameters: dim is the whole head_dim here (see compute_inv_freq)
    factor = params.get("factor", 1.0)
    rope_proportion = params["partial_rotary_factor"]
    attention_factor = 1.0
    rope_angles = int(rope_proportion * head_dim // 2)
    inv_freq_rotated = 1.0 / (
        base ** (torch.arange(0, 2 * rope_angles, 2, device="cpu", dtype=torch.int64).to(dtype=torch.float) / head_dim)
    )
    nope_angles = head_dim // 2 - rope_angles
    if nope_angles > 0:
        inv_freq = torch.cat((inv_freq_rotated, torch.zeros(nope_angles, device="cpu", dtype=torch.float32)), dim=0)
    else:
        inv_freq = inv_freq_rotated
    inv_freq /= factor
    if not bool((inv_freq[:rope_angles] > 0).all()):
        raise ValueError(
            f"rope_type 'proportional' with base={base} and factor={factor} gives rotated pairs a frequency of 0 "
            "or less (float32 underflow); check base and scaling['factor']"
        )
    return inv_freq, attention_factor


_COMPUTE = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
    "longrope": _longrope,
    "proportional": _proportional,
}
