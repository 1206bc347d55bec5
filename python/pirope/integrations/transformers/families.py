"""The architectures patch_rope knows: for each ``config.model_type``, how its attention differs
from LLaMA's where pirope must follow it (:class:`_Family`), and which layers rotate."""

from __future__ import annotations

from typing import Any, NamedTuple



class _RopeLayers(NamedTuple):
    """Which layers of a family rotate q and k: ``rotates(attn)`` exactly as the family's
    Hugging Face attention forward decides, from the attention module's attributes
    ``needs`` (checked when patching)."""

    needs: tuple[str, ...]
    rotates: Any  # Callable[[nn.Module], bool], a module-level function (pickles by name)


def _rotates_by_use_rope(attn) -> bool:
    # SmolLM3: `if self.use_rope: apply_rotary_pos_emb(...)`, use_rope 0 on its NoPE layers (Llama 4
    # the same: `if self.use_rope: apply_rotary_emb(...)`, use_rope its config.no_rope_layers entry)
    return bool(attn.use_rope)


def _rotates_exaone4(attn) -> bool:
    # EXAONE 4: `if self.sliding_window is None or self.is_sliding: apply_rotary_pos_emb(...)`
    # -- with a window, the global (full_attention) layers are NoPE
    return attn.sliding_window is None or bool(attn.is_sliding)


def _rotates_when_windowed(attn) -> bool:
    # Cohere 2: `if self.sliding_window is not None: apply_rotary_pos_emb(...)`, where the
    # module's sliding_window is None on its full_attention layers (NoPE)
    return attn.sliding_window is not None


def _rotates_when_windowed_or_forced(attn) -> bool:
    # Cohere 2 MoE: `if self.sliding_window is not None or self.force_rope: apply_rotary_pos_emb(...)`,
    # force_rope set on its dense prefix layers when config.prefix_dense_sliding_window_pattern == 1
    # (they are all full_attention then, and rotate)
    return attn.sliding_window is not None or bool(attn.force_rope)


def _rotates_when_local(attn) -> bool:
    # AFMoE: `if self.is_local_attention: apply_rotary_pos_emb(...)`, its sliding_attention layers
    return bool(attn.is_local_attention)


def _rotates_when_sliding(attn) -> bool:
    # LaraMini: its model hands position_embeddings to the sliding_attention layers only (None to the
    # full_attention ones, NoPE) and the attention rotates `if position_embeddings is not None`
    return attn.layer_type == "sliding_attention"


def _rotates_by_layer_theta(attn) -> bool:
    # GraniteSWA: its model hands position_embeddings to the layers whose config.layer_rope_theta is not 0
    # (None to the others, NoPE) and the attention rotates `if position_embeddings is not None`
    return bool(attn.config.layer_rope_theta[attn.layer_idx])


class _Family(NamedTuple):
    """How an architecture's attention differs from LLaMA's, where pirope must follow it."""

    # "separate": q_proj, k_proj, v_proj;  "qkv": one qkv_proj split as q | k | v;  "qkv_heads":
    # one query_key_value whose output is, per head, q | k | v (GPT-NeoX: viewed as (..., heads,
    # 3 * head_dim) and chunked);  "falcon_qkv": Falcon's query_key_value in its three layouts
    # (_falcon_qkv);  "mla": DeepSeek-V2's Multi-head Latent Attention (its own forward,
    # _pirope_mla_attention_forward; head_dim_attr names the rotary part's size)
    proj: str
    # None: the attention gets no sliding_window kwarg (Llama); "config":
    # getattr(config, "sliding_window", None) (Mistral, Phi-3); "module": the attention
    # module's own .sliding_window (Qwen2, Qwen3, Ministral: per layer type); "sliding": the
    # module's .sliding_window where its .is_sliding, else None (EXAONE 4, whose modules all
    # hold the config's window)
    window: str | None
    partial: bool  # partial rotary (rotates the first rotary_dim features of a head)
    # q_norm / k_norm before RoPE: None (no norms); "head": over each head's features, after the
    # view into heads (Qwen3's RMSNorm, Cohere's per-head LayerNorm); "proj": over the whole
    # projection, before the view (OLMo 2's RMSNorm over num_heads * head_dim); "heads_first":
    # per head, on the (batch, heads, seqlen, head_dim) layout, the head dimension second
    # (StableLM's LayerNorm per head, which splits its input along dim 1)
    qk_norm: str | None = None
    # the attention module's attribute that switches the norms on (Cohere's use_qk_norm: the
    # modules exist only then; Llama 4's qk_norm module itself, present only where it normalizes);
    # None: a family with qk_norm always has them
    qk_norm_flag: str | None = None
    # the attention module's names of the q and k norms
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")
    # rotate pairs (2i, 2i+1) of the rotary features (Cohere, GLM) instead of rotate-half's
    # (i, i + rotary_dim/2)
    interleaved: bool = False
    # the config attribute that, where true, makes the family rotate interleaved pairs (DeepSeek-V3's
    # rope_interleave); None: interleaved alone decides
    interleave_flag: str | None = None
    # which layers rotate at all (NoPE layers: SmolLM3's use_rope 0, EXAONE 4's and Cohere 2's
    # global layers), derived from attention-module attributes; None: every layer rotates
    rope_layers: _RopeLayers | None = None
    # the attention module's attribute holding a dropout rate applied to o_proj's output in
    # training (StarCoder2's and Seed-OSS's residual_dropout); None: no such dropout
    out_dropout: str | None = None
    # config.rope_parameters is a dict keyed by layer type ({"full_attention": {...},
    # "sliding_attention": {...}}) and the rotary embedding is called once per layer type with
    # a layer_type argument (Gemma 3, OLMo 3): one pirope table per layer type
    rope_per_layer_type: bool = False
    # the attention module's attribute holding the attention-logit soft-cap its forward passes
    # to the attention function as softcap= (Gemma 2's attn_logit_softcapping: scores become
    # cap * tanh(scores / cap) before the mask and softmax); None: the family passes no softcap
    # (Gemma 3 stores attn_logit_softcapping but does not pass it). The fused path passes the
    # cap to pirope.rope_attention (CPU only: see _pirope_attention_forward)
    softcap: str | None = None
    # the config attribute whose value, when set, clamps q, k and v to [-value, value] after the
    # projections and "proj" norms, before the view into heads and RoPE (OLMo's and OLMoE's
    # clip_qkv); None: no clamping
    clip: str | None = None
    # the q/k norms (qk_norm "head", the only placement supported with it) run AFTER RoPE, on the
    # rotated q and k, before the cache update and the attention (NanoChat's weightless RMSNorms,
    # Hunyuan's query_layernorm / key_layernorm): pirope rotates, then the norms run, then the
    # model's attention function. rope_attention rotates inside itself, leaving no place for them
    # between: such layers fuse on CPU only, through its identity rotation (_rotates_inside)
    qk_norm_after_rope: bool = False
    # rotate by the negative angle: NanoChat's rotate_half is cat((x2, -x1)) where LLaMA's is
    # cat((-x2, x1)), i.e. x * cos + rotate_half(x) * sin with sin negated. pirope's inverse rotation
    # (the apply_rope_qk_backward op, differentiable like apply_rope_qk) computes it on the same
    # table. Not fused (rope_attention rotates by +angle; the one such family is unfused anyway)
    conjugate: bool = False
    # rope_parameters {"rope_type": "dynamic", "alpha": a, ...} with a truthy alpha mean static
    # plain RoPE with base rope_theta * a ** (head_dim / (head_dim - 2)) (Hunyuan's "ntk_alpha"
    # rotary embedding; its other keys are ignored), and alpha is ignored with any other rope_type,
    # as in transformers (see _ntk_alpha_as_default)
    ntk_alpha: bool = False
    # the attention module's attribute holding per-head attention-sink logits its forward passes
    # to the attention function as s_aux= (GPT-OSS's sinks: each softmax row gets one more key of
    # that logit and no value); None: the family has none. The fused path passes them to
    # pirope.rope_attention's sinks (CPU only, as with softcap)
    sinks: str | None = None
    # what the decoder layer and its attention module call things: the attention (LLaMA's
    # self_attn, GPT-NeoX's attention), the output projection (o_proj / dense) and the head
    # size (head_dim / head_size)
    attn_name: str = "self_attn"
    out_proj: str = "o_proj"
    head_dim_attr: str = "head_dim"
    # the attention module's norm of the values, per head after the view (Gemma 4's v_norm, an
    # RMSNorm without weight); None: the values are not normalized
    v_norm: str | None = None
    # Gemma 4's KV sharing: a layer with is_kv_shared_layer has only q_proj (and q_norm) and
    # attends to the rotated keys and values the last earlier layer of its type stored in the
    # forward's shared_kv_states (a layer with store_full_length_kv stores them, after its cache
    # update); and a layer whose v_proj is None (attention_k_eq_v) takes k_proj's output as values
    kv_sharing: bool = False
    # the attention rotates its first rotary_ndims = int(head_dim * partial_rotary_factor) features,
    # fixed when it is built, rather than the table's width (Phi, Persimmon, StableLM): a
    # "proportional" table, which spans the whole head, does not fit (transformers fails on it)
    fixed_rotary_dim: bool = False
    # Llama 4's attention temperature (Ministral 3): after RoPE, q times 1 + beta * log(1 +
    # floor(position / window)), beta = rope_parameters["llama_4_scaling_beta"] and window =
    # rope_parameters["original_max_position_embeddings"] (transformers' get_llama_4_attn_scale of
    # the model's module, on the position_ids the decoder layer passes). Those keys (and the
    # "max_position_embeddings" such configs write beside them) are the attention's, not the
    # table's: kept when the scaling is replaced, left out of pirope's table (the window where
    # the rope_type's table does not read it)
    attn_temperature: bool = False
    # the attention module's norm of the attention output, over the whole (heads x head_dim)
    # features, before the output projection (BitNet's attn_sub_norm); None: no such norm
    out_norm: str | None = None
    # gated attention (proj "separate"): the attention module's projection whose output is, per
    # head, q | gate (MiniCPM5-MoE's q_gate_proj, Qwen3-Next's q_proj), the attention's output
    # (all heads) multiplied by sigmoid(gate) before the output projection; None: no gate
    q_gate: str | None = None
    # gated attention by a projection of its own: the attention module's projection of the hidden
    # states whose activation (gate_act) multiplies the attention's output before the output projection:
    # all heads' width (AFMoE's gate_proj), or one value per head gating that head's features (LFM3's
    # g_proj, None where its config has no gate; Laguna's and Step 3.7's g_proj with gating "per-head");
    # None: no such gate
    gate: str | None = None
    # the gate's activation: "sigmoid" (AFMoE's), or "softplus" (Laguna's: in float32, then the output's dtype)
    gate_act: str = "sigmoid"
    # the config.layer_types entry of the decoder layers that have no attention (Qwen3-Next's
    # "linear_attention": a Gated DeltaNet, no RoPE), which the patch leaves as they are; None:
    # every layer has the attention
    linear_layers: str | None = None
    # the config attribute listing the decoder layers that attend to the image instead of themselves
    # (Mllama's cross_attention_layers: cross_attn, no self_attn, no RoPE), which the patch leaves as they
    # are; None: no such layers
    cross_layers: str | None = None
    # the attention module's attribute holding its attention dropout rate (Mllama's dropout)
    dropout_attr: str = "attention_dropout"
    # multimodal RoPE (mRoPE: Qwen2-VL, Qwen3-VL, Qwen3.5, GLM-4V): the rotary embedding takes
    # position_ids (3, batch, seqlen), a temporal, height and width position per token, and each pair
    # of the table turns by the position of one of them (its recomposition_frequencies says which,
    # read when patching); the layers get the text positions (transformers' text_position_ids, which
    # delimit packed sequences) as their position_ids kwarg, or None (GLM-4V-MoE passes the three
    # sections there: packing is then read from all three, where an image's positions repeat, so
    # its calls with an image fuse only with a mask tensor that shows them causal, eager's)
    mrope: bool = False
    # the base model's attribute holding the rotary embedding, which the patch replaces (LLaMA's
    # rotary_emb; LFM2-MoE's pos_emb)
    rotary_name: str = "rotary_emb"
    # the base model's attribute holding the decoder layers (LLaMA's layers, Falcon's h)
    layers_name: str = "layers"
    # the first transformers version whose attention of this family pirope follows (Falcon's before
    # 5.25 computed its attention itself): named where an older one's modules lack what is needed
    since: str | None = None
    # the config attribute that, where true, gives the model positions another way than RoPE, its
    # rotary embedding unused (Falcon's alibi: an ALiBi bias in the mask); such a model is refused
    no_rope_flag: str | None = None
    # the config attribute holding the chunk size of the layers whose config.layer_types entry is
    # "chunked_attention" (Llama 4's attention_chunk_size: a query sees the keys at or before it in
    # its own chunk of that many tokens, through the mask transformers builds). Such a layer takes
    # the fused path where the call fits in one chunk (plain causal there), or with a mask tensor that
    # shows the chunks (_segments_of_mask: each chunk a sequence of cu_seqlens); None: no chunks
    chunked: str | None = None
    # transformers' own plain ("default") table of the family spans the whole head, its partial_rotary_factor
    # ignored (Mistral 4's compute_default_rope_parameters): where the family rotates part of the head it does
    # not fit, and is refused (the scaled rope types read the factor)
    default_spans_head: bool = False
    # LongCat-Flash's MLA: q times the module's mla_scale_q_lora and the normalized latent times its
    # mla_scale_kv_lora, before RoPE and the cache
    mla_lora_scales: bool = False
    # Llama 4's attention temperature tuning of its NoPE layers: where the module's
    # attn_temperature_tuning is set and it does not rotate, q times 1 + attn_scale * log1p(
    # floor((p + 1) / floor_scale)), p the token's index in the call plus the cache's length (not
    # its position_ids), in float32 (see _nope_temperature)
    nope_temperature: bool = False
    # the module's sinks attribute (_Family.sinks) is None on the layers without sinks, whose attention then has
    # none (MiMo-V2-Flash's full_attention layers: it passes s_aux None, its eager attention tests
    # `module.sinks is not None`); False: every layer must hold a sinks tensor
    sinks_optional: bool = False
    # the attention module's attribute holding the values' head size where it differs from q's and k's
    # (MiMo-V2-Flash's v_head_dim: v_proj gives heads x it, v is viewed with it, o_proj takes heads x it); the
    # fused path pads the values with zero features to q's head size (or q and k to theirs) and slices the
    # output back (see _one_head_size); None: the values have head_dim features
    v_head_dim: str | None = None
    # the attention module's attribute holding a constant the values are multiplied by after the projection,
    # before the cache and the attention (MiMo-V2-Flash's v_scale, config.attention_value_scale); None: none
    v_scale: str | None = None
    # transformers' own "default" table of the family (a rotary embedding with RoPE per layer type) reads
    # partial_rotary_factor from the type's rope_parameters only, this value where that has none
    # (MiMo-V2-Flash's compute_default_rope_parameters: 0.334), while its scaled rope types read 1.0 there
    # (transformers' default); pirope does the same and writes the factor out in a replaced scaling, which
    # keeps the part of the head that rotates. Such a dict beside a config.partial_rotary_factor (which the
    # scaled types' init copies into every type's dict, the default table not reading it) is refused.
    # None: the config's partial_rotary_factor, else 1.0
    default_partial: float | None = None
    # the attention module's attribute holding a sparse-attention indexer, None on the layers without one
    # (MiniMax M3's lightning indexer on its "minimax_m3_sparse" layers: it rotates projections of its own by
    # the model's cos/sin and masks the attention to the key blocks it selects), which pirope does not
    # follow: a model with such a layer is refused; None: the family has no indexer
    indexer: str | None = None
    # the base model's ModuleList of rotary embeddings, one per distinct non-zero theta of
    # config.layer_rope_theta in increasing order, each built from a copy of the config whose
    # rope_parameters' rope_theta is that theta (their scaling applying to every theta), whose tables the
    # model hands the layers of that theta, finding them by that copy's rope_parameters["rope_theta"]
    # (GraniteSWA's rotary_embs; its rotary_name embedding is built but unused): each replaced by pirope's
    # of its theta; None: the model's one rotary_name embedding
    rotary_per_theta: str | None = None


# Families whose attention is LLaMA's up to the differences above (checked against
# transformers' modeling code: same rotary embedding and attention call; rotate-half RoPE
# unless interleaved; Gemma may be bidirectional (is_causal), Granite scales by
# attention_multiplier (scaling); Cohere, Helium and ERNIE 4.5 rotate the pairs (2i, 2i+1)
# their repeat_interleave'd cos/sin make, GLM the same on its first rotary_dim features only).
_FAMILIES: dict[str, _Family] = {
    "llama": _Family("separate", None, False),
    "olmo": _Family("separate", None, False, clip="clip_qkv"),
    "mistral": _Family("separate", "config", False),
    "ministral": _Family("separate", "module", False),
    "qwen2": _Family("separate", "module", False),
    "qwen3": _Family("separate", "module", False, qk_norm="head"),
    "qwen3_moe": _Family("separate", "module", False, qk_norm="head"),
    "gemma": _Family("separate", None, False),
    "granite": _Family("separate", None, False),
    "phi3": _Family("qkv", "config", True),
    "olmo2": _Family("separate", None, False, qk_norm="proj"),
    "cohere": _Family("separate", None, False, qk_norm="head", qk_norm_flag="use_qk_norm", interleaved=True),
    "glm": _Family("separate", None, True, interleaved=True),
    "glm4": _Family("separate", None, True, interleaved=True),
    "smollm3": _Family("separate", "module", False, rope_layers=_RopeLayers(("use_rope",), _rotates_by_use_rope)),
    "arcee": _Family("separate", None, False),
    "apertus": _Family("separate", None, False, qk_norm="head"),
    "helium": _Family("separate", None, False, interleaved=True),
    "ernie4_5": _Family("separate", None, False, interleaved=True),
    "seed_oss": _Family("separate", None, False, out_dropout="residual_dropout"),
    "starcoder2": _Family("separate", "config", False, out_dropout="residual_dropout"),
    # Gemma4ForCausalLM (text only; Gemma4ForConditionalGeneration's language model is one): RoPE per
    # layer type ("proportional" on its full_attention layers, whose heads are larger), per-head q/k
    # RMSNorms before RoPE and a weightless one on v, scaling 1.0, KV sharing between layers
    "gemma4_text": _Family("separate", "module", False, qk_norm="head", rope_per_layer_type=True, v_norm="v_norm",
                           kv_sharing=True),
    # Gemma4UnifiedForCausalLM: Gemma 4's attention module itself (no per-layer inputs)
    "gemma4_unified_text": _Family("separate", "module", False, qk_norm="head", rope_per_layer_type=True,
                                   v_norm="v_norm", kv_sharing=True),
    # Gemma3nForCausalLM (Gemma 3n's text model): Gemma 4's attention without attention_k_eq_v, RoPE
    # per layer type (one head size); its AltUp / LAuReL / per-layer inputs live outside the attention
    "gemma3n_text": _Family("separate", "module", False, qk_norm="head", rope_per_layer_type=True, v_norm="v_norm",
                            kv_sharing=True),
    # Gemma3ForCausalLM (text only; Gemma3ForConditionalGeneration, "gemma3", has one as its language model)
    # Gemma2ForCausalLM: sliding_window on the sliding_attention layers' modules, scaling
    # query_pre_attn_scalar ** -0.5, attn_logit_softcapping passed as softcap
    "gemma2": _Family("separate", "module", False, softcap="attn_logit_softcapping"),
    "gemma3_text": _Family("separate", "module", False, qk_norm="head", rope_per_layer_type=True),
    "olmo3": _Family("separate", "module", False, qk_norm="proj", rope_per_layer_type=True),
    "exaone4": _Family("separate", "sliding", False, qk_norm="head",
                       rope_layers=_RopeLayers(("sliding_window", "is_sliding"), _rotates_exaone4)),
    "cohere2": _Family("separate", "module", False, interleaved=True,
                       rope_layers=_RopeLayers(("sliding_window",), _rotates_when_windowed)),
    # Architectures whose attention is one of the above, line for line (mostly mixture-of-experts
    # models: the experts are in the MLP, which the patch does not touch)
    "mixtral": _Family("separate", "config", False),  # Mistral's
    # Qwen2-MoE windows through its mask only (its attention gets no sliding_window): LLaMA's
    "qwen2_moe": _Family("separate", None, False),
    "granitemoe": _Family("separate", None, False),  # Granite's (attention_multiplier)
    "granitemoeshared": _Family("separate", None, False),
    "hyperclovax": _Family("separate", None, False),  # Granite's
    "jais2": _Family("separate", None, False),
    # MiniCPM5-MoE: LLaMA's attention with q from a q_gate_proj whose other half gates the output
    "minicpm5_moe": _Family("separate", None, False, q_gate="q_gate_proj"),
    # Qwen3-Next (Qwen3NextForCausalLM): its full_attention layers' attention is Qwen3's with
    # partial rotary and q_proj giving q | gate per head; its linear_attention layers (Gated
    # DeltaNet, no RoPE) are left alone
    "qwen3_next": _Family("separate", None, True, qk_norm="head", q_gate="q_proj", linear_layers="linear_attention"),
    "emu3_text_model": _Family("separate", None, False),  # Emu3ForCausalLM (Emu3's text model)
    "aria_text": _Family("separate", None, False),  # AriaTextForCausalLM (Aria's text model, MoE MLPs)
    # the language models of DeepSeek-OCR 2 (LLaMA's attention, MoE MLPs) and Granite 4.0 Vision (Granite's
    # attention: attention_multiplier), inside their multimodal models only
    "deepseek_ocr2_text": _Family("separate", None, False),
    "granite4_vision_text": _Family("separate", None, False),
    # Multimodal RoPE (the language models of Qwen2-VL, Qwen2.5-VL: Qwen2's attention; Qwen3-VL and its
    # MoE: Qwen3's without a window; Qwen3.5 and its MoE, also Qwen3_5ForCausalLM: Qwen3-Next's)
    "qwen2_vl_text": _Family("separate", "module", False, mrope=True),
    "qwen2_5_vl_text": _Family("separate", "module", False, mrope=True),
    "qwen3_vl_text": _Family("separate", None, False, qk_norm="head", mrope=True),
    "qwen3_vl_moe_text": _Family("separate", None, False, qk_norm="head", mrope=True),
    "qwen3_5_text": _Family("separate", None, True, qk_norm="head", q_gate="q_proj",
                            linear_layers="linear_attention", mrope=True),
    "qwen3_5_moe_text": _Family("separate", None, True, qk_norm="head", q_gate="q_proj",
                                linear_layers="linear_attention", mrope=True),
    # GLM-4.1V / GLM-4.5V's language models: LLaMA's attention (q/k/v biases in GLM-4V), partial rotary;
    # GLM-4V and GLM-OCR rotate interleaved pairs, GLM-4V-MoE rotate-half ones (GLM-4.5's)
    "glm4v_text": _Family("separate", None, True, interleaved=True, mrope=True),
    "glm_ocr_text": _Family("separate", None, True, interleaved=True, mrope=True),
    "glm4v_moe_text": _Family("separate", None, True, mrope=True),  # (GLM-4.5's attention, no q/k norms)
    # GLM-Image's language model (an autoregressive image generator): GLM-4V-MoE's fields (LLaMA's attention with
    # q/k/v biases, partial rotary, rotate-half pairs, contiguous sections), its layers handed the text positions
    "glm_image_text": _Family("separate", None, True, mrope=True),
    # PaddleOCR-VL's language model (ERNIE 4.5 0.3B with multimodal RoPE): Qwen2-VL's attention
    "paddleocr_vl_text": _Family("separate", "module", False, mrope=True),
    # the thinkers' language models of Qwen2.5-Omni (Qwen2-VL's attention) and Qwen3-Omni (Qwen3's, with
    # Qwen3-VL's interleaved sections)
    "qwen2_5_omni_text": _Family("separate", "module", False, mrope=True),
    "qwen3_omni_moe_text": _Family("separate", "module", False, qk_norm="head", mrope=True),
    "solar_open": _Family("separate", None, False),
    "cwm": _Family("separate", "module", False),  # Ministral's
    # Ministral 3 (Ministral3ForCausalLM; Mistral3ForConditionalGeneration's language model is one):
    # Mistral's attention (the config's sliding_window: its modules hold none) with Llama 4's
    # attention temperature after RoPE
    "ministral3": _Family("separate", "config", False, attn_temperature=True),
    # BitNet b1.58 (BitNetForCausalLM): LLaMA's attention with an RMSNorm of its output before o_proj
    "bitnet": _Family("separate", None, False, out_norm="attn_sub_norm"),
    "ernie4_5_moe": _Family("separate", None, False, interleaved=True),
    "dots1": _Family("separate", "module", False, qk_norm="head"),  # Qwen3's
    "hy_v3": _Family("separate", None, False, qk_norm="head"),  # Apertus'
    "mellum": _Family("separate", "module", False, qk_norm="head", rope_per_layer_type=True),
    "flex_olmo": _Family("separate", None, False, qk_norm="proj"),  # OLMo 2's
    "minimax_m2": _Family("separate", None, True, qk_norm="proj"),  # OLMo 2's, partial rotary
    # MiniMax M3 (MiniMaxM3VLForCausalLM; MiniMaxM3SparseForConditionalGeneration's language model): Qwen3's
    # per-head q/k norms before RoPE, partial rotary (rope_parameters' partial_rotary_factor: its config's
    # rotary_dim is not read); its sparse layers (a lightning indexer) are refused
    "minimax_m3_vl_text": _Family("separate", None, True, qk_norm="head", indexer="indexer"),
    "olmoe": _Family("separate", "config", False, qk_norm="proj", clip="clip_qkv"),
    "vaultgemma": _Family("separate", "module", False, softcap="attn_logit_softcapping"),  # Gemma 2's
    "exaone_moe": _Family("separate", "sliding", False, qk_norm="head",
                          rope_layers=_RopeLayers(("sliding_window", "is_sliding"), _rotates_exaone4)),
    "kolibri1": _Family("separate", "sliding", False, qk_norm="head",  # EXAONE 4's
                        rope_layers=_RopeLayers(("sliding_window", "is_sliding"), _rotates_exaone4)),
    # Cohere 2's, whose dense prefix layers (force_rope) rotate without a window
    "cohere2_moe": _Family("separate", "module", False, interleaved=True,
                           rope_layers=_RopeLayers(("sliding_window", "force_rope"),
                                                   _rotates_when_windowed_or_forced)),
    # Apertus1p5TextForCausalLM (Apertus 1.5's text model)
    "apertus1p5_text": _Family("separate", None, False, qk_norm="head"),  # Apertus'
    # GLM-4.5 (Glm4MoeForCausalLM): partial rotary with rotate-half pairs (not GLM's interleaved ones),
    # Cohere's optional (use_qk_norm) per-head q/k norms, here RMSNorms
    "glm4_moe": _Family("separate", None, True, qk_norm="head", qk_norm_flag="use_qk_norm"),
    # Nemotron: LLaMA's attention, its RoPE on the first rotary_dim features only (partial rotary, rotate-half)
    "nemotron": _Family("separate", None, True),
    # NanoChat: per-head RMSNorms without weights AFTER RoPE, and a rotate_half with flipped signs
    # (cat((x2, -x1))): it rotates by the negative angle
    "nanochat": _Family("separate", None, False, qk_norm="head", qk_norm_after_rope=True, conjugate=True),
    # Hunyuan (dense and MoE: the same attention): per-head RMSNorms query_layernorm / key_layernorm
    # AFTER RoPE; "dynamic" RoPE with an alpha is its static NTK-alpha base (its checkpoints' form)
    "hunyuan_v1_dense": _Family("separate", None, False, qk_norm="head",
                                qk_norm_names=("query_layernorm", "key_layernorm"), qk_norm_after_rope=True,
                                ntk_alpha=True),
    "hunyuan_v1_moe": _Family("separate", None, False, qk_norm="head",
                              qk_norm_names=("query_layernorm", "key_layernorm"), qk_norm_after_rope=True,
                              ntk_alpha=True),
    # GPT-OSS: LLaMA's attention (q/k/v biases) with a sliding window on its sliding_attention
    # layers (the module's own .sliding_window) and per-head attention sinks passed as s_aux
    "gpt_oss": _Family("separate", "module", False, sinks="sinks"),
    # GPT-NeoX (Pythia): per-head fused q | k | v, partial rotary (rotary_pct), its own names
    "gpt_neox": _Family("qkv_heads", None, True, attn_name="attention", out_proj="dense",
                        head_dim_attr="head_size"),
    # Falcon (7B, 40B, 180B, Falcon 2): one query_key_value in one of three layouts (_falcon_qkv), full
    # rotary; its ALiBi configurations (config.alibi: Falcon-RW) have no RoPE and are refused
    "falcon": _Family("falcon_qkv", None, False, attn_name="self_attention", out_proj="dense", layers_name="h",
                      no_rope_flag="alibi", since="5.25"),
    # Phi (phi-1, phi-1.5, phi-2): partial rotary, dense, a LayerNorm over each head with qk_layernorm
    "phi": _Family("separate", None, True, qk_norm="head", qk_norm_flag="qk_layernorm",
                   qk_norm_names=("q_layernorm", "k_layernorm"), out_proj="dense", fixed_rotary_dim=True),
    # Persimmon: GPT-NeoX's per-head fused q | k | v, Phi's optional q/k LayerNorms
    "persimmon": _Family("qkv_heads", None, True, qk_norm="head", qk_norm_flag="qk_layernorm",
                         qk_norm_names=("q_layernorm", "k_layernorm"), out_proj="dense", fixed_rotary_dim=True),
    # StableLM: partial rotary; with qk_layernorm a LayerNorm per head, on (batch, heads, ...)
    "stablelm": _Family("separate", None, True, qk_norm="heads_first", qk_norm_flag="qk_layernorm",
                        qk_norm_names=("q_layernorm", "k_layernorm"), fixed_rotary_dim=True),
    # Granite 4.0 hybrids (GraniteMoeHybridForCausalLM) with position_embedding_type "rope": Granite's
    # attention (attention_multiplier) on its "attention" layers; the Mamba-2 layers ("linear_attention")
    # are left alone (with NoPE, the checkpoints' default, the model has no rotary_emb: nothing to patch)
    "granitemoehybrid": _Family("separate", None, False, linear_layers="linear_attention"),
    # OLMo Hybrid with RoPE (its released checkpoints have none: refused): OLMo 2's attention on its
    # full_attention layers, Gated DeltaNets ("linear_attention") left alone
    "olmo_hybrid": _Family("separate", None, False, qk_norm="proj", linear_layers="linear_attention"),
    # Flint: per-head q/k RMSNorms before RoPE, GPT-OSS's attention sinks, RoPE on the sliding layers only
    # (its full_attention layers, whose module has no window, are NoPE: Cohere 2's rule)
    "flint": _Family("separate", "module", False, qk_norm="head", sinks="sinks",
                     rope_layers=_RopeLayers(("sliding_window",), _rotates_when_windowed)),
    # AFMoE (Arcee's Trinity): per-head q/k RMSNorms before RoPE, RoPE on its sliding_attention layers
    # only (is_local_attention), the output gated by sigmoid(gate_proj(hidden_states))
    "afmoe": _Family("separate", "module", False, qk_norm="head", gate="gate_proj",
                     rope_layers=_RopeLayers(("is_local_attention",), _rotates_when_local)),
    # GraniteSWA (dense and MoE): Granite's attention (attention_multiplier) with a window on its
    # sliding_attention layers and GPT-OSS's sinks (its eager applies them as sigmoid(logsumexp - sink), the
    # same), RoPE per layer by config.layer_rope_theta (one rotary embedding per theta), NoPE where it is 0
    "granite_swa": _Family("separate", "module", False, sinks="sinks", rotary_per_theta="rotary_embs",
                           rope_layers=_RopeLayers(("layer_idx",), _rotates_by_layer_theta)),
    "granitemoe_swa": _Family("separate", "module", False, sinks="sinks", rotary_per_theta="rotary_embs",
                              rope_layers=_RopeLayers(("layer_idx",), _rotates_by_layer_theta)),
    # Laguna (Poolside): AFMoE's attention, rotating in every layer, partial rotary and RoPE per layer type
    # (the full_attention layers' 0.5 of a head, the sliding ones' whole head), heads per layer, and the output
    # gated by softplus(g_proj(hidden_states)), one gate per head (gating "per-head") or per feature
    "laguna": _Family("separate", "module", True, qk_norm="head", gate="g_proj", gate_act="softplus",
                      rope_per_layer_type=True),
    # Step 3.5 / 3.7's language model (Step3p7ForConditionalGeneration's): Laguna's attention with the
    # gate's sigmoid (query_pre_attn_scalar as its scaling, (1 + w) RMSNorm q/k norms)
    "step3p5": _Family("separate", "module", True, qk_norm="head", gate="g_proj", rope_per_layer_type=True),
    # MiMo-V2-Flash (Xiaomi): Qwen2's attention (q/k/v biases with attention_bias), RoPE per layer type with
    # partial rotary (0.334 of the head where the type's rope_parameters say nothing), a window and GPT-OSS's
    # attention sinks on its sliding_attention layers (None on the full_attention ones), values of their own
    # head size (v_head_dim) times v_scale
    "mimo_v2_flash": _Family("separate", "module", True, sinks="sinks", sinks_optional=True, rope_per_layer_type=True,
                             v_head_dim="v_head_dim", v_scale="v_scale", default_partial=0.334),
    # Llama 3.2 Vision's language model (MllamaForCausalLM; MllamaForConditionalGeneration's is one):
    # LLaMA's self-attention (its dropout rate in .dropout) between cross-attention layers (left alone)
    "mllama_text_model": _Family("separate", None, False, cross_layers="cross_attention_layers", dropout_attr="dropout"),
    # LFM2 and LFM2-MoE (Liquid): LLaMA's attention with per-head RMSNorms q_layernorm / k_layernorm
    # before RoPE and out_proj; hybrids whose "conv" layers (short convolutions, no RoPE) are left alone
    "lfm2": _Family("separate", None, False, qk_norm="head", qk_norm_names=("q_layernorm", "k_layernorm"),
                    out_proj="out_proj", linear_layers="conv"),
    "lfm2_moe": _Family("separate", None, False, qk_norm="head", qk_norm_names=("q_layernorm", "k_layernorm"),
                        out_proj="out_proj", linear_layers="conv", rotary_name="pos_emb"),
    # LFM3 (Liquid): Qwen3's attention (per-head q/k RMSNorms before RoPE) with a window on its
    # sliding_attention layers, RoPE per layer type ("proportional" on full_attention), its output times
    # sigmoid(g_proj(hidden)) per head (where use_attention_gate); "conv" layers left alone
    "lfm3": _Family("separate", "module", False, qk_norm="head", rope_per_layer_type=True, gate="g_proj",
                    linear_layers="conv"),
    # LaraMini: Qwen3-Next's layout (Gated DeltaNets, "linear_attention", left alone) with Qwen3's attention;
    # RoPE on the sliding_attention layers only (windowed), the full_attention ones handed no tables (NoPE)
    "lara_mini": _Family("separate", "module", False, qk_norm="head", linear_layers="linear_attention",
                         rope_layers=_RopeLayers(("layer_type",), _rotates_when_sliding)),
    # Llama 4 (Llama4ForCausalLM; Llama4ForConditionalGeneration's language model is one): interleaved
    # pairs (its complex rotation), NoPE layers (config.no_rope_layers 0: use_rope) with attention
    # temperature tuning, a weightless RMSNorm `qk_norm` of the rotated q and k on the rotating layers
    # where config.use_qk_norm (the module exists only there), chunked attention on the rotating layers
    "llama4_text": _Family("separate", None, False, qk_norm="head", qk_norm_flag="qk_norm",
                           qk_norm_names=("qk_norm", "qk_norm"), qk_norm_after_rope=True, interleaved=True,
                           rope_layers=_RopeLayers(("use_rope",), _rotates_by_use_rope),
                           chunked="attention_chunk_size", nope_temperature=True),
    # Multi-head Latent Attention (DeepSeek-V2's MLA): the rotary part of each head (qk_rope_head_dim) and
    # one rotary key shared by the heads; DeepSeek-V2 rotates interleaved pairs (its complex rotation),
    # DeepSeek-V3 and the architectures that take its attention line for line (GLM-4.7-Flash's
    # glm4_moe_lite, Youtu, A.X K1) interleaved pairs where config.rope_interleave, else rotate-half ones
    # (MiniCPM3 always rotate-half)
    "deepseek_v2": _Family("mla", None, False, interleaved=True, head_dim_attr="qk_rope_head_dim"),
    "deepseek_v3": _Family("mla", None, False, interleave_flag="rope_interleave", head_dim_attr="qk_rope_head_dim"),
    "glm4_moe_lite": _Family("mla", None, False, interleave_flag="rope_interleave", head_dim_attr="qk_rope_head_dim"),
    "youtu": _Family("mla", None, False, interleave_flag="rope_interleave", head_dim_attr="qk_rope_head_dim"),
    "axk1": _Family("mla", None, False, interleave_flag="rope_interleave", head_dim_attr="qk_rope_head_dim"),
    "minicpm3": _Family("mla", None, False, head_dim_attr="qk_rope_head_dim"),
    # Mistral 4: DeepSeek-V3's attention, its table over the whole head (qk_head_dim) with a partial_rotary_factor
    # making it the rotary part's, and Ministral 3's attention temperature on the whole query
    "mistral4": _Family("mla", None, True, interleave_flag="rope_interleave", head_dim_attr="qk_head_dim",
                        attn_temperature=True, default_spans_head=True),
    # LongCat-Flash: two MLAs per decoder layer (a ModuleList self_attn), q and the latent scaled by
    # mla_scale_q_lora / mla_scale_kv_lora, interleaved pairs
    "longcat_flash": _Family("mla", None, False, interleaved=True, head_dim_attr="qk_rope_head_dim",
                             mla_lora_scales=True),
}


# the projection modules each kind of _Family.proj needs
_PROJECTIONS = {"separate": ("q_proj", "k_proj", "v_proj"), "qkv": ("qkv_proj",), "qkv_heads": ("query_key_value",),
                # (with what says which layout; and scaling, which transformers' Falcon attention has since it
                # runs transformers' attention functions, 5.25: its earlier one computed attention itself)
                "falcon_qkv": ("query_key_value", "new_decoder_architecture", "multi_query", "num_kv_heads",
                               "scaling"),
                # (q from q_proj, or with a q_lora_rank from q_b_proj(q_a_layernorm(q_a_proj(.)))): see
                # _pirope_mla_attention_forward
                "mla": ("q_lora_rank", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "expand_kv",
                        "qk_nope_head_dim", "qk_head_dim", "kv_lora_rank", "v_head_dim")}


#: ``config.model_type`` values :func:`patch_rope` and :func:`apply_position_interpolation` accept.
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
