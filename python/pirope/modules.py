"""nn.Module front end: RotaryEmbedding holds the cos/sin tables of one configuration
and rotates q and k (or one tensor) with pirope's fused ops."""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_true

from . import _checks
from .apply_rope import apply_rope, apply_rope_qk
from .frequencies import (FrequencyPlan, PositionsMemo, rope_cos_sin, rows_of_positions,
                          tables_outside_inference_mode)

__all__ = ["RotaryEmbedding"]



class RotaryEmbedding(nn.Module):
    """Rotary position embedding with any scaling, as a drop-in module.

    Example (Position Interpolation of a 2k model to 8k)::

        rope = pirope.RotaryEmbedding(128, max_position_embeddings=8192,
                                      scaling={"rope_type": "linear", "factor": 4.0})
        q, k = rope(q, k)            # q, k: (batch, seqlen, heads, 128)
        x = rope.rotate(x)           # or one tensor alone (code that rotates q and k apart)

    The float32 ``cos``/``sin`` buffers cover ``max_position_embeddings`` positions and
    grow when a longer sequence arrives: ``seqlen`` of the input, or ``max(position_ids)
    + 1`` when ``position_ids`` are given (e.g. a decode step past the table), to at
    least twice their size, so decoding past them rebuilds rarely. Positions too sparse
    for a table (a huge offset or sentinel far past the table with few tokens) get rows
    of their own for that call instead, so memory stays proportional to the call.
    Negative ``position_ids`` rotate by negative angles, as in transformers. On CUDA,
    reading ``max(position_ids)`` takes one device sync per ``position_ids`` tensor (and
    version), not per call: the layers of one forward share it (so rewrite position ids
    in place, not through ``.data`` or shared NumPy memory, which torch cannot see).
    Under ``torch.compile`` the read is skipped for the types that do not need it: the
    rows of the call's own positions are computed instead (the same values). For the
    length-dependent scalings ("dynamic" NTK, and "longrope" whose long factors differ from
    its short ones) the table is the one of the current sequence length,
    ``max(position_ids) + 1``: it is recomputed when the length changes above the original
    window and returns to the original table inside it, so a long request never changes
    the result of a later short one. Threads may share the module.

    ``model.half()`` / ``model.to(torch.bfloat16)`` leave the tables float32 (rounding
    them would move every angle). The buffers live on the default device (a
    ``torch.device(...)`` context or ``torch.set_default_device``), like any module's
    parameters. They are non-persistent (not in the ``state_dict``) and derived from the
    configuration, so the module recomputes them where they cannot hold its values: when
    ``model.to_empty(device=...)`` moves it off the meta device, and when something outside
    replaces them (transformers' ``from_pretrained`` of a model that holds this module sets
    every non-persistent buffer to uninitialised memory), at the next call. After
    ``to_empty`` from a real device call :meth:`reset_parameters`, as for any module with
    computed state.
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
        self.interleaved = interleaved
        with _checks.prefixed(op):
            self._plan = FrequencyPlan(head_dim, max_position_embeddings=max_position_embeddings, base=base,
                                       scaling=scaling, partial_rotary_factor=partial_rotary_factor)
        self.scaling = self._plan.scaling
        # the values in effect (a scaling dict may carry rope_theta / partial_rotary_factor)
        self.base = self._plan.base
        self.partial_rotary_factor = self._plan.partial_rotary_factor
        self._table_key = None
        # Choosing and (re)building the table is one step for threads sharing the module
        # (an inference server): a "longrope"/"dynamic" switch of one thread must not
        # hand another thread's call the wrong table. Held while a table is picked, not
        # while rotating.
        self._lock = threading.Lock()
        # the default device, as for any module's parameters (torch.device("cuda") or
        # "meta" contexts, torch.set_default_device); the frequencies are computed on the CPU
        device = torch.empty(0).device
        inv_freq, attention_factor = self._plan.static
        self.attention_factor = attention_factor
        self._positions_seen = PositionsMemo()  # (min, max + 1) of the last position_ids
        with tables_outside_inference_mode():
            self.register_buffer("inv_freq", inv_freq.to(device, copy=True), persistent=False)
            self.register_buffer("cos", torch.empty(0, inv_freq.numel(), device=device), persistent=False)
            self.register_buffer("sin", torch.empty(0, inv_freq.numel(), device=device), persistent=False)
            self._build(self.max_position_embeddings)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def _build(self, length: int) -> None:
        cos, sin = rope_cos_sin(self.inv_freq, length, self.attention_factor)
        self.cos, self.sin = cos, sin
        self._adopt_tables()

    def _adopt_tables(self) -> None:
        # the buffers this module computed (or moved/cast in _apply): any other tensor in
        # their place was set from outside and holds no table of this configuration
        self._own_tables = (self.inv_freq, self.cos, self.sin)

    def _ensure_tables(self) -> None:
        """Recomputes the tables if their buffers were replaced from outside."""
        if not all(own is now for own, now in zip(self._own_tables, (self.inv_freq, self.cos, self.sin))):
            self.reset_parameters()

    def _rebuild(self, length: int) -> None:
        # float32 frequencies and tables of the current key, on the module's device
        with tables_outside_inference_mode():
            inv_freq, self.attention_factor = self._plan.frequencies(self._table_key)
            self.inv_freq = inv_freq.to(self.inv_freq.device)
            self._build(length)

    def reset_parameters(self) -> None:
        """Recomputes ``inv_freq`` and the tables (float32, on the module's device), e.g.
        after ``to_empty()`` left them uninitialised."""
        self._rebuild(max(self.cos.shape[0], self.max_position_embeddings))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        if state.get("_positions_seen") is None:  # pickled by an older pirope
            state["_positions_seen"] = PositionsMemo()
        super().__setstate__(state)
        self._lock = threading.Lock()
        if "_own_tables" not in state:  # pickled by an older pirope: its tables are its own
            self._adopt_tables()

    def _apply(self, fn, recurse=True):
        was_meta = self.inv_freq.is_meta
        super()._apply(fn, recurse)
        if (not self.inv_freq.dtype.is_floating_point or self.inv_freq.dtype.itemsize < 4
                or (was_meta and not self.inv_freq.is_meta)):
            # .half() / .to(bfloat16): rebuild the frequencies and tables in float32;
            # to_empty() off the meta device: meta tensors had no values to move
            self._rebuild(self.cos.shape[0])
        else:
            self._adopt_tables()
        return self

    def _positions_range(self, position_ids: torch.Tensor) -> tuple[int, int]:
        """(min(position_ids), max(position_ids) + 1); on CUDA read once per position_ids
        tensor (and version), as that read is a device sync (see PositionsMemo)."""
        def read(p):
            low, high = torch.stack(tuple(torch.aminmax(p))).tolist()  # one read of both
            return low, high + 1

        return self._positions_seen.get(position_ids, read)

    def _tables_for(self, needed: int, count: int, low: int, position_ids: torch.Tensor | None):
        """(cos, sin, position_ids) to rotate a call whose positions lie in [low, needed)."""
        self._ensure_tables()
        key = self._plan.key(needed)
        cached = self.cos.shape[0] if key == self._table_key else 0
        if cached >= needed and low >= 0:
            return self.cos, self.sin, position_ids
        # negative positions (as transformers allows: rotation by a negative angle) have
        # no table rows: they take rows of their own, like sparse ones
        rows = self._plan.table_rows(key, needed, count, cached) if low >= 0 else None
        if key == self._table_key:
            inv_freq, attention_factor = self.inv_freq, self.attention_factor
        else:
            inv_freq, attention_factor = self._plan.frequencies(key)
            inv_freq = inv_freq.to(self.inv_freq.device)
        if rows is None:  # sparse or negative positions: rows of this call's own
            return rows_of_positions(inv_freq, position_ids, attention_factor)
        self.inv_freq, self.attention_factor, self._table_key = inv_freq, attention_factor, key
        self._build(rows)
        return self.cos, self.sin, position_ids

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None):
        """Rotates q and k: ``(batch, seqlen, heads, head_dim)`` or packed
        ``(total_tokens, heads, head_dim)``; see :func:`pirope.apply_rope_qk`."""
        cos, sin, position_ids = self._call_tables("RotaryEmbedding", {"q": q, "k": k}, position_ids)
        return apply_rope_qk(q, k, cos, sin, position_ids, interleaved=self.interleaved)

    def rotate(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rotates one tensor, ``(batch, seqlen, heads, head_dim)`` or packed
        ``(total_tokens, heads, head_dim)``: what :meth:`forward` does to q (or k) alone, with
        the same tables, for code that rotates q and k apart (torchtune's attention calls its
        RoPE module on each); see :func:`pirope.apply_rope`."""
        cos, sin, position_ids = self._call_tables("RotaryEmbedding.rotate", {"x": x}, position_ids)
        return apply_rope(x, cos, sin, position_ids, interleaved=self.interleaved)

    def _call_tables(self, op: str, tensors: dict, position_ids: torch.Tensor | None):
        """Checks a call's tensors (by name) and position_ids; (cos, sin, position_ids) that
        rotate it: the module's tables, or rows of the call's own positions."""
        for name, t in tensors.items():
            _checks.tensor(op, name, t)
        _checks.tensor(op, "position_ids", position_ids, optional=True)
        first_name, first = next(iter(tensors.items()))
        if first.dim() not in (3, 4):
            raise ValueError(
                f"{op}: {first_name} must be (batch, seqlen, heads, head_dim) or packed "
                f"(total_tokens, heads, head_dim), got shape {tuple(first.shape)}")
        for name, t in tensors.items():
            if t.shape[-1] != self.head_dim:
                raise ValueError(
                    f"{op}: {name} must have head_dim {self.head_dim} (the module's) as its last "
                    f"dimension, got shape {tuple(t.shape)}")
        if position_ids is not None and position_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: position_ids must be int32 or int64, got {position_ids.dtype}")
        seqlen = first.shape[-3]
        compiling = torch.compiler.is_compiling()
        if (compiling and not self._plan.length_dependent
                and position_ids is not None and guard_or_true(position_ids.numel() > 0)):
            # Under torch.compile the largest position (a value on the device) would
            # need a host read, which breaks the graph: the rows of exactly these
            # positions instead (the same float64 angles, so the same values as eager),
            # indexed 0..n-1; also for a count known only when the graph runs (positions
            # picked by a mask: none is fine too). dynamic/longrope need that length anyway.
            self._ensure_tables()
            return rows_of_positions(self.inv_freq, position_ids, self.attention_factor)
        low = 0
        if position_ids is None or position_ids.numel() == 0:
            needed, count = seqlen, seqlen
        else:
            low, needed = self._positions_range(position_ids)
            count = position_ids.numel()
        if compiling:
            return self._tables_for(needed, count, low, position_ids)
        with self._lock, tables_outside_inference_mode():
            return self._tables_for(needed, count, low, position_ids)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
                f"max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}")
