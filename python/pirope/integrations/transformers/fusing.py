"""When a patched attention layer may take the fused path (``pirope.rope_attention``) and stay
exact: masks, windows, chunks, soft-caps, caches and dropout, and the packed sequences a mask
describes."""

from __future__ import annotations

import torch
from torch import nn

from pirope import _checks

from .layout import _qk_norm

try:  # the collector of a model's requested outputs (transformers 5: every version pirope supports)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - a transformers without it passes the keyword to the attention
    _active_collector = None


def _sliding_window(attn):
    src = attn._pirope_family.window
    if src == "config":
        return getattr(attn.config, "sliding_window", None)
    if src == "module":
        return getattr(attn, "sliding_window", None)
    if src == "sliding":
        return attn.sliding_window if attn.is_sliding else None
    return None


def _softcap(attn):
    src = attn._pirope_family.softcap
    return None if src is None else getattr(attn, src)


def _fusable_softcap(cap) -> bool:
    """Whether a layer's soft-cap is one rope_attention's softcap computes as transformers' backends
    do: None (no cap), or a finite number > 0 within float32's range (0 is rope_attention's
    "no cap", while transformers' eager would divide by it)."""
    if cap is None:
        return True
    try:
        return _checks.softcap("rope_attention", "softcap", cap, torch.float32) > 0
    except (TypeError, ValueError):
        return False


def _past_length(cache, layer_idx: int) -> int:
    """The layer's cached length, -1 where unknown (never fused then). A static cache keeps it
    as a tensor: read on the host (a device sync per layer on a GPU; callers ask only for
    calls of more than one token), except under torch.compile, where the read would break
    the graph."""
    try:
        n = cache.get_seq_length(layer_idx)
        if isinstance(n, torch.Tensor) and torch.compiler.is_compiling():
            return -1
        return int(n)
    except Exception:  # a cache type that cannot tell: never take the fused path
        return -1


# attention kwargs of transformers' backends whose presence changes the result in ways
# rope_attention does not compute: packed sequences (flash attention's varlen), an additive
# score bias (sdpa's position_bias), attention-sink logits (s_aux)
_UNFUSABLE_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "position_bias", "s_aux")


def _cutting_window(attn, seqlen: int) -> int | None:
    """The layer's sliding window where it masks something at this length, else None.
    (Within it, by either convention -- key j seen from query i when i - j < window, or
    <= window -- every key is seen.)"""
    window = _sliding_window(attn)
    # (a window of 0 would be window_size (-1, 0), no window: never fused, its mask hides everything)
    return window if window is not None and seqlen > window >= 1 else None


def _chunk(attn) -> int | None:
    """The layer's attention chunk size (_Family.chunked), None where it attends unchunked."""
    src = attn._pirope_family.chunked
    layer_types = getattr(attn.config, "layer_types", None) or ()
    if src is None or attn.layer_idx >= len(layer_types) or layer_types[attn.layer_idx] != "chunked_attention":
        return None
    return getattr(attn.config, src, None)


def _cutting_chunk(attn, seqlen: int) -> int | None:
    """The layer's attention chunk size where a call of this length spans more than one chunk, else None."""
    chunk = _chunk(attn)
    return chunk if chunk is not None and seqlen > chunk else None


def _rotates_inside(attn, rotates: bool) -> bool:
    """Whether rope_attention can rotate this layer's q and k itself: the layer ``rotates`` (not NoPE:
    _Family.rope_layers, as the forward decides), by the positive angle, with nothing between the rotation and the attention (no q/k norms after
    RoPE). Elsewhere the fused path rotates (or not) and normalizes as the other path does, then
    runs rope_attention with an identity rotation (_identity_table): on CPU only, where its kernels
    beat SDPA; on CUDA rope_attention would just add a pass over q and k there."""
    family = attn._pirope_family
    return (rotates and not family.conjugate
            and not (family.qk_norm_after_rope and _qk_norm(attn, family) is not None))


def _layer_can_fuse(attn, seqlen: int, cache, kwargs, attention_mask=None) -> bool:
    """Whether rope_attention computes this call's attention, whatever its mask: everything but the
    mask, the packing, the sliding window and the chunks (see _segments_of_mask), and where the
    rotation happens (see _rotates_inside)."""
    if attn._pirope_attention != "fused" or seqlen <= 1:
        # (one query, a decode step: nothing for a fused kernel to gain, and no cache read)
        return False
    if _cutting_chunk(attn, seqlen) is not None and not isinstance(attention_mask, torch.Tensor):
        # chunked attention across chunks (Llama 4): the chunks are in transformers' mask only, which
        # a mask-free backend would not even get; its backend computes it, on the rotated q and k
        return False
    if any(kwargs.get(name) is not None for name in _UNFUSABLE_KWARGS):
        # transformers' flash attention's packed sequences (cu_seqlens passed in), or a score
        # bias / sink logits that transformers' backends add and rope_attention has not
        return False
    if attn.training and _dropout_rate(attn):
        return False
    if not _fusable_softcap(_softcap(attn)):
        return False  # a cap rope_attention does not take (transformers' eager would divide by 0)
    causal = kwargs.get("is_causal")  # a call's is_causal overrides the module's, as in transformers' backends
    if not (getattr(attn, "is_causal", True) if causal is None else causal):
        return False
    if cache is not None and _past_length(cache, attn.layer_idx) != 0:
        return False
    if _attention_weights_requested(attn, kwargs):
        return False
    return True


def _attention_weights_requested(attn, kwargs) -> bool:
    """Whether transformers records this call's attention weights, which rope_attention does not
    compute: the call or, without the keyword, the config asks. The keyword reaches the attention
    only where the decoder layer passes it on (Nemotron's and StableLM's do not), so the output
    collector the model's forward sets up (transformers.utils.output_capturing, the one its
    recording hooks read) is asked too."""
    if kwargs.get("output_attentions", getattr(getattr(attn, "config", None), "output_attentions", False)):
        return True
    collector = _active_collector.get() if _active_collector is not None else None
    return collector is not None and "attentions" in collector


_MASK_ROWS = 1024  # rows of the mask compared at a time (bounds the temporary)


def _dropout_rate(attn) -> float:
    """The attention dropout rate the layer passes its attention function: its
    attention_dropout (_Family.dropout_attr: Mllama's dropout), or where that is an nn.Dropout (Persimmon, which passes
    config.attention_dropout, the module's p) that module's rate."""
    rate = getattr(attn, attn._pirope_family.dropout_attr, 0.0)
    return rate.p if isinstance(rate, nn.Dropout) else rate


def _segments_of_mask(q, attention_mask, position_ids, packed, window: int | None = None,
                      bool_masks: bool = True, chunk: int | None = None) -> torch.Tensor | None:
    """cu_seqlens (over the batch's rows flattened) when ``attention_mask`` lets each query
    see exactly the keys at or before it within its own sequence -- sequences being the
    runs of consecutive positions, as transformers delimits packed ones -- and, with a
    sliding ``window``, fewer than ``window`` tokens back (transformers' ``kv_idx > q_idx -
    window``: rope_attention's ``window_size=(window - 1, 0)``), so that rope_attention with
    those cu_seqlens computes the call; else None.

    That is the mask transformers builds for packed sequences (padding-free training:
    positions restarting, no attention mask given) with its sdpa or eager backend, the
    causal mask eager always builds, and the sliding-window masks of both. Read on the host:
    CPU tensors only (the fused CUDA path takes neither packed sequences nor windows), and
    not under torch.compile (``packed`` None). A bool mask means "seen" where True only to a
    backend that reads it so (SDPA); ``bool_masks`` False (eager, which adds any mask to the
    scores, True as +1) leaves bool ones unfused, so that transformers' backend computes
    them as it does."""
    if packed is None or q.device.type != "cpu" or not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dtype == torch.bool and not bool_masks:
        return None
    batch, seqlen = q.shape[:2]
    if attention_mask.dim() != 4 or tuple(attention_mask.shape) != (batch, 1, seqlen, seqlen):
        return None
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        return None
    positions = torch.arange(seqlen)[None] if position_ids is None else position_ids.to("cpu")
    positions = positions.expand(batch, seqlen)
    # sequence index of each token in its row: a new sequence wherever a position is not
    # its predecessor's + 1 (transformers' find_packed_sequence_indices)
    starts = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1
    if chunk is not None:  # Llama 4's chunks, by the token's index in the row (transformers' q_idx // chunk)
        starts = starts | (torch.arange(seqlen) % chunk == 0)
    segment = starts.cumsum(-1)
    keys = torch.arange(seqlen)
    for r0 in range(0, seqlen, _MASK_ROWS):
        rows = torch.arange(r0, min(seqlen, r0 + _MASK_ROWS))
        allowed = attention_mask[:, 0, rows]
        if allowed.dtype != torch.bool:  # additive: 0 where seen, the dtype's lowest (or -inf) where hidden
            hidden = allowed <= torch.finfo(allowed.dtype).min / 2
            allowed = allowed == 0
            if not (allowed | hidden).all():  # a finite score bias: not a mask rope_attention computes
                return None
        expected = (segment[:, rows, None] == segment[:, None, :]) & (keys[None, None, :] <= rows[None, :, None])
        if window is not None:
            expected &= keys[None, None, :] > rows[None, :, None] - window
        if not torch.equal(allowed, expected):
            return None
    starts = torch.ones(batch, seqlen, dtype=torch.bool)
    starts[:, 1:] = segment[:, 1:] != segment[:, :-1]
    first_tokens = starts.reshape(-1).nonzero().flatten()
    return torch.cat([first_tokens, torch.tensor([batch * seqlen])])
