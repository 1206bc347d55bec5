"""The rotary embeddings a patched model's decoder uses in place of transformers' ``rotary_emb``:
float32 cos/sin tables shared by all layers, handed to them as :class:`RopeTables`."""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
from torch import nn

import pirope
from pirope.frequencies import (FrequencyPlan, PositionsMemo, rows_of_positions, rows_of_sectioned_positions,
                                tables_outside_inference_mode)

from .families import _Family
from .layout import _base_model, _head_dim
from .rope_parameters import _ntk_alpha_as_default, _rope_setup


class RopeTables(NamedTuple):
    """What the patched ``rotary_emb`` hands every decoder layer (as its
    ``position_embeddings``): float32 ``cos``/``sin`` tables ``(positions, rotary_dim //
    2)``, the ``position_ids`` they are indexed with, and ``packed``: whether the model's
    positions hold several sequences back to back (some position is not its predecessor's
    + 1, which is how transformers tells packed sequences), ``None`` where that is not known
    (under ``torch.compile``)."""

    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor | None
    packed: bool | None = False


def _jumps(position_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Whether some position is not its predecessor's + 1 along the sequence (packed
    sequences), as a 0-d tensor of ``like``'s dtype."""
    if position_ids.dim() == 0 or position_ids.shape[-1] < 2:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return (torch.diff(position_ids, dim=-1) != 1).any().to(like.dtype)


def _position_summary(position_ids: torch.Tensor) -> tuple[int, int, bool]:
    """Smallest and largest position, and whether some position is not its predecessor's
    + 1 along the sequence (packed sequences), read in one host sync."""
    low, high = torch.aminmax(position_ids)
    low, high, jump = torch.stack([low, high, _jumps(position_ids, low)]).tolist()
    return low, high, bool(jump)


def _sectioned_summary(position_ids: torch.Tensor) -> tuple[int, int, bool, bool]:
    """For mRoPE's ``(sections, batch, seqlen)`` position_ids: smallest and largest position of
    any section, whether the first section's are packed (see _position_summary) and whether
    every section holds the same positions (text), read in one host sync."""
    low, high = torch.aminmax(position_ids)
    agree = (position_ids == position_ids[:1]).all().to(low.dtype)
    low, high, jump, agree = torch.stack([low, high, _jumps(position_ids[0], low), agree]).tolist()
    return low, high, bool(jump), bool(agree)


class PiropeRotaryEmbedding(nn.Module):
    """Drop-in replacement of a Hugging Face model's ``rotary_emb``: one float32 cos/sin
    table for all layers, built with :func:`pirope.rope_frequencies` /
    :func:`pirope.rope_cos_sin`, cached per device and grown as needed.

    ``forward(x, position_ids)`` returns a :class:`RopeTables` (not Hugging Face's
    per-token ``(cos, sin)``); only attention modules patched by :func:`patch_rope`
    understand it. It holds no buffers, so ``model.to(dtype)`` leaves the table in
    float32 and ``state_dict`` is unchanged.
    """

    def __init__(
        self,
        head_dim: int,
        *,
        max_position_embeddings: int,
        base: float = 10000.0,
        scaling: dict | None = None,
        partial_rotary_factor: float = 1.0,
    ):
        super().__init__()
        self._plan = FrequencyPlan(head_dim, max_position_embeddings=max_position_embeddings, base=base,
                                   scaling=scaling, partial_rotary_factor=partial_rotary_factor)
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.base = self._plan.base  # the values in effect (a scaling dict may carry its own)
        self.scaling = self._plan.scaling
        self.partial_rotary_factor = self._plan.partial_rotary_factor
        self.rope_type = self._plan.rope_type
        self._static = self._plan.static
        self._cache: dict[Any, tuple[Any, torch.Tensor, torch.Tensor]] = {}  # device -> (key, cos, sin)
        # the range and packing of the last position_ids (a device sync to read; shared by the
        # embeddings of one PiropeLayerTypeRotaryEmbedding: one read per model forward)
        self._positions = PositionsMemo()

    def __setstate__(self, state):
        state.setdefault("_positions", PositionsMemo())  # pickled by an older pirope
        super().__setstate__(state)

    @property
    def rotary_dim(self) -> int:
        return 2 * self._static[0].numel()

    @property
    def attention_factor(self) -> float:
        return self._static[1]

    # Read-only views under Hugging Face's names, for code that inspects model.model.rotary_emb
    @property
    def inv_freq(self) -> torch.Tensor:
        """The original (length-independent) float32 inverse frequencies."""
        return self._static[0]

    @property
    def attention_scaling(self) -> float:
        return self._static[1]

    def tables(self, length: int, device, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """float32 ``(cos, sin)`` covering positions ``0 .. length-1`` (at least), for a
        sequence whose largest position is ``length - 1``; ``None`` when a call of
        ``count`` positions is too sparse for a table (see ``FrequencyPlan.table_rows``)."""
        device = torch.device(device)
        key = self._plan.key(length)
        hit = self._cache.get(device)
        cached = hit[1].shape[0] if hit is not None and hit[0] == key else 0
        if cached >= length:
            return hit[1], hit[2]
        size = self._plan.table_rows(key, length, length if count is None else count, cached)
        if size is None:
            return None
        with tables_outside_inference_mode():  # cached: later training steps save it for backward
            inv_freq, attention_factor = self._static if key is None else self._plan.frequencies(key)
            cos, sin = pirope.rope_cos_sin(inv_freq.to(device), size, attention_factor)
        self._cache[device] = (key, cos, sin)
        return cos, sin

    def _own_rows(self, key, position_ids: torch.Tensor, device, packed: bool | None) -> RopeTables:
        inv_freq, attention_factor = self._static if key is None else self._plan.frequencies(key)
        return RopeTables(*rows_of_positions(inv_freq.to(device), position_ids, attention_factor), packed)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> RopeTables:
        if position_ids is not None and position_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"pirope rotary embedding: position_ids must be int32 or int64, got {position_ids.dtype}")
        if (torch.compiler.is_compiling() and not self._plan.length_dependent
                and position_ids is not None and position_ids.numel() > 0):
            # Under torch.compile the table's length (the largest position, a value on
            # the device) would need a host sync, which breaks the graph: build the rows
            # of exactly these positions instead. dynamic/longrope need that length anyway.
            # Whether they are packed is not known then either.
            return self._own_rows(None, position_ids, x.device, None)
        summary = None
        if position_ids is not None and position_ids.numel() > 0:
            summary = self._positions.get(position_ids, _position_summary)
        return self._tables_for(x, position_ids, summary)

    def _tables_for(self, x: torch.Tensor, position_ids: torch.Tensor | None, summary) -> RopeTables:
        """The tables of a call whose positions have ``(low, high, packed) = summary`` (None:
        no positions, token i at position i)."""
        packed = False
        if summary is None:
            length = x.shape[1] if x.dim() >= 2 else 1
            count = None
        else:
            low, high, packed = summary
            length, count = high + 1, position_ids.numel()
            if low < 0:  # transformers rotates them by negative angles (e.g. cumsum - 1 at padding)
                return self._own_rows(self._plan.key(max(length, 1)), position_ids, x.device, packed)
        tables = self.tables(max(length, 1), x.device, count)
        if tables is None:  # a huge offset, a padding sentinel, a dynamic decode step
            return self._own_rows(self._plan.key(length), position_ids, x.device, packed)
        return RopeTables(tables[0], tables[1], position_ids, packed)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
                f"max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
                f"scaling={self.scaling}")


_MROPE_SECTIONS = 3  # mRoPE's position sections: temporal, height, width


class PiropeMultimodalRotaryEmbedding(PiropeRotaryEmbedding):
    """Drop-in replacement of the ``rotary_emb`` of a model with multimodal RoPE (mRoPE:
    Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V, PaddleOCR-VL), whose ``position_ids`` are ``(3, batch,
    seqlen)``: a temporal, height and width position per token (the same three for text,
    different ones for image and video tokens). Pair ``j`` of the table turns by the
    position in section ``pair_rows[j]`` (what transformers' ``recomposition_frequencies``
    of the model's own rotary embedding does; read from it when patching).

    Where the three sections agree (text) this is plain RoPE on those positions: the
    cached table, as :class:`PiropeRotaryEmbedding`. Otherwise the :class:`RopeTables`
    hold one row per token (float64 angles, rounded once) and ``position_ids`` index them
    (``0 .. batch * seqlen - 1``), which every pirope op and both attention paths take as
    they take a table. ``(batch, seqlen)`` position_ids (or one section) mean text.
    Floating-point position_ids (Qwen3-Omni's, which time video and audio tokens in fractions of
    a position) always get the rows of their own positions.
    """

    def __init__(self, head_dim: int, *, pair_rows, **kwargs):
        super().__init__(head_dim, **kwargs)
        self.pair_rows = tuple(int(r) for r in pair_rows)
        if len(self.pair_rows) != self.rotary_dim // 2 or not all(0 <= r < _MROPE_SECTIONS for r in self.pair_rows):
            raise ValueError(f"pair_rows must give a section in [0, {_MROPE_SECTIONS}) for each of the "
                             f"{self.rotary_dim // 2} rotary pairs, got {list(pair_rows)}")

    def _sectioned_rows(self, key, position_ids: torch.Tensor, device, packed: bool | None) -> RopeTables:
        inv_freq, attention_factor = self._static if key is None else self._plan.frequencies(key)
        return RopeTables(*rows_of_sectioned_positions(inv_freq.to(device), position_ids, self.pair_rows,
                                                       attention_factor), packed)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> RopeTables:
        if position_ids is None or position_ids.dim() != 3:
            return super().forward(x, position_ids)
        if position_ids.shape[0] not in (1, _MROPE_SECTIONS):
            raise ValueError(
                f"pirope rotary embedding: position_ids of multimodal RoPE must be (batch, seqlen) or "
                f"({_MROPE_SECTIONS}, batch, seqlen) (temporal, height, width), got shape {tuple(position_ids.shape)}")
        floating = position_ids.is_floating_point()
        if floating:  # every section, for the rows of their own positions
            position_ids = position_ids.expand(_MROPE_SECTIONS, *position_ids.shape[1:])
        elif position_ids.shape[0] == 1 or position_ids.numel() == 0:
            return super().forward(x, position_ids[0])
        elif position_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"pirope rotary embedding: position_ids must be int32, int64 or floating-point, got "
                            f"{position_ids.dtype}")
        if torch.compiler.is_compiling() and not self._plan.length_dependent:
            return self._sectioned_rows(None, position_ids, x.device, None)  # (as PiropeRotaryEmbedding)
        if floating:
            # the length "dynamic" and "longrope" read: transformers' max(position_ids) + 1 in the
            # positions' dtype, a fraction included (its dynamic base is computed from it)
            low, high, length = (0, 0, 1)
            if position_ids.numel():
                low, high = torch.aminmax(position_ids)
                low, high, length = torch.stack([low, high, high + 1]).tolist()
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"pirope rotary embedding: position_ids must be finite, got values in [{low}, {high}]")
            return self._sectioned_rows(self._plan.key(max(length, 1)), position_ids, x.device, False)
        low, high, packed, agree = self._positions.get(position_ids, _sectioned_summary)
        if agree:  # text: plain RoPE on those positions
            return self._tables_for(x, position_ids[0], (low, high, packed))
        # the packing of the call is the text positions' (see _Family.mrope), read by the layers
        return self._sectioned_rows(self._plan.key(max(high + 1, 1)), position_ids, x.device, False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pair_rows={self.pair_rows}"


class PiropeLayerTypeRotaryEmbedding(nn.Module):
    """Drop-in replacement of the ``rotary_emb`` of a model with RoPE parameters per layer
    type (Gemma 3, OLMo 3): one :class:`PiropeRotaryEmbedding` per layer type, in
    ``by_type`` (a ``ModuleDict`` keyed by layer type, e.g. ``"full_attention"``,
    ``"sliding_attention"``).

    ``forward(x, position_ids, layer_type)`` returns the :class:`RopeTables` of that layer
    type's embedding: the model calls it once per layer type and hands each layer those of
    its ``config.layer_types[i]``, as it does with Hugging Face's per-type ``(cos, sin)``.
    Like :class:`PiropeRotaryEmbedding` it holds no buffers.
    """

    def __init__(self, by_type: dict[str, PiropeRotaryEmbedding]):
        super().__init__()
        if not by_type:
            raise ValueError("PiropeLayerTypeRotaryEmbedding needs at least one layer type")
        self.by_type = nn.ModuleDict(by_type)
        self.layer_types = tuple(sorted(by_type))
        # the model calls each type's embedding with the same position_ids: read them once
        positions = PositionsMemo()
        for rotary in by_type.values():
            rotary._positions = positions

    @property
    def max_position_embeddings(self) -> int:
        return max(r.max_position_embeddings for r in self.by_type.values())

    @max_position_embeddings.setter
    def max_position_embeddings(self, value: int) -> None:
        for r in self.by_type.values():
            r.max_position_embeddings = value

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                layer_type: str | None = None) -> RopeTables:
        if layer_type not in self.by_type:
            raise ValueError(
                f"pirope rotary embedding: layer_type must be one of {', '.join(map(repr, self.layer_types))}, "
                f"got {layer_type!r}")
        return self.by_type[layer_type](x, position_ids)


def _rotary_embedding(model, model_type: str, family: _Family, attns, params: dict) -> PiropeRotaryEmbedding:
    # (config.head_dim read only there: a per-layer attribute of Gemma 4's configs raises when read globally)
    stray = getattr(model.config, "head_dim", None) if family.head_dim_attr == "head_size" else None
    if stray and stray != _head_dim(attns[0], family):
        # GPT-NeoX: the attention's heads are hidden_size / num_attention_heads, where its rotary
        # embedding reads a config.head_dim first (GPTNeoXConfig has none): the table transformers
        # would build does not fit the heads, and no rotation pirope computes is that model's
        raise ValueError(
            f"model: config.head_dim = {stray} is not the head size of model_type {model_type!r}'s attention "
            f"(hidden_size / num_attention_heads = {_head_dim(attns[0], family)}), which transformers' rotary "
            "embedding would read instead of it; its config class has no head_dim: remove it from the config")
    params = _ntk_alpha_as_default(model.config, family, params, _head_dim(attns[0], family))
    head_dim, theta, pirope_scaling, partial = _rope_setup(model, model_type, family, params,
                                                           _head_dim(attns[0], family))
    if family.fixed_rotary_dim and pirope_scaling is not None and pirope_scaling["rope_type"] == "proportional":
        raise ValueError(
            f"scaling: rope_type 'proportional' (a table over the whole head) is not supported by model_type "
            f"{model_type!r}, whose attention rotates its first int(head_dim * partial_rotary_factor) features "
            "whatever the table (transformers fails on it too)")
    if family.default_spans_head and pirope_scaling is None and partial != 1.0:
        raise ValueError(
            f"scaling: rope_type 'default' of model_type {model_type!r} is a table over the whole head in transformers "
            f"(its partial_rotary_factor {partial} ignored), which does not fit the rotary part of its heads "
            "(transformers fails on it too); plain RoPE on the rotary part is {'rope_type': 'linear', 'factor': 1.0}")
    kwargs = dict(max_position_embeddings=model.config.max_position_embeddings, base=theta, scaling=pirope_scaling,
                  partial_rotary_factor=partial)
    if family.mrope:
        rotary = getattr(_base_model(model), family.rotary_name)
        pair_rows = _mrope_pair_rows(model_type, family, rotary, int(head_dim * partial) // 2)
        return PiropeMultimodalRotaryEmbedding(head_dim, pair_rows=pair_rows, **kwargs)
    return PiropeRotaryEmbedding(head_dim, **kwargs)


def _rotary_embeddings_per_theta(model, model_type: str, family: _Family, attns, params: dict) -> nn.ModuleList:
    """pirope's embeddings in place of a model's rotary embedding per theta (_Family.rotary_per_theta:
    GraniteSWA's rotary_embs), built as transformers builds its own: for each distinct non-zero theta of
    config.layer_rope_theta, increasing, the RoPE of ``params`` (the model's rope_parameters) with that
    rope_theta -- a linear factor scales every theta --, holding that copy of the config, by whose
    rope_parameters["rope_theta"] the model finds the tables of each layer. A model whose embeddings are
    not those (so that the layers would not get the tables the model means) is refused."""
    config, name = model.config, family.rotary_per_theta
    thetas = sorted({theta for theta in getattr(config, "layer_rope_theta", None) or () if theta})
    old = getattr(_base_model(model), name, None)
    found = [_rope_theta_of(r) for r in old] if isinstance(old, nn.ModuleList) else None
    if found != thetas:
        raise TypeError(
            f"model: {type(model).__name__}'s {name} (of thetas {found}) is not one rotary embedding per distinct "
            f"non-zero theta of config.layer_rope_theta={getattr(config, 'layer_rope_theta', None)!r}; this "
            "architecture is not supported")
    positions = PositionsMemo()  # the model calls each with the same position_ids: read them once
    rotaries = []
    for theta in thetas:
        theta_config = copy.deepcopy(config)
        theta_config.rope_parameters = {**params, "rope_theta": theta}
        rotary = _rotary_embedding(model, model_type, family, attns, theta_config.rope_parameters)
        rotary.config, rotary._positions = theta_config, positions
        rotaries.append(rotary)
    return nn.ModuleList(rotaries)


def _rope_theta_of(rotary):
    """The rope_theta of a rotary embedding's own config (GraniteSWA's per-theta ones), None without one."""
    params = getattr(getattr(rotary, "config", None), "rope_parameters", None)
    return params.get("rope_theta") if isinstance(params, dict) else None


def _mrope_pair_rows(model_type: str, family: _Family, rotary, pairs: int) -> tuple[int, ...]:
    """For each of the ``pairs`` rotary pairs of a model with multimodal RoPE, the section
    (temporal 0, height 1, width 2) whose position turns it, as the model's own rotary
    embedding composes them: its ``recomposition_frequencies`` maps per-section frequencies
    ``(3, batch, seqlen, pairs)`` to the per-feature ones of its attention (rotate-half's
    ``cat((f, f))``, or each pair's twice in a row where pairs are interleaved), and is given
    frequencies that name their own section and pair. Every pair must keep its place (only its
    section chosen): a layout that moves frequencies between pairs is refused."""
    if isinstance(rotary, PiropeMultimodalRotaryEmbedding):  # patched before: the sections it read then
        if len(rotary.pair_rows) != pairs:
            raise ValueError(f"scaling: model_type {model_type!r} rotates {len(rotary.pair_rows)} pairs per head "
                             f"with multimodal RoPE sections; a scaling of {pairs} pairs does not fit them")
        return rotary.pair_rows
    recompose = getattr(rotary, "recomposition_frequencies", None)
    if not callable(recompose):
        raise TypeError(f"model: the rotary embedding {type(rotary).__name__} of model_type {model_type!r} has no "
                        "recomposition_frequencies telling its multimodal RoPE sections; this version of the "
                        "architecture is not supported")
    probe = torch.arange(_MROPE_SECTIONS * pairs, dtype=torch.float64).view(_MROPE_SECTIONS, 1, 1, pairs)
    try:
        out = recompose(probe).reshape(-1)
    except (RuntimeError, IndexError, ValueError) as e:
        raise ValueError(
            f"model: the multimodal RoPE sections (config.rope_parameters['mrope_section'] = "
            f"{getattr(rotary, 'mrope_section', None)!r}) do not fit the {pairs} rotary pairs of a head: {e}") from e
    halves = (out[0::2], out[1::2]) if family.interleaved else (out[:pairs], out[pairs:])
    if (out.numel() != 2 * pairs or not torch.equal(*halves)
            or not torch.equal(halves[0] % pairs, torch.arange(pairs, dtype=torch.float64))):
        raise TypeError(f"model: the multimodal RoPE of model_type {model_type!r} ({type(rotary).__name__}) moves "
                        "frequencies between pairs; not supported")
    return tuple(int(r) for r in (halves[0] // pairs).tolist())
