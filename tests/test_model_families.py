"""Every architecture pirope.integrations.transformers supports, against transformers' own
model on the same weights: Position Interpolation by apply_position_interpolation gives
the logits and gradients of the model transformers builds from the updated config, on
both attention paths; sliding windows, q/k norms (per head: Qwen3, Apertus, Cohere; over the
whole projection: OLMo 2), interleaved pairs (Cohere, Helium, ERNIE 4.5; partial: GLM),
SmolLM3's NoPE layers and residual dropout (StarCoder2, Seed-OSS) are followed; RoPE per
layer type (Gemma 3, OLMo 3: each layer gets its type's table, PI extends the full_attention
layers only), NoPE layers chosen by the window (EXAONE 4, Cohere 2), Gemma 2's attention-logit
soft-capping (passed on, never fused), OLMo's q/k/v clipping; architectures whose attention
is one of these line for line (mostly mixtures of experts: Mixtral, Qwen2-MoE, OLMoE, ...) are
checked the same way; a fused prefill then cached decoding generates what transformers
generates.

Tiny random float32 models (hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16),
seconds on a CPU.
"""

import copy
import sys

import pytest
import torch

import pirope

transformers = pytest.importorskip("transformers")
from pirope.integrations.transformers import (  # noqa: E402
    SUPPORTED_MODEL_TYPES, apply_position_interpolation, patch_rope)
from hf_compare import assert_same_grads, assert_same_logits, logits_and_grads  # noqa: E402

WINDOW = 64
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=WINDOW)

# a mixture of experts as small as the attention: 4 experts, 2 per token (each family reads its own keys)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4)

# layer 0 attends within a 16-token window, layer 1 to everything
HYBRID = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"])

# Hunyuan's RoPE as its checkpoints write it: "dynamic" with an alpha, which its rotary embedding
# takes as static NTK-alpha RoPE (base rope_theta * alpha ** (head_dim / (head_dim - 2))), the
# other keys unused
NTK_ALPHA = {"rope_type": "dynamic", "factor": 1.0, "alpha": 1000.0, "rope_theta": 10000.0}

# Qwen3.5's text layers: layer 0 linear attention (a Gated DeltaNet, left alone), layer 1 full
# attention (Qwen3-Next's), multimodal RoPE sections on its 4 rotary pairs (partial rotary 0.5)
QWEN3_5 = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=8, linear_value_head_dim=8,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True})

# Granite 4.0's hybrid: a Mamba-2 layer, then an attention layer with RoPE, a dense MLP and a shared one
GRANITE_HYBRID = dict(layer_types=["linear_attention", "attention"], position_embedding_type="rope",
                      num_local_experts=0, mamba_n_heads=4, mamba_d_state=8, mamba_d_head=32, mamba_chunk_size=16,
                      shared_intermediate_size=64, attention_multiplier=0.3)

# GraniteSWA: Granite's multipliers; layers 0 and 1 sliding (16-token window), layer 2 full; RoPE per layer
# by layer_rope_theta: 1e4 and 5e5 (a rotary embedding each, in rotary_embs), 0 (NoPE: handed no tables)
GRANITE_SWA = dict(attention_multiplier=0.11, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=3.0,
                   num_hidden_layers=3, sliding_window=16,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   layer_rope_theta=[10000.0, 500000.0, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Llama 3.2 Vision's text model (its vocabulary has 8 more rows, its pad id must fit in the tiny one)
MLLAMA_TEXT = dict(num_hidden_layers=3, cross_attention_layers=[1], pad_token_id=1, bos_token_id=1, eos_token_id=2)

# Llama 4's text model: layer 0 rotates (chunked attention), layer 1 is NoPE; both MoE (its
# intermediate_size_mlp is the dense layers' MLP, none here, but the config's default is 16384)
LLAMA4 = dict(no_rope_layers=[1, 0], floor_scale=16, use_qk_norm=False, intermediate_size_mlp=128)

# Multi-head Latent Attention (DeepSeek-V2's MLA): q per head 16 features without RoPE then 8 with (a
# low-rank q, rank 24), one rotary key of 8 shared by the heads, keys' other part and values (12 per head,
# fewer than q's 24) from a latent of 16; MoE after a dense first layer (first_k_dense_replace 1)
MLA = dict(MOE, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=12,
           num_key_value_heads=4, first_k_dense_replace=1, n_group=1, topk_group=1)

MINISTRAL3_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.1,
                   "original_max_position_embeddings": 16}

# an extra entry of FAMILIES with this value leaves out the key of COMMON (a config that computes it)
OMIT = object()

# model_type -> (config class, model class, what sets the family apart in a tiny model)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(sliding_window=4096)),
    # Llama 4's attention temperature after RoPE: q times 1 + 0.1 log(1 + floor(position / 16)),
    # up to 1.19 over the tests' 100 tokens (a patch that skipped it would change the logits)
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", dict(rope_parameters=MINISTRAL3_ROPE)),
    # an RMSNorm of the attention output (attn_sub_norm) before o_proj
    "bitnet": ("BitNetConfig", "BitNetForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    # Granite scales attention by attention_multiplier, not head_dim ** -0.5
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(attention_multiplier=0.11, embedding_multiplier=2.0, residual_multiplier=0.5,
                     logits_scaling=3.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(original_max_position_embeddings=WINDOW, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # q_norm / k_norm: RMSNorm over the whole projection (all heads), before the view into heads
    # OLMo 1: q, k, v clamped to [-clip_qkv, clip_qkv] before RoPE (0.1 clamps many of this model's values)
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(pad_token_id=1, eos_token_id=2, clip_qkv=0.1)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=1, eos_token_id=2)),
    # interleaved pairs (2i, 2i+1); per-head LayerNorm q/k norms with use_qk_norm (test below)
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(eos_token_id=2)),
    # interleaved pairs on the first half of each head (partial_rotary_factor 0.5, the config's default)
    "glm": ("GlmConfig", "GlmForCausalLM", dict(pad_token_id=0, eos_token_id=2)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(pad_token_id=0, eos_token_id=2)),
    # layer 1 is a NoPE layer (no rotation at all)
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                dict(no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    # Qwen3's per-head q/k RMSNorms; the config's default RoPE (llama3 for an 8k window) does not fit 64
    "apertus": ("ApertusConfig", "ApertusForCausalLM", dict(rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 10000.0})),
    # interleaved pairs on the whole head
    "helium": ("HeliumConfig", "HeliumForCausalLM", {}),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", {}),
    # q/k/v biases; dropout after o_proj (residual_dropout, test below)
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    # RoPE per layer type (layer 0 sliding, 16-token window; layer 1 full), per-head (1 + w)
    # RMSNorm q/k norms, scaling by query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5);
    # the config's thetas differ: 1e4 local, 1e6 global
    # layer 0 sliding (16-token window), layer 1 full; scaling by query_pre_attn_scalar ** -0.5;
    # attn_logit_softcapping at its default 50.0 (passed to the attention function as softcap),
    # final_logit_softcapping 30.0; transformers gives Gemma 2 "eager" (it refuses sdpa)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(HYBRID, query_pre_attn_scalar=24)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(HYBRID, query_pre_attn_scalar=24)),
    # RoPE per layer type: "proportional" on the full layer (1e6, a quarter of its 16 pairs rotating),
    # whose heads are larger (global_head_dim 32); per-head q/k RMSNorms before RoPE, a weightless one
    # on v; scaling 1.0; per-layer input embeddings kept small; KV sharing and k = v (tests below)
    "gemma4_text": ("Gemma4TextConfig", "Gemma4ForCausalLM",
                    dict(HYBRID, global_head_dim=32, vocab_size_per_layer_input=256, hidden_size_per_layer_input=8)),
    # Gemma 4 Unified's text model: Gemma 4's attention (and RoPE), no per-layer inputs
    "gemma4_unified_text": ("Gemma4UnifiedTextConfig", "Gemma4UnifiedForCausalLM", dict(HYBRID, global_head_dim=32)),
    # Gemma 4's attention (one head size, plain RoPE per layer type); AltUp, LAuReL and per-layer
    # inputs kept small; its default KV sharing (15 layers) off here (tests below)
    "gemma3n_text": ("Gemma3nTextConfig", "Gemma3nForCausalLM",
                     dict(HYBRID, vocab_size_per_layer_input=256, hidden_size_per_layer_input=8, laurel_rank=4,
                          altup_num_inputs=2, num_kv_shared_layers=0)),
    # RoPE per layer type (thetas made to differ here), OLMo 2's q/k norms over the projection
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM",
              dict(HYBRID, pad_token_id=1, eos_token_id=2,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    # global (full_attention) layers are NoPE: with a window only the sliding layers rotate;
    # per-head q/k RMSNorms (EXAONE 4), interleaved pairs (Cohere 2)
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(HYBRID, bos_token_id=1, eos_token_id=2)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(HYBRID, bos_token_id=1, eos_token_id=2)),
    # attention identical to a family above (mostly mixtures of experts: 4 experts, 2 per token)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(MOE, shared_expert_intermediate_size=32)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(MOE, attention_multiplier=0.11)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(MOE, attention_multiplier=0.11, shared_intermediate_size=32)),
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(attention_multiplier=0.11)),
    "jais2": ("Jais2Config", "Jais2ForCausalLM", {}),
    # q and an output gate from one q_gate_proj (per head q | gate; output times sigmoid(gate))
    "minicpm5_moe": ("MiniCPM5MoeConfig", "MiniCPM5MoeForCausalLM",
                     dict(MOE, n_shared_experts=1, n_group=1, topk_group=1, eos_token_id=2)),
    # layer 0 linear attention (Gated DeltaNet, no RoPE: left alone), layer 1 full attention: q_proj
    # giving q | gate per head, (1 + w) RMSNorm q/k norms, partial rotary (its default 0.25)
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(MOE, shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"],
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                        linear_value_head_dim=8)),
    "emu3_text_model": ("Emu3TextConfig", "Emu3ForCausalLM", dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    # Aria's text model: LLaMA's attention; MoE MLPs (4 experts, 2 per token, one shared)
    "aria_text": ("AriaTextConfig", "AriaTextForCausalLM", dict(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
                                                                pad_token_id=0)),
    # Qwen3.5's language model on its own (Qwen3_5ForCausalLM): Qwen3-Next's layers with multimodal
    # RoPE, here on text (the three sections agree); images in test_multimodal_rope.py
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(QWEN3_5, bos_token_id=1, eos_token_id=2)),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                         dict(MOE, **QWEN3_5, shared_expert_intermediate_size=32, bos_token_id=1, eos_token_id=2)),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM", dict(MOE, n_group=1, topk_group=1)),
    "cwm": ("CwmConfig", "CwmForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(moe_num_experts=4, moe_k=2,
                                                                           moe_intermediate_size=32)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", dict(MOE, n_shared_experts=1, first_k_dense_replace=1,
                                                      n_group=1, topk_group=1)),
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM", MOE),
    "mellum": ("MellumConfig", "MellumForCausalLM", {**MOE, **HYBRID}),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(MOE, pad_token_id=1, eos_token_id=2)),
    # partial rotary: the first 8 of 16 features (rotary_dim, as its checkpoints write it)
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(MOE, rotary_dim=8)),
    # MiniMax M3's text model: per-head (1 + w) RMSNorm q/k norms before RoPE, partial rotary (0.5 in
    # rope_parameters: its config does not read rotary_dim); layer 0 a dense MLP, layer 1 the experts with
    # a shared one; full attention (its sparse layers are refused, test below)
    "minimax_m3_vl_text": ("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM",
                           dict(MOE, shared_intermediate_size=32, dense_intermediate_size=128,
                                mlp_layer_types=["dense", "sparse"], bos_token_id=1, eos_token_id=2,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5})),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(MOE, clip_qkv=0.1, pad_token_id=1, eos_token_id=2)),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(HYBRID, query_pre_attn_scalar=24)),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", dict({**MOE, **HYBRID}, bos_token_id=1, eos_token_id=2)),
    # EXAONE 4's attention (layer 1, full_attention, is NoPE); shared expert
    "kolibri1": ("Kolibri1Config", "Kolibri1ForCausalLM", dict({**MOE, **HYBRID}, shared_expert_intermediate_size=32)),
    # Cohere 2's attention (layer 1 NoPE); dense prefix layers with force_rope rotate anyway (test below)
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM",
                    dict({**MOE, **HYBRID}, prefix_dense_intermediate_size=128, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)),
    # Apertus' attention; the config's default RoPE (llama3 for an 8k window) does not fit 64
    "apertus1p5_text": ("Apertus1p5TextConfig", "Apertus1p5TextForCausalLM",
                        dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2)),
    # partial rotary (0.5, the config's default) with rotate-half pairs; per-head RMSNorm q/k
    # norms with use_qk_norm (test below); layer 0 dense (first_k_dense_replace 1), layer 1 MoE
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", MOE),
    # partial rotary (0.5, the config's default), rotate-half pairs
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    # GPT-NeoX (Pythia): one query_key_value, q | k | v per head; rotary on the first quarter
    # of each head (rotary_pct 0.25, the config's default); attention / dense / head_size
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    # Falcon-40B / -180B's layout (new_decoder_architecture): one query_key_value holding, per KV group,
    # the group's queries then its key and value (GQA 4 / 2); self_attention / dense, layers in .h; its
    # head size is hidden / heads (a config property: COMMON's head_dim omitted). The 7B's multi-query
    # layout, the per-head one and ALiBi: tests below
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=128, head_dim=OMIT)),
    # partial rotary (phi: 0.5, stablelm: 0.25, the configs' defaults), per-head LayerNorm q/k
    # norms with qk_layernorm (test below); phi's output projection is `dense`
    "phi": ("PhiConfig", "PhiForCausalLM", dict(resid_pdrop=0.0, embd_pdrop=0.0)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    # GPT-NeoX's fused q | k | v per head (viewed as (..., heads, 3, head_dim)), partial rotary 0.5
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    # q/k RMSNorms (no weights) AFTER RoPE, rotation by the negative angle (tests below);
    # final_logit_softcapping 15 (the config's default), applied by the model after the layers
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", {}),
    # q/k RMSNorms query_layernorm / key_layernorm AFTER RoPE; NTK-alpha RoPE (tests below)
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", dict(rope_parameters=NTK_ALPHA)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(MOE, rope_parameters=NTK_ALPHA)),
    # Granite 4.0's hybrid with RoPE (its checkpoints' default is NoPE: refused, test below): layer 0 a
    # Mamba-2 layer (left alone), layer 1 Granite's attention (attention_multiplier as its scaling)
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(GRANITE_HYBRID)),
    # OLMo Hybrid with RoPE (its checkpoints have none: refused, test below): layer 0 a Gated DeltaNet
    # (left alone), layer 1 OLMo 2's attention (q/k norms over the whole projection)
    "olmo_hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM",
                    dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, pad_token_id=1,
                         bos_token_id=1, eos_token_id=2)),
    # Flint: layer 0 sliding (16-token window) with RoPE, layer 1 full and NoPE; per-head q/k norms
    # before RoPE, GPT-OSS's attention sinks (transformers gives it "eager")
    "flint": ("FlintConfig", "FlintForCausalLM", dict(HYBRID)),
    # AFMoE (Arcee's Trinity): layer 0 sliding with RoPE, layer 1 full and NoPE; per-head q/k norms before
    # RoPE; the output gated by sigmoid(gate_proj(hidden)); layer 0's MLP dense, layer 1's the experts
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM", dict(MOE, **HYBRID, num_dense_layers=1)),
    # Laguna: AFMoE's attention rotating in every layer, RoPE per layer type (the config's: layer 1 full,
    # 5e5, its first half rotating; layer 0 sliding, 1e4, the whole head), the output times
    # softplus(g_proj(hidden)), one gate per head (gating "per-head", the default; per feature and heads
    # per layer: test below); layer 0's MLP dense, layer 1's the experts
    "laguna": ("LagunaConfig", "LagunaForCausalLM", dict(MOE, **HYBRID, shared_expert_intermediate_size=32)),
    # GraniteSWA (GRANITE_SWA above) with GPT-OSS's attention sinks (zero at init; transformers gives it
    # "eager"), and its MoE (4 experts, 2 per token, a shared MLP)
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM", dict(GRANITE_SWA)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM",
                       dict(MOE, **GRANITE_SWA, shared_intermediate_size=32)),
    # Llama 3.2 Vision's language model alone: 3 layers, layer 1 a cross-attention layer (left alone;
    # skipped by transformers without an image), layers 0 and 2 LLaMA's self-attention
    "mllama_text_model": ("MllamaTextConfig", "MllamaForCausalLM", dict(MLLAMA_TEXT)),
    # LFM2 and its MoE: hybrids, layer 0 a short convolution (left alone), layer 1 attention with
    # per-head q/k RMSNorms (q_layernorm / k_layernorm) before RoPE; LFM2-MoE's rotary embedding is pos_emb
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"])),
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", dict(MOE, layer_types=["conv", "full_attention"])),
    # LFM3: layer 0 a short convolution (left alone), layer 1 sliding (16-token window, plain RoPE 1e4),
    # layer 2 full ("proportional" 1e6, half its pairs rotating); Qwen3's q/k norms, a sigmoid gate per head
    "lfm3": ("Lfm3Config", "Lfm3ForCausalLM",
             dict(num_hidden_layers=3, layer_types=["conv", "sliding_attention", "full_attention"], sliding_window=16,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # LaraMini: layer 0 a Gated DeltaNet (left alone), layer 1 sliding (16-token window) with RoPE, layer 2
    # full and NoPE (handed no tables); Qwen3's q/k norms; MoE with a shared expert
    "lara_mini": ("LaraMiniConfig", "LaraMiniForCausalLM",
                  dict(MOE, num_hidden_layers=3, sliding_window=16,
                       layer_types=["linear_attention", "sliding_attention", "full_attention"],
                       shared_expert_intermediate_size=32, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=8, linear_value_head_dim=8)),
    # Llama 4 (Maverick's form: no q/k norm): interleaved pairs, layer 1 NoPE with attention temperature
    # tuning (floor_scale 16, so that it bites at these lengths), layer 0 chunked (8192 tokens: one
    # chunk here; chunks, the Scout form's norms after RoPE and the multimodal model: tests below)
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(MOE, **LLAMA4)),
    # layer 0 sliding (16-token window), layer 1 full; per-head attention sinks (s_aux); plain RoPE
    # here (its checkpoints' YaRN: test below); transformers gives GPT-OSS "eager" (it refuses sdpa)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(MOE, **HYBRID, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # MiMo-V2-Flash: layer 0 sliding (16-token window) with attention sinks and twice the KV heads, layer 1 full
    # without sinks; RoPE per layer type, the config's (1e4 sliding, 5e6 full, 0.334 of the 24-feature heads: 8
    # rotate); values of 16 features (v_head_dim) times 0.707 (attention_value_scale); layer 1's MLP the experts;
    # transformers gives it "eager" (it refuses sdpa)
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", dict(MOE, **HYBRID, head_dim=24, v_head_dim=16)),
    # Multi-head Latent Attention: DeepSeek-V2 (its complex rotation: interleaved pairs; q from one q_proj
    # here, q_lora_rank None), DeepSeek-V3 and the architectures with its attention (interleaved pairs,
    # config.rope_interleave's default; rotate-half ones: tests in test_mla.py), MiniCPM3 (rotate-half)
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(MLA, q_lora_rank=None)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", MLA),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", MLA),
    "youtu": ("YoutuConfig", "YoutuForCausalLM", dict(MLA, bos_token_id=1, eos_token_id=2)),
    "axk1": ("AXK1Config", "AXK1ForCausalLM", dict(MLA, bos_token_id=1, eos_token_id=2)),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", MLA),
    # Mistral 4: its table over the whole head (24) with partial_rotary_factor 1/3 (the rotary part's 8),
    # Llama 4's attention temperature on the whole query (up to 1.19 over 100 tokens); "linear" with factor
    # 1 as plain RoPE (transformers' own "default" for it ignores the factor and fails)
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM",
                 dict(MLA, head_dim=24, bos_token_id=1, eos_token_id=2,
                      rope_parameters={"rope_type": "linear", "factor": 1.0, "rope_theta": 10000.0,
                                       "partial_rotary_factor": 1 / 3, "llama_4_scaling_beta": 0.1,
                                       "original_max_position_embeddings": 16})),
    # LongCat-Flash: one decoder layer holding two MLAs (a ModuleList self_attn, called in turn), q and the
    # latent scaled by (hidden / rank) ** 0.5; its MoE with "zero experts" (identity) beside the routed ones
    "longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM",
                      dict(MLA, num_layers=1, ffn_hidden_size=128, expert_ffn_hidden_size=32, moe_topk=2,
                           zero_expert_num=2)),
}

# MLA families: q and k made ready outside rope_attention (its rotary part rotated by pirope, as transformers
# caches the shared key), the values padded to q's head size (24)
MLA_TYPES = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "youtu", "axk1", "minicpm3", "mistral4", "longcat_flash")


# layers that take the fused path on a sequence longer than HYBRID's window (default: both; a
# sliding layer with its window, the sdpa mask showing it on CPU; on CPU also the layers that
# rope_attention cannot rotate itself -- NoPE layers (SmolLM3, EXAONE 4, Cohere 2, Llama 4, ...) and
# NanoChat's and Hunyuan's q/k norms after RoPE --, through an identity rotation, see
# IDENTITY_LAYERS; Gemma 2's and VaultGemma's soft-capped layers fuse with rope_attention's
# softcap): the number of layers with attention where the model has fewer (hybrids) or more
FUSED_LAYERS = {"qwen3_next": 1, "qwen3_5_text": 1, "qwen3_5_moe_text": 1, "lfm2": 1, "lfm2_moe": 1,
                "granitemoehybrid": 1, "olmo_hybrid": 1, "lfm3": 2, "lara_mini": 2,
                "granite_swa": 3, "granitemoe_swa": 3}

# which of the fused calls of a make(model_type) model (one per layer with attention, in order) are of
# layers that rotate outside rope_attention (NoPE, or norms after RoPE, or the negative angle) and so call
# it with the identity table (width 0: no feature rotates), where not none
IDENTITY_LAYERS = {"smollm3": [1], "exaone4": [1], "cohere2": [1], "exaone_moe": [1], "kolibri1": [1],
                   "cohere2_moe": [1], "nanochat": [0, 1], "hunyuan_v1_dense": [0, 1], "hunyuan_v1_moe": [0, 1],
                   "llama4_text": [1], "flint": [1], "afmoe": [1], "lara_mini": [1],
                   "granite_swa": [2], "granitemoe_swa": [2],
                   **{t: [0, 1] for t in MLA_TYPES}}

# the head size of each layer on the fused path, where not 16 in every layer: Gemma 4's full
# layer has heads of global_head_dim
FUSED_HEAD_DIMS = {"gemma4_text": [16, 32], "gemma4_unified_text": [16, 32], "mimo_v2_flash": [24, 24],
                   **{t: [24, 24] for t in MLA_TYPES}}


def fused_shapes(model_type, batch, seqlen):
    """The q shapes of the rope_attention calls of one forward of a make(model_type) model."""
    dims = FUSED_HEAD_DIMS.get(model_type, [16] * FUSED_LAYERS.get(model_type, 2))
    return [(batch, seqlen, 4, d) for d in dims]


# language models of multimodal RoPE (Qwen2-VL, Qwen3-VL, GLM-4V, GLM-Image) with no ForCausalLM of their own: tested
# inside their multimodal models, with images, in test_multimodal_rope.py
MROPE_LANGUAGE_MODELS_ONLY = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text", "glm4v_text",
                              "glm_ocr_text", "glm4v_moe_text", "paddleocr_vl_text", "qwen2_5_omni_text",
                              "qwen3_omni_moe_text", "glm_image_text")


# language models with neither a ForCausalLM nor multimodal RoPE (DeepSeek-OCR 2's, Granite 4.0 Vision's,
# Step 3.7's): tested inside their multimodal models, on text, in MULTIMODAL below
MULTIMODAL_LANGUAGE_MODELS_ONLY = ("deepseek_ocr2_text", "granite4_vision_text", "step3p5")


def test_every_supported_family_is_tested_here():
    assert set(FAMILIES) | set(MROPE_LANGUAGE_MODELS_ONLY) | set(MULTIMODAL_LANGUAGE_MODELS_ONLY) == \
        set(SUPPORTED_MODEL_TYPES)


def make(model_type, seed=0, **kw):
    config_cls, model_cls, extra = FAMILIES[model_type]
    if not hasattr(transformers, config_cls):  # an older transformers than requirements-dev.txt's
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    values = {key: value for key, value in {**COMMON, **extra, **kw}.items() if value is not OMIT}
    config = getattr(transformers, config_cls)(**copy.deepcopy(values))
    assert config.model_type == model_type
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    if model_type == "falcon" and not falcon_runs_attention_functions(model):
        pytest.skip(f"transformers {transformers.__version__}'s Falcon attention computes attention itself "
                    "(refused: test_falcon_of_older_transformers_is_refused_naming_the_version)")
    return model


def falcon_runs_attention_functions(model):
    """Whether transformers' Falcon attention is the one pirope follows (5.25 on: it runs transformers'
    attention functions, at its .scaling)."""
    return hasattr(model.transformer.h[0].self_attention, "scaling")


def twin(model, config=None):
    """transformers' own model with `config` (default: model's) and model's weights."""
    ref = type(model)(copy.deepcopy(config or model.config)).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def ids(batch, seqlen, seed=1):
    return torch.randint(3, 256, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert_same_logits(la, lb)
    assert_same_grads(ga, gb)


def assert_generates_like(model, ref, x, **inputs):
    """Greedy generate() of model (a fused prefill, then cached decoding) gives ref's tokens and logits."""
    with torch.no_grad():
        a, b = (m.generate(x, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           **inputs) for m in (model, ref))
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-5, atol=1e-5)


def assert_left_padded_generation_like_transformers(model_type, seqlen, padding):
    """make(model_type) extended 2x by PI (fused) generates like transformers' model from the new config,
    for a batch of two rows of ``seqlen`` tokens, the first left-padded by ``padding``."""
    base = make(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(2, seqlen)
    mask = torch.ones_like(x)
    mask[0, :padding] = 0
    assert_generates_like(model, twin(base, model.config), x, attention_mask=mask)


def assert_compiled_pi_equals_transformers(base):
    """torch.compile(fullgraph=True) of ``base`` extended 2x by PI (fused) gives the logits and gradients of
    transformers' model from the new config."""
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = ids(2, 50)
    logits, grads = logits_and_grads(compiled, x)
    assert_same((logits, {n.removeprefix("_orig_mod."): g for n, g in grads.items()}),
                logits_and_grads(twin(base, model.config), x))


def assert_checkpoint_rope_kept_then_replaced(base, rope_type, longer, attention, tmp_path, x):
    """A checkpoint's own non-linear RoPE (``rope_type``): patch_rope keeps the model; Position
    Interpolation, which composes with no scaling but its own, is refused naming it; a replaced
    scaling (``longer``) is transformers' model with that config, which plain transformers loads back
    from save_pretrained as the same model. Returns (the replaced model, transformers' twin, the
    loaded one)."""
    patched = patch_rope(copy.deepcopy(base), attention=attention)
    assert_same(logits_and_grads(patched, x), logits_and_grads(twin(base), x))
    with pytest.raises(ValueError, match=rope_type):
        apply_position_interpolation(copy.deepcopy(base), 2.0)
    model = patch_rope(copy.deepcopy(base), longer, attention=attention)
    assert model.config.rope_parameters == longer
    ref = twin(base, model.config)
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    model.save_pretrained(tmp_path)
    loaded = type(base).from_pretrained(tmp_path).eval()  # plain transformers
    assert loaded.config.rope_parameters == longer
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))
    return model, ref, loaded


def assert_refused_unchanged(model, error, match, calls=None):
    """Each of ``calls`` (default: patch_rope, and apply_position_interpolation by 2) refuses ``model``
    with ``error`` matching ``match`` and leaves it as it was: the same config, the same module objects
    under the same names (no rotary embedding replaced), no attention forward bound."""
    calls = calls or (lambda m: patch_rope(m), lambda m: apply_position_interpolation(m, 2.0))
    config, modules = model.config.to_dict(), dict(model.named_modules())
    for call in calls:
        with pytest.raises(error, match=match):
            call(model)
        assert model.config.to_dict() == config and dict(model.named_modules()) == modules
        assert not any("forward" in vars(module) for module in model.modules())


def spy_on(monkeypatch, name, record=lambda q, args, kwargs: tuple(q.shape)):
    """Records record(q, args, kwargs) (default: the q shape) for every call of pirope.<name>(q, *args,
    **kwargs)."""
    calls = []
    real = getattr(pirope, name)

    def spy(q, *args, **kwargs):
        calls.append(record(q, args, kwargs))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(pirope, name, spy)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """The q shape of every pirope.rope_attention call."""
    return spy_on(monkeypatch, "rope_attention")


@pytest.fixture
def fused_softcaps(monkeypatch):
    """The (q shape, softcap) of every pirope.rope_attention call."""
    return spy_on(monkeypatch, "rope_attention", lambda q, args, kwargs: (tuple(q.shape), kwargs.get("softcap", 0.0)))


@pytest.fixture
def fused_tables(monkeypatch):
    """Whether each pirope.rope_attention(q, k, v, cos, ...) call got the identity table (width 0: q and k
    made ready before it)."""
    return spy_on(monkeypatch, "rope_attention", lambda q, args, kwargs: args[2].shape[1] == 0)


@pytest.fixture
def fused_windows(monkeypatch):
    """The window_size of every pirope.rope_attention call."""
    return spy_on(monkeypatch, "rope_attention", lambda q, args, kwargs: kwargs.get("window_size", (-1, -1)))


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_position_interpolation_equals_transformers(model_type, attention, fused_calls, fused_tables):
    base = make(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    assert model.config.max_position_embeddings == 2 * WINDOW
    ref = twin(base, model.config)  # the PI model as transformers builds it from the config
    x = ids(2, 100)  # past the original window
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    # the fused kernel ran in every layer with attention (no window here is shorter than the sequence),
    # those it cannot rotate itself on q and k rotated (or not) and normalized before it
    assert fused_calls == (fused_shapes(model_type, 2, 100) if attention == "fused" else [])
    assert fused_tables == [i in IDENTITY_LAYERS.get(model_type, []) for i in range(len(fused_calls))]


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_output_attentions_returns_transformers_attention_weights(model_type, fused_calls):
    # the fused kernel computes no weights: a call whose weights transformers records takes the model's
    # eager attention, also where the decoder layer does not pass output_attentions on (Nemotron, StableLM)
    base = make(model_type, attn_implementation="eager")
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config)
    x = ids(1, 40)
    with torch.no_grad():
        a, b = model(x, output_attentions=True), ref(x, output_attentions=True)
    assert_same_logits(a.logits, b.logits)
    assert len(a.attentions) == len(b.attentions) > 0
    for got, want in zip(a.attentions, b.attentions):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fused_calls == []


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_patch_rope_keeps_the_model(model_type):
    # the model's own RoPE (partial rotary, per-layer-type tables, ... as configured) through
    # pirope: the unpatched model's logits and gradients
    base = make(model_type)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))


def scale_qk_norms(model):
    # scaled norm weights: a patch that skipped or misplaced the norms would change the logits
    # (the family's norm names; NanoChat's norms have no weight)
    from pirope.integrations.transformers.families import _FAMILIES

    with torch.no_grad():
        for layer in model.model.layers:
            for name in _FAMILIES[model.config.model_type].qk_norm_names:
                # (Gemma 4's KV-shared layers have no k_norm, the convolution layers of hybrids no self_attn)
                weight = getattr(getattr(getattr(layer, "self_attn", None), name, None), "weight", None)
                if weight is not None:
                    weight.uniform_(0.2, 3.0)
    return model


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe", "apertus", "gemma3_text", "exaone4", "dots1", "hy_v3",
                                        "mellum", "exaone_moe", "kolibri1", "apertus1p5_text", "lfm2", "lfm2_moe",
                                        "flint", "afmoe", "laguna", "minimax_m3_vl_text"])
def test_qk_norms_run_before_rope(model_type):
    base = scale_qk_norms(make(model_type))
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x = ids(1, 50)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", ["olmo2", "olmo3", "flex_olmo", "minimax_m2", "olmoe", "olmo_hybrid"])
def test_olmo_norms_over_the_whole_projection_run_before_the_view_into_heads(model_type, attention, fused_calls):
    base = scale_qk_norms(make(model_type))
    norm = base.model.layers[-1].self_attn.q_norm  # (OLMo Hybrid's layer 0 is linear attention)
    assert norm.weight.shape == (4 * 16,)  # one RMSNorm over all heads: not the per-head norm of Qwen3
    model = patch_rope(copy.deepcopy(base), attention=attention)
    x = ids(2, 50)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    assert len(fused_calls) == (FUSED_LAYERS.get(model_type, 2) if attention == "fused" else 0)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_olmo_clips_q_k_v_before_rope(attention, fused_calls):
    base = make("olmo")
    attn = base.model.layers[0].self_attn
    h = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(4))
    assert (attn.q_proj(h).abs() > 0.1).float().mean() > 0.2  # the clip bites: not a vacuous check
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    got = logits_and_grads(model, x)
    assert_same(got, logits_and_grads(twin(base, model.config), x))
    assert len(fused_calls) == (2 if attention == "fused" else 0)
    # the same weights without clipping give other logits, so a patch that skipped it would fail
    unclipped = copy.deepcopy(model.config)
    unclipped.clip_qkv = None
    assert not torch.allclose(logits_and_grads(twin(base, unclipped), x)[0], got[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", ["phi", "stablelm", "persimmon"])
def test_phi_and_stablelm_qk_layernorms_run_before_rope(model_type, attention, fused_calls):
    # qk_layernorm: Phi's LayerNorm over each head's features, StableLM's one LayerNorm per
    # head applied on (batch, heads, seqlen, head_dim); weights and biases drawn so that a
    # skipped or misplaced norm (or heads mixed up) changes the logits
    base = make(model_type, qk_layernorm=True)
    with torch.no_grad():
        for layer in base.model.layers:
            for name in ("q_layernorm", "k_layernorm"):
                for p in getattr(layer.self_attn, name).parameters():
                    p.uniform_(-1.5, 1.5)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    assert len(fused_calls) == (2 if attention == "fused" else 0)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize(("model_type", "norm_shape"), [("cohere", (4, 16)), ("glm4_moe", (16,))])
def test_per_head_qk_norms_run_before_rope_with_use_qk_norm(model_type, norm_shape, attention):
    # Cohere: a LayerNorm per head (weights (heads, head_dim)); GLM-4.5: one RMSNorm over each head's features
    base = scale_qk_norms(make(model_type, use_qk_norm=True))
    assert base.model.layers[0].self_attn.q_norm.weight.shape == norm_shape
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))


@pytest.mark.parametrize("model_type", ["cohere", "glm", "glm4", "helium", "ernie4_5", "ernie4_5_moe"])
def test_interleaved_families_rotate_the_pairs_transformers_rotates(model_type):
    # q and k rotated by transformers' own rotary embedding and apply_rotary_pos_emb against
    # pirope's op with the patched model's table and the family's pairing; GLM rotates
    # pairs (2i, 2i+1) of the first half of each head and passes the second half through
    from pirope.integrations.transformers.families import _FAMILIES

    base = apply_position_interpolation(make(model_type), 2.0)
    ref = twin(base)  # unpatched, from the PI config
    hf = sys.modules[type(ref.model.layers[0].self_attn).__module__]
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 100, 16, generator=g), torch.randn(2, 2, 100, 16, generator=g)  # (B, H, S, D)
    positions = torch.arange(100).expand(2, 100)
    cos, sin = ref.model.rotary_emb(q, positions)
    want_q, want_k = hf.apply_rotary_pos_emb(q, k, cos, sin)

    tables = base.model.rotary_emb(q, positions)
    assert tables.cos.shape[1] == (4 if model_type.startswith("glm") else 8)  # rotary_dim // 2
    interleaved = _FAMILIES[model_type].interleaved
    got_q, got_k = (pirope.apply_rope(t.transpose(1, 2), tables.cos, tables.sin, tables.position_ids,
                                      interleaved=interleaved).transpose(1, 2) for t in (q, k))
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    # not a pairing-blind check: rotate-half pairs would give other values
    rotate_half_q = pirope.apply_rope(q.transpose(1, 2), tables.cos, tables.sin, tables.position_ids).transpose(1, 2)
    assert not torch.allclose(rotate_half_q, want_q, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model_type", ["glm", "glm4", "glm4_moe", "nemotron"])
def test_glm_position_interpolation_keeps_the_partial_rotary_and_round_trips(model_type, tmp_path):
    base = make(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0)
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5}
    assert model.model.rotary_emb.rotary_dim == 8
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, FAMILIES[model_type][1]).from_pretrained(tmp_path).eval()  # plain transformers
    assert loaded.config.rope_parameters == model.config.rope_parameters
    assert loaded.config.max_position_embeddings == 2 * WINDOW
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))


def test_gpt_neox_keeps_its_partial_rotary_and_round_trips(tmp_path):
    base = make("gpt_neox")
    assert base.gpt_neox.layers[0].attention.rotary_ndims == 4  # rotary_pct 0.25 of 16
    model = apply_position_interpolation(copy.deepcopy(base), 2.0)
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.25}
    assert model.gpt_neox.rotary_emb.rotary_dim == 4
    model.save_pretrained(tmp_path)
    loaded = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))


def test_rope_parameters_without_the_partial_factor_read_the_configs_as_a_reloaded_model_does(tmp_path):
    # a config edited after its init, rope_parameters without the partial_rotary_factor the config holds:
    # transformers moves the config's into rope_parameters when it loads one (standardize_rope_params)
    base = make("phi")
    base.config.rope_parameters = {k: v for k, v in base.config.rope_parameters.items() if k != "partial_rotary_factor"}
    base.config.partial_rotary_factor = 0.5
    model = patch_rope(copy.deepcopy(base))
    assert model.model.rotary_emb.rotary_dim == 8
    base.save_pretrained(tmp_path)
    loaded = transformers.PhiForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    assert loaded.config.rope_parameters["partial_rotary_factor"] == 0.5
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))


@pytest.mark.parametrize("head_dim", [8, 32])
def test_gpt_neox_with_a_config_head_dim_its_attention_does_not_use_is_refused_unchanged(head_dim):
    # GPTNeoXConfig has no head_dim: one set in the config sizes transformers' rotary table but not the
    # attention's heads (hidden_size / num_attention_heads = 16), a model no pirope table reproduces
    assert_refused_unchanged(make("gpt_neox", head_dim=head_dim), ValueError,
                             rf"config.head_dim = {head_dim} is not the head size .*'gpt_neox'.* = 16\)")


# Falcon's other layouts of query_key_value: all queries then one key and one value (multi_query,
# Falcon-7B's), or q | k | v per head (neither flag); with biases (config.bias)
FALCON_LAYOUTS = {"multi_query": dict(new_decoder_architecture=False, multi_query=True),
                  "per_head": dict(new_decoder_architecture=False, multi_query=False, num_kv_heads=4),
                  "grouped_with_bias": dict(bias=True)}


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("layout", list(FALCON_LAYOUTS))
def test_falcon_query_key_value_layouts_equal_transformers(layout, attention, fused_calls):
    base = make("falcon", **FALCON_LAYOUTS[layout])
    attn = base.transformer.h[0].self_attention
    heads_kv = {"multi_query": 1, "per_head": 4, "grouped_with_bias": 2}[layout]
    assert attn.num_kv_heads == heads_kv and (attn.query_key_value.bias is not None) == (layout == "grouped_with_bias")
    with torch.no_grad():  # (Falcon initializes biases to zero: made to count)
        for module in base.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    assert fused_calls == (fused_shapes("falcon", 2, 100) if attention == "fused" else [])
    # (the keys and values of a fused call are those heads: the spy saw q only, the logits say the rest)
    model.config._attn_implementation = "eager"  # its eager attention, as transformers' eager model has it
    ref = twin(base, model.config)
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))


def test_falcon_position_interpolation_round_trips(tmp_path):
    base = make("falcon", new_decoder_architecture=False, multi_query=True)  # Falcon-7B's layout
    model = apply_position_interpolation(copy.deepcopy(base), 2.0)
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model.save_pretrained(tmp_path)
    loaded = transformers.FalconForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    assert loaded.config.max_position_embeddings == 2 * WINDOW
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))


def test_falcon_left_padded_batch_generates_like_transformers():
    # Falcon's model builds its own masks (and decoder layers that pass no extra keywords on)
    assert_left_padded_generation_like_transformers("falcon", 70, 5)


def test_phi3_compiles_fullgraph():
    # Phi-3's PI is written as a "longrope" of equal short and long factors (what transformers
    # reads back): one table for every length, so no host read of the length under compile
    assert_compiled_pi_equals_transformers(make("phi3"))


def test_static_cache_decoding_reads_no_cached_length_per_layer(monkeypatch):
    # A static cache keeps its length as a tensor: reading it per layer and decode step would
    # be a device sync on a GPU, and breaks a compiled forward's graph (transformers' has none).
    # A decode step (one query) never fuses, so it is not read; under compile it is not read.
    from pirope.integrations.transformers import fusing

    reads = []
    past_length = fusing._past_length
    monkeypatch.setattr(fusing, "_past_length", lambda *a: reads.append(a[1]) or past_length(*a))
    base = make("llama")
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(1, 40)
    assert_generates_like(model, twin(base, model.config), x, cache_implementation="static")
    layers = base.config.num_hidden_layers
    assert len(reads) == layers  # the prefill's (6 steps: 1 prefill + 5 decode steps)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="eager")
    assert_generates_like(compiled, twin(base, model.config), x, cache_implementation="static")
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_falcon_compiles_fullgraph():
    assert_compiled_pi_equals_transformers(make("falcon", new_decoder_architecture=False, multi_query=True))


def test_falcon_of_older_transformers_is_refused_naming_the_version():
    # before 5.25 transformers' Falcon attention computed attention itself (no .scaling, its own
    # eager / sdpa / flash code): refused where it is so, the model unchanged
    config = transformers.FalconConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"})
    base = transformers.FalconForCausalLM(config).eval()
    if falcon_runs_attention_functions(base):
        pytest.skip(f"transformers {transformers.__version__}'s Falcon attention is the one pirope follows")
    model = copy.deepcopy(base)
    with pytest.raises(TypeError, match=r"has no self_attention with .*scaling.* transformers >= 5\.25"):
        apply_position_interpolation(model, 2.0)
    assert model.config.max_position_embeddings == WINDOW and "forward" not in vars(model.transformer.h[0].self_attention)


def test_falcon_with_alibi_is_refused_unchanged():
    # Falcon-RW's form: positions by an ALiBi bias in the mask; the model still builds a rotary
    # embedding, which it never uses: nothing to patch or extend
    assert_refused_unchanged(make("falcon", alibi=True), TypeError, "config.alibi set: its positions are not RoPE")


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", ["smollm3", "llama4_text"])  # (Llama 4's NoPE temperature: test_llama4.py)
def test_nope_layers_attend_without_rotation(model_type, attention, fused_calls, fused_tables, rotations):
    rotated = rotations  # the q shape of every pirope.apply_rope_qk call (the "sdpa" path's rotation)
    base = make(model_type)
    assert [layer.self_attn.use_rope for layer in base.model.layers] == [1, 0]  # layer 1 is NoPE
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    # layer 0 rotates once (by apply_rope_qk or inside rope_attention), layer 1 never: fused, it
    # attends through the identity rotation
    if attention == "fused":
        assert (fused_calls, fused_tables, rotated) == ([(2, 100, 4, 16)] * 2, [False, True], [])
    else:
        assert (fused_calls, rotated) == ([], [(2, 100, 4, 16)])


def mask_free_call_fuses(attn, seqlen, cache=None, kwargs=None, packed=False):
    """Whether a patched layer's call without a mask tensor (a mask-free backend's: flash
    attention's) takes the fused path, as its forward decides: everything but the mask
    (_layer_can_fuse), then the packing and the sliding window (_fused_segments)."""
    from pirope.integrations.transformers.attention import _fused_segments
    from pirope.integrations.transformers.fusing import _cutting_window, _layer_can_fuse

    kwargs = {} if kwargs is None else kwargs
    q = torch.zeros(1, seqlen, 1, 8)
    fuse = _layer_can_fuse(attn, seqlen, cache, kwargs)
    return _fused_segments(attn, fuse, q, None, None, packed, _cutting_window(attn, seqlen))[0]


def windowed(model_type):
    """A model whose layer 0 attends within a 16-token window (layer 1: as configured)."""
    if model_type in ("mistral", "starcoder2", "mixtral", "ministral3"):
        return make(model_type, sliding_window=16)  # every layer
    return make(model_type, sliding_window=16, use_sliding_window=True,
                layer_types=["sliding_attention", "full_attention"])


@pytest.mark.parametrize("model_type", ["mistral", "ministral", "qwen2", "qwen3", "smollm3", "starcoder2", "mixtral",
                                        "cwm", "dots1", "ministral3"])
def test_sliding_windows_are_followed(model_type, fused_windows):
    # past the window, transformers' sdpa mask shows it: the windowed layers (layer 0, or all)
    # fuse with rope_attention's window_size = (window - 1, 0) on CPU
    base = windowed(model_type)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    windowed_layers = 2 if model_type in ("mistral", "starcoder2", "mixtral", "ministral3") else 1
    fusable = FUSED_LAYERS.get(model_type, 2)
    for seqlen, windows in ((40, [(15, 0)] * windowed_layers + [(-1, -1)] * (fusable - windowed_layers)),
                            (15, [(-1, -1)] * fusable)):  # past the window / within it
        fused_windows.clear()
        x = ids(2, seqlen, seed=seqlen)
        assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
        assert fused_windows == windows, seqlen


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_a_sliding_window_of_zero_is_computed_as_transformers_computes_it(model_type, fused_windows):
    # (its mask hides every key; rope_attention's window_size would be (-1, 0), no window: never fused)
    base = make(model_type, sliding_window=0, **({} if model_type == "mistral" else
                                                  {"use_sliding_window": True, "max_window_layers": 0}))
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    assert fused_windows == []  # (transformers computes it)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_a_fused_window_is_what_separates_the_result_from_full_attention(model_type, monkeypatch):
    # the premise of the test above: without its window the fused call would attend to every key
    base = windowed(model_type)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x = ids(1, 40, seed=5)
    want = logits_and_grads(twin(base), x)[0]
    real = pirope.rope_attention
    monkeypatch.setattr(pirope, "rope_attention", lambda *a, **kw: real(*a, **{**kw, "window_size": (-1, -1)}))
    unwindowed = model(x, use_cache=False).logits
    torch.testing.assert_close(unwindowed[:, :16], want[:, :16], rtol=1e-5, atol=1e-5)  # within the window
    assert not torch.allclose(unwindowed[:, 16:], want[:, 16:], atol=1e-3)


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text"])
def test_packed_sequences_within_sliding_windows_equal_transformers(model_type, fused_windows):
    # transformers' sdpa mask for packed sequences and a window at once: cu_seqlens and window_size
    base = windowed(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x, position_ids=PACKED),
                logits_and_grads(twin(base, model.config), x, position_ids=PACKED))
    assert fused_windows == [(15, 0), (-1, -1)]


@pytest.mark.parametrize("model_type", ["qwen3", "gemma", "granite", "cohere", "glm", "smollm3", "gemma3_text",
                                        "gemma4_text", "gemma3n_text", "gemma2", "mixtral", "qwen2_moe", "olmoe",
                                        "minimax_m2", "mellum", "gpt_neox", "glm4_moe", "nemotron", "cohere2_moe",
                                        "kolibri1", "nanochat", "hunyuan_v1_dense", "hunyuan_v1_moe", "gpt_oss",
                                        "ministral3", "bitnet", "minicpm5_moe", "qwen3_next", "qwen3_5_text",
                                        "qwen3_5_moe_text", "lfm2", "lfm2_moe", "llama4_text", "granitemoehybrid",
                                        "olmo_hybrid", "flint", "afmoe", "mllama_text_model", "falcon", "aria_text",
                                        "lfm3", "lara_mini", "laguna", "minimax_m3_vl_text", "mimo_v2_flash",
                                        "granite_swa", "granitemoe_swa", *MLA_TYPES])
def test_fused_prefill_then_cached_decoding_generates_like_transformers(model_type, fused_calls):
    base = make(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config)
    assert_generates_like(model, ref, ids(1, 70))
    # the prefill; the decode steps take the cached path
    assert fused_calls == fused_shapes(model_type, 1, 70)


def test_mllama_with_cross_attention_layers_only_is_refused_unchanged():
    assert_refused_unchanged(make("mllama_text_model", num_hidden_layers=2, cross_attention_layers=[0, 1]),
                             ValueError, "none of the 2 decoder layers .*cross_attention_layers lists them all")


def test_qwen3_next_without_attention_layers_is_refused_unchanged():
    # Qwen3-Next below its full_attention_interval (4) has linear-attention layers only: no RoPE
    # anywhere, so nothing to patch or extend; refused naming the layer types, model unchanged
    assert_refused_unchanged(make("qwen3_next", layer_types=["linear_attention", "linear_attention"]),
                             ValueError, "none of the 2 decoder layers .*'linear_attention'")


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_ministral3_checkpoint_rope_is_kept_and_position_interpolation_refused(attention, fused_calls):
    # Ministral 3's checkpoints: YaRN (factor 16 over a 16k window there; 4 over 16 here) with the
    # attention temperature's keys and a max_position_embeddings beside them in rope_parameters:
    # patch_rope keeps the model (the table from the YaRN keys alone, the temperature from the
    # others); PI, defined on plain RoPE, is refused naming the rope_parameters, model unchanged
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "max_position_embeddings": WINDOW, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}
    base = make("ministral3", rope_parameters=rope)
    model = patch_rope(copy.deepcopy(base), attention=attention)
    x = ids(2, 60)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    assert fused_calls == (fused_shapes("ministral3", 2, 60) if attention == "fused" else [])
    with pytest.raises(ValueError, match="rope_type 'default', 'linear'"):
        apply_position_interpolation(copy.deepcopy(base), 2.0)
    # a replaced scaling keeps the temperature's keys (transformers' attention reads them)
    model = patch_rope(copy.deepcopy(base), {"rope_type": "linear", "factor": 2.0}, attention=attention)
    kept = {k: rope[k] for k in ("llama_4_scaling_beta", "original_max_position_embeddings", "max_position_embeddings")}
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, **kept}
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    # the checkpoint's rope_parameters with a longer factor, passed as they are (the temperature's keys given,
    # a new beta taken): transformers' model with that config
    longer = dict(rope, factor=8.0, llama_4_scaling_beta=0.2)
    model = patch_rope(copy.deepcopy(base), longer, attention=attention)
    assert model.config.rope_parameters == longer
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))


@pytest.mark.parametrize(("key", "value", "error"), [("llama_4_scaling_beta", "0.1", TypeError),
                                                     ("llama_4_scaling_beta", float("nan"), ValueError),
                                                     ("max_position_embeddings", 64.0, TypeError),
                                                     ("max_position_embeddings", 0, ValueError),
                                                     ("original_max_position_embeddings", True, TypeError),
                                                     ("llama_4_scaling_beta", True, TypeError)])
def test_bad_attention_temperature_keys_are_refused_unchanged(key, value, error):
    base = make("ministral3")
    model = copy.deepcopy(base)
    with pytest.raises(error, match=key):
        patch_rope(model, {"rope_type": "linear", "factor": 2.0, key: value})
    assert model.config.rope_parameters == base.config.rope_parameters


def test_attention_temperature_keys_are_written_as_python_numbers(tmp_path):
    # (a numpy integer is an int to numbers.Integral, not to the JSON the config is saved as)
    np = pytest.importorskip("numpy")
    base = make("ministral3")
    model = patch_rope(copy.deepcopy(base), {"rope_type": "linear", "factor": 2.0, "llama_4_scaling_beta": 1,
                                             "max_position_embeddings": np.int64(48)})
    params = model.config.rope_parameters
    assert (params["llama_4_scaling_beta"], params["max_position_embeddings"]) == (1.0, 48)
    assert (type(params["llama_4_scaling_beta"]), type(params["max_position_embeddings"])) == (float, int)
    model.save_pretrained(tmp_path)
    loaded = type(base).from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == params
    x = ids(2, 60)
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", ["ministral3", "mistral4"])
def test_attention_temperature_reads_the_positions_not_the_rows_of_the_tables(model_type, attention):
    # A short call far into the window is too sparse for a table: the rotary embedding hands the layers
    # the rows of the call's own positions, indexed 0..n-1. The temperature (1 + 0.1 log(1 + floor(
    # position / 16)): 1.19 at positions 100-107, 1.0 at those indices) reads the positions themselves.
    base = make(model_type)
    model = patch_rope(copy.deepcopy(base), attention=attention)
    x, positions = ids(1, 8), torch.arange(100, 108)[None]
    tables = model.model.rotary_emb(model.model.embed_tokens(x), positions)
    assert torch.equal(tables.position_ids, torch.arange(8)[None])  # (the premise: rows, not a table)
    assert_same(logits_and_grads(model, x, position_ids=positions),
                logits_and_grads(twin(base), x, position_ids=positions))


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_a_call_with_is_causal_false_attends_both_ways_as_in_transformers(model_type, fused_calls):
    # transformers' attention backends take a call's is_causal over the module's (bidirectional
    # use of a decoder, e.g. for embeddings); rope_attention is causal only, so no fused call
    base = make(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0)
    ref = twin(base, model.config)
    x = ids(1, 12)
    got = logits_and_grads(model, x, is_causal=False)
    assert_same(got, logits_and_grads(ref, x, is_causal=False))
    assert fused_calls == []
    assert not torch.allclose(got[0], logits_and_grads(ref, x)[0], atol=1e-4)  # really not causal
    logits_and_grads(model, x, is_causal=True)
    assert len(fused_calls) == 2  # an explicit is_causal=True fuses


def test_a_score_bias_passed_to_the_attention_is_added_as_in_transformers(fused_calls):
    # sdpa_attention_forward adds a position_bias kwarg to the scores; rope_attention has no bias
    base = make("llama")
    model = apply_position_interpolation(copy.deepcopy(base), 2.0)
    ref = twin(base, model.config)
    x = ids(1, 12)
    bias = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(7))
    got = logits_and_grads(model, x, position_bias=bias)
    assert_same(got, logits_and_grads(ref, x, position_bias=bias))
    assert fused_calls == []
    assert not torch.allclose(got[0], logits_and_grads(ref, x)[0], atol=1e-4)  # the bias matters


def test_sink_logits_passed_to_the_attention_take_its_backend(mask_free, fused_calls):
    # a backend that takes sink logits (s_aux: flash attention's kernels, the stand-in here) adds them to
    # each row's softmax; rope_attention, given none, would not: not fused
    base = make("llama", attn_implementation=MASK_FREE)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config)
    x = ids(1, 12)
    sinks = torch.full((4,), 2.0)
    got = logits_and_grads(model, x, s_aux=sinks)
    assert_same(got, logits_and_grads(ref, x, s_aux=sinks))
    assert fused_calls == []
    assert not torch.allclose(got[0], logits_and_grads(ref, x)[0], atol=1e-4)  # the sinks matter


def test_bidirectional_gemma_takes_the_exact_path(fused_calls):
    base = make("gemma", use_bidirectional_attention=True)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x = ids(1, 30)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    assert fused_calls == []  # rope_attention is causal only


@pytest.mark.parametrize("model_type", ["qwen3", "smollm3", "starcoder2"])
def test_no_fused_call_where_a_window_without_mask_would_cut_keys(model_type):
    # attention implementations that apply the window themselves (flash_attention_2) get no
    # mask tensor: the window alone must keep such a layer off the fused path
    model = patch_rope(windowed(model_type), attention="fused")
    windowed_attn, other_attn = (layer.self_attn for layer in model.model.layers)
    assert not mask_free_call_fuses(windowed_attn, 17)
    assert mask_free_call_fuses(windowed_attn, 16)
    # layer 1 attends to every key, except in StarCoder2 (one window for all layers)
    assert mask_free_call_fuses(other_attn, 17) == (model_type != "starcoder2")


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", ["llama", "mllama_text_model", "persimmon"])
def test_attention_dropout_is_off_in_eval(model_type, attention):
    # out of training the attention gets dropout 0 whatever the layer's rate (its attention_dropout,
    # Mllama's .dropout, Persimmon's nn.Dropout module), as transformers passes it its attention function
    base = make(model_type, **{"dropout" if model_type == "mllama_text_model" else "attention_dropout": 0.5})
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))


def test_mllama_attention_dropout_is_applied_in_training(fused_calls):
    # Llama 3.2 Vision's self-attention keeps its dropout rate in .dropout (not attention_dropout):
    # passed to the attention function in training, as transformers does (never fused then)
    base = make("mllama_text_model", dropout=0.3)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0).train()
    ref = twin(base, model.config).train()
    x = ids(2, 40)
    torch.manual_seed(5)
    got = logits_and_grads(model, x)
    torch.manual_seed(5)
    assert_same(got, logits_and_grads(ref, x))
    assert fused_calls == []
    model.eval()  # without the dropout: fused, and other logits
    assert not torch.allclose(model(x, use_cache=False).logits, got[0])
    assert fused_calls == [(2, 40, 4, 16)] * 2


MLLAMA_VISION = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, image_size=28, patch_size=14,
                     max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
                     supported_aspect_ratios=[[1, 1], [1, 2]], attention_heads=2, intermediate_size=64)


def test_llama_3_2_vision_llama3_rope_refused_with_a_recipe_that_works():
    # Llama 3.2 Vision ships Llama 3's "llama3" RoPE in its text config: PI is refused, and the
    # patch_rope call the error names (through get_text_config(), which a multimodal config
    # needs), followed as written, gives transformers' model with that config
    if not hasattr(transformers, "MllamaConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Mllama")
    rope = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": WINDOW // 2, "rope_theta": 10000.0}
    config = transformers.MllamaConfig(text_config={**COMMON, **MLLAMA_TEXT, "rope_parameters": rope},
                                       vision_config=MLLAMA_VISION, image_token_index=250)
    torch.manual_seed(0)
    base = transformers.MllamaForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="is not defined") as refused:
        apply_position_interpolation(copy.deepcopy(base), 2.0)
    advice = "patch_rope(model, {**model.config.get_text_config().rope_parameters, 'factor': 4.0})"
    assert advice in str(refused.value)
    model = eval(advice, {"patch_rope": patch_rope, "model": copy.deepcopy(base)})  # noqa: S307 - its own call
    model.config.get_text_config().max_position_embeddings = 2 * WINDOW
    assert model.config.get_text_config().rope_parameters == {**rope, "factor": 4.0}
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_llama_3_2_vision_with_an_image_equals_transformers(attention, fused_calls, tmp_path):
    # MllamaForConditionalGeneration: PI extends its language model; with an image (2 tiles) its
    # cross-attention layer attends to it, untouched, between the patched self-attention layers
    if not hasattr(transformers, "MllamaConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Mllama")
    config = transformers.MllamaConfig(text_config={**COMMON, **MLLAMA_TEXT}, vision_config=MLLAMA_VISION,
                                       image_token_index=250)
    torch.manual_seed(0)
    base = transformers.MllamaForConditionalGeneration(config).eval()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    assert model.model.language_model.config is model.config.get_text_config()
    ref = twin(base, model.config)
    x = ids(1, 100)
    x[0, 3] = 250
    image = dict(pixel_values=torch.randn(1, 1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(2)),
                 aspect_ratio_ids=torch.tensor([[1]]), aspect_ratio_mask=torch.tensor([[[1, 1]]]),
                 cross_attention_mask=torch.ones(1, 100, 1, 2, dtype=torch.long))
    got = logits_and_grads(model, x, **image)
    assert_same(got, logits_and_grads(ref, x, **image))
    assert any(".cross_attn." in name for name in got[1])  # the cross-attention layer ran
    assert fused_calls == ([(1, 100, 4, 16)] * 2 if attention == "fused" else [])
    model.save_pretrained(tmp_path)
    loaded = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path).eval()  # plain transformers
    assert_same(logits_and_grads(model, x, **image), logits_and_grads(loaded, x, **image))


@pytest.mark.parametrize("model_type", ["seed_oss", "starcoder2"])
def test_residual_dropout_after_o_proj_is_applied_in_training(model_type, fused_calls):
    base = make(model_type, residual_dropout=0.3, attention_dropout=0.0)
    model = patch_rope(copy.deepcopy(base), attention="fused").train()  # attention_dropout 0: fused
    ref = twin(base).train()
    x = ids(2, 40)
    torch.manual_seed(5)
    got = logits_and_grads(model, x)
    torch.manual_seed(5)
    want = logits_and_grads(ref, x)
    assert_same(got, want)
    assert fused_calls == [(2, 40, 4, 16)] * 2
    torch.manual_seed(6)  # the dropout is really on: another draw gives other logits
    assert not torch.allclose(model(x, use_cache=False).logits, got[0])


# ---- Gemma 4 (and 4 Unified), Gemma 3n: KV sharing, keys as values, proportional RoPE ----------

# 4 layers: the last two attend to the rotated keys and values that layers 0 and 1 (the last of
# their type before them) stored
SHARING = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2)
# name -> (model_type, config); in each, the layers with keys of their own (they fuse) are one
# sliding and one full layer, as in the two-layer make(model_type): fused_shapes gives them
KV_SHARING = {
    "gemma4": ("gemma4_text", SHARING),
    # the full layers have no v_proj (values: k_proj's output) and one KV head; layer 2 shares layer 1's
    "gemma4_k_eq_v": ("gemma4_text", dict(num_hidden_layers=3, num_kv_shared_layers=1, attention_k_eq_v=True,
                                          layer_types=["sliding_attention", "full_attention", "full_attention"],
                                          num_global_key_value_heads=1)),
    "gemma3n": ("gemma3n_text", SHARING),
    # (its _maybe_slice_kv_shared_inputs takes no per-layer inputs)
    "gemma4_unified": ("gemma4_unified_text", SHARING),
}


@pytest.fixture
def float64_angles(monkeypatch):
    """transformers' Gemma 4 (and 4 Unified) and Gemma 3n rotary embeddings with their angles in
    float64, as pirope's tables have them: a float64 model then differs from its patched copy by
    rounding alone (their attention has scale 1.0, so in float32 the two kinds of angle rounding
    move the gradients by ~1e-5)."""
    from transformers.modeling_rope_utils import dynamic_rope_update
    from transformers.models.gemma3n import modeling_gemma3n
    from transformers.models.gemma4 import modeling_gemma4
    from transformers.models.gemma4_unified import modeling_gemma4_unified

    @dynamic_rope_update  # as transformers' own (the length-dependent types' tables)
    def forward(self, x, position_ids, layer_type):
        inv_freq = getattr(self, f"{layer_type}_inv_freq")
        scale = getattr(self, f"{layer_type}_attention_scaling")
        angles = position_ids[..., None].double() * inv_freq.double()
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * scale).float().to(x.dtype), (angles.sin() * scale).float().to(x.dtype)

    monkeypatch.setattr(modeling_gemma4.Gemma4TextRotaryEmbedding, "forward", forward)
    monkeypatch.setattr(modeling_gemma3n.Gemma3nRotaryEmbedding, "forward", forward)
    monkeypatch.setattr(modeling_gemma4_unified.Gemma4UnifiedTextRotaryEmbedding, "forward", forward)


def assert_same_float64(a, b):
    """Logits and gradients of float64 models: transformers' Gemma 4 / 3n RMSNorms compute in float32
    whatever the dtype (their weights' gradients then differ by float32 summation order only)."""
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-6 * gb[name].abs().max().item(), msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("variant", list(KV_SHARING))
def test_kv_sharing_and_keys_as_values_equal_transformers(variant, attention, float64_angles, fused_calls):
    model_type, config = KV_SHARING[variant]
    base = scale_qk_norms(make(model_type, **config)).double()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    ref = twin(base, model.config).double()
    x = ids(2, 100)
    got, want = logits_and_grads(model, x), logits_and_grads(ref, x)
    assert_same_float64(got, want)
    # the layers with keys of their own fuse (the sliding one with its window); the shared ones cannot
    assert fused_calls == (fused_shapes(model_type, 2, 100) if attention == "fused" else [])


@pytest.mark.parametrize("variant", list(KV_SHARING))
def test_generates_like_transformers_with_shared_layers(variant, float64_angles, fused_calls):
    model_type, config = KV_SHARING[variant]
    base = make(model_type, **config).double()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config).double()
    seen = {}  # the tokens each model's shared layers attend from (transformers may keep only the
    for name, m in (("pirope", model), ("transformers", ref)):  # last before them in a prefill)
        seen[name] = []
        m.model.layers[-1].self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, out=seen[name]: out.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
    x = ids(1, 70)
    with torch.no_grad():
        a = model.generate(x, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        b = ref.generate(x, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-10, atol=1e-10)
    assert seen["pirope"] == seen["transformers"] and len(seen["pirope"]) == 6
    assert fused_calls == fused_shapes(model_type, 1, 70)  # the prefill's own-key layers


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_gemma4_with_shared_layers_compiles_fullgraph(attention, float64_angles):
    torch._dynamo.reset()
    base = make("gemma4_text", **SHARING).double()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = ids(2, 60)
    logits, grads = logits_and_grads(compiled, x)
    assert_same_float64((logits, {n.removeprefix("_orig_mod."): g for n, g in grads.items()}),
                        logits_and_grads(twin(base, model.config).double(), x))


def test_gemma4_full_layers_rotate_a_quarter_of_their_pairs():
    # "proportional": the full layer's table spans its 32-feature heads, the first 4 of its 16 pairs
    # rotating (divided by the PI factor), the other 12 not at all
    model = apply_position_interpolation(make("gemma4_text"), 4.0)
    full = model.model.rotary_emb.by_type["full_attention"]
    assert full.rotary_dim == 32 and model.model.rotary_emb.by_type["sliding_attention"].rotary_dim == 16
    cos, sin = full.tables(300, "cpu")
    assert torch.equal(cos[:, 4:], torch.ones(len(cos), 12)) and torch.equal(sin[:, 4:], torch.zeros(len(sin), 12))
    plain = pirope.rope_frequencies(32, base=1e6)[0][:4]
    torch.testing.assert_close(cos[:300, :4], torch.cos(torch.arange(300.0)[:, None] * plain / 4))


@pytest.mark.parametrize("model_type", ["phi", "persimmon", "stablelm", "gpt_neox", "glm", "nemotron"])
def test_proportional_rope_where_the_architecture_can_rotate_it(model_type):
    # "proportional" spans the whole head: GPT-NeoX, GLM, ... rotate as many features as the table
    # has, and equal transformers; Phi, Persimmon and StableLM rotate a fixed int(head_dim *
    # partial_rotary_factor), which transformers cannot run with it: refused, nothing changed
    base = make(model_type)
    scaling = {"rope_type": "proportional", "factor": 2.0, "partial_rotary_factor": 0.5}
    if model_type in ("phi", "persimmon", "stablelm"):
        model = copy.deepcopy(base)
        before = copy.deepcopy(model.config.rope_parameters)
        with pytest.raises(ValueError, match=f"proportional.*not supported by model_type '{model_type}'"):
            patch_rope(model, scaling)
        assert model.config.rope_parameters == before and "forward" not in model.model.layers[0].self_attn.__dict__
        return
    model = patch_rope(copy.deepcopy(base), scaling, attention="fused")
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))


def test_gemma4_layers_of_one_type_with_different_head_sizes_are_refused_unchanged():
    # one table per layer type serves its layers: heads of another size in one of them cannot be
    model = make("gemma4_text", **KV_SHARING["gemma4_k_eq_v"][1])
    model.model.layers[2].self_attn.head_dim = 16
    assert_refused_unchanged(model, TypeError, "full_attention layers have heads of different sizes",
                             calls=[patch_rope])


# ---- RoPE per layer type (Gemma 3, OLMo 3) ------------------------------------------------


def hf_rows(ref, layer_type, positions):
    """cos of transformers' own rotary embedding for one layer type: (positions, head_dim // 2)."""
    cos, _ = ref.model.rotary_emb(torch.zeros(1, len(positions), 64), positions[None], layer_type)
    return cos[0, :, :cos.shape[-1] // 2]


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo3", "mellum", "gemma4_text", "gemma3n_text"])
def test_each_layer_gets_the_table_of_its_layer_type(model_type, fused_calls):
    from pirope.integrations.transformers import PiropeLayerTypeRotaryEmbedding

    base = make(model_type)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    rotary = model.model.rotary_emb
    assert isinstance(rotary, PiropeLayerTypeRotaryEmbedding)
    assert rotary.layer_types == ("full_attention", "sliding_attention")
    # each type's table is transformers' table of that type, and the two really differ
    positions = torch.arange(40)
    full, sliding = (rotary(torch.zeros(1, 40, 64), positions[None], t)
                     for t in ("full_attention", "sliding_attention"))
    for t, tables in (("full_attention", full), ("sliding_attention", sliding)):
        torch.testing.assert_close(tables.cos[positions], hf_rows(base, t, positions), rtol=1e-5, atol=1e-5)
    pairs = min(full.cos.shape[1], sliding.cos.shape[1])  # (Gemma 4's full heads are larger)
    assert not torch.allclose(full.cos[positions, :pairs], sliding.cos[positions, :pairs], atol=1e-2)
    # what each layer is handed: the tables of its config.layer_types[i]
    received = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs: received.append(kwargs["position_embeddings"]), with_kwargs=True)
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    assert [r.cos for r in received] == [rotary.by_type[t].tables(40, "cpu")[0] for t in model.config.layer_types]
    assert fused_calls == fused_shapes(model_type, 2, 40)  # the sliding one with its window (40 > 16)


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo3", "gemma4_text", "gemma3n_text", "lfm3"])
def test_position_interpolation_extends_only_the_full_attention_layers_and_round_trips(model_type, tmp_path,
                                                                                     float64_angles):
    base = make(model_type)
    before = copy.deepcopy(base.config.rope_parameters)
    model = apply_position_interpolation(copy.deepcopy(base), 4.0)
    params = model.config.rope_parameters
    assert params["sliding_attention"] == before["sliding_attention"]
    if before["full_attention"]["rope_type"] == "proportional":  # Gemma 4: PI of the same rotating pairs
        assert params["full_attention"] == {**before["full_attention"], "factor": 4.0}
    else:
        assert params["full_attention"] == {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": before["full_attention"]["rope_theta"]}
    assert model.config.max_position_embeddings == 4 * WINDOW
    # position 4m of a full layer is rotated as position m was; the sliding layers' table is unchanged
    old = patch_rope(copy.deepcopy(base)).model.rotary_emb
    m = torch.arange(0, 60)
    new_full = model.model.rotary_emb(torch.zeros(1, 240, 64), torch.arange(240)[None], "full_attention")
    old_full = old(torch.zeros(1, 60, 64), m[None], "full_attention")
    torch.testing.assert_close(new_full.cos[4 * m], old_full.cos[m], rtol=0, atol=2e-6)
    new_sliding = model.model.rotary_emb(torch.zeros(1, 60, 64), m[None], "sliding_attention")
    assert torch.equal(new_sliding.cos, old(torch.zeros(1, 60, 64), m[None], "sliding_attention").cos)
    # plain transformers reloads it as the same model
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, FAMILIES[model_type][1]).from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == params
    assert loaded.config.max_position_embeddings == 4 * WINDOW
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))
    # composes with the full layers' linear factor: 4 then 2 is 8
    again = apply_position_interpolation(model, 2.0)
    assert again.config.rope_parameters["full_attention"]["factor"] == 8.0
    assert again.config.rope_parameters["sliding_attention"] == before["sliding_attention"]
    x = ids(1, 150)
    if model_type in ("gemma4_text", "gemma3n_text"):
        # in float64, where float64_angles makes transformers' tables pirope's: Gemma 4's attention
        # (scale 1.0) takes float32 rounding alone to ~0.8x the float32 tolerance at 150 tokens
        assert_same_float64(logits_and_grads(again.double(), x), logits_and_grads(twin(base, again.config).double(), x))
    else:
        assert_same(logits_and_grads(again, x), logits_and_grads(twin(base, again.config), x))


def test_patch_rope_takes_rope_parameters_keyed_by_layer_type_only():
    base = make("gemma3_text")
    model = copy.deepcopy(base)
    before = copy.deepcopy(model.config.rope_parameters)
    # one dict for all layers would be ambiguous (transformers' legacy rope_scaling means the
    # full_attention layers only): refused, nothing changed
    with pytest.raises(ValueError, match="per layer type"):
        patch_rope(model, {"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="per layer type"):
        patch_rope(model, {"chunked_attention": {"rope_type": "linear", "factor": 2.0}})
    for bad in ({}, {"full_attention": "linear"}):  # nothing to replace; a type's parameters not a dict
        with pytest.raises(ValueError, match="per layer type"):
            patch_rope(model, bad)
    with pytest.raises(TypeError, match="scaling must be None or a dict"):
        patch_rope(model, "linear")
    assert model.config.rope_parameters == before
    assert type(model.model.rotary_emb).__name__ == "Gemma3RotaryEmbedding"
    # keyed by layer type: the named types change, the others keep theirs
    patch_rope(model, {"sliding_attention": {"rope_type": "linear", "factor": 3.0}}, attention="fused")
    assert model.config.rope_parameters == {
        "full_attention": before["full_attention"],
        "sliding_attention": {"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}}
    x = ids(2, 50)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))


def test_malformed_rope_parameters_are_refused_naming_the_entry():
    # a per-layer-type dict on a model with one RoPE for all layers
    llama = make("llama")
    llama.config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(ValueError, match=r"model\.config\.rope_parameters must be one dict.*one RoPE for all layers"):
        patch_rope(llama)
    # one layer type's entry missing or not a RoPE dict, on a model with RoPE per layer type
    for bad in (None, {"factor": 2.0}):
        gemma = make("gemma3_text")
        gemma.config.rope_parameters = {**gemma.config.rope_parameters, "sliding_attention": bad}
        for call in (lambda m: patch_rope(m), lambda m: apply_position_interpolation(m, 2.0)):
            with pytest.raises(ValueError, match=r"model\.config\.rope_parameters\['sliding_attention'\] must be one dict"):
                call(gemma)
            assert type(gemma.model.rotary_emb).__name__ == "Gemma3RotaryEmbedding"
    # no dict keyed by layer type at all (the config's fields take a dict or None)
    gemma = make("gemma3_text")
    gemma.config.rope_parameters = None
    for call in (lambda m: patch_rope(m), lambda m: apply_position_interpolation(m, 2.0)):
        with pytest.raises(ValueError, match=r"model\.config must have layer_types and rope_parameters keyed by "
                                             r"layer type.*rope_parameters=None"):
            call(gemma)
        assert type(gemma.model.rotary_emb).__name__ == "Gemma3RotaryEmbedding"


@pytest.mark.parametrize(("impl", "attention"), [("sdpa", "sdpa"), ("sdpa", "fused"), ("eager", "sdpa")])
def test_gemma3_attn_logit_softcapping_is_followed_as_transformers_does(impl, attention, fused_calls):
    # transformers' Gemma3Attention stores config.attn_logit_softcapping but passes no softcap to
    # its attention function (unlike Gemma 2's): the scores are not capped. The patched model must
    # follow that (a cap of 0.05 would change every logit; eager would apply a softcap passed to
    # it, sdpa refuses one), on every path.
    base = make("gemma3_text", attn_logit_softcapping=0.05, attn_implementation=impl)
    uncapped = twin(base, make("gemma3_text", attn_implementation=impl).config)
    x = ids(2, 40)
    want = logits_and_grads(twin(base), x)
    assert_same(logits_and_grads(uncapped, x), want)  # the premise: transformers does not cap
    model = patch_rope(copy.deepcopy(base), attention=attention)
    assert model.config._attn_implementation == impl
    assert_same(logits_and_grads(model, x), want)
    assert fused_calls == ([(2, 40, 4, 16)] * 2 if attention == "fused" else [])


# ---- NoPE layers chosen by the window (EXAONE 4, Cohere 2) ----------------------------------


@pytest.fixture
def rotations(monkeypatch):
    """The q shape of every pirope.apply_rope_qk call (the "sdpa" path's rotation)."""
    return spy_on(monkeypatch, "apply_rope_qk")


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", ["exaone4", "cohere2", "exaone_moe", "kolibri1", "cohere2_moe", "flint",
                                        "afmoe"])
def test_global_layers_are_nope_where_the_model_has_a_window(model_type, attention, fused_calls, fused_tables,
                                                           rotations):
    from pirope.integrations.transformers.fusing import _sliding_window

    base = make(model_type)
    model = patch_rope(copy.deepcopy(base), attention=attention)
    assert [_sliding_window(layer.self_attn) for layer in model.model.layers] == [16, None]
    x = ids(2, 12)  # within the window: the sliding layer may fuse
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    # layer 0 (sliding) rotates once, by apply_rope_qk or inside rope_attention; layer 1 (full) never
    # (fused: through the identity rotation)
    if attention == "fused":
        assert (fused_calls, fused_tables, rotations) == ([(2, 12, 4, 16)] * 2, [False, True], [])
    else:
        assert (fused_calls, rotations) == ([], [(2, 12, 4, 16)])


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize(("pattern", "rotating"), [(1, 1), (2, 0)])
def test_cohere2_moe_dense_prefix_layers_rotate_without_a_window(pattern, rotating, attention, fused_calls,
                                                                 fused_tables, rotations):
    # Cohere 2 MoE: a full_attention layer is NoPE unless it is a dense prefix layer and
    # prefix_dense_sliding_window_pattern is 1 (force_rope); here both layers are full_attention,
    # layer 0 dense, layer 1 MoE
    base = make("cohere2_moe", layer_types=["full_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                prefix_dense_sliding_window_pattern=pattern)
    assert [layer.self_attn.force_rope for layer in base.model.layers] == [pattern == 1, False]
    model = patch_rope(copy.deepcopy(base), attention=attention)
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    # fused: both layers, the NoPE ones through the identity rotation; else apply_rope_qk where rotating
    if attention == "fused":
        assert (fused_calls, fused_tables, rotations) == ([(2, 40, 4, 16)] * 2, [False] * rotating + [True] * (2 - rotating),
                                                          [])
    else:
        assert (fused_calls, rotations) == ([], [(2, 40, 4, 16)] * rotating)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_exaone4_without_a_window_rotates_every_layer(attention, fused_calls, rotations):
    # no window (then every layer is a full_attention one): no NoPE layers
    base = make("exaone4", sliding_window=None, layer_types=["full_attention", "full_attention"])
    model = patch_rope(copy.deepcopy(base), attention=attention)
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    assert (fused_calls if attention == "fused" else rotations) == [(2, 40, 4, 16)] * 2


# ---- Gemma 2's attention-logit soft-capping -------------------------------------------------

MASK_FREE = "pirope_test_mask_free"


def packed_sequence_ids(query, position_ids, cu_seq_lens_q):
    """Which packed sequence each token belongs to, as transformers' flash attention reads it:
    from cu_seq_lens_q when given, else from position_ids restarting (batch 1 only); None for
    one sequence per row."""
    if cu_seq_lens_q is not None:
        return torch.bucketize(torch.arange(query.shape[2]), cu_seq_lens_q[1:], right=True)[None]
    if position_ids is not None and query.shape[0] == 1 and position_ids.shape[-1] > 1:
        restarts = torch.diff(position_ids, dim=-1, prepend=position_ids[..., :1] - 1) != 1
        return restarts.cumsum(-1) if restarts.any() else None
    return None


def mask_free_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                        sliding_window=None, position_ids=None, cu_seq_lens_q=None, s_aux=None, **kwargs):
    """An attention backend transformers hands no mask (like flash_attention_2 without padding,
    or any registered backend without a mask function): causal, sliding window and soft-cap
    applied here, as eager_attention_forward applies them with its mask; sequences packed
    back to back attend within themselves, as flash attention's varlen path does; attention
    sinks (s_aux: a logit per head in every row's softmax, attending to nothing) as the
    kernels that take them do."""
    assert attention_mask is None
    k, v = (t.repeat_interleave(module.num_key_value_groups, dim=1) for t in (key, value))
    scores = query @ k.transpose(2, 3) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_len, k_len = scores.shape[-2:]
    i = torch.arange(q_len)[:, None] + (k_len - q_len)  # the queries are the last q_len keys
    j = torch.arange(k_len)[None]
    keep = j <= i if sliding_window is None else (j <= i) & (i - j < sliding_window)
    seq = packed_sequence_ids(query, position_ids, cu_seq_lens_q)
    if seq is not None:
        assert q_len == k_len
        keep = keep & (seq[:, :, None] == seq[:, None, :])[:, None]
    scores = scores.masked_fill(~keep, float("-inf"))
    if s_aux is not None:
        scores = torch.cat([scores, s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)], -1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)[..., :k_len]
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return (probs @ v).transpose(1, 2).contiguous(), probs


@pytest.fixture
def mask_free():
    """MASK_FREE registered as an attention implementation (no mask function: transformers
    passes attention_mask=None), for the duration of a test."""
    transformers.AttentionInterface.register(MASK_FREE, mask_free_attention)
    yield MASK_FREE
    del transformers.AttentionInterface._global_mapping[MASK_FREE]


def sharpen(model):
    # q_proj and k_proj scaled up: scores of a few units, where a cap of 1.0 changes them a lot
    # (the random init's scores are ~0.1, where tanh is the identity to 1e-3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


@pytest.mark.parametrize("model_type", ["gemma2", "vaultgemma"])
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("impl", ["eager", MASK_FREE])
def test_gemma2_attn_logit_softcapping_is_applied_as_transformers_does(impl, attention, model_type, mask_free,
                                                                        fused_softcaps):
    # Gemma2Attention (and VaultGemma's, the same) passes softcap=attn_logit_softcapping to its
    # attention function; the patched layers pass it to it too, or fused, to rope_attention's
    # softcap: with eager's mask tensor both layers (the sliding one with its window), with no
    # mask tensor the full one and, within the window, the sliding one
    base = sharpen(make(model_type, attn_logit_softcapping=1.0, attn_implementation=impl))
    assert base.config._attn_implementation == impl
    assert [layer.self_attn.sliding_window for layer in base.model.layers] == [16, None]
    x = ids(2, 12)
    uncapped = twin(base, make(model_type, attn_logit_softcapping=None, attn_implementation=impl).config)
    # the premise: the cap changes the logits
    assert not torch.allclose(logits_and_grads(uncapped, x)[0], logits_and_grads(twin(base), x)[0], atol=1e-2)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    ref = twin(base, model.config)
    for seqlen in (12, 100):  # within the window, past it
        fused_softcaps.clear()
        x = ids(2, seqlen)
        assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
        fused = 0 if attention == "sdpa" else 1 if (impl == MASK_FREE and seqlen > 16) else 2
        assert fused_softcaps == [((2, seqlen, 4, 16), 1.0)] * fused


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_gemma2_without_softcapping_fuses_where_exact(attention, mask_free, fused_calls):
    base = sharpen(make("gemma2", attn_logit_softcapping=None, attn_implementation=MASK_FREE))
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    ref = twin(base, model.config)
    eager = copy.deepcopy(ref)
    eager.set_attn_implementation("eager")
    for seqlen, fused in ((12, 2), (100, 1)):  # within the window: both layers; past it: the full one
        fused_calls.clear()
        x = ids(2, seqlen, seed=seqlen)
        got = logits_and_grads(model, x)
        assert_same(got, logits_and_grads(ref, x))
        assert_same(got, logits_and_grads(eager, x))  # the mask-free backend is Gemma 2's attention
        assert fused_calls == ([(2, seqlen, 4, 16)] * fused if attention == "fused" else [])


def test_gemma2_can_fuse_with_no_cap_or_a_finite_positive_one(mask_free):
    # a cap of 0 (transformers would divide by it), inf, or past float32 (rope_attention computes
    # in float32) is left to transformers
    for cap in (None, 50.0, 1e-3, 0.0, float("inf"), 1e39):
        model = patch_rope(make("gemma2", attn_logit_softcapping=cap, attn_implementation=MASK_FREE),
                           attention="fused")
        sliding, full = (layer.self_attn for layer in model.model.layers)
        fusable = cap is None or 0 < cap < 1e39
        assert [mask_free_call_fuses(sliding, 16), mask_free_call_fuses(sliding, 17),
                mask_free_call_fuses(full, 17)] == ([True, False, True] if fusable else [False] * 3), cap


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gemma2_soft_capped_layers_take_transformers_backend_on_cuda(mask_free, fused_calls):
    # off CPU rope_attention would run the cap unfused: the backend (here one with no mask tensor,
    # where an uncapped layer fuses) computes the layer, as transformers does
    base = sharpen(make("gemma2", attn_logit_softcapping=1.0, attn_implementation=MASK_FREE)).cuda()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config).cuda()
    x = ids(2, 12).cuda()
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    assert fused_calls == []


@pytest.mark.parametrize("cap", [None, 1.0])
def test_gemma2_fused_prefill_then_cached_decoding_generates_like_transformers(cap, mask_free, fused_calls):
    base = sharpen(make("gemma2", attn_logit_softcapping=cap, attn_implementation=MASK_FREE))
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config)
    assert_generates_like(model, ref, ids(1, 70))
    # the prefill of the full layer (the sliding one masks keys at 70 > 16, and this backend gets
    # no mask tensor to show it), with or without a cap
    assert fused_calls == [(1, 70, 4, 16)]


# ---- q/k norms after RoPE (NanoChat, Hunyuan), NanoChat's rotation by the negative angle, -----
# ---- Hunyuan's NTK-alpha RoPE ----------------------------------------------------------------

NORMS_AFTER_ROPE = ["nanochat", "hunyuan_v1_dense", "hunyuan_v1_moe"]


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", NORMS_AFTER_ROPE)
def test_qk_norms_run_after_rope(model_type, attention, fused_calls, fused_tables):
    # the norms of the rotated q and k, before the cache update: training forwards, and a prefill
    # then cached decoding, equal transformers' (Hunyuan's norm weights drawn, NanoChat's have none);
    # rope_attention rotates inside itself, leaving no place for the norms: fused (on CPU), q and k
    # are rotated and normalized before it, which attends through the identity rotation
    base = scale_qk_norms(make(model_type))
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    ref = twin(base, model.config)
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    assert_generates_like(model, ref, ids(1, 70))
    # two forwards' layers (the training one, the prefill), then the decoding steps unfused
    assert fused_calls == ([(2, 100, 4, 16)] * 2 + [(1, 70, 4, 16)] * 2 if attention == "fused" else [])
    assert fused_tables == [True] * len(fused_calls)


def _with_family(model, **changes):
    """model with its patched layers' _Family options changed (a patch that got them wrong)."""
    for layer in model.model.layers:
        layer.self_attn._pirope_family = layer.self_attn._pirope_family._replace(**changes)
    return model


@pytest.mark.parametrize("model_type", NORMS_AFTER_ROPE)
def test_norms_before_rope_would_differ_where_they_have_weights(model_type):
    # the premise of the test above: Hunyuan's norms (weights differing within a rotated pair) do
    # not commute with the rotation, so norms before RoPE give other logits; NanoChat's weightless
    # RMSNorm over the whole head does (a rotation keeps the head's RMS): there the placement only
    # changes float rounding
    base = scale_qk_norms(make(model_type))
    x = ids(1, 50)
    want = logits_and_grads(twin(base), x)[0]
    before = _with_family(patch_rope(copy.deepcopy(base)), qk_norm_after_rope=False)
    with torch.no_grad():
        got = before(x, use_cache=False).logits
    if model_type == "nanochat":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_afmoe_gates_the_attention_output_with_its_own_projection(attention, fused_calls):
    # sigmoid(gate_proj(hidden)) times the attention output, on both paths (the sliding layer fuses);
    # without the gate the same patch gives other logits
    base = make("afmoe")
    model = patch_rope(copy.deepcopy(base), attention=attention)
    x = ids(2, 12)  # within the window
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    assert len(fused_calls) == (2 if attention == "fused" else 0)  # (layer 1, NoPE, by the identity rotation)
    with torch.no_grad():
        ungated = _with_family(copy.deepcopy(model), gate=None)(x, use_cache=False).logits
        assert not torch.allclose(ungated, model(x, use_cache=False).logits, rtol=0, atol=1e-4)


def test_a_gate_neither_per_head_nor_per_feature_raises_naming_its_width():
    model = patch_rope(make("lfm3"), attention="fused")
    model.model.layers[1].self_attn.g_proj = torch.nn.Linear(64, 3, bias=False)  # 4 heads of 16
    with pytest.raises(RuntimeError, match=r"gate has 3 features, neither one per head \(4\) nor one per output "
                                           r"feature \(64\)"):
        model(ids(1, 10))


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_lfm3_gates_each_head_with_its_own_projection(attention, fused_calls):
    # sigmoid(g_proj(hidden)), one value per head, times that head's output, on both paths; without the
    # gate the same patch gives other logits; use_attention_gate False: no g_proj, no gate
    base = make("lfm3")
    model = patch_rope(copy.deepcopy(base), attention=attention)
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    assert len(fused_calls) == (2 if attention == "fused" else 0)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.self_attn._pirope_family = layer.self_attn._pirope_family._replace(gate=None)
        assert not torch.allclose(model(x, use_cache=False).logits, twin(base)(x, use_cache=False).logits, atol=1e-4)
    base = make("lfm3", use_attention_gate=False)
    model = patch_rope(copy.deepcopy(base), attention=attention)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))


# models whose model hands some layers no tables (position_embeddings None: NoPE), and which layers rotate:
# LaraMini's full_attention layer (2; layer 0 a Gated DeltaNet), GraniteSWA's layer of layer_rope_theta 0 (2)
TABLELESS_NOPE = {"lara_mini": [False, True], "granite_swa": [False, False, True],
                  "granitemoe_swa": [False, False, True]}


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", list(TABLELESS_NOPE))
def test_layers_handed_no_tables_attend_without_rotation(model_type, attention, fused_calls, fused_tables, rotations):
    nope = TABLELESS_NOPE[model_type]  # per layer with attention: whether it is NoPE
    base = make(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(1, 100)
    for position_ids in (None, PACKED):  # packed sequences: delimited by the positions the layers get
        fused_calls.clear(), fused_tables.clear(), rotations.clear()
        assert_same(logits_and_grads(model, x, position_ids=position_ids),
                    logits_and_grads(twin(base, model.config), x, position_ids=position_ids))
        if attention == "fused":  # (packed: as (tokens, heads, head_dim) sequences, cu_seqlens)
            shape = (1, 100, 4, 16) if position_ids is None else (100, 4, 16)
            assert (fused_calls, fused_tables, rotations) == ([shape] * len(nope), nope, [])
        else:
            assert (fused_calls, rotations) == ([], [(1, 100, 4, 16)] * nope.count(False))


@pytest.mark.parametrize("model_type", ["lara_mini", "granite_swa"])
def test_layers_handed_no_tables_compile_fullgraph(model_type):
    # (their positions, which tell packed sequences, are not read under torch.compile: no graph break)
    assert_compiled_pi_equals_transformers(make(model_type))


@pytest.mark.parametrize("model_type", list(TABLELESS_NOPE))
def test_layers_handed_no_tables_see_packed_sequences_without_a_mask(model_type, mask_free, fused_calls):
    # a mask-free backend (flash attention's) gets no mask tensor: the positions the decoder layer passes
    # tell the layers handed no tables that the sequences are packed, and none fuses across them
    base = make(model_type, attn_implementation=MASK_FREE)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x, position_ids=PACKED),
                logits_and_grads(twin(base, model.config), x, position_ids=PACKED))
    assert fused_calls == []


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", ["granite_swa", "granitemoe_swa"])
def test_granite_swa_position_interpolation_scales_the_rope_of_every_theta_and_round_trips(model_type, attention,
                                                                                          tmp_path):
    # transformers builds one rotary embedding per non-zero theta of layer_rope_theta from the config's
    # rope_parameters with that rope_theta: PI's linear factor scales each; the model finds each layer's
    # tables by its embedding's config's rope_theta; plain transformers loads the saved model back
    from pirope.integrations.transformers.rotary import PiropeRotaryEmbedding

    base = sharpen(make(model_type))  # (scores of a few units, where the angles show)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    params = model.config.rope_parameters
    assert params == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    rotaries = model.model.rotary_embs
    assert [(type(r), r.base, r.scaling["factor"]) for r in rotaries] == \
        [(PiropeRotaryEmbedding, 10000.0, 2.0), (PiropeRotaryEmbedding, 500000.0, 2.0)]
    assert [r.config.rope_parameters for r in rotaries] == [{**params, "rope_theta": t} for t in (10000.0, 500000.0)]
    assert [r.config.max_position_embeddings for r in rotaries] == [2 * WINDOW] * 2
    assert len({id(r._positions) for r in rotaries}) == 1  # the same position_ids: one read (a sync) for both
    x = ids(2, 100)
    got = logits_and_grads(model, x)
    assert_same(got, logits_and_grads(twin(base, model.config), x))
    model.save_pretrained(tmp_path)
    loaded = type(base).from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == params and loaded.config.layer_rope_theta == [10000.0, 500000.0, 0]
    assert_same(got, logits_and_grads(loaded, x))
    # the premise: layer 1 turned by layer 0's theta (5e5's embedding built at 1e4) gives other logits
    rotaries[1] = copy.deepcopy(rotaries[0])
    rotaries[1].config.rope_parameters["rope_theta"] = 500000.0
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, got[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_granite_swa_checkpoint_yarn_is_kept_and_rescaled_for_every_theta(attention, tmp_path):
    # a YaRN checkpoint: each theta's embedding holds the checkpoint's YaRN at that theta; patch_rope keeps
    # the model, PI (undefined on YaRN) is refused, a longer YaRN replaces it at every theta, and plain
    # transformers loads that back
    yarn = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32}
    base = sharpen(make("granite_swa", rope_parameters=yarn))
    longer = dict(yarn, factor=4.0)
    model, _, _ = assert_checkpoint_rope_kept_then_replaced(base, "yarn", longer, attention, tmp_path, ids(2, 100))
    assert [(r.base, r.scaling["rope_type"], r.scaling["factor"]) for r in model.model.rotary_embs] == \
        [(10000.0, "yarn", 4.0), (500000.0, "yarn", 4.0)]


def test_granite_swa_rotary_embeddings_not_one_per_theta_are_refused_unchanged():
    # a model whose rotary_embs do not serve config.layer_rope_theta (here a theta changed after building,
    # which transformers' forward would not find either) is refused before anything changes
    model = make("granite_swa")
    model.config.layer_rope_theta = [10000.0, 1000000.0, 0]
    assert_refused_unchanged(model, TypeError, r"rotary_embs \(of thetas \[10000.0, 500000.0\]\) .*layer_rope_theta")


@pytest.mark.parametrize("gating", [True, "per-element"])
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_laguna_gates_the_attention_output_by_softplus_per_head_or_per_feature(gating, attention, fused_calls):
    # softplus(g_proj(hidden)) (in float32) times the attention output: one gate per head, broadcast over
    # its features, or one per feature; 8 heads in the full layer, 4 in the sliding one (heads per layer);
    # PI extends the full layer, whose first half of each head rotates; a sigmoid gate gives other logits
    base = make("laguna", gating=gating, num_attention_heads_per_layer=[4, 8])
    assert base.model.layers[1].self_attn.g_proj.out_features == (8 if gating is True else 8 * 16)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    assert fused_calls == ([(2, 100, 4, 16), (2, 100, 8, 16)] if attention == "fused" else [])
    with torch.no_grad():
        sigmoid = _with_family(copy.deepcopy(model), gate_act="sigmoid")(x, use_cache=False).logits
        assert not torch.allclose(sigmoid, model(x, use_cache=False).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("v_head_dim", [16, 32])
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_mimo_v2_flash_values_have_their_own_head_size_times_v_scale(v_head_dim, attention, fused_calls):
    # v_proj gives heads x v_head_dim, viewed so, times v_scale (attention_value_scale 0.707) before the
    # cache; transformers runs its own eager attention (no sdpa); the fused path pads the values (16) to
    # q's head size (24), or q and k to the values' (32), with zero features and slices the output back
    base = make("mimo_v2_flash", v_head_dim=v_head_dim)
    attn = base.model.layers[0].self_attn
    assert base.config._attn_implementation == "eager" and attn.v_proj.out_features == 4 * v_head_dim
    assert attn.head_dim == 24 and attn.v_scale == 0.707
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    assert fused_calls == ([(2, 100, 4, max(24, v_head_dim))] * 2 if attention == "fused" else [])
    with torch.no_grad():  # without the scale the same patch gives other logits
        unscaled = _with_family(copy.deepcopy(model), v_scale=None)(x, use_cache=False).logits
        assert not torch.allclose(unscaled, model(x, use_cache=False).logits, rtol=0, atol=1e-4)


MIMO_ROPE_WITHOUT_PARTIAL = {"full_attention": {"rope_type": "default", "rope_theta": 5e6},
                             "sliding_attention": {"rope_type": "linear", "factor": 1.0, "rope_theta": 1e4}}


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_mimo_v2_flash_rotates_its_default_share_where_rope_parameters_have_no_partial_factor(attention, tmp_path):
    # its own "default" table rotates 0.334 of the head (8 of 24 features) where the type's dict has no
    # partial_rotary_factor, a scaled one the whole head (transformers' 1.0); PI writes the share out, and
    # plain transformers reloads the same model
    base = make("mimo_v2_flash", rope_parameters=copy.deepcopy(MIMO_ROPE_WITHOUT_PARTIAL))
    x = ids(2, 100)
    model = patch_rope(copy.deepcopy(base), attention=attention)
    assert {t: r.rotary_dim for t, r in model.model.rotary_emb.by_type.items()} == \
        {"full_attention": 8, "sliding_attention": 24}
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    assert model.config.rope_parameters == {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e6, "partial_rotary_factor": 0.334},
        "sliding_attention": MIMO_ROPE_WITHOUT_PARTIAL["sliding_attention"]}
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    model.save_pretrained(tmp_path)
    loaded = transformers.MiMoV2FlashForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    assert loaded.config.rope_parameters == model.config.rope_parameters
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))
    # a replaced scaling keeps the share that rotates: the sliding layers' whole head, even as "default"
    model = patch_rope(copy.deepcopy(base), {"sliding_attention": {"rope_type": "default"}}, attention=attention)
    assert model.config.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4,
                                                                 "partial_rotary_factor": 1.0}
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))


def test_mimo_v2_flash_replaced_scaling_keeps_a_given_share_and_reads_the_old_types_legacy_key():
    base = make("mimo_v2_flash", rope_parameters=copy.deepcopy(MIMO_ROPE_WITHOUT_PARTIAL))
    x = ids(2, 100)
    # a partial_rotary_factor the new dict gives is the share that rotates, whatever the type's default
    scaling = {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}
    model = patch_rope(copy.deepcopy(base), {"sliding_attention": dict(scaling)})
    assert model.config.rope_parameters["sliding_attention"] == {**scaling, "rope_theta": 1e4}
    assert model.model.rotary_emb.by_type["sliding_attention"].rotary_dim == 12
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    # without one, the share the old type rotated, read under its legacy "type" key too (a config edited
    # after its init may hold it): a scaled type rotated the whole head, and so does the new "default"
    legacy = copy.deepcopy(base)
    legacy.config.rope_parameters["sliding_attention"] = {"type": "linear", "factor": 1.0, "rope_theta": 1e4}
    model = patch_rope(legacy, {"sliding_attention": {"rope_type": "default"}})
    assert model.config.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4,
                                                                 "partial_rotary_factor": 1.0}
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))


def test_mimo_v2_flash_rope_parameters_without_partial_factor_beside_the_configs_are_refused_unchanged():
    # transformers' MiMo-V2-Flash rotates 0.334 of the head by such a "default" dict but copies
    # config.partial_rotary_factor into it once a scaled type's table is built (PI's): refused, nothing changed
    base = make("mimo_v2_flash", rope_parameters={t: {"rope_type": "default", "rope_theta": 1e4}
                                                  for t in ("full_attention", "sliding_attention")})
    base.config.partial_rotary_factor = 0.5
    assert_refused_unchanged(base, ValueError, r"config.partial_rotary_factor=0.5 beside rope_parameters without one "
                                               r"\(\{'rope_type': 'default', 'rope_theta': 10000.0\}\)")
    # where the config's share is the one the dict means (0.334), both readings agree: accepted
    base.config.partial_rotary_factor = 0.334
    model = patch_rope(copy.deepcopy(base))
    x = ids(1, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))


def test_nanochat_rotates_by_the_negative_angle():
    # NanoChat's rotate_half is cat((x2, -x1)): q * cos + rotate_half(q) * sin rotates by -angle,
    # which the patch computes with pirope's inverse rotation (apply_rope_qk_backward's op) on the
    # table; the values and their gradients are transformers' apply_rotary_pos_emb's
    from pirope.integrations.transformers.attention import _rotate_qk

    base = apply_position_interpolation(make("nanochat"), 2.0)
    ref = twin(base)  # unpatched, from the PI config
    hf = sys.modules[type(ref.model.layers[0].self_attn).__module__]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 100, 16, generator=g, requires_grad=True)  # (B, H, S, D) as transformers'
    k = torch.randn(2, 2, 100, 16, generator=g, requires_grad=True)
    wq, wk = torch.randn(2, 4, 100, 16, generator=g), torch.randn(2, 2, 100, 16, generator=g)
    positions = torch.arange(100).expand(2, 100)
    cos, sin = ref.model.rotary_emb(q, positions)
    want = hf.apply_rotary_pos_emb(q, k, cos, sin)
    want_grads = torch.autograd.grad((want[0] * wq).sum() + (want[1] * wk).sum(), (q, k))

    tables = base.model.rotary_emb(q, positions)
    got = _rotate_qk(q.transpose(1, 2), k.transpose(1, 2), tables.cos, tables.sin, tables.position_ids,
                     False, True)
    got = [t.transpose(1, 2) for t in got]
    got_grads = torch.autograd.grad((got[0] * wq).sum() + (got[1] * wk).sum(), (q, k))
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the same as pirope's forward rotation with the sines negated
    negated = pirope.apply_rope_qk(q.transpose(1, 2), k.transpose(1, 2), tables.cos, -tables.sin,
                                   tables.position_ids)
    for a, b in zip(got, negated):
        torch.testing.assert_close(a, b.transpose(1, 2), rtol=0, atol=1e-6)
    # not a sign-blind check: the unconjugated rotation (LLaMA's) differs, in the model too
    plain = pirope.apply_rope(q.transpose(1, 2), tables.cos, tables.sin, tables.position_ids).transpose(1, 2)
    assert not torch.allclose(plain, want[0], rtol=1e-3, atol=1e-3)
    x = ids(1, 50)
    with torch.no_grad():
        unconjugated = _with_family(copy.deepcopy(base), conjugate=False)(x, use_cache=False).logits
        assert not torch.allclose(unconjugated, ref(x, use_cache=False).logits, atol=1e-3)


def _transformers_hunyuan_has_ntk_alpha() -> bool:
    """Whether this transformers' Hunyuan treats "dynamic" RoPE with an alpha as static
    NTK-alpha RoPE (its "ntk_alpha" rope_type, as the checkpoints mean it). Earlier versions
    (5.17 among them) build the NTK-alpha table but keep rope_type "dynamic", so past the
    window they recompute it as dynamic NTK without the alpha; pirope follows the fixed
    behaviour, which those versions cannot be compared with."""
    from transformers.models.hunyuan_v1_dense import modeling_hunyuan_v1_dense

    return hasattr(modeling_hunyuan_v1_dense.HunYuanDenseV1RotaryEmbedding, "compute_ntk_alpha_rope_parameters")


NO_HF_NTK_ALPHA = ("this transformers' Hunyuan has no static NTK-alpha RoPE to compare with (it recomputes the "
                   "table as dynamic NTK past the window)")
needs_hf_ntk_alpha = pytest.mark.skipif(not _transformers_hunyuan_has_ntk_alpha(), reason=NO_HF_NTK_ALPHA)


# Hunyuan-7B's config.json rope_scaling (rope_theta 1e4): "dynamic" by name, NTK-alpha by alpha
HUNYUAN_CHECKPOINT_ROPE = {"type": "dynamic", "factor": 1.0, "alpha": 1000.0, "beta_fast": 32, "beta_slow": 1,
                           "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
STRETCHED_BASE = 10000.0 * 1000.0 ** (16 / 14)  # rope_theta * alpha ** (head_dim / (head_dim - 2))


@pytest.mark.parametrize("model_type", ["hunyuan_v1_dense", "hunyuan_v1_moe"])
@pytest.mark.parametrize(("rope", "hf_type"), [
    (NTK_ALPHA, "ntk_alpha"),
    (HUNYUAN_CHECKPOINT_ROPE, "ntk_alpha"),
    ({"rope_type": "dynamic", "factor": 2.0, "alpha": 0.0, "rope_theta": 10000.0}, "dynamic"),  # alpha unset
    ({"rope_type": "linear", "factor": 2.0, "alpha": 1000.0, "rope_theta": 10000.0}, "linear"),  # alpha unused
    ({"rope_type": "default", "rope_theta": 10000.0}, "default"),
])
def test_hunyuan_rope_is_transformers(model_type, rope, hf_type):
    if hf_type == "ntk_alpha" and not _transformers_hunyuan_has_ntk_alpha():
        pytest.skip(NO_HF_NTK_ALPHA)
    base = make(model_type, rope_parameters=rope)
    hf_rotary = base.model.rotary_emb
    assert hf_rotary.rope_type == hf_type
    model = patch_rope(copy.deepcopy(base), attention="fused")
    rotary = model.model.rotary_emb
    assert torch.equal(rotary.inv_freq, hf_rotary.original_inv_freq)  # the same float32 frequencies
    if hf_type == "ntk_alpha":  # plain RoPE with the stretched base, which alpha really changes
        assert (rotary.rope_type, rotary.base) == ("default", STRETCHED_BASE)
        assert not torch.allclose(rotary.inv_freq, 1.0 / 10000.0 ** (torch.arange(0, 16, 2) / 16), rtol=1e-3)
    positions = torch.arange(100)
    cos, _ = hf_rotary(torch.zeros(1, 100, 64), positions[None])
    torch.testing.assert_close(rotary(torch.zeros(1, 100, 64), positions[None]).cos[positions], cos[0, :, :8],
                               rtol=1e-5, atol=1e-5)
    x = ids(2, 100)  # past the window (64): "dynamic" rescales there, NTK-alpha does not
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))


@pytest.mark.parametrize("model_type", ["hunyuan_v1_dense", "hunyuan_v1_moe"])
def test_hunyuan_position_interpolation_is_linear_on_the_ntk_alpha_base_and_round_trips(model_type, tmp_path):
    base = make(model_type)  # NTK-alpha RoPE, as its checkpoints
    model = apply_position_interpolation(copy.deepcopy(base), 2.0)
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": STRETCHED_BASE}
    # transformers' model of that config: linear, the NTK-alpha model's frequencies halved
    ref = twin(base, model.config)
    assert ref.model.rotary_emb.rope_type == "linear"
    assert torch.equal(ref.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq / 2)
    # plain transformers reloads it as the same model
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, FAMILIES[model_type][1]).from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == model.config.rope_parameters
    assert loaded.config.max_position_embeddings == 2 * WINDOW
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))
    # composes: 2 then 2 is linear 4 on the same base
    again = apply_position_interpolation(model, 2.0)
    assert again.config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": STRETCHED_BASE}
    x = ids(1, 200)
    assert_same(logits_and_grads(again, x), logits_and_grads(twin(base, again.config), x))


@needs_hf_ntk_alpha
def test_patch_rope_takes_hunyuan_alpha_and_refuses_a_bad_one():
    base = make("hunyuan_v1_dense", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = copy.deepcopy(base)
    for bad, error in ((-2.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("1000", TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match="alpha"):
            patch_rope(model, {"rope_type": "dynamic", "factor": 1.0, "alpha": bad})
        assert model.config.rope_parameters == base.config.rope_parameters
        assert type(model.model.rotary_emb).__name__ == "HunYuanDenseV1RotaryEmbedding"
    patch_rope(model, {"rope_type": "dynamic", "factor": 1.0, "alpha": 50.0})
    assert model.config.rope_parameters == {"rope_type": "dynamic", "factor": 1.0, "alpha": 50.0,
                                            "rope_theta": 10000.0}
    ref = twin(base, model.config)
    assert ref.model.rotary_emb.rope_type == "ntk_alpha"
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    # the legacy "type" key of a config edited after its init names "dynamic" too: NTK-alpha as well
    legacy = copy.deepcopy(base)
    legacy.config.rope_parameters = {"type": "dynamic", "factor": 1.0, "alpha": 50.0, "rope_theta": 10000.0}
    rotary = patch_rope(legacy).model.rotary_emb
    assert (rotary.scaling, rotary.base) == (None, 10000.0 * 50.0 ** (16 / 14))  # head_dim 16
    assert_same(logits_and_grads(legacy, x), logits_and_grads(ref, x))
    legacy = copy.deepcopy(base)  # (no rope_theta in the dict: the config's)
    legacy.config.rope_parameters = {"type": "dynamic", "factor": 1.0, "alpha": 50.0}
    legacy.config.rope_theta = 5e5
    assert patch_rope(legacy).model.rotary_emb.base == 5e5 * 50.0 ** (16 / 14)
    # a falsy alpha is transformers' "no alpha": dynamic NTK as named, the alpha kept in the config as given
    model = copy.deepcopy(base)
    patch_rope(model, {"rope_type": "dynamic", "factor": 2.0, "alpha": 0.0})
    assert model.config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "alpha": 0.0,
                                            "rope_theta": 10000.0}
    ref = twin(base, model.config)
    assert ref.model.rotary_emb.rope_type == "dynamic"
    x = ids(2, 100)  # past the window (64), where dynamic NTK rescales
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    # alpha is Hunyuan's: other families refuse it as any unknown key, given or in their config
    with pytest.raises(ValueError, match="alpha"):
        patch_rope(make("llama"), {"rope_type": "dynamic", "factor": 1.0, "alpha": 50.0})
    llama = make("llama", rope_parameters={"rope_type": "dynamic", "factor": 1.0, "alpha": 50.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="alpha"):
        patch_rope(llama)


# ---- multimodal models: their language model is patched -----------------------------------

IMAGE_TOKEN = 255
TEXT = {**COMMON, "vocab_size": 256}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
# name -> (config class, model class, config kwargs, the head size of each layer fused on a
# text-only sequence of 100 (Gemma 3's sliding one with its window; PaliGemma always hands its
# layers a prefix-LM mask tensor; Gemma 4's full layer has larger heads), whether the test feeds
# an image (28 x 28: 4 patches of 14, 4 image tokens))
MULTIMODAL = {
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration",
               dict(text_config={**TEXT, **HYBRID, "query_pre_attn_scalar": 24}, vision_config=VISION,
                    mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=253,
                    eoi_token_index=254), [16, 16], True),
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration",
              dict(text_config={**TEXT, "model_type": "llama"},
                   vision_config={**VISION, "model_type": "clip_vision_model"},
                   image_token_index=IMAGE_TOKEN), [16, 16], True),
    "mistral3": ("Mistral3Config", "Mistral3ForConditionalGeneration",
                 dict(text_config={**TEXT, "model_type": "mistral"},
                      vision_config={**VISION, "model_type": "pixtral", "head_dim": 16},
                      image_token_index=IMAGE_TOKEN), [16, 16], False),
    # Ministral 3's checkpoints: Mistral 3 with a Ministral 3 language model (attention temperature)
    "mistral3_ministral3": ("Mistral3Config", "Mistral3ForConditionalGeneration",
                            dict(text_config={**TEXT, "model_type": "ministral3", "rope_parameters": MINISTRAL3_ROPE},
                                 vision_config={**VISION, "model_type": "pixtral", "head_dim": 16},
                                 image_token_index=IMAGE_TOKEN), [16, 16], False),
    # LFM2-VL: an LFM2 hybrid (layer 0 a convolution) as its language model; text only (its SigLIP 2
    # tower takes patch masks and shapes of its own processor)
    "lfm2_vl": ("Lfm2VlConfig", "Lfm2VlForConditionalGeneration",
                dict(text_config={**TEXT, "model_type": "lfm2", "layer_types": ["conv", "full_attention"]},
                     vision_config={**VISION, "model_type": "siglip2_vision_model", "num_patches": 4},
                     image_token_id=IMAGE_TOKEN), [16], False),
    "paligemma": ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration",
                  dict(text_config={**TEXT, "model_type": "gemma"},
                       vision_config={**VISION, "model_type": "siglip_vision_model"},
                       image_token_index=IMAGE_TOKEN), [], False),
    # DeepSeek-OCR 2: LLaMA's attention, layer 0's MLP dense, layer 1's MoE; text only (tiny SAM and Qwen2 towers)
    "deepseek_ocr2": ("DeepseekOcr2Config", "DeepseekOcr2ForConditionalGeneration",
                      dict(text_config={**TEXT, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                        "moe_intermediate_size": 32, "n_shared_experts": 1,
                                        "mlp_layer_types": ["dense", "sparse"]},
                           vision_config=dict(
                               sam_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               image_size=64, patch_size=16, global_attn_indexes=[0],
                                               downsample_channels=[16, 32], output_channels=16, window_size=2),
                               encoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=16)),
                           image_token_id=IMAGE_TOKEN), [16, 16], False),
    # Granite 4.0 Vision: Granite's attention (attention_multiplier) and multipliers; text only (its deepstack and
    # spatial Q-Former projectors feed image features into chosen layers)
    "granite4_vision": ("Granite4VisionConfig", "Granite4VisionForConditionalGeneration",
                        dict(text_config={**TEXT, **FAMILIES["granite"][2]},
                             vision_config={**VISION, "hidden_size": 64, "model_type": "clip_vision_model"},
                             qformer_config={"intermediate_size": 64, "vocab_size": 16}, deepstack_layer_map=[[0, 0]],
                             spatial_target_layers=[1, 1, 1, 1], downsample_rate="1/2", image_token_index=IMAGE_TOKEN),
                        [16, 16], False),
    # Gemma 4 without its vision and audio towers (optional in its config): the text model inside
    "gemma4": ("Gemma4Config", "Gemma4ForConditionalGeneration",
               dict(text_config={**TEXT, **FAMILIES["gemma4_text"][2]}, vision_config=None, audio_config=None,
                    audio_token_id=249, boi_token_id=250, eoi_token_id=251, image_token_id=252, video_token_id=253,
                    boa_token_id=254, eoa_token_index=IMAGE_TOKEN), [16, 32], False),
    # Step 3.7 (its language model "step3p5": Laguna's attention with a sigmoid gate per head, g_proj): RoPE
    # per layer type as its checkpoints write it (per-layer thetas and partial_rotary_factors: layer 0 sliding,
    # 1e4, the whole head; layer 1 full, 5e5, half of it), scaling query_pre_attn_scalar ** -0.5; text only
    "step3p7": ("Step3p7Config", "Step3p7ForConditionalGeneration",
                dict(text_config={**TEXT, **MOE, **HYBRID, "share_expert_dim": 32, "query_pre_attn_scalar": 24,
                                  "mlp_layer_types": ["dense", "sparse"], "rope_theta": [10000.0, 500000.0],
                                  "partial_rotary_factors": [1.0, 0.5]},
                     vision_config=dict(VISION, image_size=56), image_token_id=IMAGE_TOKEN), [16, 16], False),
}


def make_multimodal(name):
    config_cls, model_cls, kwargs, _, _ = MULTIMODAL[name]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**copy.deepcopy(kwargs))).eval()


@pytest.mark.parametrize("name", list(MULTIMODAL))
def test_position_interpolation_of_a_multimodal_model_extends_its_language_model(name, fused_calls, tmp_path):
    base = make_multimodal(name)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0)
    assert model.model.language_model.config is model.config.get_text_config()  # what save_pretrained writes
    assert model.config.get_text_config().max_position_embeddings == 2 * WINDOW
    ref = twin(base, model.config)
    x = ids(1, 100, seed=2)
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    assert fused_calls == [(1, 100, 4, d) for d in MULTIMODAL[name][3]]
    if MULTIMODAL[name][4]:  # with an image: its tokens in the sequence (Gemma 3 attends to them bidirectionally)
        x = x.clone()
        x[0, 5:9] = IMAGE_TOKEN
        pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
        extra = {"pixel_values": pixels}
        if name == "gemma3":
            extra["token_type_ids"] = (x == IMAGE_TOKEN).long()
        assert_same(logits_and_grads(model, x, **extra), logits_and_grads(ref, x, **extra))
    # the saved model loads with plain transformers as the extended one
    model.save_pretrained(tmp_path)
    loaded = type(base).from_pretrained(tmp_path).eval()
    assert loaded.config.get_text_config().rope_parameters == model.config.get_text_config().rope_parameters
    x = ids(1, 100, seed=4)
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))


def test_every_multimodal_only_language_model_is_tested_here():
    text_types = {getattr(transformers, config_cls)(**copy.deepcopy(kwargs)).get_text_config().model_type
                  for config_cls, _, kwargs, _, _ in MULTIMODAL.values() if hasattr(transformers, config_cls)}
    assert set(MULTIMODAL_LANGUAGE_MODELS_ONLY) <= text_types


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_step3p7_language_model_keeps_the_model_and_generates_like_transformers(attention, fused_calls):
    # Step 3.7's language model ("step3p5"), 8 heads in its sliding layer (num_sliding_attention_heads, a
    # per-layer config): patch_rope keeps it; the output's gate, sigmoid(g_proj(hidden)), one per head,
    # bites; PI (the full layer, half of whose head rotates) generates like transformers
    config_cls, model_cls, kwargs, _, _ = MULTIMODAL["step3p7"]
    kwargs = copy.deepcopy(kwargs)
    kwargs["text_config"]["num_sliding_attention_heads"] = 8
    torch.manual_seed(0)
    base = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    assert [layer.self_attn.g_proj.out_features for layer in base.model.language_model.layers] == [8, 4]
    model = patch_rope(copy.deepcopy(base), attention=attention)
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    assert fused_calls == ([(2, 40, 8, 16), (2, 40, 4, 16)] if attention == "fused" else [])
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn._pirope_family = layer.self_attn._pirope_family._replace(gate=None)
        ungated = model(x, use_cache=False).logits
        assert not torch.allclose(ungated, twin(base)(x, use_cache=False).logits, rtol=0, atol=1e-4)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    assert_generates_like(model, twin(base, model.config), ids(1, 70))


def test_a_multimodal_model_whose_language_model_is_unsupported_is_refused_unchanged():
    base = make_multimodal("llava")
    base.model.language_model.config.model_type = "not_a_llama"  # the text config the model holds
    before = {n: p.clone() for n, p in base.state_dict().items()}
    with pytest.raises(TypeError, match="model_type"):
        apply_position_interpolation(base, 2.0)
    assert type(base.model.language_model.rotary_emb).__module__.startswith("transformers")
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())


def test_a_language_model_holding_a_copy_of_the_text_config_is_refused_unchanged():
    # patching it would update its own config, not the one save_pretrained writes (config.text_config):
    # the saved model would reload with the old RoPE
    base = make_multimodal("llava")
    base.model.language_model.config = copy.deepcopy(base.config.get_text_config())
    assert_refused_unchanged(base, TypeError, "LlavaForConditionalGeneration with model_type 'llava'")


# ---- packed sequences (padding-free training) ----------------------------------------------

PACKED = torch.cat([torch.arange(30), torch.arange(45), torch.arange(25)])[None]  # 3 sequences, 100 tokens


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_sequences_attend_within_themselves_as_with_flash_attention(how, mask_free, fused_calls):
    # flash attention backends get no mask: transformers tells them the sequences packed into one
    # row by cu_seq_lens_* or by position_ids restarting, and they attend within each. The fused
    # path would attend across: it must not be taken (sdpa/eager get a packed mask tensor instead)
    base = make("llama", attn_implementation=MASK_FREE)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config)
    x = ids(1, 100)
    inputs = {"position_ids": PACKED}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 30, 75, 100])
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=45, max_length_k=45)
    got = logits_and_grads(model, x, **inputs)
    assert_same(got, logits_and_grads(ref, x, **inputs))
    assert fused_calls == []
    # the premise: the dense fused path, were it taken, would attend across the sequences
    import pirope.integrations.transformers.attention as integration

    real = integration._layer_can_fuse
    with pytest.MonkeyPatch.context() as m:
        m.setattr(integration, "_layer_can_fuse", lambda attn, seqlen, cache, kwargs, *mask: real(
            attn, seqlen, cache, {k: v for k, v in kwargs.items() if not k.startswith("cu_seq_lens")}, *mask))
        m.setattr(integration, "_segments_of_mask", lambda q, *rest, **kw: torch.tensor([0, q.shape[1]]))  # one per row
        across = model(x, **inputs, use_cache=False).logits
    assert fused_calls == [(1, 100, 4, 16)] * 2
    torch.testing.assert_close(across[:, :30], got[0][:, :30], rtol=1e-5, atol=1e-5)  # the first sequence
    assert not torch.allclose(across[:, 30:], got[0][:, 30:], atol=1e-3)


# (transformers starts a sequence wherever a position is not its predecessor's + 1: a jump forward too)
PACKED_BY_JUMPS = torch.cat([torch.arange(30), torch.arange(100, 145), torch.arange(7, 32)])[None]


@pytest.mark.parametrize("positions", [PACKED, PACKED_BY_JUMPS], ids=["restarts", "jumps"])
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_packed_sequences_with_sdpa_equal_transformers(attention, positions, fused_calls):
    # sdpa: transformers builds a packed-sequence mask tensor, which the fused path computes
    # as rope_attention's packed sequences (cu_seqlens), one call per layer
    base = make("llama")
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x, position_ids=positions),
                logits_and_grads(twin(base, model.config), x, position_ids=positions))
    assert fused_calls == ([(100, 4, 16)] * 2 if attention == "fused" else [])


def test_rope_tables_say_whether_the_positions_are_packed():
    model = patch_rope(make("llama"))
    rotary = model.model.rotary_emb
    x = torch.zeros(2, 10, 64)
    for positions, packed in ((torch.arange(10)[None], False), (torch.arange(5, 15).expand(2, 10), False),
                              (PACKED, True), (torch.tensor([[0, 1, 2, 0, 1]]), True),
                              (torch.tensor([[0, 1, 2], [0, 1, 0]]), True), (torch.tensor([[7]]), False),
                              (torch.tensor([[3, 2, 1]]), True), (torch.tensor([4, 5, 6]), False)):
        assert rotary(x, positions).packed is packed, positions
    assert rotary(x, None).packed is False


def test_no_fused_call_where_packing_is_unknown():
    # under torch.compile the tables cannot say whether the positions are packed: no fusing
    attn = patch_rope(make("llama"), attention="fused").model.layers[0].self_attn
    assert mask_free_call_fuses(attn, 10, packed=False)
    assert not mask_free_call_fuses(attn, 10, packed=True)
    assert not mask_free_call_fuses(attn, 10, packed=None)
    assert not mask_free_call_fuses(attn, 10, kwargs={"cu_seq_lens_q": torch.tensor([0, 4, 10])})


# ---- what the patch refuses, naming what is wrong ------------------------------------------


# ---- found by review: training Persimmon, Phi-3's own original window, bool masks under eager ----

@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_persimmon_trains_with_its_dropout_module(attention, fused_calls):
    # Persimmon's attention_dropout is an nn.Dropout (it passes config.attention_dropout to its
    # attention function): in training mode the patch passed the module as a rate and failed
    base = make("persimmon").train()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention).train()
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config).train(), x))
    assert fused_calls == ([(2, 100, 4, 16)] * 2 if attention == "fused" else [])  # rate 0: fused in training
    dropping = make("persimmon", attention_dropout=0.5).train()
    model = apply_position_interpolation(dropping, 2.0, attention=attention).train()
    fused_calls.clear()
    logits_and_grads(model, x)  # runs (transformers' attention, with dropout), never fused
    assert fused_calls == []


def test_phi3_longrope_by_patch_rope_uses_the_configs_original_window():
    # transformers takes Phi-3's config.original_max_position_embeddings over the dict's (and the
    # window): patch_rope must build the same model, and refuse a dict that says otherwise
    base = make("phi3", max_position_embeddings=128, original_max_position_embeddings=32)
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}
    model = patch_rope(copy.deepcopy(base), scaling, attention="fused")
    assert model.config.rope_parameters["original_max_position_embeddings"] == 32
    x = ids(1, 48)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    with pytest.raises(ValueError, match="original_max_position_embeddings 64 differs from "
                                         r"model.config.original_max_position_embeddings \(32\)"):
        patch_rope(copy.deepcopy(base), {**scaling, "original_max_position_embeddings": 64})


def test_a_bool_mask_under_eager_is_computed_as_transformers_computes_it(fused_calls):
    # eager adds any mask to the scores (a bool one as +1 / +0: no masking), while SDPA reads
    # True as "seen": the fused path takes a bool mask as causal only under SDPA
    x = ids(2, 40)
    mask = torch.tril(torch.ones(40, 40, dtype=torch.bool)).expand(2, 1, 40, 40)
    for impl, fused in (("eager", 0), ("sdpa", 2)):
        base = make("llama", attn_implementation=impl)
        model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
        fused_calls.clear()
        got = logits_and_grads(model, x, attention_mask=mask)
        assert_same(got, logits_and_grads(twin(base, model.config), x, attention_mask=mask))
        assert len(fused_calls) == fused, impl


# ---- GPT-OSS's attention sinks ----

def with_sinks(model, scale=2.0):
    """model with sinks of a few units (the random init's are ~0.02), where they take a good
    part of each row's attention: a patch that dropped them would change the logits a lot."""
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.self_attn.sinks is not None:  # (MiMo-V2-Flash's full_attention layers have none)
                layer.self_attn.sinks.normal_(0.0, scale)
    return model


@pytest.fixture
def fused_sinks(monkeypatch):
    """The sinks tensor of every pirope.rope_attention call."""
    return spy_on(monkeypatch, "rope_attention", lambda q, args, kwargs: kwargs.get("sinks"))


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", ["gpt_oss", "flint", "granite_swa", "granitemoe_swa", "mimo_v2_flash"])
def test_sinks_are_followed_and_trained(model_type, attention, fused_sinks):
    # logits and every gradient (the sinks' included) equal transformers'; the fused path
    # passes each layer's own sinks parameter (Flint's NoPE layer 1 is not fused; MiMo-V2-Flash's
    # full_attention layer 1 has sinks None: none passed)
    base = with_sinks(make(model_type))
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    got, want = logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x)
    assert_same(got, want)
    assert any("sinks" in name for name in got[1]) and all(g.abs().max() > 0 for n, g in got[1].items() if "sinks" in n)
    layers = model.model.layers
    fused = FUSED_LAYERS.get(model_type, 2) if attention == "fused" else 0
    assert len(fused_sinks) == fused and all(s is layer.self_attn.sinks for s, layer in zip(fused_sinks, layers))
    # without them the model is another one
    no_sinks = copy.deepcopy(base)
    with torch.no_grad():
        for layer in no_sinks.model.layers:
            if layer.self_attn.sinks is not None:
                layer.self_attn.sinks.fill_(float("-inf"))
    assert not torch.allclose(logits_and_grads(twin(no_sinks, model.config), x)[0], want[0], atol=1e-3)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_sinks_reach_a_mask_free_backend(attention, mask_free, fused_sinks):
    # a backend without a mask (flash attention's kernels that take sinks) gets them as s_aux, as
    # transformers' GPT-OSS passes them; fused within the window (layer 0's: 16), not past it
    base = with_sinks(make("gpt_oss", attn_implementation=MASK_FREE))
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    for seqlen in (12, 100):
        fused_sinks.clear()
        x = ids(2, seqlen)
        assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
        assert len(fused_sinks) == (0 if attention == "sdpa" else 2 if seqlen == 12 else 1)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_gpt_oss_yarn_is_kept_and_rescaled_by_patch_rope(attention, fused_calls):
    # its checkpoints' RoPE: YaRN (truncate False, as GPT-OSS writes it); patch_rope keeps it, or
    # takes a larger factor, as transformers builds the same model (PI on YaRN is not defined)
    yarn = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 16, "rope_theta": 150000.0}
    base = with_sinks(make("gpt_oss", rope_parameters=yarn))
    x = ids(2, 100)
    model = patch_rope(copy.deepcopy(base), attention=attention)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    wider = {**yarn, "factor": 8.0}
    model = patch_rope(copy.deepcopy(base), wider, attention=attention)
    assert model.config.rope_parameters["factor"] == 8.0
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    with pytest.raises(ValueError, match="yarn"):
        apply_position_interpolation(copy.deepcopy(base), 2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpt_oss_layers_with_sinks_take_transformers_backend_on_cuda(fused_calls):
    # rope_attention would run the sinks unfused on CUDA: transformers' attention runs instead
    base = with_sinks(make("gpt_oss")).cuda()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(2, 100).cuda()
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config).cuda(), x))
    assert fused_calls == []


def _without(model, layer, name):
    """model with attribute `name` of layer `layer`'s self_attn (the first of LongCat-Flash's two) removed
    (an architecture that looks supported by its model_type but is not built as pirope expects)."""
    attn = model.model.layers[layer].self_attn
    delattr(attn[0] if isinstance(attn, torch.nn.ModuleList) else attn, name)
    return model


@pytest.mark.parametrize("model_type, layer, name, match", [
    ("llama", 1, "k_proj", "decoder layer 1 .*k_proj"),
    ("qwen3", 0, "q_norm", "decoder layer 0 .*q_norm"),
    ("smollm3", 1, "use_rope", "self_attn.use_rope"),
    ("gemma2", 0, "attn_logit_softcapping", "self_attn.attn_logit_softcapping"),
    ("exaone4", 0, "is_sliding", "is_sliding"),
    ("gpt_oss", 1, "sinks", "self_attn.sinks"),
    ("cohere2_moe", 1, "force_rope", "self_attn.force_rope"),
    ("gemma4_text", 1, "store_full_length_kv", "self_attn.is_kv_shared_layer.*KV sharing"),
    ("gemma4_text", 0, "v_norm", "decoder layer 0 .*v_norm"),
    ("llama4_text", 0, "use_rope", "self_attn.use_rope"),
    ("llama4_text", 0, "layer_idx", "decoder layer 0 .*layer_idx"),
    ("afmoe", 0, "gate_proj", "decoder layer 0 .*gate_proj"),
    ("afmoe", 0, "sliding_window", "decoder layer 0 .*sliding_window"),
    ("qwen2", 1, "sliding_window", "decoder layer 1 .*sliding_window"),
    ("llama4_text", 1, "floor_scale", "self_attn.attn_temperature_tuning.*temperature tuning"),
    ("mimo_v2_flash", 0, "sinks", r"self_attn.sinks \(its attention-sink logits, or None\)"),
    ("mimo_v2_flash", 1, "sinks", r"self_attn.sinks \(its attention-sink logits, or None\)"),  # (None there)
    ("mimo_v2_flash", 0, "v_head_dim", "decoder layer 0 .*v_head_dim"),
    ("mimo_v2_flash", 1, "v_scale", "decoder layer 1 .*v_scale"),
    ("granite_swa", 2, "layer_idx", "self_attn.layer_idx telling whether it rotates"),
    ("llama", 0, "head_dim", "decoder layer 0 .*k_proj, v_proj, o_proj and head_dim"),
    ("starcoder2", 0, "residual_dropout", "decoder layer 0 .*residual_dropout"),
    ("bitnet", 1, "attn_sub_norm", "decoder layer 1 .*attn_sub_norm"),
    ("deepseek_v2", 1, "q_proj", "decoder layer 1 .*q_proj"),  # (q_lora_rank None: q from q_proj)
    ("minicpm3", 1, "q_a_layernorm", "decoder layer 1 .*q_a_layernorm"),
    ("longcat_flash", 0, "mla_scale_kv_lora", "decoder layer 0 .*mla_scale_kv_lora"),
])
def test_a_layer_without_what_its_family_needs_is_refused_unchanged(model_type, layer, name, match):
    assert_refused_unchanged(_without(make(model_type), layer, name), TypeError, match)


@pytest.mark.parametrize(("model_type", "no_rope"), [
    ("granitemoehybrid", dict(position_embedding_type=None)),
    ("olmo_hybrid", dict(rope_parameters={"rope_type": "default", "rope_theta": None})),
])
def test_a_model_without_rope_is_refused_unchanged(model_type, no_rope):
    # Granite 4.0's and OLMo Hybrid's checkpoints are NoPE (their rotary_emb None): patching would add
    # a rotation the models never had
    model = make(model_type, **no_rope)
    assert model.model.rotary_emb is None
    before = copy.deepcopy(model.config.rope_parameters)
    for call in (lambda m: patch_rope(m), lambda m: apply_position_interpolation(m, 2.0)):
        with pytest.raises(TypeError, match="no rotary embedding .*rotary_emb is None"):
            call(model)
        assert model.model.rotary_emb is None and "forward" not in vars(model.model.layers[1].self_attn)
        assert model.config.rope_parameters == before


def test_minimax_m3_sparse_layers_are_refused_unchanged():
    # MiniMax M3's "minimax_m3_sparse" layers: a lightning indexer rotates projections of its own by the
    # model's cos/sin and restricts the attention to the key blocks it picks, which pirope does not follow
    model = make("minimax_m3_vl_text", layer_types=["full_attention", "minimax_m3_sparse"], index_n_heads=2,
                 index_head_dim=16, index_block_size=8, index_topk_blocks=2)
    assert_refused_unchanged(model, TypeError, "decoder layer 1 .*sparse-attention indexer")


def test_sinks_that_are_not_a_tensor_are_refused_unchanged():
    model = make("gpt_oss")
    del model.model.layers[1].self_attn.sinks
    model.model.layers[1].self_attn.sinks = 0.5
    assert_refused_unchanged(model, TypeError,
                             r"decoder layer 1 .*no tensor self_attn.sinks \(its attention-sink logits\)")


def test_a_layer_without_its_attention_is_refused_unchanged_unless_it_cross_attends():
    model = make("mllama_text_model")  # layer 1 cross-attends (no self_attn, left alone)
    del model.model.layers[2].self_attn
    assert_refused_unchanged(model, TypeError, "decoder layer 2 .*has no self_attn with q_proj")


def test_falcon_without_what_its_attention_of_transformers_5_25_has_is_refused_naming_the_version():
    model = make("falcon")
    del model.transformer.h[0].self_attention.scaling
    assert_refused_unchanged(model, TypeError, r"decoder layer 0 .*scaling.* follows the falcon attention of "
                                               r"transformers >= 5\.25")


def test_a_model_without_rotary_emb_is_refused():
    model = make("llama")
    del model.model._modules["rotary_emb"]
    with pytest.raises(TypeError, match="rotary_emb"):
        patch_rope(model)


def test_patch_rope_per_layer_type_keeps_the_configs_entries_of_types_the_model_has_no_layer_of():
    # (every layer full_attention here: the config's sliding_attention parameters stay, unread, as they were)
    base = make("gemma3_text", layer_types=["full_attention", "full_attention"])
    sliding = copy.deepcopy(base.config.rope_parameters["sliding_attention"])
    model = patch_rope(copy.deepcopy(base), {"full_attention": {"rope_type": "linear", "factor": 2.0}})
    assert model.config.rope_parameters["sliding_attention"] == sliding
    assert model.config.rope_parameters["full_attention"]["factor"] == 2.0
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))


def test_per_layer_type_configs_that_pi_cannot_extend_are_refused_unchanged():
    model = make("gemma3_text", layer_types=["sliding_attention", "sliding_attention"])
    before = copy.deepcopy(model.config.rope_parameters)
    with pytest.raises(ValueError, match="full_attention"):
        apply_position_interpolation(model, 2.0)
    assert model.config.rope_parameters == before
    model = make("gemma3_text")
    model.config.rope_parameters["sliding_attention"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
    before = copy.deepcopy(model.config.rope_parameters)
    with pytest.raises(ValueError, match="sliding_attention"):
        apply_position_interpolation(model, 2.0)
    assert model.config.rope_parameters == before
    # PI on the full_attention layers' YaRN: no recipe of a factor for it (the one for a single rope_parameters
    # dict would replace every type's)
    model = make("gemma3_text")
    model.config.rope_parameters["full_attention"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
    before = copy.deepcopy(model.config.rope_parameters)
    with pytest.raises(ValueError, match=r"Position Interpolation needs a model with rope_type 'default', 'linear' or "
                                         r"'proportional', this one has config.rope_parameters\['full_attention'\]=.*"
                                         r"'yarn'") as refused:
        apply_position_interpolation(model, 2.0)
    assert "e.g. its factor times" not in str(refused.value)
    assert model.config.rope_parameters == before
    model = make("gemma3_text")
    model.config.layer_types = None
    with pytest.raises(ValueError, match="layer_types"):
        patch_rope(model)


def test_the_patched_rotary_embeddings_reject_bad_calls():
    from pirope.integrations.transformers import PiropeLayerTypeRotaryEmbedding

    rotary = patch_rope(make("llama")).model.rotary_emb
    with pytest.raises(TypeError, match="position_ids must be int32 or int64"):
        rotary(torch.zeros(1, 4, 64), torch.arange(4.0)[None])
    by_type = patch_rope(make("gemma3_text")).model.rotary_emb
    with pytest.raises(ValueError, match="layer_type must be one of 'full_attention', 'sliding_attention'"):
        by_type(torch.zeros(1, 4, 64), torch.arange(4)[None], "global")
    with pytest.raises(ValueError, match="at least one layer type"):
        PiropeLayerTypeRotaryEmbedding({})


def test_a_rotary_embedding_replaced_after_patching_is_an_error_saying_so():
    model = patch_rope(make("llama"))
    model.model.rotary_emb = twin(make("llama")).model.rotary_emb  # Hugging Face's again
    with pytest.raises(RuntimeError, match="call patch_rope\\(\\) again"):
        model(ids(1, 8))


def test_a_cache_that_cannot_tell_its_length_never_fuses():
    class Opaque:
        def get_seq_length(self, layer_idx):
            raise NotImplementedError

    attn = patch_rope(make("llama"), attention="fused").model.layers[0].self_attn
    assert not mask_free_call_fuses(attn, 10, cache=Opaque())


# ---- a PEFT wrapper (PeftModel): the transformers model it wraps is patched ----------------


class _Wrapper(torch.nn.Module):
    """What pirope relies on of peft.PeftModel (not a PreTrainedModel; get_base_model()
    returns the wrapped transformers model, whose projections LoRA replaces in place; the
    forward passes through), with a LoRA-like update on q_proj so the wrapped layers differ."""

    def __init__(self, model):
        super().__init__()
        self.base = model
        for layer in model.model.layers:
            proj = layer.self_attn.q_proj
            layer.self_attn.q_proj = torch.nn.Sequential()  # an nn.Module in q_proj's place, as LoRA's
            layer.self_attn.q_proj.add_module("base_layer", proj)
            layer.self_attn.q_proj.add_module("scale", _Scale())

    def get_base_model(self):
        return self.base

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


class _Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((64,), 1.3))

    def forward(self, x):
        return x * self.weight


def test_a_peft_wrapped_model_gets_the_model_it_wraps_extended(fused_calls):
    base = make("llama")
    wrapped = _Wrapper(copy.deepcopy(base))
    assert apply_position_interpolation(wrapped, 2.0) is wrapped
    assert wrapped.base.config.rope_parameters["rope_type"] == "linear"
    reference = _Wrapper(twin(base, wrapped.base.config))  # transformers' PI model, the same wrapping
    x = ids(2, 100)
    assert_same(logits_and_grads(wrapped, x), logits_and_grads(reference, x))
    assert fused_calls == [(2, 100, 4, 16)] * 2
