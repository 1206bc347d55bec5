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
LLaMA's ``self_attn``/``o_proj``/``head_dim``), ``phi`` (phi-1/1.5/2: partial rotary,
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
``emu3_text_model`` (``Emu3ForCausalLM``, Emu3's text model: LLaMA's), ``solar_open``,
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
get rows of their own). Anything else raises ``TypeError`` rather than risk a silently different
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
"longrope", so ``torch.compile(model, fullgraph=True)`` works as with transformers.

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

import functools
import math
import numbers
import sys
from typing import Any, NamedTuple

import torch
from torch import nn

import pirope
from pirope import _checks
from pirope._autograd import functorch as _functorch
from pirope._extension import require_cuda_build
from pirope.frequencies import (FrequencyPlan, PositionsMemo, rows_of_positions, rows_of_sectioned_positions,
                                tables_outside_inference_mode)
from pirope.scaling import normalize_scaling

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PiropeLayerTypeRotaryEmbedding",
    "PiropeRotaryEmbedding",
    "RopeTables",
    "apply_position_interpolation",
    "patch_rope",
]

_ATTENTION_MODES = ("fused", "sdpa")

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


class _Family(NamedTuple):
    """How an architecture's attention differs from LLaMA's, where pirope must follow it."""

    # "separate": q_proj, k_proj, v_proj;  "qkv": one qkv_proj split as q | k | v;  "qkv_heads":
    # one query_key_value whose output is, per head, q | k | v (GPT-NeoX: viewed as (..., heads,
    # 3 * head_dim) and chunked);  "mla": DeepSeek-V2's Multi-head Latent Attention (its own forward,
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
    # states (all heads' width) whose sigmoid multiplies the attention's output before the output
    # projection (AFMoE's gate_proj); None: no such gate
    gate: str | None = None
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
    # Llama 3.2 Vision's language model (MllamaForCausalLM; MllamaForConditionalGeneration's is one):
    # LLaMA's self-attention (its dropout rate in .dropout) between cross-attention layers (left alone)
    "mllama_text_model": _Family("separate", None, False, cross_layers="cross_attention_layers", dropout_attr="dropout"),
    # LFM2 and LFM2-MoE (Liquid): LLaMA's attention with per-head RMSNorms q_layernorm / k_layernorm
    # before RoPE and out_proj; hybrids whose "conv" layers (short convolutions, no RoPE) are left alone
    "lfm2": _Family("separate", None, False, qk_norm="head", qk_norm_names=("q_layernorm", "k_layernorm"),
                    out_proj="out_proj", linear_layers="conv"),
    "lfm2_moe": _Family("separate", None, False, qk_norm="head", qk_norm_names=("q_layernorm", "k_layernorm"),
                        out_proj="out_proj", linear_layers="conv", rotary_name="pos_emb"),
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
                # (q from q_proj, or with a q_lora_rank from q_b_proj(q_a_layernorm(q_a_proj(.)))): see
                # _pirope_mla_attention_forward
                "mla": ("q_lora_rank", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "expand_kv",
                        "qk_nope_head_dim", "qk_head_dim", "kv_lora_rank", "v_head_dim")}

#: ``config.model_type`` values :func:`patch_rope` and :func:`apply_position_interpolation` accept.
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)

# Families whose config class accepts only rope_type "default" or "longrope" (transformers'
# Phi3Config rejects "linear"): Position Interpolation is written there as the LongRoPE
# scaling it is a special case of (see _linear_as_longrope).
_LONGROPE_ONLY = ("phi3",)

_MAX_WINDOW = 2**63 - 1  # a context window is an int64 position count


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


# ----------------------------------------------------------------------------------------
# Model inspection
# ----------------------------------------------------------------------------------------


def _family(model) -> tuple[str, _Family]:
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - transformers is what this module is for
        raise ImportError("pirope.integrations.transformers needs the transformers package") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            "model must be a Hugging Face transformers PreTrainedModel of the LLaMA family "
            f"(model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}), got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _FAMILIES:
        raise TypeError(
            f"model must be a LLaMA-family model (config.model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"got {type(model).__name__} with model_type {model_type!r}")
    return model_type, _FAMILIES[model_type]


def _language_model(model):
    """What pirope patches: ``model`` itself for a supported ``model_type``; for a PEFT
    wrapper (``PeftModel``: not a ``PreTrainedModel``, with ``get_base_model()``) the
    transformers model it wraps; for a multimodal model (LLaVA, Gemma 3, Mistral 3,
    PaliGemma, ...) its language model when that is of a supported type and holds the
    model's own text config (the same object, so the config update reaches
    ``save_pretrained``). Anything else is returned as is, for :func:`_family` to refuse."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) and callable(getattr(model, "get_base_model", None)):
        inner = model.get_base_model()  # PEFT's LoRA layers replace q_proj etc. in place: patchable
        if isinstance(inner, PreTrainedModel):
            model = inner
    if not isinstance(model, PreTrainedModel) or getattr(model.config, "model_type", None) in _FAMILIES:
        return model
    text_config = model.config.get_text_config()
    inner = getattr(model, "model", None)
    # model.model.language_model (LLaVA, Gemma 3, Qwen2-VL, ...), model.language_model, or model.model
    # itself (the Omni thinkers of older transformers, 5.17 among them, hold their text model there)
    for lm in (getattr(inner, "language_model", None), getattr(model, "language_model", None), inner):
        if (isinstance(lm, PreTrainedModel) and lm.config is text_config
                and getattr(lm.config, "model_type", None) in _FAMILIES):
            return lm
    return model


def _base_model(model):
    base = model.base_model
    if base is model and not hasattr(base, "layers"):
        # Llama4ForCausalLM: base_model_prefix "language_model" names no attribute of it (base_model is
        # the model itself); its decoder is .model, as in every other ...ForCausalLM
        base = getattr(model, "model", base)
    rotary = _FAMILIES[model.config.model_type].rotary_name
    if not (hasattr(base, "layers") and hasattr(base, rotary)):
        raise TypeError(
            f"model: could not find the decoder layers and {rotary} of {type(model).__name__} "
            f"(its base model {type(base).__name__} has no .layers / .{rotary})")
    if getattr(base, rotary) is None:
        # configured without RoPE (Granite 4.0's position_embedding_type None, OLMo Hybrid's rope_theta None)
        raise TypeError(
            f"model: {type(model).__name__} has no rotary embedding ({type(base).__name__}.{rotary} is None: "
            "its config has no RoPE); there is no RoPE to patch or interpolate")
    return base


def _projections(family: _Family) -> tuple[str, ...]:
    """The names of an attention module's q, k, v projections (see _Family.proj, .q_gate)."""
    names = _PROJECTIONS[family.proj]
    return names if family.q_gate is None else (family.q_gate,) + names[1:]


def _attention_modules(model, family: _Family):
    base = _base_model(model)
    need = _projections(family) + (family.out_proj,)
    need += (family.out_dropout,) if family.out_dropout is not None else ()
    need += (family.out_norm,) if family.out_norm is not None else ()
    need += (family.gate,) if family.gate is not None else ()
    need += ("layer_idx",) if family.chunked is not None else ()  # which config.layer_types entry is its
    # the window the family's attention passes (and where it rotates, AFMoE's, Flint's), read from the module
    need += ("sliding_window",) if family.window in ("module", "sliding") else ()
    modules = []
    layer_types = getattr(model.config, "layer_types", None) or ()
    cross_layers = (getattr(model.config, family.cross_layers, None) or ()) if family.cross_layers else ()
    layers = ((i, layer, attn) for i, layer in enumerate(base.layers) for attn in _attentions_of(layer, family))
    for i, layer, attn in layers:
        if family.linear_layers is not None and i < len(layer_types) and layer_types[i] == family.linear_layers \
                and attn is None:  # Qwen3-Next's linear-attention layers: no RoPE, left alone
            continue
        if attn is None and i in cross_layers:  # Mllama's cross-attention layers: no RoPE, left alone
            continue
        layer_need = need + (family.qk_norm_names if attn is not None and _qk_norm(attn, family) else ())
        layer_need += (family.v_norm,) if family.v_norm is not None else ()
        if family.proj == "mla":  # q from one projection, or from a low-rank pair with a norm between
            layer_need += (("q_proj",) if getattr(attn, "q_lora_rank", None) is None
                           else ("q_a_proj", "q_a_layernorm", "q_b_proj"))
            layer_need += ("mla_scale_q_lora", "mla_scale_kv_lora") if family.mla_lora_scales else ()
        if family.kv_sharing:
            if attn is None or not all(hasattr(attn, n) for n in _KV_SHARING_ATTRS):
                raise TypeError(
                    f"model: decoder layer {i} ({type(layer).__name__}) has no self_attn."
                    f"{', self_attn.'.join(_KV_SHARING_ATTRS)} (its KV sharing); this architecture is not supported")
            if _kv_shared(attn, family):  # q_proj and o_proj, and its q_norm, only
                layer_need = ("q_proj", family.out_proj) + family.qk_norm_names[:1]
        if (attn is None or not all(hasattr(attn, n) for n in layer_need)
                or not hasattr(attn, family.head_dim_attr)):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no {family.attn_name} with "
                f"{', '.join(layer_need)} and {family.head_dim_attr}; this architecture is not supported")
        if family.rope_layers is not None and not all(hasattr(attn, n) for n in family.rope_layers.needs):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no self_attn."
                f"{', self_attn.'.join(family.rope_layers.needs)} telling whether it rotates; "
                "this architecture is not supported")
        if family.softcap is not None and not hasattr(attn, family.softcap):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no self_attn.{family.softcap} "
                "(its attention-logit soft-cap); this architecture is not supported")
        if family.sinks is not None and not isinstance(getattr(attn, family.sinks, None), torch.Tensor):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no tensor self_attn.{family.sinks} "
                "(its attention-sink logits); this architecture is not supported")
        if family.nope_temperature and not all(hasattr(attn, n) for n in _NOPE_TEMPERATURE_ATTRS):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no self_attn."
                f"{', self_attn.'.join(_NOPE_TEMPERATURE_ATTRS)} (its attention temperature tuning); "
                "this architecture is not supported")
        if family.window == "sliding" and not hasattr(attn, "is_sliding"):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no self_attn.is_sliding; "
                "this architecture is not supported")
        modules.append(attn)
    if not modules:  # Qwen3-Next with fewer layers than its full_attention_interval: all linear
        which = (f"config.{family.cross_layers} lists them all" if family.cross_layers
                 else f"config.layer_types are all {family.linear_layers!r}")
        raise ValueError(
            f"model: none of the {len(base.layers)} decoder layers of {type(model).__name__} has an attention "
            f"with RoPE ({which}): nothing for pirope to patch")
    return base, modules


def _attentions_of(layer, family: _Family) -> list:
    """A decoder layer's attention modules: its ``family.attn_name`` module (None where it has none), or
    each of a ModuleList of them (LongCat-Flash's two per layer, which it calls one after the other)."""
    attn = getattr(layer, family.attn_name, None)
    return list(attn) if isinstance(attn, nn.ModuleList) else [attn]


# what the attention module of a family with nope_temperature holds for it (Llama 4)
_NOPE_TEMPERATURE_ATTRS = ("attn_temperature_tuning", "floor_scale", "attn_scale")

# what the attention module of a family with kv_sharing tells about it (Gemma 4)
_KV_SHARING_ATTRS = ("is_kv_shared_layer", "store_full_length_kv", "layer_type")


def _kv_shared(attn, family: _Family) -> bool:
    """Whether this layer attends to keys and values an earlier layer stored (Gemma 4)."""
    return family.kv_sharing and bool(attn.is_kv_shared_layer)


def _qk_norm(attn, family: _Family) -> str | None:
    """Where this attention module normalizes q and k (see _Family.qk_norm; after RoPE with
    _Family.qk_norm_after_rope), None where it does not."""
    if family.qk_norm is None or (family.qk_norm_flag is not None and not getattr(attn, family.qk_norm_flag, False)):
        return None
    return family.qk_norm


def _rope_parameters_by_type(config) -> dict[str, dict]:
    """``{layer_type: rope_parameters}`` of a family with RoPE per layer type, for the layer
    types the model has (``set(config.layer_types)``, as its rotary embedding builds them)."""
    params = getattr(config, "rope_parameters", None)
    layer_types = sorted(set(getattr(config, "layer_types", None) or ()))
    if not layer_types or not isinstance(params, dict):
        raise ValueError(
            "model.config must have layer_types and rope_parameters keyed by layer type such as "
            "{'full_attention': {'rope_type': 'default', 'rope_theta': 1e6}, 'sliding_attention': {...}}, "
            f"got layer_types={getattr(config, 'layer_types', None)!r}, rope_parameters={params!r}")
    return {t: _checked_rope_dict(params.get(t), f"model.config.rope_parameters[{t!r}]") for t in layer_types}


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return _checked_rope_dict(params, "model.config.rope_parameters",
                              " (this model_type has one RoPE for all layers, not one per layer type)")


def _checked_rope_dict(params, where: str, note: str = "") -> dict:
    """A copy of one RoPE parameter dict (transformers 5 ``rope_parameters`` form), or a
    ValueError naming ``where`` (e.g. a per-layer-type dict where one dict was expected)."""
    if not isinstance(params, dict) or not ({"rope_type", "type", "rope_theta"} & set(params)):
        raise ValueError(
            f"{where} must be one dict in transformers 5 form such as "
            f"{{'rope_type': 'default', 'rope_theta': 10000.0}}{note}, got {params!r}")
    return dict(params)


# rope_parameters keys that a family with _Family.attn_temperature reads for its attention
_TEMPERATURE_KEYS = ("llama_4_scaling_beta", "original_max_position_embeddings", "max_position_embeddings")
# rope_parameters keys of a family with _Family.mrope: its sections, read by its rotary embedding's
# recomposition_frequencies (pirope reads the pairs' sections from that), not by the table
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")
# the rope types whose tables read original_max_position_embeddings
_WINDOWED_ROPE_TYPES = ("yarn", "llama3", "longrope")


def _rope_setup(model, model_type: str, family: _Family, params: dict, head_dim: int):
    """(head_dim, base, scaling-for-pirope, partial_rotary_factor) of a model's RoPE."""
    partial_supported = family.partial
    params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if family.attn_temperature:  # the attention's keys, not the table's
        for key in _TEMPERATURE_KEYS:
            if key != "original_max_position_embeddings" or rope_type not in _WINDOWED_ROPE_TYPES:
                params.pop(key, None)
    if family.mrope:
        for key in _MROPE_KEYS:
            params.pop(key, None)
    params.pop("type", None)
    base = params.pop("rope_theta", None)
    if base is None:
        base = getattr(model.config, "rope_theta", 10000.0)
    partial = params.pop("partial_rotary_factor", None)
    if partial is None:
        partial = getattr(model.config, "partial_rotary_factor", None) or 1.0
    if partial != 1.0 and not partial_supported and rope_type != "proportional":
        # (proportional's table spans the whole head, partial_rotary_factor zeroing its last
        # pairs' frequencies: rotated as plain RoPE; _rotary_embedding refuses it where the
        # attention rotates a fixed part of the head)
        if rope_type == "default":
            # e.g. LlamaRotaryEmbedding's default init ignores partial_rotary_factor
            partial = 1.0
        else:
            raise ValueError(
                f"model: config partial_rotary_factor={partial} is not supported by model_type "
                f"{model_type!r} (transformers' {model_type} rotates the whole head)")
    if rope_type == "dynamic":
        # transformers' dynamic NTK always uses config.max_position_embeddings as the window
        params.pop("original_max_position_embeddings", None)
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **params}
    return head_dim, base, scaling, partial


def _interpolation_factor(params: dict) -> float | None:
    """The Position Interpolation factor of a model's RoPE (1.0 for plain RoPE), or None
    when its scaling is not PI. PI written as LongRoPE (_linear_as_longrope: one factor
    for every pair, short and long, attention_factor 1) counts as PI, and so does
    "proportional" (Gemma 4's), whose factor divides the frequencies of the pairs it rotates."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return 1.0
    if rope_type in ("linear", "proportional"):  # proportional: PI of the pairs that rotate (Gemma 4)
        return float(params.get("factor", 1.0))
    if rope_type == "longrope":
        short, long = params.get("short_factor"), params.get("long_factor")
        if (isinstance(short, list) and short and short == long and all(x == short[0] for x in short)
                and params.get("attention_factor") == 1.0):
            return float(short[0])
    return None


def _linear_as_longrope(config, params: dict, head_dim: int, linear: dict, old_window: int) -> dict:
    """PI by ``linear["factor"]`` as rope_parameters a config that accepts only LongRoPE
    can hold: LongRoPE divides inverse frequency i by its ``short_factor[i]`` (sequences
    within ``original_max_position_embeddings``) or ``long_factor[i]`` (beyond), so one
    factor F for every pair of both lists is PI by F at every length; attention_factor 1
    keeps cos/sin unscaled (LongRoPE's default would scale them). The frequencies are
    1 / (F * base^(2i/d)) instead of linear's (1 / base^(2i/d)) / F: equal up to float32
    rounding. ``params``: the config's rope_parameters before."""
    partial = linear.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    pairs = int(head_dim * partial) // 2
    factor = linear["factor"]
    original = (params.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None) or old_window)
    out = {"rope_type": "longrope", "rope_theta": linear["rope_theta"], "factor": factor,
           "short_factor": [factor] * pairs, "long_factor": [factor] * pairs, "attention_factor": 1.0,
           "original_max_position_embeddings": original}
    if "partial_rotary_factor" in linear:
        out["partial_rotary_factor"] = linear["partial_rotary_factor"]
    return out


# ----------------------------------------------------------------------------------------
# The patched attention forward
# ----------------------------------------------------------------------------------------


def _head_dim(attn, family: _Family) -> int:
    return getattr(attn, family.head_dim_attr)


def _project(attn, hidden_states):
    """q, k, v as (batch, seqlen, heads, head_dim) views, exactly as Hugging Face projects (k and v
    None in a KV-shared layer: see _Family.kv_sharing), and the output gate (batch, seqlen,
    heads * head_dim; None without _Family.q_gate or .gate)."""
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
    elif family.proj == "qkv":
        qkv = attn.qkv_proj(hidden_states)
        nq = attn.config.num_attention_heads * head_dim
        nkv = attn.config.num_key_value_heads * head_dim
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
    else:
        q, k = attn.q_proj(hidden_states), attn.k_proj(hidden_states)
        # Gemma 4's attention_k_eq_v layers have no v_proj: the values are k_proj's output (before k_norm)
        v = k if family.kv_sharing and attn.v_proj is None else attn.v_proj(hidden_states)
        if family.gate is not None:  # AFMoE: a gate projection of its own
            gate = getattr(attn, family.gate)(hidden_states)
    norm = None if family.qk_norm_after_rope else _qk_norm(attn, family)  # those run after RoPE
    q_norm, k_norm = (getattr(attn, name) for name in family.qk_norm_names) if norm else (None, None)
    if norm == "proj":  # OLMo 2: one RMSNorm over all heads' features, then the view
        q, k = q_norm(q), k_norm(k)
    clip = None if family.clip is None else getattr(attn.config, family.clip, None)
    if clip is not None:  # OLMo, OLMoE (after its norms): clamped before RoPE, so fusing stays exact
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k, v = q.view(shape), k.view(shape), v.view(shape)
    if norm == "head":
        q, k = q_norm(q), k_norm(k)
    elif norm == "heads_first":  # StableLM: its per-head norms take (batch, heads, seqlen, head_dim)
        q, k = q_norm(q.transpose(1, 2)).transpose(1, 2), k_norm(k.transpose(1, 2)).transpose(1, 2)
    if family.v_norm is not None:
        v = getattr(attn, family.v_norm)(v)
    return q, k, v, gate


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
    try:
        return int(cache.get_seq_length(layer_idx))
    except Exception:  # a cache type that cannot tell: never take the fused path
        return -1


# attention kwargs of transformers' backends whose presence changes the result in ways
# rope_attention does not compute: packed sequences (flash attention's varlen), an additive
# score bias (sdpa's position_bias), attention-sink logits (s_aux)
_UNFUSABLE_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "position_bias", "s_aux")


def _can_fuse(attn, seqlen: int, attention_mask, cache, kwargs, packed: bool | None = False) -> bool:
    """Whether the dense fused call (no mask tensor, one sequence per row, no window) is exact
    here, on CPU (elsewhere also only where _rotates_inside)."""
    return (attention_mask is None and packed is False and _cutting_window(attn, seqlen) is None
            and _layer_can_fuse(attn, seqlen, cache, kwargs))


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
    if attn._pirope_attention != "fused":
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
    # transformers records the attention weights when the call or, without the keyword, the
    # config asks (its output collector reads config.output_attentions; no keyword reaches here)
    if kwargs.get("output_attentions", getattr(getattr(attn, "config", None), "output_attentions", False)):
        return False
    return True


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
        if torch.compiler.is_compiling():
            packed = None
        else:
            packed = text_positions.numel() > 0 and \
                self._pirope_text_positions.get(text_positions, _position_summary)[2]
    input_shape = hidden_states.shape[:-1]
    q, k, v, gate = _project(self, hidden_states)  # (B, S, H, D); gate: None, or (B, S, H * D)
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
        out = _fused_attention(self, q, k, v, cos, sin, position_ids, cu_seqlens, interleaved=interleaved,
                               window_size=window_size, softcap=softcap, sinks=sinks)
        out = out.reshape(*input_shape, -1).contiguous()
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
    packed), or a RuntimeError where the rotary embedding was not pirope's."""
    for alias in ("past_key_values", "layer_past"):
        if alias in kwargs and cache is None:
            cache = kwargs.pop(alias)
    if not isinstance(position_embeddings, RopeTables):
        raise RuntimeError(
            f"{type(attn).__name__} was patched by pirope but got position_embeddings of type "
            f"{type(position_embeddings).__name__}, not pirope's RopeTables: the model's rotary_emb "
            "was replaced or bypassed after patch_rope(); call patch_rope() again")
    return cache, tuple(position_embeddings)


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
        width = max(q.shape[-1], v.shape[-1])
        q, k, v = (t if t.shape[-1] == width else nn.functional.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # rope_attention's (B, S, H, D) views
        out = _fused_attention(self, q, k, v, *_identity_table(q), cu_seqlens)
        out, weights = out[..., :self.v_head_dim], None
    else:
        out, weights = _transformers_attention(self, q, k, v, attention_mask, **kwargs)
    return _out_proj(self, out.reshape(batch, seqlen, -1).contiguous()), weights


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
    if gate is not None:  # gated attention (_Family.q_gate, .gate)
        out = out * gate.sigmoid()
    if attn._pirope_family.out_norm is not None:  # BitNet's attn_sub_norm
        out = getattr(attn, attn._pirope_family.out_norm)(out)
    out = getattr(attn, attn._pirope_family.out_proj)(out)
    rate = attn._pirope_family.out_dropout
    if rate is not None:
        out = nn.functional.dropout(out, p=getattr(attn, rate), training=attn.training)
    return out


def _replaced_rope_parameters(model_type: str, family: _Family, config, attns, params: dict, scaling: dict) -> dict:
    """The rope_parameters ``scaling`` (Hugging Face form) gives a model whose current ones
    are ``params``: validated, keeping rope_theta (and partial_rotary_factor where the
    architecture has one) unless ``scaling`` has its own."""
    alpha = None
    if family.ntk_alpha and isinstance(scaling, dict) and "alpha" in scaling:  # Hunyuan's NTK-alpha, kept as given
        scaling = dict(scaling)
        alpha = scaling.pop("alpha")
    given = {}
    if family.attn_temperature and isinstance(scaling, dict):  # the attention's keys, given beside the table's
        scaling, given = _temperature_keys(scaling)
    new = normalize_scaling(scaling)  # validates (raises ValueError/TypeError naming the key)
    if new is None:
        new = {"rope_type": "default"}
    new.update(given)
    if alpha is not None:
        new["alpha"] = alpha
        _ntk_alpha_as_default(config, family, new, _head_dim(attns[0], family))  # validates alpha
    # transformers' families other than phi3 ignore partial_rotary_factor for plain RoPE and
    # fail with it otherwise: it is kept only where the architecture rotates part of a head, or
    # for "proportional", which reads it as the share of the head's pairs that rotate (Gemma 4)
    keep = (("rope_theta", "partial_rotary_factor") if family.partial or new["rope_type"] == "proportional"
            else ("rope_theta",))
    if family.attn_temperature:  # the attention's own keys (before the window's default below)
        keep += _TEMPERATURE_KEYS
    if family.mrope:  # the sections: transformers' rotary embedding reads them from here
        keep += _MROPE_KEYS
    for key in keep:
        if key not in new and key in params:
            new[key] = params[key]
    if new["rope_type"] in ("llama3", "yarn", "longrope"):
        # as transformers' standardize_rope_params: a config's own original window (Phi-3 keeps
        # original_max_position_embeddings beside rope_parameters) is the one the model uses
        original = getattr(config, "original_max_position_embeddings", None)
        if original is None:
            new.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        elif new.setdefault("original_max_position_embeddings", original) != original:
            raise ValueError(
                f"scaling: original_max_position_embeddings {new['original_max_position_embeddings']!r} differs from "
                f"model.config.original_max_position_embeddings ({original}), which transformers uses for this model "
                "instead: leave it out or pass the config's")
    if model_type in _LONGROPE_ONLY and new["rope_type"] not in ("default", "longrope"):
        if new["rope_type"] != "linear":
            raise ValueError(
                f"scaling: model_type {model_type!r} (transformers' config class) accepts only rope_type "
                f"'default' or 'longrope' ('linear' is written as the equal LongRoPE), got {new['rope_type']!r}")
        new.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        new = _linear_as_longrope(config, params, _head_dim(attns[0], family), new, config.max_position_embeddings)
    return new


def _temperature_keys(scaling: dict) -> tuple[dict, dict]:
    """(the table's keys, the attention temperature's keys) of a ``scaling`` dict for a family with
    _Family.attn_temperature (Ministral 3, Mistral 4), so that a checkpoint's rope_parameters with a
    new factor can be passed as they are: ``llama_4_scaling_beta`` (a real number) and the window
    keys (ints >= 1), original_max_position_embeddings staying with the table where its rope_type
    reads it."""
    table, given = dict(scaling), {}
    rope_type = table.get("rope_type", table.get("type", "default"))
    for key in _TEMPERATURE_KEYS:
        if key not in table or (key == "original_max_position_embeddings" and rope_type in _WINDOWED_ROPE_TYPES):
            continue
        value = table.pop(key)
        if key == "llama_4_scaling_beta":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"scaling['{key}'] (the attention temperature's) must be a finite real number, got "
                                f"{type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"scaling['{key}'] (the attention temperature's) must be a finite real number, got "
                                 f"{value!r}")
            given[key] = float(value)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"scaling['{key}'] (the attention temperature's window) must be an int >= 1, got "
                            f"{type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"scaling['{key}'] (the attention temperature's window) must be an int >= 1, got {value}")
        given[key] = int(value)
    return table, given


def _ntk_alpha_as_default(config, family: _Family, params: dict, head_dim: int) -> dict:
    """``params`` as the RoPE it means for a family with ``ntk_alpha`` (Hunyuan): its rotary
    embedding turns rope_type "dynamic" with a truthy ``alpha`` into "ntk_alpha", static plain
    RoPE with base ``rope_theta * alpha ** (head_dim / (head_dim - 2))`` (computed as
    ``compute_ntk_alpha_rope_parameters`` does, in Python floats, so the table is the same), the
    dict's other keys (its checkpoints' factor 1.0, beta_fast, mscale, ...) unused; with any other
    rope_type (or a falsy alpha) ``alpha`` is ignored. Other families' params are returned as
    they are."""
    if not family.ntk_alpha or "alpha" not in params:
        return params
    params = dict(params)
    alpha = params.pop("alpha")
    if params.get("rope_type", params.get("type", "default")) != "dynamic" or not alpha:
        return params
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"rope_parameters['alpha'] (NTK-alpha RoPE) must be a real number, got "
                        f"{type(alpha).__name__} {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"rope_parameters['alpha'] (NTK-alpha RoPE) must be a finite number > 0, got {alpha!r}")
    theta = params.get("rope_theta")
    if theta is None:
        theta = getattr(config, "rope_theta", 10000.0)
    return {"rope_type": "default", "rope_theta": theta * alpha ** (head_dim / (head_dim - 2))}


def _rotary_embedding(model, model_type: str, family: _Family, attns, params: dict) -> PiropeRotaryEmbedding:
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


def _attention_modules_of_type(config, family: _Family, attns, layer_type: str):
    """The attention modules of the layers of one type (``config.layer_types``), whose head size
    is that of the type's table (Gemma 4's full_attention heads are larger than its sliding ones)."""
    of_type = [attn for attn, t in zip(attns, config.layer_types) if t == layer_type] or attns
    sizes = sorted({_head_dim(attn, family) for attn in of_type})
    if len(sizes) > 1:
        raise TypeError(f"model: the {layer_type} layers have heads of different sizes {sizes} (one RoPE table per "
                        "layer type cannot serve them); this architecture is not supported")
    return of_type


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


def _mla_scaling(attn, params: dict) -> float:
    """The softmax scale an MLA attention module of transformers builds for rope_parameters ``params``:
    qk_head_dim ** -0.5, times yarn_get_mscale(factor, mscale_all_dim) ** 2 for a scaled RoPE with
    mscale_all_dim (DeepSeek's YaRN), computed by transformers' own yarn_apply_mscale."""
    import transformers
    from transformers import modeling_rope_utils

    apply = getattr(sys.modules[type(attn).__module__], "yarn_apply_mscale", None) or \
        getattr(modeling_rope_utils, "yarn_apply_mscale", None)
    if apply is None:
        raise TypeError(f"model: transformers {transformers.__version__} has no yarn_apply_mscale telling the "
                        f"softmax scale of {type(attn).__name__} under a new RoPE scaling; this version is not "
                        "supported")
    return apply(params, attn.qk_head_dim ** -0.5)


def _resolve_attention(attention) -> str:
    if not isinstance(attention, str) or attention not in _ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(map(repr, _ATTENTION_MODES))}, got {attention!r}")
    return attention


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def patch_rope(model, scaling: dict | None = None, *, attention: str = "sdpa"):
    """Routes a LLaMA-family model's RoPE (and optionally attention) through pirope's ops.

    Args:
        model: a transformers ``PreTrainedModel`` with ``config.model_type`` in
            :data:`SUPPORTED_MODEL_TYPES` (e.g. ``LlamaForCausalLM``, ``LlamaModel``,
            ``MistralForCausalLM``, ``Phi3ForCausalLM``), or a multimodal model whose
            language model is one (e.g. ``LlavaForConditionalGeneration``: its language
            model is patched, ``config`` below is then its ``text_config``). Modified in
            place.
        scaling: ``None`` keeps the model's own ``config.rope_parameters`` (any
            ``rope_type``). A dict in Hugging Face ``rope_parameters`` form replaces it
            -- in ``model.config`` too, so the config keeps describing the model (its
            ``rope_theta`` and ``partial_rotary_factor`` are kept unless the dict has
            its own). For a model with RoPE per layer type (Gemma 3, Gemma 4, OLMo 3) a dict
            keyed by layer type, e.g. ``{"full_attention": {"rope_type": "linear",
            "factor": 4.0}}``: each named type's parameters are replaced as above, the
            types not named keep theirs; a single ``rope_parameters`` dict raises
            ``ValueError`` (ambiguous, see the module docstring). Hunyuan's dicts may also
            hold ``alpha`` (NTK-alpha RoPE with "dynamic", ignored otherwise, as in
            transformers); Ministral 3's and Mistral 4's the attention temperature's keys
            (``llama_4_scaling_beta``, ``original_max_position_embeddings``,
            ``max_position_embeddings``), kept from the config where not given.
        attention: ``"sdpa"`` (pirope RoPE, then the model's own attention function) or
            ``"fused"`` (:func:`pirope.rope_attention` where exact, see the module
            docstring).

    Returns:
        ``model``. Its logits equal the unpatched model's (to float32 rounding of the
        angles) for every call the unpatched model supports.

    Raises:
        TypeError: ``model`` is not a supported transformers model, or ``scaling`` is not
            a dict (or has a value of the wrong type).
        ValueError: bad ``attention`` or ``scaling``, or a model none of whose layers has an
            attention with RoPE (a Qwen3-Next of linear-attention layers only).
    """
    whole, model = model, _language_model(model)
    model_type, family = _family(model)
    mode = _resolve_attention(attention)
    base, attns = _attention_modules(model, family)
    config = model.config
    if scaling is not None and not isinstance(scaling, dict):
        raise TypeError(
            f"scaling must be None or a dict in Hugging Face rope_parameters form, got {type(scaling).__name__}")
    mla_scales = None
    if family.rope_per_layer_type:
        by_type = _rope_parameters_by_type(config)
        if scaling is not None:
            unknown = set(scaling) - set(by_type)
            if not scaling or unknown or not all(isinstance(v, dict) for v in scaling.values()):
                raise ValueError(
                    f"scaling: model_type {model_type!r} has RoPE parameters per layer type "
                    f"({', '.join(map(repr, by_type))}); pass a dict keyed by layer type, e.g. "
                    "{'full_attention': {'rope_type': 'linear', 'factor': 4.0}} (types not named keep their "
                    "RoPE), or use apply_position_interpolation (which extends the full_attention layers); "
                    f"got {scaling!r}")
            by_type = {t: _replaced_rope_parameters(model_type, family, config, attns, p, scaling[t])
                       if t in scaling else p for t, p in by_type.items()}
        rotary = PiropeLayerTypeRotaryEmbedding(
            {t: _rotary_embedding(model, model_type, family, _attention_modules_of_type(config, family, attns, t), p)
             for t, p in by_type.items()})
        if scaling is not None:
            config.rope_parameters = {**config.rope_parameters, **by_type}
    else:
        params = _rope_parameters(config)
        if scaling is not None:
            params = _replaced_rope_parameters(model_type, family, config, attns, params, scaling)
        rotary = _rotary_embedding(model, model_type, family, attns, params)
        if family.proj == "mla" and rotary.rotary_dim != attns[0].qk_rope_head_dim:
            raise ValueError(
                f"scaling: a RoPE table of {rotary.rotary_dim} features does not fit the {attns[0].qk_rope_head_dim} "
                f"rotary features (qk_rope_head_dim) of model_type {model_type!r}'s heads; rope_parameters "
                f"{params!r} (its partial_rotary_factor) must give them")
        # MLA's softmax scale holds YaRN's mscale_all_dim (transformers' yarn_apply_mscale at init)
        if family.proj == "mla" and scaling is not None:
            mla_scales = [_mla_scaling(attn, params) for attn in attns]
        if scaling is not None:
            config.rope_parameters = params
    setattr(base, family.rotary_name, rotary)
    if family.kv_sharing and hasattr(type(base), "_maybe_slice_kv_shared_inputs"):
        base._maybe_slice_kv_shared_inputs = functools.partial(_slice_kv_shared_inputs, base)
    text_positions = PositionsMemo()  # mRoPE: the layers' text positions, read once per forward
    for attn in attns:
        attn._pirope_family = family
        attn._pirope_attention = mode
        if family.mrope:
            attn._pirope_text_positions = text_positions
        # a partial of a module-level function pickles (torch.save(model), multiprocessing)
        # and deep-copies onto the copy; a bound MethodType would not unpickle
        forward = _pirope_mla_attention_forward if family.proj == "mla" else _pirope_attention_forward
        attn.forward = functools.partial(forward, attn)
    for attn, scale in zip(attns, mla_scales or ()):
        attn.scaling = scale
    return whole


def apply_position_interpolation(
    model,
    factor: float | None = None,
    *,
    max_position_embeddings: int | None = None,
    attention: str = "fused",
):
    """Extends a LLaMA-family model's context window by Position Interpolation.

    Position ``m`` of the extended model is rotated like position ``m / factor`` of the
    original one (Chen et al. 2023, rope_type ``"linear"``). The model is modified in
    place and returned:

    * ``model.config.rope_parameters`` becomes ``{"rope_type": "linear", "factor":
      F, "rope_theta": ...}`` (plus ``partial_rotary_factor`` if the config had one and
      the architecture rotates part of a head: Phi-3, GLM, GLM-4; the others rotate
      the whole head) and ``model.config.max_position_embeddings`` the new window, so
      ``save_pretrained`` / ``from_pretrained`` with plain transformers (no pirope)
      gives the same model. Phi-3, whose config class accepts no "linear", gets the
      same scaling as LongRoPE parameters instead: ``short_factor`` = ``long_factor``
      = ``[F] * (rotary_dim // 2)``, ``attention_factor`` 1 (frequencies equal to
      linear's up to float32 rounding);
    * RoPE, and with ``attention="fused"`` attention, run through pirope's ops (see
      :func:`patch_rope`); the output equals transformers' own linear-scaled model on
      the same weights.

    RoPE per layer type (Gemma 3, Gemma 4, OLMo 3). Only the full_attention layers are
    extended: ``config.rope_parameters["full_attention"]`` becomes linear with the (composed)
    factor, every other layer type keeps its parameters and tables -- sliding-window layers
    only ever see distances within their window, which PI does not change; this is what Gemma 3
    itself does for its 128k models (linear factor 8 on the global layers only, local ones
    untouched, as transformers' legacy ``rope_scaling`` is applied). Gemma 4's full_attention
    layers have "proportional" RoPE (a share of their pairs rotating): it stays "proportional",
    with the composed ``factor`` dividing the rotating pairs' frequencies (transformers computes
    with that key, though its config validation logs that it does not know it). The other layer
    types must have rope_type "default", "linear" or "proportional" (whose tables do not depend
    on ``max_position_embeddings``, which grows), and the model must have full_attention
    layers. The updated config reloads with plain transformers as the same model.

    NoPE global layers (EXAONE 4, Cohere 2 with a window): their one ``rope_parameters``
    is scaled as for any model, and only their sliding-window layers rotate, so PI changes
    those local layers only; the global layers have no position limit of RoPE's to extend.

    ``model.config`` is changed in place, as transformers' own config setters do: another
    model built from the same config object sees the new ``rope_parameters`` and window
    without being patched (pass ``copy.deepcopy(config)`` when building models that must
    stay apart).

    Composition. ``factor`` is relative to the model *as it is*: a model already
    extended by PI with factor ``s`` (``rope_type "linear"``, window ``L``) extended
    again by ``f`` gets ``factor = s * f`` in its config and window ``f * L`` -- the
    positions of the new model are divided by ``s * f`` relative to pretraining, which
    is what transformers' single linear ``factor`` means (it always divides the
    pretrained frequencies). Only models with ``rope_type`` "default" or "linear" (or
    "proportional", above) can be interpolated (PI on top of dynamic/yarn/llama3/longrope is
    not a defined scaling).

    Hunyuan's NTK-alpha RoPE (``hunyuan_v1_dense``/``hunyuan_v1_moe`` with ``rope_parameters``
    ``{"rope_type": "dynamic", "alpha": a, ...}``, as its checkpoints write it) is plain RoPE
    with the stretched base ``B = rope_theta * a ** (head_dim / (head_dim - 2))``, so it counts
    as "default" here: ``rope_parameters`` becomes ``{"rope_type": "linear", "factor": F,
    "rope_theta": B}`` (``alpha`` and the unused keys dropped), the same frequencies divided by
    ``F``, which transformers' Hunyuan rotary embedding builds from it (and reloads) exactly.

    Args:
        model: transformers ``PreTrainedModel`` with ``config.model_type`` in
            :data:`SUPPORTED_MODEL_TYPES`, or a multimodal model whose language model is
            one (``Gemma3ForConditionalGeneration``, LLaVA, ...): that language model is
            extended and ``config.text_config`` updated (``config`` above means it).
        factor: the scale ``s >= 1``: new window = ``s`` x the model's window
            (``config.max_position_embeddings``, rounded to an int).
        max_position_embeddings: alternatively, the new window (an int larger than the
            model's); ``factor = max_position_embeddings / config.max_position_embeddings``.
            Pass exactly one of ``factor`` and ``max_position_embeddings``.
        attention: ``"fused"`` (default: :func:`pirope.rope_attention` where exact, the
            "sdpa" path elsewhere) or
            ``"sdpa"`` (pirope RoPE + the model's own attention function).

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a supported transformers model, or ``factor`` /
            ``max_position_embeddings`` has the wrong type.
        ValueError: both or neither of ``factor`` and ``max_position_embeddings``,
            ``factor < 1`` (``factor=1`` is accepted: linear scaling by 1, the window
            unchanged), ``max_position_embeddings`` not larger than the model's window,
            a model whose ``rope_type`` is not "default"/"linear" (or PI written as LongRoPE, as
            above; per layer type: the full_attention layers', and every type's must be
            "default"/"linear"/"proportional"), or an unknown ``attention``.
    """
    whole, model = model, _language_model(model)
    _, family = _family(model)  # TypeError for an unsupported model, before anything else
    _resolve_attention(attention)
    if (factor is None) == (max_position_embeddings is None):
        raise ValueError(
            "pass exactly one of factor (the scale, e.g. 4.0) and max_position_embeddings (the new window); "
            f"got factor={factor!r}, max_position_embeddings={max_position_embeddings!r}")
    config = model.config
    old_window = config.max_position_embeddings
    if factor is not None:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            raise TypeError(f"factor must be a real number >= 1, got {type(factor).__name__} {factor!r}")
        factor = float(factor)
        if not math.isfinite(factor) or factor < 1:
            raise ValueError(
                f"factor must be a finite number >= 1 (Position Interpolation extends the window), got {factor}")
        new_window = old_window * factor
        if new_window > _MAX_WINDOW:
            raise ValueError(f"factor={factor} gives a window of {new_window:.3g} positions, past int64")
        new_window = int(round(new_window))
    else:
        if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, numbers.Integral):
            raise TypeError(
                f"max_position_embeddings must be an int, got {type(max_position_embeddings).__name__} "
                f"{max_position_embeddings!r}")
        new_window = int(max_position_embeddings)
        if new_window > _MAX_WINDOW:
            raise ValueError(f"max_position_embeddings must fit in int64, got {new_window}")
        if new_window <= old_window:
            raise ValueError(
                f"max_position_embeddings={new_window} must be larger than the model's window "
                f"config.max_position_embeddings={old_window}")
        factor = new_window / old_window

    if family.rope_per_layer_type:
        new_params = _interpolated_by_type(config, factor)
    else:
        params = _rope_parameters(config)
        if family.ntk_alpha:  # Hunyuan's NTK-alpha RoPE is plain RoPE with a stretched base: PI on that
            _, attns = _attention_modules(model, family)
            params = _ntk_alpha_as_default(config, family, params, _head_dim(attns[0], family))
        new_params = _interpolated(config, params, factor, "config.rope_parameters")
    # patch_rope keeps the config's partial_rotary_factor where the architecture has one and
    # writes "linear" as LongRoPE where the config class accepts nothing else (Phi-3)

    patch_rope(model, new_params, attention=attention)  # validates everything before changing the model
    config.max_position_embeddings = new_window
    getattr(_base_model(model), family.rotary_name).max_position_embeddings = new_window
    return whole


def _interpolated(config, params: dict, factor: float, where: str) -> dict:
    """Linear rope_parameters extending ``params`` (default or linear) by ``factor``; for
    "proportional" ones (Gemma 4's) proportional ones with the composed factor, the same pairs
    rotating (its partial_rotary_factor kept): no linear dict describes that table."""
    old_factor = _interpolation_factor(params)
    if old_factor is None:
        raise ValueError(
            f"model: Position Interpolation needs a model with rope_type 'default', 'linear' or 'proportional', "
            f"this one has {where}={params!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if params.get("rope_type") == "proportional":
        return {**params, "factor": old_factor * factor, "rope_theta": theta}
    return {"rope_type": "linear", "factor": old_factor * factor, "rope_theta": theta}


def _interpolated_by_type(config, factor: float) -> dict:
    """PI of a model with RoPE per layer type: the full_attention layers' RoPE extended by
    ``factor`` (composing with a linear factor they have), the others' left as they are."""
    by_type = _rope_parameters_by_type(config)
    if "full_attention" not in by_type:
        raise ValueError(
            "model: Position Interpolation extends the RoPE of the full_attention layers, and this model has "
            f"none (config.layer_types={config.layer_types!r})")
    for layer_type, params in by_type.items():
        # the other layer types keep their rope_parameters, and so must keep their tables when
        # the config's max_position_embeddings grows: only rope types that do not read it
        if layer_type != "full_attention" and _interpolation_factor(params) is None:
            raise ValueError(
                f"model: Position Interpolation leaves the {layer_type} layers' RoPE as it is, which needs their "
                "rope_type to be 'default', 'linear' or 'proportional' (tables independent of "
                f"max_position_embeddings); "
                f"config.rope_parameters[{layer_type!r}]={params!r}")
    return {"full_attention": _interpolated(config, by_type["full_attention"], factor,
                                            "config.rope_parameters['full_attention']")}

