"""Llama 4 (Llama4ForCausalLM, and the language model of Llama4ForConditionalGeneration) against
transformers' own model on the same weights.

What sets its attention apart from LLaMA's: RoPE as a complex rotation of the pairs (2i, 2i+1)
(pirope's interleaved layout); NoPE layers (config.no_rope_layers 0) whose queries get a
temperature from the token's index (attn_temperature_tuning); on the rotating layers a weightless
RMSNorm of the rotated q and k (use_qk_norm: the Scout form) and attention within chunks of
attention_chunk_size tokens, through the mask transformers builds. The family's generic checks
(Position Interpolation on both attention paths, patch_rope) run in test_model_families.py with
the Maverick form (no q/k norm, one chunk); here the rest.

Tiny random float32 models (hidden 64, 2 layers: 0 rotating, 1 NoPE; 4 heads / 2 KV heads,
head_dim 16), seconds on a CPU.
"""

import copy
import sys

import pytest
import torch

import pirope

transformers = pytest.importorskip("transformers")
from pirope.integrations.transformers import apply_position_interpolation, patch_rope  # noqa: E402
from hf_compare import logits_and_grads  # noqa: E402
from test_model_families import (  # noqa: E402,F401  (fused_calls, fused_tables, rotations: fixtures)
    COMMON, LLAMA4, MOE, PACKED, WINDOW, _with_family, assert_checkpoint_rope_kept_then_replaced,
    assert_compiled_pi_equals_transformers, assert_generates_like, assert_left_padded_generation_like_transformers,
    assert_same, fused_calls, fused_tables, ids, make, rotations, spy_on, twin)

if not hasattr(transformers, "Llama4TextConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no Llama 4", allow_module_level=True)

CHUNK = 32  # shorter than the 100-token calls below: the chunks bite

# Llama 4 Scout's RoPE as its checkpoint writes it (the window scaled down with the tiny model)
SCOUT_ROPE = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def scout(**kw):
    """The Scout form: q/k norms after RoPE on the rotating layer, chunks of CHUNK tokens."""
    return make("llama4_text", use_qk_norm=True, attention_chunk_size=CHUNK, **kw)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_scout_form_position_interpolation_equals_transformers(attention, fused_calls, fused_tables, rotations):
    base = scout()
    assert [hasattr(layer.self_attn, "qk_norm") for layer in base.model.layers] == [True, False]
    assert base.config.layer_types == ["chunked_attention", "full_attention"]
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    ref = twin(base, model.config)
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    assert_generates_like(model, ref, ids(1, 70))  # prefill and decoding past a chunk's end
    # the rotating layer (norms after RoPE, chunks of 32) rotates by apply_rope_qk in each forward
    # (logits_and_grads', generate's prefill, then its 5 decoding steps) and, fused, attends through
    # rope_attention with its chunks as packed sequences (transformers' chunked mask, checked), in the two
    # forwards without a cache, as the NoPE layer, which never rotates; both with the identity rotation
    assert rotations == [(2, 100, 4, 16), (1, 70, 4, 16)] + [(1, 1, 4, 16)] * 5
    assert fused_calls == ([(200, 4, 16), (2, 100, 4, 16), (70, 4, 16), (1, 70, 4, 16)] if attention == "fused"
                           else [])
    assert fused_tables == [True] * len(fused_calls)


def test_the_chunks_and_the_norms_change_the_result():
    # the premises of the test above: a patch that ignored the chunks (attended across them) or
    # skipped the norms after RoPE would give other logits
    base = scout()
    x = ids(1, 100)
    want = logits_and_grads(twin(base), x)[0]
    unchunked = copy.deepcopy(base.config)
    unchunked.attention_chunk_size = 8192
    assert not torch.allclose(logits_and_grads(twin(base, unchunked), x)[0], want, rtol=0, atol=1e-4)
    without_norms = _with_family(patch_rope(copy.deepcopy(base)), qk_norm=None)
    with torch.no_grad():
        assert not torch.allclose(without_norms(x, use_cache=False).logits, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tuning", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_nope_layers_take_their_temperature(attention, tuning):
    # (that layer 1 never rotates, fused or not: test_model_families' NoPE test); none without
    # attn_temperature_tuning
    base = make("llama4_text", attn_temperature_tuning=tuning)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    if not tuning:
        return
    # the temperature (floor_scale 16: every 16 tokens) is what makes the NoPE layer exact: the
    # same patch without it gives other logits
    with torch.no_grad():
        untuned = _with_family(copy.deepcopy(model), nope_temperature=False)(x, use_cache=False).logits
        assert not torch.allclose(untuned, model(x, use_cache=False).logits, rtol=0, atol=1e-4)  # 10x the tolerance


def test_nope_temperature_counts_the_cache_as_transformers_does():
    # decoding: the temperature of a new token comes from the cache's length (not position_ids);
    # left padding shifts the positions but not that count, in transformers as here
    assert_left_padded_generation_like_transformers("llama4_text", 40, 7)


@pytest.mark.parametrize("seqlen", [CHUNK, CHUNK + 1, 100])
def test_a_chunked_layer_fuses_its_chunks_as_sequences(seqlen, monkeypatch):
    # Maverick's form (no norms) with chunks: a call within one chunk is plain causal; past it, transformers'
    # chunked mask (sdpa's, checked) makes each chunk a sequence, rope_attention's cu_seqlens, the positions
    # running on (the NoPE layer, unchunked, fuses as one sequence per row, through the identity rotation)
    calls = spy_on(monkeypatch, "rope_attention", lambda q, args, kwargs: (
        tuple(q.shape), args[2].shape[1] == 0, kwargs.get("cu_seqlens")))
    base = make("llama4_text", attention_chunk_size=CHUNK)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x = ids(2, seqlen)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    chunks = [0, *range(CHUNK, seqlen, CHUNK)]
    rotating = ((2, seqlen, 4, 16), False, None) if seqlen <= CHUNK else (
        (2 * seqlen, 4, 16), False, [*chunks, *(seqlen + c for c in chunks), 2 * seqlen])
    nope = ((2, seqlen, 4, 16), True, None)
    assert [(shape, identity, None if cu is None else cu.tolist()) for shape, identity, cu in calls] == \
        [rotating, nope]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_sequences_in_a_chunked_layer_follow_transformers_mask(attn_implementation, monkeypatch):
    # padding-free packing (3 sequences: 30, 45, 25 tokens) in a layer with chunks of 32: transformers 5.17's
    # chunked mask keeps a key where sequence and chunk agree, so rope_attention's sequences start at every
    # sequence and chunk start; 5.25's lets a query see the keys of its chunk across a sequence start, which is
    # no set of sequences rope_attention takes: that layer takes transformers' attention. Either way the mask
    # decides (the NoPE layer fuses the 3 sequences)
    calls = spy_on(monkeypatch, "rope_attention", lambda q, args, kwargs: kwargs.get("cu_seqlens"))
    base = make("llama4_text", attention_chunk_size=CHUNK, attn_implementation=attn_implementation)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x, position_ids=PACKED), logits_and_grads(twin(base), x, position_ids=PACKED))
    assert [cu.tolist() for cu in calls] in ([[0, 30, 32, 64, 75, 96, 100], [0, 30, 75, 100]], [[0, 30, 75, 100]])


def test_a_mask_free_backend_never_fuses_across_chunks():
    # the chunks live in the mask only: a backend transformers hands no mask would lose them, so
    # the decision reads the layer's chunk size, and fuses past one chunk only with a mask tensor
    # (which _segments_of_mask then reads the chunks from)
    from pirope.integrations.transformers.fusing import _layer_can_fuse

    model = patch_rope(make("llama4_text", attention_chunk_size=CHUNK), attention="fused")
    attn = model.model.layers[0].self_attn
    assert _layer_can_fuse(attn, CHUNK, None, {}) and not _layer_can_fuse(attn, CHUNK + 1, None, {})
    assert _layer_can_fuse(attn, CHUNK + 1, None, {}, torch.zeros(1, 1, CHUNK + 1, CHUNK + 1))


def test_the_rotation_is_transformers_complex_rotation():
    # q and k rotated by transformers' Llama 4 freqs_cis (complex, pairs (2i, 2i+1)) against pirope's
    # interleaved op on the patched model's table (PI'd); rotate-half pairs would give other values
    base = apply_position_interpolation(make("llama4_text"), 2.0)
    ref = twin(base)
    hf = sys.modules[type(ref.model.layers[0].self_attn).__module__]
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 100, 4, 16, generator=g), torch.randn(2, 100, 2, 16, generator=g)  # (B, S, H, D)
    positions = torch.arange(100).expand(2, 100)
    want_q, want_k = hf.apply_rotary_emb(q, k, ref.model.rotary_emb(q, positions))
    tables = base.model.rotary_emb(q, positions)
    got_q, got_k = pirope.apply_rope_qk(q, k, tables.cos, tables.sin, tables.position_ids, interleaved=True)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    rotate_half_q = pirope.apply_rope(q, tables.cos, tables.sin, tables.position_ids)
    assert not torch.allclose(rotate_half_q, want_q, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_scouts_llama3_rope_is_kept_by_patch_rope_and_replaced_by_a_longer_one(attention, tmp_path):
    # a longer llama3 scaling (what extending Scout further means) is transformers' with that config
    assert_checkpoint_rope_kept_then_replaced(scout(rope_parameters=SCOUT_ROPE), "llama3",
                                              dict(SCOUT_ROPE, factor=32.0), attention, tmp_path, ids(2, 100))


def test_compiles_fullgraph():
    # both paths in one model: the rotating layer fused, the NoPE layer with its temperature
    assert_compiled_pi_equals_transformers(make("llama4_text"))


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)


def test_the_multimodal_model_gets_its_language_model_extended(tmp_path):
    config = transformers.Llama4Config(
        text_config={**COMMON, **MOE, **LLAMA4, "use_qk_norm": True, "attention_chunk_size": CHUNK},
        vision_config=VISION, image_token_index=255)
    torch.manual_seed(0)
    base = transformers.Llama4ForConditionalGeneration(config).eval()
    vision_rope = base.vision_model.rotary_embedding
    model = apply_position_interpolation(copy.deepcopy(base), 2.0)
    assert model.language_model.config is model.config.get_text_config()  # what save_pretrained writes
    assert model.config.text_config.rope_parameters["rope_type"] == "linear"
    assert model.config.text_config.max_position_embeddings == 2 * WINDOW
    assert type(model.vision_model.rotary_embedding) is type(vision_rope)  # the vision tower is left alone
    x = ids(2, 100)
    ref = type(base)(copy.deepcopy(model.config)).eval()
    ref.load_state_dict(base.state_dict())
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    model.save_pretrained(tmp_path)
    loaded = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.text_config.rope_parameters == model.config.text_config.rope_parameters
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))
