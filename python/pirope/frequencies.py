"""Frequency tables: rope_frequencies (inverse frequencies of plain RoPE, Position
Interpolation and its successors) and rope_cos_sin (cos/sin tables for the ops)."""

from __future__ import annotations

import contextlib
import weakref

import torch

from . import _checks
from .scaling import _compute_inv_freq, compute_inv_freq, normalize_scaling

__all__ = ["rope_frequencies", "rope_cos_sin", "rows_of_positions", "FrequencyPlan"]

_FLOAT32_MAX = torch.finfo(torch.float32).max


def tables_outside_inference_mode():
    """Context for building tables that are cached across calls: a table made inside
    ``torch.inference_mode()`` would be an inference tensor, which a later training
    step could not save for backward."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def rope_frequencies(
    head_dim: int,
    *,
    base: float = 10000.0,
    scaling: dict | None = None,
    max_position_embeddings: int = 2048,
    partial_rotary_factor: float = 1.0,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies ``theta_i`` of a (scaled) rotary embedding.

    Args:
        head_dim: features per attention head.
        base: RoPE base (``rope_theta``), 10000 for LLaMA.
        scaling: ``None`` for plain RoPE, or a Hugging Face ``rope_scaling`` dict, e.g.
            ``{"rope_type": "linear", "factor": 4.0}`` for Position Interpolation
            (positions divided by 4: a 2k model extended to 8k). Also ``"dynamic"``,
            ``"yarn"``, ``"llama3"``, ``"longrope"`` and ``"proportional"`` (Gemma 4)
            with Hugging Face's keys; ``"type"`` is accepted as an alias of
            ``"rope_type"``.
        max_position_embeddings: the model's context window (used by dynamic NTK, as the
            default ``original_max_position_embeddings`` of yarn, llama3 and longrope, and
            to derive yarn's / longrope's ``factor`` when the dict's is ``None``).
        partial_rotary_factor: fraction of ``head_dim`` that rotates.
        seq_len: current sequence length, for the length-dependent scalings.

    Returns:
        ``(inv_freq, attention_factor)``: float32 ``(rotary_dim // 2,)`` tensor equal to
        transformers' ``ROPE_INIT_FUNCTIONS`` for the same configuration, and the factor
        cos and sin are multiplied by (1.0 except for yarn and longrope). With
        ``"proportional"`` the table covers the whole head (``(head_dim // 2,)``,
        rotary_dim = head_dim), as transformers builds it: its first
        ``int(partial_rotary_factor * head_dim // 2)`` pairs rotate, the others have
        frequency 0 (cos 1, sin 0), so :func:`pirope.apply_rope` passes them through
        unchanged.
    """
    with _checks.prefixed("rope_frequencies"):
        return compute_inv_freq(
            head_dim,
            base=base,
            scaling=scaling,
            max_position_embeddings=max_position_embeddings,
            partial_rotary_factor=partial_rotary_factor,
            seq_len=seq_len,
        )


def rope_cos_sin(
    inv_freq: torch.Tensor,
    positions: int | torch.Tensor,
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for :func:`pirope.apply_rope`.

    Args:
        inv_freq: ``(rotary_dim // 2,)`` inverse frequencies (see rope_frequencies).
        positions: an int ``P`` (positions ``0..P-1``) or a 1-D integer tensor.
        attention_factor: multiplies cos and sin (YaRN / LongRoPE).

    Returns:
        ``(cos, sin)``, float32, shape ``(len(positions), rotary_dim // 2)`` on
        ``inv_freq``'s device. Angles ``position * inv_freq`` are computed in float64,
        so the tables stay accurate at long positions (float32 angles lose about
        ``position * 6e-8`` radians).
    """
    op = "rope_cos_sin"
    _checks.tensor(op, "inv_freq", inv_freq)
    if inv_freq.dim() != 1:
        raise ValueError(f"{op}: inv_freq must be 1-D (rotary_dim // 2,), got shape {tuple(inv_freq.shape)}")
    if not inv_freq.is_floating_point():
        raise TypeError(f"{op}: inv_freq must be a floating-point tensor, got {inv_freq.dtype}")
    factor = _checks.number(op, "attention_factor", attention_factor, positive=True)
    if factor > _FLOAT32_MAX:
        raise ValueError(f"{op}: attention_factor must be at most {_FLOAT32_MAX} (the tables are float32), "
                         f"got {factor}")
    # a host-side check only where it is free: not on a device (a sync), meta or fake
    # tensors (no values) or under torch.compile (rope_frequencies validates its own)
    if (inv_freq.device.type == "cpu" and not torch.compiler.is_compiling()
            and not isinstance(inv_freq, torch._subclasses.FakeTensor)
            and not bool(torch.isfinite(inv_freq).all())):
        raise ValueError(f"{op}: inv_freq must be finite, got NaN or inf in {tuple(inv_freq.shape)} values")
    device = inv_freq.device
    if isinstance(positions, torch.Tensor):
        _checks.tensor(op, "positions", positions)
        if positions.dim() != 1:
            raise ValueError(f"{op}: positions must be an int or a 1-D tensor, got shape {tuple(positions.shape)}")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"{op}: positions must be an integer tensor, got {positions.dtype}")
        if positions.device.type == "meta" and device.type != "meta":
            raise ValueError(f"{op}: positions must hold values to make {device} tables from, got a meta tensor")
        n = positions.shape[0]
    else:
        n = _checks.integer(op, "positions", positions, minimum=0)
    try:
        pos = (positions.to(device=device, dtype=torch.float64) if isinstance(positions, torch.Tensor)
               else torch.arange(n, device=device, dtype=torch.float64))
        return _cos_sin_of(pos, inv_freq, factor)
    except RuntimeError as e:  # an allocation failure names no argument
        if not (isinstance(e, torch.OutOfMemoryError) or "allocate" in str(e) or "size calculation overflow" in str(e)):
            raise
        raise RuntimeError(f"{op}: the tables of {n} positions x {inv_freq.shape[0]} pairs do not fit in "
                           f"{device} memory: {str(e).splitlines()[0]}") from e


def _cos_sin_of(pos: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin ``(len(pos), len(inv_freq))`` of the float64 angles pos * inv_freq, times factor."""
    angles = pos.to(device=inv_freq.device, dtype=torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    cos = angles.cos()
    sin = angles.sin()
    if factor != 1.0:
        cos = cos * factor
        sin = sin * factor
    return cos.to(torch.float32), sin.to(torch.float32)


class PositionsMemo:
    """A value read from a ``position_ids`` tensor (its range, say), kept for that tensor
    while it lives unmodified (same object, same version counter) where reading it is a
    device sync; on the CPU read every call (cheap, and it sees writes torch cannot track,
    e.g. through NumPy). Copies and pickles start empty."""

    def __init__(self):
        self._seen = None  # (weakref to position_ids, its version, the value)

    def get(self, position_ids: torch.Tensor, read):
        version = None
        if position_ids.device.type != "cpu":
            try:
                version = position_ids._version
            except RuntimeError:  # inference tensors have no version counter: read every time
                version = None
        seen = self._seen
        if seen is not None and version is not None and seen[0]() is position_ids and seen[1] == version:
            return seen[2]
        value = read(position_ids)
        self._seen = (weakref.ref(position_ids), version, value) if version is not None else None
        return value

    def __getstate__(self):
        return {"_seen": None}  # a weak reference: neither picklable nor meaningful elsewhere


def rows_of_positions(inv_freq: torch.Tensor, position_ids: torch.Tensor, attention_factor: float = 1.0):
    """``(cos, sin, index)``: the table rows of exactly the positions in
    ``position_ids`` (any shape, any values, negative ones too) and the ids that index
    them, ``0..n-1`` in ``position_ids``' shape. The same float64 angles as a full
    table's rows, so the same values; for calls too sparse for a table and for traced
    code that cannot read the largest position."""
    cos, sin = rope_cos_sin(inv_freq, position_ids.reshape(-1), attention_factor)
    index = torch.arange(position_ids.numel(), device=position_ids.device).view(position_ids.shape)
    return cos, sin, index


def rows_of_sectioned_positions(inv_freq: torch.Tensor, position_ids: torch.Tensor, pair_rows,
                                attention_factor: float = 1.0):
    """``(cos, sin, index)`` as :func:`rows_of_positions` gives, for multimodal RoPE (mRoPE:
    Qwen2-VL and its successors), where a token has one position per section (temporal,
    height, width): ``position_ids`` is ``(sections, *shape)`` and pair ``j`` of a token turns
    by ``inv_freq[j]`` times its position in section ``pair_rows[j]``. One row per token of
    ``shape``; the same float64 angles as a table's rows. Positions may be floating-point
    (Qwen3-Omni times video and audio tokens in fractions of a position)."""
    sections, n = position_ids.shape[0], position_ids[0].numel()
    pair_rows = tuple(pair_rows)
    if len(pair_rows) != inv_freq.numel() or not all(0 <= r < sections for r in pair_rows):
        raise ValueError(f"pair_rows must give one section in [0, {sections}) for each of the {inv_freq.numel()} "
                         f"pairs, got {list(pair_rows)}")
    cos, sin = _cos_sin_of(position_ids.reshape(-1), inv_freq, attention_factor)  # (sections * n, pairs)
    rows = torch.tensor(pair_rows, dtype=torch.int64, device=cos.device)
    # row of token t for pair j: section pair_rows[j]'s row of t
    pick = rows[None, :] * n + torch.arange(n, device=cos.device)[:, None]
    index = torch.arange(n, device=position_ids.device).view(position_ids.shape[1:])
    return cos.gather(0, pick), sin.gather(0, pick), index


class FrequencyPlan:
    """Which frequencies a sequence of a given length uses, for one RoPE configuration.

    Most scalings have one table. The length-dependent ones pick theirs from the
    current sequence length ``n`` (the largest position + 1): "dynamic" NTK recomputes
    its base for every ``n`` above the original window, "longrope" switches from the
    short to the long factors above ``original_max_position_embeddings``, and both use
    the original table inside the window (so a long request never changes the result of
    a later short one). Shared by :class:`pirope.RotaryEmbedding` and the Hugging Face
    integration. The configuration is validated on construction.
    """

    def __init__(self, head_dim: int, *, max_position_embeddings: int, base: float = 10000.0,
                 scaling: dict | None = None, partial_rotary_factor: float = 1.0):
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.scaling = normalize_scaling(scaling)
        self.base = base
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_type = self.scaling["rope_type"] if self.scaling else "default"
        # longrope with short_factor == long_factor (how Phi-3-style configs write PI) has
        # one table for every length: static, so torch.compile needs no host read of it
        self.length_dependent = self.rope_type == "dynamic" or (
            self.rope_type == "longrope"
            and list(self.scaling["short_factor"]) != list(self.scaling["long_factor"]))
        self.original_window = max_position_embeddings
        if self.rope_type == "longrope":
            self.original_window = int(self.scaling.get("original_max_position_embeddings",
                                                        max_position_embeddings))
        #: ``(inv_freq, attention_factor)`` of sequences inside the original window.
        self.static = self.frequencies(None)  # also validates the configuration
        # the values in effect: a transformers 5 ``rope_parameters`` dict carries its own
        if self.scaling:
            self.base = self.scaling.get("rope_theta", base)
            self.partial_rotary_factor = self.scaling.get("partial_rotary_factor", partial_rotary_factor)

    def key(self, length: int | float):
        """Identifies the table of a sequence of this length: None for the original one,
        "long" for longrope's long factors, the length itself for dynamic NTK."""
        if not self.length_dependent or length <= self.original_window:
            return None
        return "long" if self.rope_type == "longrope" else length

    def table_rows(self, key, needed: int, count: int, cached_rows: int) -> int | None:
        """Rows of the table to build for a call whose largest position is ``needed - 1``
        and which has ``count`` positions, when the cached table of this ``key`` has
        ``cached_rows`` (0: none) and is too short; ``None`` when the positions are too
        sparse for a table (a huge offset, a padding sentinel like 2**31 - 1, a "dynamic"
        decode step past the window, whose table would serve this length only): build
        the rows of the call's own positions then, so memory and time stay proportional
        to the call, never to the largest position. Tables grow to at least twice their
        size, so decoding past them rebuilds a table only O(log n) times."""
        window = self.max_position_embeddings  # (a key of a length-dependent table implies needed > window)
        if needed > max(2 * cached_rows, window, 4 * count):
            return None
        return max(needed, window, 2 * cached_rows)

    @torch.compiler.disable
    def frequencies(self, key) -> tuple[torch.Tensor, float]:
        """``(inv_freq, attention_factor)`` for a key from :meth:`key`. Always eager, also
        under torch.compile (where only the length-dependent types call it, and their
        graph breaks on the length anyway): traced, inductor's float32 pow moved dynamic
        NTK's frequencies by up to 1.5e-7, 2e-3 in the output at 9k positions, and the
        table built from them stayed cached for later eager calls."""
        if key is None:
            seq_len = None
        elif key == "long":
            seq_len = self.original_window + 1
        else:
            # dynamic NTK: the length as a tensor, as transformers' forward passes it
            # (its new base is then computed in float32); on the CPU whatever the default
            # device (a meta one has no value to read). A float length (floating-point
            # positions, Qwen3-Omni's) is float32, as transformers reads it from them
            seq_len = torch.tensor(key, device="cpu", dtype=torch.float32 if isinstance(key, float) else None)
        return _compute_inv_freq(
            self.head_dim, base=self.base, scaling=self.scaling,
            max_position_embeddings=self.max_position_embeddings,
            partial_rotary_factor=self.partial_rotary_factor, seq_len=seq_len, fractional_seq_len=True)
