"""nn.Module front end: RotaryEmbedding holds the cos/sin tables of one configuration
and rotates q and k with pirope's fused op."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import _checks
from .apply_rope import apply_rope_qk
from .frequencies import FrequencyPlan, rope_cos_sin

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with any scaling, as a drop-in module.

    Example (Position Interpolation of a 2k model to 8k)::

        rope = pirope.RotaryEmbedding(128, max_position_embeddings=8192,
                                      scaling={"rope_type": "linear", "factor": 4.0})
        q, k = rope(q, k)            # q, k: (batch, seqlen, heads, 128)

    The float32 ``cos``/``sin`` buffers cover ``max_position_embeddings`` positions and
    grow when a longer sequence arrives: ``seqlen`` of the input, or ``max(position_ids)
    + 1`` when ``position_ids`` are given (e.g. a decode step past the table). Reading
    that maximum takes one device sync per ``position_ids`` tensor, not per call: the
    layers of one forward share it. (Under ``torch.compile`` the read is skipped for the
    types below that do not need it, so the table must already cover the positions:
    out-of-range ones raise on CPU and give NaN rows on CUDA, as in
    :func:`pirope.apply_rope`.) For the length-dependent scalings ("dynamic" NTK and
    "longrope") the table is the one of the current sequence length,
    ``max(position_ids) + 1``: it is recomputed when the length changes above the
    original window and returns to the original table inside it, so a long request
    never changes the result of a later short one.

    ``model.half()`` / ``model.to(torch.bfloat16)`` leave the tables float32 (rounding
    them would move every angle).
    """

    def __init__(
        self,
        head_dim: int,
        *,
        max_position_embeddings: int,
        base: float = 10000.0,
        scaling: dict | None = None,
        partial_rotary_factor: float = 1.0,
        interleaved: bool = False,
    ):
        super().__init__()
        op = "RotaryEmbedding"
        self.head_dim = _checks.integer(op, "head_dim", head_dim, minimum=1)
        self.max_position_embeddings = _checks.integer(
            op, "max_position_embeddings", max_position_embeddings, minimum=1)
        _checks.flag(op, "interleaved", interleaved)
        self.base = base
        self.partial_rotary_factor = partial_rotary_factor
        self.interleaved = interleaved
        self._plan = FrequencyPlan(head_dim, max_position_embeddings=max_position_embeddings, base=base,
                                   scaling=scaling, partial_rotary_factor=partial_rotary_factor)
        self.scaling = self._plan.scaling
        self._table_key = None
        inv_freq, attention_factor = self._plan.static
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attention_factor
        self.register_buffer("cos", torch.empty(0, inv_freq.numel()), persistent=False)
        self.register_buffer("sin", torch.empty(0, inv_freq.numel()), persistent=False)
        self._positions_seen = None  # (weakref to position_ids, its version, max + 1)
        self._build(self.max_position_embeddings)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def _build(self, length: int) -> None:
        cos, sin = rope_cos_sin(self.inv_freq, length, self.attention_factor)
        self.cos, self.sin = cos, sin

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.inv_freq.dtype.is_floating_point or self.inv_freq.dtype.itemsize < 4:
            # .half() / .to(bfloat16): rebuild the frequencies and tables in float32
            inv_freq, _ = self._plan.frequencies(self._table_key)
            self.inv_freq = inv_freq.to(self.inv_freq.device)
            self._build(self.cos.shape[0])
        return self

    def _positions_end(self, position_ids: torch.Tensor) -> int:
        """max(position_ids) + 1, read once per position_ids tensor (and version)."""
        seen = self._positions_seen
        try:
            version = position_ids._version
        except RuntimeError:  # inference tensors have no version counter: read every time
            version = None
        if seen is not None and version is not None and seen[0]() is position_ids and seen[1] == version:
            return seen[2]
        end = int(position_ids.max()) + 1
        self._positions_seen = (weakref.ref(position_ids), version, end) if version is not None else None
        return end

    def _update_for_length(self, seq_len: int) -> None:
        key = self._plan.key(seq_len)
        if key != self._table_key:
            inv_freq, self.attention_factor = self._plan.frequencies(key)
            self.inv_freq = inv_freq.to(self.inv_freq.device)
            self._table_key = key
            self._build(max(self.max_position_embeddings, seq_len))
        elif seq_len > self.cos.shape[0]:
            self._build(seq_len)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None):
        """Rotates q and k: ``(batch, seqlen, heads, head_dim)`` or packed
        ``(total_tokens, heads, head_dim)``; see :func:`pirope.apply_rope_qk`."""
        _checks.tensor("RotaryEmbedding", "q", q)
        _checks.tensor("RotaryEmbedding", "k", k)
        _checks.tensor("RotaryEmbedding", "position_ids", position_ids, optional=True)
        if q.dim() not in (3, 4):
            raise ValueError(
                "RotaryEmbedding: q must be (batch, seqlen, heads, head_dim) or packed "
                f"(total_tokens, heads, head_dim), got shape {tuple(q.shape)}")
        for name, t in (("q", q), ("k", k)):
            if t.shape[-1] != self.head_dim:
                raise ValueError(
                    f"RotaryEmbedding: {name} must have head_dim {self.head_dim} (the module's) as its last "
                    f"dimension, got shape {tuple(t.shape)}")
        seqlen = q.shape[-3]
        if position_ids is None or position_ids.numel() == 0:
            needed = seqlen
        elif self._plan.length_dependent or not torch.compiler.is_compiling():
            needed = self._positions_end(position_ids)
        else:
            needed = seqlen
        self._update_for_length(needed)
        return apply_rope_qk(q, k, self.cos, self.sin, position_ids, interleaved=self.interleaved)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
                f"max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}")
