"""nn.Module front end: RotaryEmbedding holds the cos/sin tables of one configuration
and rotates q and k with pirope's fused op."""

from __future__ import annotations

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
    grow when a longer sequence (``seqlen`` of the input) arrives. For the
    length-dependent scalings ("dynamic" NTK and "longrope") the table is the one of
    the current sequence length, ``max(position_ids) + 1``: it is recomputed when the
    length changes above the original window and returns to the original table inside
    it, so a long request never changes the result of a later short one. (That needs
    the largest position on the host: one device sync per call for those two types.)
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
        self._build(self.max_position_embeddings)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def _build(self, length: int) -> None:
        cos, sin = rope_cos_sin(self.inv_freq, length, self.attention_factor)
        self.cos, self.sin = cos, sin

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
        seqlen = q.shape[-3]
        if self._plan.length_dependent and position_ids is not None and position_ids.numel() > 0:
            needed = int(position_ids.max()) + 1
        else:
            needed = seqlen
        self._update_for_length(needed)
        return apply_rope_qk(q, k, self.cos, self.sin, position_ids, interleaved=self.interleaved)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
                f"max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}")
