"""The patched attention forwards (LLaMA-style and Multi-head Latent Attention): transformers'
steps, with pirope rotating q and k, or computing rotation and attention in one fused call."""

from __future__ import annotations

import sys

import torch
from torch import nn

import pirope
from pirope._autograd import functorch as _functorch
from pirope._extension import require_cuda_build

from .fusing import (_cutting_chunk, _cutting_window, _dropout_rate, _layer_can_fuse, _rotates_inside,
                     _segments_of_mask, _sliding_window, _softcap)

from .layout import _head_dim, _kv_shared, _qk_norm
from .rotary import _position_summary, RopeTables


def _project(attn, hidden_states):
    """q, k, v as (batch, seqlen, heads, head_dim) views, exactly as Hugging Face projects (k and v
    None in a KV-shared layer: see _Family.kv_sharing), and the output gate: (batch, seqlen,
    heads * head_dim), or (batch, seqlen, heads, 1) for a gate per head; None without _Family.q_gate
    or .gate."""
    family = attn._pirope_family
    head_dim = _head_dim(attn, family)
    shape = (*hidden_states.shape[:-1], -1, head_dim)
    if _kv_shared(attn, family):  # Gemma 4: a query of its own, the keys and values of an earlier layer
        q = attn.q_proj(hidden_states).view(shape)
        return getattr(attn, family.qk_norm_names[0])(q), None, None, None
    gate = None
    if family.q_gate is not None:  # per head q | gate (views with head stride 2 * head_dim)
        q, gate = getattr(attn, family.q_gate)(hidden_states).view(*shape[:-1], 2 * head_dim).chunk(2, dim=-1)
        gate = gate.reshape(*hidden_states.shape[:-1], -1)
        k, v = attn.k_proj(hidden_states), attn.v_proj(hidden_states)
    elif family.proj == "qkv_heads":  # GPT-NeoX: per head q | k | v; views with head stride 3 * head_dim
        qkv = attn.query_key_value(hidden_states).view(*hidden_states.shape[:-1], -1, 3 * head_dim)
        q, k, v = qkv.chunk(3, dim=-1)  # already (batch, seqlen, heads, head_dim): the view below keeps them
    elif family.proj == "falcon_qkv":
        q, k, v = _falcon_qkv(attn, hidden_states, head_dim)
    elif family.proj == "qkv":
        qkv = attn.qkv_proj(hidden_states)
        nq = attn.config.num_attention_heads * head_dim
        nkv = attn.config.num_key_value_heads * head_dim
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
    else:
        q, k = attn.q_proj(hidden_states), attn.k_proj(hidden_states)
        # Gemma 4's attention_k_eq_v layers have no v_proj: the values are k_proj's output (before k_norm)
        v = k if family.kv_sharing and attn.v_proj is None else attn.v_proj(hidden_states)
        gate_proj = None if family.gate is None else getattr(attn, family.gate)
        if gate_proj is not None:  # AFMoE, LFM3 (where use_attention_gate): a gate projection of its own
            gate = gate_proj(hidden_states)
    norm = None if family.qk_norm_after_rope else _qk_norm(attn, family)  # those run after RoPE
    q_norm, k_norm = (getattr(attn, name) for name in family.qk_norm_names) if norm else (None, None)
    if norm == "proj":  # OLMo 2: one RMSNorm over all heads' features, then the view
        q, k = q_norm(q), k_norm(k)
    clip = None if family.clip is None else getattr(attn.config, family.clip, None)
    if clip is not None:  # OLMo, OLMoE (after its norms): clamped before RoPE, so fusing stays exact
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    # (MiMo-V2-Flash: values of their own head size)
    v_shape = shape if family.v_head_dim is None else (*shape[:-1], getattr(attn, family.v_head_dim))
    q, k, v = q.view(shape), k.view(shape), v.view(v_shape)
    if norm == "head":
        q, k = q_norm(q), k_norm(k)
    elif norm == "heads_first":  # StableLM: its per-head norms take (batch, heads, seqlen, head_dim)
        q, k = q_norm(q.transpose(1, 2)).transpose(1, 2), k_norm(k.transpose(1, 2)).transpose(1, 2)
    if family.v_norm is not None:
        v = getattr(attn, family.v_norm)(v)
    if family.v_scale is not None:  # MiMo-V2-Flash: before the cache, as transformers
        v = v * getattr(attn, family.v_scale)
    if gate is not None and gate.shape[-1] != q.shape[-2] * v.shape[-1]:
        # a gate per head (LFM3's, Laguna's, Step 3.7's g_proj): (B, S, H, 1), broadcast over the head's output
        if gate.shape[-1] != q.shape[-2]:
            raise RuntimeError(
                f"{type(attn).__name__}: its gate has {gate.shape[-1]} features, neither one per head ({q.shape[-2]}) "
                f"nor one per output feature ({q.shape[-2] * v.shape[-1]})")
        gate = gate.unsqueeze(-1)
    return q, k, v, gate


def _falcon_qkv(attn, hidden_states, head_dim: int):
    """q, k, v (batch, seqlen, heads, head_dim) of Falcon's query_key_value, laid out as its
    transformers attention splits it: per KV group, the group's queries then its key and value
    (new_decoder_architecture: Falcon-40B, -180B, Falcon 2); all queries then one key and one
    value (multi_query: Falcon-7B); else per head q | k | v."""
    qkv = attn.query_key_value(hidden_states).view(*hidden_states.shape[:-1], -1, head_dim)
    if attn.new_decoder_architecture:
        grouped = qkv.unflatten(-2, (attn.num_kv_heads, -1))
        return grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :], grouped[..., -1, :]
    if attn.multi_query:
        return qkv.split([qkv.shape[-2] - 2, 1, 1], dim=-2)
    return qkv.unflatten(-2, (-1, 3)).unbind(-2)


def _pirope_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                              **kwargs):
    """The patched ``self_attn.forward`` (bound to each attention module with
    functools.partial, so copy.deepcopy and pickling of a patched model rebind it to the
    copy)."""
    shared_kv = kwargs.pop("shared_kv_states", None)  # Gemma 4's (see _Family.kv_sharing)
    cache, (cos, sin, position_ids, packed) = _call_inputs(self, position_embeddings, cache, kwargs)
    family = self._pirope_family
    segment_positions = position_ids  # the positions whose runs are the sequences of the call
    if family.mrope and kwargs.get("position_ids") is not None:
        # multimodal RoPE: the text positions transformers passes the layers (not those of the
        # tables, whose image tokens jump) delimit packed sequences, as in its masks. Where they
        # are the three sections (GLM-4V-MoE's), any jump in them counts as packing, and a mask
        # tensor's sequences are its rows (transformers builds it without positions then)
        text_positions = kwargs["position_ids"]
        segment_positions = text_positions if text_positions.dim() < 3 else None
        packed = _packed_text_positions(self, text_positions)
    input_shape = hidden_states.shape[:-1]
    q, k, v, gate = _project(self, hidden_states)  # (B, S, H, D); gate: None, (B, S, H * D) or (B, S, H, 1)
    cos, sin, position_ids = _tables_to(q.device, cos, sin, position_ids)

    interleaved = _interleaved(self)
    # a NoPE layer (SmolLM3's use_rope 0, EXAONE 4's and Cohere 2's global layers) skips RoPE like
    # Hugging Face's; where rope_attention cannot rotate (NoPE, norms after RoPE, the negative angle)
    # the fused path runs it on q and k made ready here (on CPU: see _rotates_inside)
    rotates = family.rope_layers is None or family.rope_layers.rotates(self)
    inside = _rotates_inside(self, rotates)

    softcap = _softcap(self)  # None, or (where it fuses) a number _layer_can_fuse checked
    sinks = None if family.sinks is None else getattr(self, family.sinks)
    # (a KV-shared layer's keys come rotated: nothing to fuse)
    shared = _kv_shared(self, family)
    fuse = not shared and (inside or q.device.type == "cpu") and _layer_can_fuse(self, q.shape[1], cache, kwargs,
                                                                                  attention_mask)
    if fuse and (softcap is not None or sinks is not None) and q.device.type != "cpu":
        # rope_attention runs a soft-cap or sinks unfused off CPU: transformers' backend (flash
        # attention's softcap, or eager) is the one to take there
        fuse = False
    window = _cutting_window(self, q.shape[1])
    fuse, cu_seqlens = _fused_segments(self, fuse, q, attention_mask, segment_positions, packed, window)
    window_size = (-1, -1) if window is None else (window - 1, 0)
    store = family.kv_sharing and bool(self.store_full_length_kv)  # Gemma 4: for the KV-shared layers
    temperature = _attn_temperature(self, kwargs.get("position_ids"), position_ids, q) if family.attn_temperature \
        else None
    if fuse:
        if not inside:  # q and k as the other path hands them to the attention, then no rotation
            q, k = _ready_qk(self, q, k, cos, sin, position_ids, rotates, temperature, cache)
            cos, sin, position_ids = _identity_table(q)
        elif temperature is not None:  # a factor per token commutes with its rotation: applied before it
            q = q * temperature
        if cache is not None or store:  # prefill: the cache (and the shared layers) get the rotated keys
            k_rot = pirope.apply_rope(k, cos, sin, position_ids, interleaved=interleaved) if inside else k
            kv = (k_rot.transpose(1, 2), v.transpose(1, 2))
            if cache is not None:
                kv = cache.update(*kv, self.layer_idx, kwargs=kwargs)
            if store:
                shared_kv[self.layer_type] = kv
        width = v.shape[-1]  # (MiMo-V2-Flash's values: their own head size, padded to q's and sliced back)
        out = _fused_attention(self, *_one_head_size(q, k, v), cos, sin, position_ids, cu_seqlens,
                               interleaved=interleaved, window_size=window_size, softcap=softcap, sinks=sinks)
        out = out[..., :width].reshape(*input_shape, -1).contiguous()
        return _out_proj(self, out, gate), None

    if shared:  # Gemma 4: the keys and values (rotated, (B, H, S, D)) of the layer that stored them
        q = pirope.apply_rope(q, cos, sin, position_ids, interleaved=interleaved).transpose(1, 2)
        k, v = (t.to(q.device) for t in shared_kv[self.layer_type])  # (that layer may be on another device)
    else:
        q, k = _ready_qk(self, q, k, cos, sin, position_ids, rotates, temperature, cache)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D) as Hugging Face
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        if store:
            shared_kv[self.layer_type] = k, v
    extra = {}
    if family.window is not None:
        extra["sliding_window"] = _sliding_window(self)
    if family.softcap is not None:  # passed even when None, as Gemma 2 does
        extra["softcap"] = softcap
    if sinks is not None:  # GPT-OSS's name for them
        extra["s_aux"] = sinks
    out, weights = _transformers_attention(self, q, k, v, attention_mask, **extra, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return _out_proj(self, out, gate), weights


def _call_inputs(attn, position_embeddings, cache, kwargs):
    """A patched attention forward's cache (also passed under a deprecated name, popped from
    ``kwargs``: past_key_values, GPT-NeoX's layer_past) and its pirope tables (cos, sin, position_ids,
    packed) -- empty ones for a NoPE layer its model hands none (LaraMini, GraniteSWA) --, or a
    RuntimeError where the rotary embedding was not pirope's."""
    for alias in ("past_key_values", "layer_past"):
        if alias in kwargs and cache is None:
            cache = kwargs.pop(alias)
    family = attn._pirope_family
    if position_embeddings is None and family.rope_layers is not None and not family.rope_layers.rotates(attn):
        # a NoPE layer its model hands no tables (LaraMini's full_attention layers): no rotation; the
        # positions the decoder layer passes delimit packed sequences, as in transformers' masks
        positions = kwargs.get("position_ids")
        packed = False if positions is None or positions.numel() == 0 else _packed_text_positions(attn, positions)
        device = "cpu" if positions is None else positions.device
        empty = torch.empty(1, 0, dtype=torch.float32, device=device)
        return cache, (empty, empty, positions, packed)
    if not isinstance(position_embeddings, RopeTables):
        raise RuntimeError(
            f"{type(attn).__name__} was patched by pirope but got position_embeddings of type "
            f"{type(position_embeddings).__name__}, not pirope's RopeTables: the model's rotary_emb "
            "was replaced or bypassed after patch_rope(); call patch_rope() again")
    return cache, tuple(position_embeddings)


def _packed_text_positions(attn, positions):
    """Whether the positions a decoder layer passes its attention (not the tables') hold packed
    sequences, read once per forward for all layers (their shared PositionsMemo); None under
    torch.compile, which cannot read them."""
    if torch.compiler.is_compiling():
        return None
    return positions.numel() > 0 and attn._pirope_text_positions.get(positions, _position_summary)[2]


def _tables_to(device, cos, sin, position_ids):
    """The tables on the layer's device (a model split over devices: the table follows the layer)."""
    if cos.device != device:
        cos, sin = cos.to(device), sin.to(device)
        position_ids = None if position_ids is None else position_ids.to(device)
    return cos, sin, position_ids


def _interleaved(attn) -> bool:
    """Whether the layer rotates pairs (2i, 2i+1) (_Family.interleaved, or .interleave_flag set in its config)."""
    family = attn._pirope_family
    flag = family.interleave_flag
    return family.interleaved or (flag is not None and bool(getattr(attn.config, flag, False)))


def _fused_segments(attn, fuse: bool, q, attention_mask, positions, packed, window):
    """(fuse, cu_seqlens): with a mask tensor, packed sequences, a sliding window or chunks, the call
    fuses only where the mask is exactly causal (within the window) within the sequences the
    positions delimit and the chunks (_segments_of_mask); cu_seqlens None otherwise."""
    chunk = _cutting_chunk(attn, q.shape[1])
    if not fuse or (attention_mask is None and packed is False and window is None and chunk is None):
        return fuse, None
    cu_seqlens = _segments_of_mask(q, attention_mask, positions, packed, window,
                                   bool_masks=attn.config._attn_implementation == "sdpa", chunk=chunk)
    return cu_seqlens is not None, cu_seqlens


def _fused_attention(attn, q, k, v, cos, sin, position_ids, cu_seqlens, **kwargs):
    """pirope.rope_attention of q (B, S, H, D), k and v (B, S, Hkv, D), causal, at the layer's scaling;
    with cu_seqlens of more sequences than rows as packed (total, heads, head_dim) sequences."""
    batch, seqlen = q.shape[:2]
    if cu_seqlens is not None and cu_seqlens.numel() - 1 > batch:  # packed: (total, heads, head_dim)
        pos = (torch.arange(seqlen, device=q.device)[None] if position_ids is None else position_ids)
        out = pirope.rope_attention(
            q.reshape(batch * seqlen, *q.shape[2:]), k.reshape(batch * seqlen, *k.shape[2:]),
            v.reshape(batch * seqlen, *v.shape[2:]), cos, sin, pos.expand(batch, seqlen).reshape(-1),
            causal=True, softmax_scale=attn.scaling, cu_seqlens=cu_seqlens, **kwargs)
        return out.view(batch, seqlen, *out.shape[1:])
    return pirope.rope_attention(q, k, v, cos, sin, position_ids, causal=True, softmax_scale=attn.scaling, **kwargs)


def _transformers_attention(attn, q, k, v, attention_mask, **kwargs):
    """The layer's own attention function (its config's _attn_implementation, else its module's eager one)
    on q, k, v (B, H, S, D), with its dropout in training and its scaling: (output (B, S, H, D), weights)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    return interface(attn, q, k, v, attention_mask, dropout=0.0 if not attn.training else _dropout_rate(attn),
                     scaling=attn.scaling, **kwargs)


def _pirope_mla_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                                  **kwargs):
    """The patched forward of Multi-head Latent Attention (DeepSeek-V2's MLA, _Family.proj "mla"),
    transformers' own steps: q per head is a part without RoPE (qk_nope_head_dim) then a rotary part
    (qk_rope_head_dim); the keys' rotary part is one head shared by all (kv_a_proj_with_mqa's last
    features), their other part and the values come from the compressed latent (kv_lora_rank, after
    kv_a_layernorm) through kv_b_proj (the module's expand_kv); the cache holds that latent and the
    rotated shared key. pirope rotates q's rotary part and the shared key (the table's width:
    qk_rope_head_dim); on CPU rope_attention then computes the attention through its identity
    rotation, the smaller of the qk and v head sizes padded with zero features (which add nothing to
    a score or an output); elsewhere, and where it is not exact, the layer's attention function."""
    cache, (cos, sin, position_ids, packed) = _call_inputs(self, position_embeddings, cache, kwargs)
    batch, seqlen = hidden_states.shape[:-1]
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    rope = self.qk_rope_head_dim
    kv_latent, k_rot = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, rope], dim=-1)
    kv_latent = self.kv_a_layernorm(kv_latent)
    if self._pirope_family.mla_lora_scales:  # LongCat-Flash
        q, kv_latent = q * self.mla_scale_q_lora, kv_latent * self.mla_scale_kv_lora
    q_pass, q_rot = q.view(batch, seqlen, -1, self.qk_head_dim).split([self.qk_nope_head_dim, rope], dim=-1)
    kv_latent = kv_latent.view(batch, 1, seqlen, self.kv_lora_rank)
    cos, sin, position_ids = _tables_to(q.device, cos, sin, position_ids)
    # (interleaved pairs come out in place: transformers' DeepSeek-V3 writes them as evens | odds instead,
    # a permutation of the features of q and k alike, which leaves every score as it is)
    q_rot, k_rot = pirope.apply_rope_qk(q_rot, k_rot.view(batch, seqlen, 1, rope), cos, sin, position_ids,
                                        interleaved=_interleaved(self))
    k_rot = k_rot.transpose(1, 2)  # (B, 1, S, rope), as transformers caches it
    fuse = q.device.type == "cpu" and _layer_can_fuse(self, seqlen, cache, kwargs)
    fuse, cu_seqlens = _fused_segments(self, fuse, q, attention_mask, position_ids, packed, None)
    cached = (kv_latent, k_rot)
    if cache is not None:
        cached = cache.update(kv_latent, k_rot, self.layer_idx, kwargs=kwargs)
    # (B, H, S, qk_head_dim) laid out as transformers' (its backend's fast layout), like expand_kv's keys
    q = torch.cat((q_pass.transpose(1, 2), q_rot.transpose(1, 2)), dim=-1)
    if self._pirope_family.attn_temperature:  # Mistral 4: the whole query times Llama 4's temperature
        q = q * _attn_temperature(self, kwargs.get("position_ids"), position_ids, q_pass).transpose(1, 2)
    # (B, H, S, qk_head_dim), (B, H, S, v_head_dim): where it fuses (no past keys), those of this call, as the
    # cache may hand back more (a static cache: its whole buffer)
    k, v = self.expand_kv(*((kv_latent, k_rot) if fuse else cached))
    if fuse:
        q, k, v = _one_head_size(q, k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # rope_attention's (B, S, H, D) views
        out = _fused_attention(self, q, k, v, *_identity_table(q), cu_seqlens)
        out, weights = out[..., :self.v_head_dim], None
    else:
        out, weights = _transformers_attention(self, q, k, v, attention_mask, **kwargs)
    return _out_proj(self, out.reshape(batch, seqlen, -1).contiguous()), weights


def _one_head_size(q, k, v):
    """q, k and v with the head size of the widest, for rope_attention (one head size): the others padded with
    zero features, which add nothing to a score (q, k: past the rotary ones, unrotated) or are output features
    sliced off after (v). MLA's qk and v head sizes, MiMo-V2-Flash's v_head_dim."""
    width = max(q.shape[-1], v.shape[-1])
    return tuple(t if t.shape[-1] == width else nn.functional.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))


def _identity_table(q):
    """rope_attention's cos, sin and position_ids for q (B, S, H, D) and k made ready outside it (see
    _rotates_inside): one position, width 0 (rotary_dim 0: every feature passes through, exactly,
    infinities included, where a rotation by angle 0 would make inf * sin(0) a NaN). Made per call,
    so that none is an inference tensor saved for a backward."""
    empty = torch.empty(1, 0, dtype=torch.float32, device=q.device)
    return empty, empty, torch.zeros(q.shape[1], dtype=torch.int64, device=q.device)


def _ready_qk(attn, q, k, cos, sin, position_ids, rotates: bool, temperature, cache):
    """q and k (B, S, H, D) as transformers' attention hands them to its attention function: rotated
    where the layer rotates, times Ministral 3's temperature, through the q/k norms after RoPE,
    times Llama 4's NoPE temperature."""
    family = attn._pirope_family
    if rotates:
        q, k = _rotate_qk(q, k, cos, sin, position_ids, _interleaved(attn), family.conjugate)
    if temperature is not None:  # Ministral 3: after RoPE, as transformers
        q = q * temperature
    if family.qk_norm_after_rope and _qk_norm(attn, family) is not None:
        # NanoChat, Hunyuan, Llama 4: per-head norms of the rotated q and k (over the last dimension,
        # so the (B, S, H, D) layout here gives Hugging Face's (B, H, S, D) values), before the cache
        q_norm, k_norm = (getattr(attn, name) for name in family.qk_norm_names)
        q, k = q_norm(q), k_norm(k)
    if family.nope_temperature and not rotates and attn.attn_temperature_tuning:
        q = _nope_temperature(attn, q, cache)  # Llama 4's NoPE layers
    return q, k


def _attn_temperature(attn, layer_positions, table_positions, q):
    """Llama 4's attention temperature of each token (_Family.attn_temperature), (B, S, 1, 1) in
    q's dtype for q (B, S, H, D): transformers' get_llama_4_attn_scale of the model's module on
    the positions the decoder layer passed (else those of the RoPE tables, else 0..S-1)."""
    positions = layer_positions if layer_positions is not None else table_positions
    if positions is None:
        positions = torch.arange(q.shape[1], device=q.device)
    if positions.dim() == 1:
        positions = positions[None]
    params = attn.config.rope_parameters
    scale = sys.modules[type(attn).__module__].get_llama_4_attn_scale(
        positions, params.get("llama_4_scaling_beta"), params.get("original_max_position_embeddings"))
    return scale.to(q.dtype).transpose(1, 2)


def _nope_temperature(attn, q, cache):
    """q (B, S, H, D) of a Llama 4 NoPE layer times its attention temperature (_Family.nope_temperature),
    as transformers' Llama4TextAttention computes it: from the token's index in the call plus the
    cache's length (its position_ids are not read), in float32, rounded once to q's dtype."""
    past = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
    positions = torch.arange(q.shape[1], device=q.device) + past
    scales = torch.log1p(torch.floor((positions.float() + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0
    return (q * scales.view(1, -1, 1, 1)).to(q.dtype)


def _rotate_qk(q, k, cos, sin, position_ids, interleaved: bool, conjugate: bool):
    """q and k rotated by the table's angles, or with ``conjugate`` by their negatives (NanoChat):
    pirope's inverse rotation, the op apply_rope_qk's backward runs, itself differentiable (its
    gradient is the forward rotation) and traceable like apply_rope_qk."""
    if not conjugate:
        return pirope.apply_rope_qk(q, k, cos, sin, position_ids, interleaved=interleaved)
    require_cuda_build(q.device, "apply_rope_qk")
    return _functorch.call("apply_rope_qk_backward", q, k, cos, sin, position_ids, interleaved)


def _out_proj(attn, out, gate=None):
    if gate is not None:  # gated attention (_Family.q_gate, .gate, .gate_act)
        if attn._pirope_family.gate_act == "softplus":  # Laguna: in float32, rounded to the output's dtype
            gate = nn.functional.softplus(gate.float()).to(out.dtype)
        else:
            gate = gate.sigmoid()
        if gate.dim() > out.dim():  # one gate per head, (B, S, H, 1): see _project
            out = (out.unflatten(-1, (gate.shape[-2], -1)) * gate).flatten(-2)
        else:
            out = out * gate
    if attn._pirope_family.out_norm is not None:  # BitNet's attn_sub_norm
        out = getattr(attn, attn._pirope_family.out_norm)(out)
    out = getattr(attn, attn._pirope_family.out_proj)(out)
    rate = attn._pirope_family.out_dropout
    if rate is not None:
        out = nn.functional.dropout(out, p=getattr(attn, rate), training=attn.training)
    return out


def _slice_kv_shared_inputs(base, hidden_states, *args, **kwargs):
    """Gemma 4's ``_maybe_slice_kv_shared_inputs`` for the patched model (installed on its base model
    by :func:`patch_rope`, a partial pickling by name): before its KV-shared layers, transformers keeps
    the last ``logits_to_keep`` tokens only (a prefill of generate) and slices each layer type's
    ``(cos, sin)`` along the sequence. Those are :class:`RopeTables` here, the rows of which the
    tokens' positions pick: transformers' own method decides and slices the positions instead.
    The layer-type dict of tables is found among the arguments (Gemma 4's method also takes and
    returns the per-layer inputs, Gemma 4 Unified's does not) and comes back at the same place."""
    at = next(i for i, a in enumerate(args)
              if isinstance(a, dict) and a and all(isinstance(t, RopeTables) for t in a.values()))
    tables = args[at]
    seqlen = hidden_states.shape[1]
    stand_ins = {}
    for layer_type, t in tables.items():
        pos = t.position_ids
        if pos is None:
            pos = torch.arange(seqlen, device=hidden_states.device)[None]
        pos = pos.expand(hidden_states.shape[0], seqlen)[..., None]
        stand_ins[layer_type] = (pos, pos)
    out = list(type(base)._maybe_slice_kv_shared_inputs(base, hidden_states, *args[:at], stand_ins, *args[at + 1:],
                                                          **kwargs))
    sliced = out[at + 1]  # (the outputs lead with hidden_states)
    out[at + 1] = tables if sliced is stand_ins else {
        layer_type: t._replace(position_ids=sliced[layer_type][0][..., 0]) for layer_type, t in tables.items()}
    return tuple(out)
