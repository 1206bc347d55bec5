"""Hugging Face transformers integration: Position Interpolation for LLaMA-family models.

    from transformers import AutoModelForCausalLM
    from pirope.integrations.transformers import apply_position_interpolation

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")   # 4k window
    model = apply_position_interpolation(model, 4.0)                          # 16k, PI
    # ... fine-tune ...; model.save_pretrained(path) loads back with plain transformers

Two functions:

* :func:`apply_position_interpolation` extends the context window by Position
  Interpolation (``rope_type "linear"``) *and* routes RoPE (and, with
  ``attention="fused"``, attention) through pirope's ops.
* :func:`patch_rope` only routes the model's current RoPE configuration -- any
  ``rope_type``: default, linear, dynamic, yarn, llama3, longrope, partial rotary where
  the architecture has it -- through pirope's ops, with logits equal to the unpatched
  model's.

Supported architectures (``config.model_type``): ``llama``, ``mistral``, ``ministral``,
``qwen2``, ``granite``, ``gemma``, ``arcee`` (separate ``q_proj``/``k_proj``/``v_proj``),
``seed_oss`` and ``starcoder2`` (the same, with dropout after ``o_proj``), ``olmo`` (the
same, q/k/v clamped to ``config.clip_qkv`` before RoPE), ``qwen3``,
``qwen3_moe`` and ``apertus`` (per-head ``q_norm``/``k_norm`` before RoPE), ``olmo2``
(``q_norm``/``k_norm`` over the whole projection, before the view into heads), ``cohere``
(interleaved pairs ``(2i, 2i+1)``; with ``use_qk_norm`` a per-head LayerNorm before
RoPE), ``helium`` and ``ernie4_5`` (interleaved pairs), ``glm`` and ``glm4`` (interleaved
pairs on the first ``rotary_dim`` features: partial rotary), ``smollm3`` (NoPE layers:
``use_rope`` 0, from ``config.no_rope_layers``), ``phi3`` (fused ``qkv_proj``, partial
rotary), ``gemma3_text`` (``Gemma3ForCausalLM``: RoPE per layer type, per-head ``(1 +
weight)`` RMSNorm q/k norms, scaling ``query_pre_attn_scalar ** -0.5``), ``gemma4_text``
(``Gemma4ForCausalLM``: RoPE per layer type, "proportional" on its full_attention layers, whose
heads are larger (``global_head_dim``); per-head q/k RMSNorms before RoPE and a weightless one on
v; scaling 1.0; ``attention_k_eq_v``: layers without ``v_proj`` take k_proj's output as values;
KV sharing: from ``num_kv_shared_layers`` before the end, a layer has only a query and attends to
the rotated keys and values the last earlier layer of its type stored in the forward's
``shared_kv_states``, which the patched layers store and read as transformers' do; the shared
layers, whose keys come rotated, always take the "sdpa" path), ``gemma3n_text``
(``Gemma3nForCausalLM``: the same attention with one head size, no ``attention_k_eq_v``, plain
RoPE per layer type; its AltUp, LAuReL and per-layer inputs are outside the attention),
``gemma4_unified_text`` (``Gemma4UnifiedForCausalLM``: Gemma 4's attention) and ``olmo3`` (RoPE
per layer type, OLMo 2's q/k norms), ``exaone4`` (per-head q/k norms) and ``cohere2``
(interleaved pairs), whose full_attention layers are NoPE when the model has a sliding
window (EXAONE 4: a layer rotates iff ``sliding_window is None or is_sliding``; Cohere 2:
iff the layer's ``sliding_window`` is set), ``gemma2`` (``Gemma2ForCausalLM``: sliding
windows on its sliding_attention layers, scaling ``query_pre_attn_scalar ** -0.5``, logit
soft-capping, see below), ``gpt_neox`` (Pythia: one ``query_key_value`` projection
holding q | k | v per head, partial rotary, ``attention``/``dense``/``head_size`` for
LLaMA's ``self_attn``/``o_proj``/``head_dim``), ``falcon`` (Falcon-7B/40B/180B, Falcon 2: one
``query_key_value`` in its three layouts -- per KV group the group's queries then its key and
value with ``new_decoder_architecture``, all queries then one key and value with ``multi_query``,
else q | k | v per head --, ``self_attention``/``dense``, layers in ``.h``; a config with ``alibi``
has no RoPE and is refused; transformers >= 5.25, whose Falcon attention runs its attention
functions; its model hands every layer a mask tensor, even a plain causal one, so the fused path
reads it on CPU, and on CUDA its layers take transformers' attention after pirope's rotation), ``phi`` (phi-1/1.5/2: partial rotary,
``dense``; with ``qk_layernorm`` a LayerNorm over each head before RoPE), ``persimmon``
(GPT-NeoX's fused projection, Phi's norms), ``stablelm`` (partial rotary; with
``qk_layernorm`` one LayerNorm per head), ``nemotron`` (LLaMA's attention, partial rotary),
``glm4_moe`` (GLM-4.5: partial rotary with rotate-half pairs; with ``use_qk_norm``
per-head RMSNorm q/k norms before RoPE), ``nanochat`` (per-head RMSNorms without weights
*after* RoPE, and a ``rotate_half`` with flipped signs: a rotation by the negative angle,
pirope's inverse rotation) and ``hunyuan_v1_dense`` and ``hunyuan_v1_moe`` (per-head RMSNorms
``query_layernorm``/``key_layernorm`` after RoPE; ``rope_parameters`` "dynamic" with an
``alpha``, their checkpoints' form, is static NTK-alpha RoPE: plain RoPE with base ``rope_theta
* alpha ** (head_dim / (head_dim - 2))``, as transformers' Hunyuan rotary embedding computes
it; Position Interpolation makes it ``{"rope_type": "linear", "factor": F, "rope_theta": that
base}``, which transformers loads back as the same model). With norms after RoPE the norms
run on the rotated q and k, before the cache update (rope_attention rotates inside itself: on
CPU these layers fuse through its identity rotation, see below; elsewhere they take the "sdpa"
path), ``gpt_oss`` (GPT-OSS: q/k/v biases, a
sliding window on its sliding_attention layers, per-head attention sinks, see below; its
checkpoints' RoPE is YaRN, which patch_rope keeps or rescales: Position Interpolation on top
of YaRN is not defined), ``ministral3`` (Ministral 3: Mistral's attention, then, after
RoPE, q times Llama 4's attention temperature ``1 + beta * log(1 + floor(position / W))``,
``beta`` and ``W`` being ``rope_parameters["llama_4_scaling_beta"]`` and
``["original_max_position_embeddings"]``, which a replaced scaling keeps; the fused path scales
q before its rotation, the same per-token factor; its checkpoints' RoPE is YaRN, kept or
rescaled by patch_rope, not interpolated), ``bitnet`` (BitNet b1.58: LLaMA's attention
with an RMSNorm of its output, ``attn_sub_norm``, before ``o_proj``), ``minicpm5_moe``
(MiniCPM5-MoE: q from a ``q_gate_proj`` that gives, per head, q | gate; the attention's output
times ``sigmoid(gate)`` before ``o_proj``) and ``qwen3_next`` (Qwen3-Next: on its full_attention
layers Qwen3's attention with partial rotary and such a gate from ``q_proj``; its
linear_attention layers, Gated DeltaNets without RoPE, are left as they are), ``llama4_text``
(Llama 4: ``Llama4ForCausalLM``, and the language model of ``Llama4ForConditionalGeneration``,
whose ``base_model`` is itself: its decoder is ``.model``; RoPE as a complex rotation, i.e.
interleaved pairs; NoPE layers, ``config.no_rope_layers`` 0, whose q is multiplied by the
attention temperature ``1 + attn_scale * log1p(floor((i + 1) / floor_scale))`` of its index in
the call plus the cache length; on the rotating layers, with ``use_qk_norm`` (Scout), a
weightless RMSNorm of the rotated q and k (fused on CPU only, as NanoChat's), and attention within
chunks of ``attention_chunk_size`` tokens, by transformers' mask: fused within one chunk, and past
it on CPU with that mask, each chunk a sequence of rope_attention's ``cu_seqlens``; a mask-free backend
never fuses across chunks; its checkpoints' "llama3" RoPE is kept or replaced by patch_rope, not
interpolated), ``lfm2`` and ``lfm2_moe`` (LFM2 and LFM2-MoE: hybrids whose attention layers are
LLaMA's with per-head q/k RMSNorms, ``q_layernorm`` / ``k_layernorm``, before RoPE and ``out_proj``;
their "conv" layers, short convolutions without RoPE, are left as they are; LFM2-MoE's rotary
embedding is ``pos_emb``), ``granitemoehybrid`` (Granite 4.0's hybrids with ``position_embedding_type``
"rope": Granite's attention; the Mamba-2 layers left as they are; a model without RoPE, the
checkpoints' default, is refused), ``olmo_hybrid`` (OLMo Hybrid with RoPE: OLMo 2's attention, the
Gated DeltaNet layers left as they are; its released checkpoints have no RoPE: refused), ``flint``
(per-head q/k RMSNorms before RoPE, GPT-OSS's attention sinks, RoPE on its sliding_attention layers
only, as Cohere 2), ``afmoe`` (AFMoE, Arcee's Trinity: per-head q/k RMSNorms before RoPE, RoPE on
its sliding_attention layers only, the attention's output times ``sigmoid(gate_proj(hidden))``),
``laguna`` (Poolside's Laguna: AFMoE's q/k norms, RoPE on every layer, per layer type with partial
rotary (its full_attention layers rotate half the head), heads per layer, the output times
``softplus(g_proj(hidden))`` in float32, one gate per head or per feature), ``mimo_v2_flash``
(Xiaomi's MiMo-V2-Flash: Qwen2's attention, RoPE per layer type with partial rotary, 0.334 of the
head where a type's ``rope_parameters`` give no ``partial_rotary_factor``, a window and GPT-OSS's
attention sinks on its sliding_attention layers, values of their own head size ``v_head_dim`` times
``attention_value_scale``, zero-padded to q's head size on the fused path) and ``step3p5`` (the
language model of Step 3.7, ``Step3p7ForConditionalGeneration``: Laguna's attention with a sigmoid
gate per head and ``query_pre_attn_scalar ** -0.5`` scaling; its multi-token-prediction draft
layers, ``generate(use_mtp=True)``, are not patched and fail on pirope's tables: generate without them), ``lfm3`` (LFM3: Qwen3's attention with a
window on its sliding_attention layers, RoPE per layer type, "proportional" on full_attention, the
output times ``sigmoid(g_proj(hidden))`` per head where ``use_attention_gate``; "conv" layers left as
they are), ``lara_mini`` (Qwen3's attention on Qwen3-Next's hybrid layout: RoPE and the window on the
sliding_attention layers only; its model hands the full_attention layers no tables, NoPE; the Gated
DeltaNet layers left as they are), ``minimax_m3_vl_text`` (MiniMax M3's text model,
``MiniMaxM3VLForCausalLM``: Qwen3's per-head q/k norms, partial rotary from ``rope_parameters``'
``partial_rotary_factor``; a model with "minimax_m3_sparse" layers, whose lightning indexer reads the
RoPE tables itself and selects the keys attended to, is refused), ``granite_swa`` and ``granitemoe_swa``
(GraniteSWA and its MoE: Granite's attention with a window on its sliding_attention layers and GPT-OSS's
attention sinks; RoPE per layer by ``config.layer_rope_theta``, one rotary embedding per theta, its
``rotary_embs``, each replaced by pirope's of that theta, which PI's linear factor scales; the layers
of theta 0, handed no tables, NoPE),
``mllama_text_model`` (Llama 3.2 Vision's language model: ``MllamaForCausalLM``, and that of
``MllamaForConditionalGeneration``; LLaMA's self-attention, its dropout rate in ``.dropout``; the
cross-attention layers, ``config.cross_attention_layers``, which attend to the image without RoPE,
are left as they are; its checkpoints' "llama3" RoPE is kept or replaced by patch_rope), and
Multi-head Latent Attention (DeepSeek-V2's MLA, below): ``deepseek_v2`` (its complex rotation:
interleaved pairs), ``deepseek_v3`` (interleaved pairs where ``config.rope_interleave``, else
rotate-half ones), ``glm4_moe_lite`` (GLM-4.7-Flash), ``youtu`` and ``axk1`` (A.X K1), whose
attention is DeepSeek-V3's line for line, ``minicpm3`` (rotate-half pairs) and ``mistral4`` (Mistral 4:
DeepSeek-V3's attention, its table over the whole head, ``qk_head_dim``, with a
``partial_rotary_factor`` that makes it the rotary part's, and Ministral 3's attention temperature,
below, on the whole query) and ``longcat_flash`` (LongCat-Flash: two such attentions per decoder
layer, a ModuleList ``self_attn``, with q and the latent scaled by ``mla_scale_q_lora`` /
``mla_scale_kv_lora``; interleaved pairs).
Architectures whose
attention is one of these line for line, most of them mixtures of experts (the experts live
in the MLP, which the patch leaves alone): ``mixtral`` (Mistral's), ``qwen2_moe``,
``granitemoe``, ``granitemoeshared`` and ``hyperclovax`` (Granite's), ``jais2``,
``emu3_text_model`` (``Emu3ForCausalLM``, Emu3's text model: LLaMA's), ``aria_text``
(``AriaTextForCausalLM``: LLaMA's), ``deepseek_ocr2_text`` (DeepSeek-OCR 2's language model:
LLaMA's), ``granite4_vision_text`` (Granite 4.0 Vision's language model: Granite's), ``solar_open``,
``cwm`` (Ministral's), ``ernie4_5_moe`` (ERNIE 4.5's), ``dots1`` (Qwen3's),
``hy_v3`` and ``apertus1p5_text`` (Apertus'), ``mellum`` (Qwen3's, RoPE per layer type),
``flex_olmo`` and ``minimax_m2`` (OLMo 2's; MiniMax-M2 with partial rotary), ``olmoe`` (OLMo
2's norms, then OLMo's clipping), ``vaultgemma`` (Gemma 2's), ``exaone_moe`` and ``kolibri1``
(EXAONE 4's) and ``cohere2_moe`` (Cohere 2's, except that its dense prefix layers rotate
without a window where ``prefix_dense_sliding_window_pattern`` is 1: ``force_rope``). A
multimodal model (``Gemma3ForConditionalGeneration``, ``Gemma4ForConditionalGeneration``, LLaVA,
Mistral 3, PaliGemma, ...) whose language model (``model.model.language_model``, holding the
model's own text config) is of one of these types has that language model patched: its RoPE is
scaled, the vision tower is left alone, and ``config.text_config`` is updated (so
``save_pretrained`` round-trips). So do the language models with multimodal RoPE (mRoPE, below):
``qwen2_vl_text`` and ``qwen2_5_vl_text`` (Qwen2-VL, Qwen2.5-VL: Qwen2's attention),
``qwen3_vl_text`` and ``qwen3_vl_moe_text`` (Qwen3-VL and its MoE: Qwen3's, no window),
``qwen3_5_text`` and ``qwen3_5_moe_text`` (Qwen3.5 and its MoE, also ``Qwen3_5ForCausalLM``:
Qwen3-Next's), ``glm4v_text`` and ``glm_ocr_text`` (GLM-4.1V, GLM-OCR: LLaMA's attention,
interleaved pairs, partial rotary), ``glm4v_moe_text`` (GLM-4.5V: rotate-half pairs, partial
rotary; its layers get the three sections as position_ids, so its calls with an image fuse only
with eager's causal mask), ``paddleocr_vl_text`` (PaddleOCR-VL: Qwen2-VL's attention),
``qwen2_5_omni_text`` and ``qwen3_omni_moe_text`` (the language models of the Qwen2.5-Omni and
Qwen3-Omni thinkers, ``*ThinkerForConditionalGeneration``: Qwen2.5-VL's and Qwen3-VL-MoE's, the
latter with a window; Qwen3-Omni's float positions, fractional for timed video and audio, always
get rows of their own) and ``glm_image_text`` (GLM-Image's: GLM-4.5V's attention, its layers handed
the text positions). Anything else raises ``TypeError`` rather than risk a silently different
model (e.g. PhiMoE's rotary embedding with its own short/long ``mscale``, a multimodal RoPE that
moves frequencies between pairs (ERNIE 4.5-VL), attention sinks computed from the input,
MLA with more than the above (DeepSeek-V3.2's indexer, Mistral Large 4's KV-shared layers), hybrids with convolution or
recurrent layers other than the above).

Multi-head Latent Attention: each query head is a part without RoPE (``qk_nope_head_dim``) then a
rotary part (``qk_rope_head_dim``); the keys' rotary part is one head shared by all heads
(``kv_a_proj_with_mqa``'s last features), their other part and the values (``v_head_dim`` per head)
come from a compressed latent (``kv_lora_rank``, after ``kv_a_layernorm``) through ``kv_b_proj``
(the module's ``expand_kv``); the cache holds that latent and the rotated shared key, as in
transformers. The pirope table has the rotary part's width; pirope rotates q's rotary part and the
shared key (interleaved pairs in place, where DeepSeek-V3's code writes them as evens | odds: the
same permutation of q's and k's features, every score the same). On CPU the fused path then runs
``pirope.rope_attention`` through its identity rotation, the smaller of the query and value head
sizes padded with zero features (which change no score and no output), under the same conditions
as any layer; elsewhere transformers' backend runs. The softmax scale of DeepSeek's YaRN holds
``yarn_get_mscale(factor, mscale_all_dim) ** 2``: a scaling replaced by :func:`patch_rope` sets each
attention module's ``scaling`` as transformers' ``yarn_apply_mscale`` computes it from the new
``rope_parameters``.

Multimodal RoPE: these models' rotary embedding takes position_ids ``(3, batch, seqlen)``, a
temporal, height and width position per token (the same three for text), and each pair of the
table turns by one of the three: which one, transformers' ``recomposition_frequencies`` of the
model's rotary embedding says (contiguous ``mrope_section`` sections in Qwen2-VL and GLM-4V,
interleaved ones from Qwen3-VL on), read when patching by giving it frequencies that name their
section and pair. The patched ``rotary_emb`` is a :class:`PiropeMultimodalRotaryEmbedding`: where the three sections
agree (text) it hands the layers the cached table and those positions, as for any model; otherwise
one float32 row per token (float64 angles) and position_ids indexing them, which both paths take
as they take a table. Position Interpolation divides every section's positions (transformers'
linear scaling of these models) and keeps the ``mrope_section`` keys. The sequences of a call are
the runs of the text positions transformers passes the layers (``position_ids``, the first row of
its 4-row form; its masks and flash attention read packing from them), not of the rotary positions,
whose image tokens repeat and jump.
Gemma 2's ``attn_logit_softcapping``: ``Gemma2Attention`` passes it to its attention function
as ``softcap`` (scores ``cap * tanh(scores / cap)``); the patched layers pass it the same way
(also ``None``), so "eager" (Gemma 2's default: transformers refuses sdpa for it), flex and
flash attention cap as in transformers. The fused path passes it as ``pirope.rope_attention``'s
``softcap``, where exact as for any layer (on CPU with eager's causal or sliding-window mask;
with no mask tensor, e.g. flash attention without padding). On CUDA a capped layer takes the
"sdpa" path (transformers' backend: flash attention caps in its kernel, while rope_attention
would run the cap unfused). ``final_logit_softcapping`` is applied by the model after the
layers, untouched by the patch.
GPT-OSS's attention sinks (``self_attn.sinks``, one learned logit per query head that joins
each softmax row as a key without a value): the patched layers pass them to the attention
function as ``s_aux``, as ``GptOssAttention`` does, and the fused path as
``pirope.rope_attention``'s ``sinks`` (on CPU; on CUDA transformers' backend runs, as for a
soft-cap), so the sinks get their gradients either way.
Gemma 3's ``attn_logit_softcapping``: transformers' ``Gemma3Attention`` stores it but passes
no ``softcap`` to its attention function, so its scores are not capped; the patched layers
do the same (both paths), so the patched model equals transformers' for any config.

RoPE per layer type (Gemma 3, Gemma 4, OLMo 3: ``config.rope_parameters`` keyed by layer type,
``{"full_attention": {...}, "sliding_attention": {...}}``). Transformers' model calls its
rotary embedding once per layer type with a ``layer_type`` argument and hands layer ``i``
the ``(cos, sin)`` of ``config.layer_types[i]``. The patched ``rotary_emb`` is a
:class:`PiropeLayerTypeRotaryEmbedding`: one :class:`PiropeRotaryEmbedding` per layer type
(its own cached table, its own ``rope_type``), called the same way, so each layer gets the
:class:`RopeTables` of its type. :func:`patch_rope`'s ``scaling`` is then a dict keyed by
layer type (the types it names are replaced, the others kept); one ``rope_parameters``
dict for all layers is refused (``ValueError``): it is ambiguous -- transformers' own
legacy ``rope_scaling`` on these configs means the full_attention layers only, while a
caller may well mean every layer -- and the keyed form says it exactly.
:func:`apply_position_interpolation` extends the full_attention layers only (see there).

How the patch works. The model's ``rotary_emb`` module is replaced by a
:class:`PiropeRotaryEmbedding` that computes, once per forward, a float32 cos/sin
*table* shared by all layers (cached, grown when a longer sequence arrives) and passes it
to the layers in place of Hugging Face's per-token ``(cos, sin)``. Each decoder layer's
``self_attn.forward`` is replaced (instance attribute; the class and the weights are
untouched) by one that keeps Hugging Face's projections, rotates the un-rotated q and k
with :func:`pirope.apply_rope_qk` (in the ``(batch, seqlen, heads, head_dim)`` layout
the projections produce, no copies) and then:

* ``attention="sdpa"``: calls the attention function of the model's
  ``config._attn_implementation`` exactly as Hugging Face does ("sdpa", torch SDPA, by
  default; "eager" if the model was loaded with it, ...), so the KV cache
  (``use_cache``/``generate``), padding masks (``attention_mask`` with zeros),
  custom ``position_ids``, sliding windows, attention dropout and, with
  ``attn_implementation="eager"``, ``output_attentions`` behave as in transformers.
* ``attention="fused"``: calls :func:`pirope.rope_attention` (RoPE + causal attention in
  one op, GQA, no seqlen x seqlen matrix) when that is exact: no cached past keys for
  this layer (a prefill or a plain training forward; the rotated keys are still written
  to an empty cache), no attention mask tensor (i.e. no padding: Hugging Face passes
  ``None`` for a pure causal mask with sdpa) -- or, on CPU, one that is exactly causal
  within the runs of consecutive positions (transformers' mask for packed sequences, which
  then run as rope_attention's ``cu_seqlens``, and eager's causal mask), and within the
  layer's sliding window where it has one (Mistral, Gemma 2/3's sliding layers, Qwen2/3
  with ``use_sliding_window``, ...: ``window_size=(sliding_window - 1, 0)``), and within Llama 4's
  chunks (each one a sequence) --, no attention
  dropout in training, causal
  attention (not Gemma's ``use_bidirectional_attention``, nor a call with
  ``is_causal=False``), on CUDA no q/k norms after RoPE (NanoChat, Hunyuan, Llama 4 Scout: they
  would have to run inside rope_attention, between its rotation and its scores), no rotation
  by the negative angle (NanoChat) and a layer with RoPE (SmolLM3's NoPE layers, EXAONE 4's,
  Cohere 2's, Llama 4's: they take the "sdpa" path there, unrotated, as transformers runs
  them) -- on CPU, where rope_attention's kernels beat SDPA, such layers rotate (or not) and
  normalize q and k as the "sdpa" path does, then run rope_attention with an identity
  rotation (a table of width 0: rotary_dim 0, every feature passes through) --, an attention-logit soft-cap (Gemma 2) only on CPU and only a finite one within
  float32's range (also ``None``), no sliding window shorter than the
  sequence without a mask tensor that shows it (CUDA; backends that apply the window
  themselves), no score bias (a ``position_bias`` kwarg) and no sequences packed back to back
  other than as above (``cu_seq_lens_q``/``_k`` passed in, or restarting ``position_ids``
  without a mask tensor: flash attention attends within each sequence; on CUDA; under
  ``torch.compile``, where the tables cannot read whether positions restart, no call
  fuses, with a mask or without). Any other call of that layer -- a decode step with cached
  keys, a padded batch, ``output_attentions`` -- takes the "sdpa" path, so results never
  depend on which path ran.

The table is float32 whatever the model's dtype (``model.half()`` does not round it)
and lives on the device of the hidden states. Finding the table length needs the
largest position id on the host: one device sync per model forward (not per layer; per
layer type where RoPE is per layer type).
The table grows to at least twice its size, so decoding past it rebuilds rarely;
positions too sparse for a table (a huge offset, a padding sentinel, a "dynamic"
decode step past the window, whose table would serve one length only) get the rows of
their own positions instead, so memory and time follow the call, not the largest id.
Under ``torch.compile`` (where that sync would break the graph) the rows of the
forward's own positions are built instead, for every type except "dynamic" and
"longrope" with long factors other than its short ones (Phi-3's PI, a "longrope" of
equal factors, is one table), so ``torch.compile(model, fullgraph=True)`` works as with
transformers.

For the length-dependent types the table is the one of the current sequence length
``max(position_ids) + 1``, like :class:`pirope.RotaryEmbedding`: "dynamic" recomputes
its base above the window and returns to the original table inside it; "longrope"
switches from ``short_factor`` to ``long_factor`` above
``original_max_position_embeddings``. This equals transformers for any fresh call and
for non-decreasing lengths (prefill then decode). It differs in one deliberate way:
transformers' "dynamic" keeps the table of the longest sequence seen so far for later
shorter sequences that are still above the window, while here a long request never
changes the result of a later short one.

Numerics: transformers computes the angles ``position * inv_freq`` in float32 (error
about ``position * 6e-8`` rad), pirope in float64 before rounding cos/sin to float32,
so patched logits agree with the unpatched model to float32 rounding at short
positions and are the more accurate of the two at long ones.
"""

from __future__ import annotations

from .families import SUPPORTED_MODEL_TYPES
from .patch import apply_position_interpolation, patch_rope
from .rotary import PiropeLayerTypeRotaryEmbedding, PiropeMultimodalRotaryEmbedding, PiropeRotaryEmbedding, RopeTables

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PiropeLayerTypeRotaryEmbedding",
    "PiropeRotaryEmbedding",
    "RopeTables",
    "apply_position_interpolation",
    "patch_rope",
]


def __getattr__(name):
    # PEP 562: the private names of the one-module integration this package was until commit d81f6d3,
    # which whole-model pickles of patched models saved then refer to (_Family, _rotates_*, the patched
    # forwards); looked up in the submodules that hold them now. Patch internals there, not here.
    from . import attention, families, fusing, layout, patch, rope_parameters, rotary

    for module in (families, layout, rope_parameters, rotary, fusing, attention, patch):
        if name.startswith("_") and not name.startswith("__") and name in vars(module):
            return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
