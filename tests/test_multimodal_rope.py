"""Multimodal RoPE (mRoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and its MoE, Qwen3.5 and its MoE, GLM-4V and
its MoE, GLM-OCR, PaddleOCR-VL, the Qwen2.5-Omni and Qwen3-Omni thinkers), against transformers' own
models on the same weights.

Their language models take position_ids (3, batch, seqlen): a temporal, height and width position
per token, the same three for text and different ones for the tokens of an image, and each rotary
pair turns by one of them (contiguous sections for Qwen2-VL and GLM-4V, interleaved ones for Qwen3-VL).
Position Interpolation of the whole multimodal model gives the logits and gradients of the model
transformers builds from the updated config, with and without an image, on both attention paths;
a fused prefill then cached decoding generates what transformers generates; packed sequences
(text positions prepended, transformers' 4-row form) are followed.

Tiny random float32 models (hidden 64, 2 layers, 4 heads / 2 KV heads; a one-block vision tower),
seconds on a CPU.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import pirope.integrations.transformers.rotary as integration  # noqa: E402
from pirope.frequencies import rows_of_sectioned_positions  # noqa: E402
from pirope.integrations.transformers import (  # noqa: E402
    PiropeMultimodalRotaryEmbedding, apply_position_interpolation, patch_rope)
from hf_compare import assert_same_logits, logits_and_grads  # noqa: E402
from test_model_families import (  # noqa: E402,F401  (fused_calls, mask_free: fixtures)
    COMMON, MASK_FREE, MOE, MROPE_LANGUAGE_MODELS_ONLY, QWEN3_5, WINDOW, assert_same, fused_calls, fused_windows, ids,
    mask_free, twin)

IMAGE, VIDEO, VISION_START, VISION_END = 250, 251, 252, 253
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END, image_start_token_id=VISION_START, image_end_token_id=VISION_END,
              video_start_token_id=248, video_end_token_id=249,  # (Qwen's names, GLM's, Qwen2.5-Omni's)
              image_token_index=IMAGE, video_token_index=VIDEO, audio_token_index=0, audio_token_id=0,
              audio_start_token_id=1, audio_end_token_id=2)  # (ids() never draws 0-2)
# the Omni thinkers' audio tower, as small as the rest
AUDIO = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64,
             num_mel_bins=16, downsample_hidden_size=16)
# an image of 4 x 8 patches of 14 pixels, merged 2 x 2: 8 tokens at heights 0-1 and widths 0-3
GRID = torch.tensor([[1, 4, 8]])
PIXELS = torch.randn(32, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3))

QWEN2_VL_VISION = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, spatial_merge_size=2,
                       patch_size=14)
QWEN2_5_VL_VISION = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                               spatial_merge_size=2, fullatt_block_indexes=[0], window_size=56, patch_size=14)
QWEN3_VL_VISION = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                       spatial_merge_size=2, deepstack_visual_indexes=[], num_position_embeddings=16, patch_size=14)
# contiguous sections over the 8 rotary pairs of a head of 16: pairs 0-1 temporal, 2-4 height, 5-7 width
SECTIONS = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
# interleaved ones: pair j height where j % 3 == 1 (j < 9), width where j % 3 == 2 (j < 6), else temporal
INTERLEAVED = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2], "mrope_interleaved": True}
GLM_VISION = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                  spatial_merge_size=2, patch_size=14, image_size=56)
# GLM-4V's partial rotary: 4 of the 8 pairs of a head of 16 turn, sections [1, 2, 1]
GLM_SECTIONS = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [1, 2, 1]}
SHARPEN = 6.0
QWEN3_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# name -> (config class, model class, text config, vision config, model_type of the language model,
# the section of each rotary pair, layers with RoPE)
MROPE = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", dict(COMMON, rope_parameters=SECTIONS),
                 QWEN2_VL_VISION, "qwen2_vl_text", (0, 0, 1, 1, 1, 2, 2, 2), 2),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", dict(COMMON, rope_parameters=SECTIONS),
                   QWEN2_5_VL_VISION, "qwen2_5_vl_text", (0, 0, 1, 1, 1, 2, 2, 2), 2),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", dict(COMMON, rope_parameters=INTERLEAVED),
                 QWEN3_VL_VISION, "qwen3_vl_text", (0, 1, 2, 0, 1, 2, 0, 1), 2),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration",
                     dict(COMMON, **QWEN3_MOE, rope_parameters=INTERLEAVED), QWEN3_VL_VISION, "qwen3_vl_moe_text",
                     (0, 1, 2, 0, 1, 2, 0, 1), 2),
    # layer 0 linear attention, layer 1 full attention rotating 4 of its 8 pairs, sections [2, 1, 1]
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", dict(COMMON, **QWEN3_5), QWEN3_VL_VISION,
                "qwen3_5_text", (0, 1, 2, 0), 1),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration",
                    dict(COMMON, **MOE, **QWEN3_5, shared_expert_intermediate_size=32), QWEN3_VL_VISION,
                    "qwen3_5_moe_text", (0, 1, 2, 0), 1),
    # interleaved pairs (2i, 2i+1), partial rotary
    "glm4v": ("Glm4vConfig", "Glm4vForConditionalGeneration", dict(COMMON, rope_parameters=GLM_SECTIONS), GLM_VISION,
              "glm4v_text", (0, 1, 1, 2), 2),
    "glm_ocr": ("GlmOcrConfig", "GlmOcrForConditionalGeneration", dict(COMMON, rope_parameters=SECTIONS), GLM_VISION,
                "glm_ocr_text", (0, 0, 1, 1, 1, 2, 2, 2), 2),
    # rotate-half pairs (GLM-4.5's), partial rotary; layer 0 dense, layer 1 MoE
    "glm4v_moe": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration",
                  dict(COMMON, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       first_k_dense_replace=1, n_group=1, topk_group=1, rope_parameters=GLM_SECTIONS), GLM_VISION,
                  "glm4v_moe_text",
                  (0, 1, 1, 2), 2),
    # PaddleOCR-VL: ERNIE 4.5 0.3B with Qwen2-VL's attention and sections
    "paddleocr_vl": ("PaddleOCRVLConfig", "PaddleOCRVLForConditionalGeneration", dict(COMMON, rope_parameters=SECTIONS),
                     dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          patch_size=14, spatial_merge_size=2, image_size=56),
                     "paddleocr_vl_text", (0, 0, 1, 1, 1, 2, 2, 2), 2),
    # the Omni thinkers (text, image, audio in; text out): Qwen2.5-Omni's is Qwen2.5-VL's language model,
    # Qwen3-Omni's Qwen3-VL-MoE's (with a sliding_window kwarg)
    "qwen2_5_omni": ("Qwen2_5OmniThinkerConfig", "Qwen2_5OmniThinkerForConditionalGeneration",
                     dict(COMMON, rope_parameters=SECTIONS), QWEN2_5_VL_VISION, "qwen2_5_omni_text",
                     (0, 0, 1, 1, 1, 2, 2, 2), 2),
    "qwen3_omni_moe": ("Qwen3OmniMoeThinkerConfig", "Qwen3OmniMoeThinkerForConditionalGeneration",
                       dict(COMMON, **QWEN3_MOE, rope_parameters=INTERLEAVED), QWEN3_VL_VISION, "qwen3_omni_moe_text",
                       (0, 1, 2, 0, 1, 2, 0, 1), 2),
}


def make(name, **text):
    config_cls, model_cls, text_config, vision_config, *_ = MROPE[name]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    audio = {"audio_config": dict(AUDIO)} if "Omni" in config_cls else {}
    config = getattr(transformers, config_cls)(text_config=copy.deepcopy({**text_config, **text}),
                                               vision_config=copy.deepcopy(vision_config), **audio, **TOKENS)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    if not hasattr(language_model(model).layers[-1].self_attn, "q_norm"):
        # Qwen2-VL's height and width sections turn its slowest pairs: scores of a few units (the
        # random init's are ~0.1) so that their angles show in the logits (q/k norms would undo it)
        with torch.no_grad():
            for layer in language_model(model).layers:
                layer.self_attn.q_proj.weight.mul_(SHARPEN)
                layer.self_attn.k_proj.weight.mul_(SHARPEN)
    return model


def language_model(model):
    """The language model of a multimodal model (the text model itself in older transformers' Omni
    thinkers, which hold it as .model)."""
    return getattr(model.model, "language_model", model.model)


def with_image(name, x, at=10):
    """x with an image (vision start, 8 image tokens, vision end) from token `at`, and the inputs
    of model `name` that go with it."""
    x = x.clone()
    x[:, at] = VISION_START
    x[:, at + 1:at + 9] = IMAGE
    x[:, at + 9] = VISION_END
    pixels = PIXELS if name != "paddleocr_vl" else PIXELS.view(32, 3, 2, 14, 14)[:, :, 0]  # its patches: one frame
    inputs = dict(pixel_values=torch.cat([pixels] * x.shape[0]), image_grid_thw=GRID.repeat(x.shape[0], 1),
                  mm_token_type_ids=(x == IMAGE).int())
    if "omni" in name:  # (the Omni thinkers lay out multimodal positions only given an attention mask)
        inputs["attention_mask"] = torch.ones_like(x)
    return x, inputs


@pytest.fixture
def sectioned(monkeypatch):
    """The position_ids shape of every build of per-token rows from sections that disagree."""
    calls = []
    real = integration.rows_of_sectioned_positions

    def spy(inv_freq, position_ids, *args):
        calls.append(tuple(position_ids.shape))
        return real(inv_freq, position_ids, *args)

    monkeypatch.setattr(integration, "rows_of_sectioned_positions", spy)
    return calls


def test_every_multimodal_rope_language_model_is_tested_here():
    # (GLM-Image's, whose image tokens are VQ codes, below)
    assert set(MROPE_LANGUAGE_MODELS_ONLY) <= {entry[4] for entry in MROPE.values()} | {"glm_image_text"}


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("name", list(MROPE))
def test_position_interpolation_equals_transformers_with_and_without_an_image(name, attention, fused_calls,
                                                                               sectioned, tmp_path):
    base = make(name)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    lm = language_model(model)
    assert lm.config.model_type == MROPE[name][4] and lm.config is model.config.get_text_config()
    assert isinstance(lm.rotary_emb, PiropeMultimodalRotaryEmbedding)
    assert lm.rotary_emb.pair_rows == MROPE[name][5]
    params = model.config.get_text_config().rope_parameters
    assert params["rope_type"] == "linear" and params["factor"] == 2.0
    assert params["mrope_section"] == base.config.get_text_config().rope_parameters["mrope_section"]
    ref = twin(base, model.config)  # the PI model as transformers builds it from the config
    layers = MROPE[name][6]
    fused = [(1, 100, 4, 16)] * layers if attention == "fused" else []
    x = ids(1, 100)  # text, past the original window: the three sections agree, the table path
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    assert fused_calls == fused and sectioned == []
    x, image = with_image(name, x)  # an image: the sections disagree on its tokens and the text after it
    fused_calls.clear()
    assert_same(logits_and_grads(model, x, **image), logits_and_grads(ref, x, **image))
    # (GLM-4V-MoE hands its layers the three sections as their position_ids, not the text positions:
    # an image's repeated positions there read as packed sequences, which are not fused)
    assert fused_calls == (fused if name != "glm4v_moe" else []) and sectioned == [(3, 1, 100)]
    # the saved model (its sections kept) loads with plain transformers as the extended one
    model.save_pretrained(tmp_path)
    loaded = type(base).from_pretrained(tmp_path).eval()
    assert loaded.config.get_text_config().rope_parameters == params
    assert_same(logits_and_grads(model, x, **image), logits_and_grads(loaded, x, **image))


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "paddleocr_vl", "qwen2_5_omni"])
def test_sliding_window_layers_are_followed_with_and_without_an_image(name, attention, fused_windows):
    # Qwen2-VL's attention (also Qwen2.5-VL's, PaddleOCR-VL's and Qwen2.5-Omni's): the module's own
    # sliding_window, set on its sliding_attention layers (layer 0 here), which pirope passes on to the
    # attention function, or to rope_attention as window_size (fused, on CPU: past the window, the mask shows it).
    # PaddleOCR-VL's model builds a causal mask only (its window acts in the backends that window themselves):
    # its windowed layer, whose mask does not show the window, is not fused, and sdpa attends to every key
    base = make(name, sliding_window=16, use_sliding_window=True, layer_types=["sliding_attention", "full_attention"])
    assert [layer.self_attn.sliding_window for layer in language_model(base).layers] == [16, None]
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    ref = twin(base, model.config)
    x = ids(1, 40)
    windowed = [(15, 0)] if name != "paddleocr_vl" else []
    for x, inputs in ((x, {}), with_image(name, x)):  # text past the window, then with an image
        fused_windows.clear()
        assert_same(logits_and_grads(model, x, **inputs), logits_and_grads(ref, x, **inputs))
        assert fused_windows == (windowed + [(-1, -1)] if attention == "fused" else [])


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "qwen3_5", "glm4v"])
def test_patch_rope_keeps_the_model_with_images_in_a_batch(name, fused_calls):
    base = make(name)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x, image = with_image(name, ids(2, 40))
    x[1, 30:] = ids(1, 10, seed=5)  # two rows, different tokens after the image
    assert_same(logits_and_grads(model, x, **image), logits_and_grads(twin(base), x, **image))
    assert fused_calls == [(2, 40, 4, 16)] * MROPE[name][6]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "glm4v", "glm4v_moe"])
def test_a_left_padded_batch_with_an_image_equals_transformers(name, impl, fused_calls):
    # a padding mask: the "sdpa" path (transformers' backend with it) on both paths; eager's causal
    # mask of an unpadded call fuses (GLM-4V-MoE's layers get the three sections as position_ids:
    # a mask's sequences are then its rows)
    base = make(name)
    language_model(base).config._attn_implementation = impl
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x, image = with_image(name, ids(2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :3] = 0
    assert_same(logits_and_grads(model, x, attention_mask=mask, **image),
                logits_and_grads(base, x, attention_mask=mask, **image))
    assert fused_calls == []
    x, image = with_image(name, ids(1, 40))
    assert_same(logits_and_grads(model, x, **image), logits_and_grads(base, x, **image))
    fused = impl == "eager" or name != "glm4v_moe"  # (sdpa: no mask tensor, packing unknown)
    assert fused_calls == ([(1, 40, 4, 16)] * 2 if fused else [])


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_the_sections_are_what_makes_the_image_tokens_right(name, monkeypatch):
    # the premise of the tests above: with every pair turned by the temporal section (plain RoPE on
    # it), the image's logits are not transformers'
    base = make(name)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x, image = with_image(name, ids(1, 40))
    monkeypatch.setattr(language_model(model).rotary_emb, "pair_rows", (0,) * 8)
    with torch.no_grad():
        got, want = model(x, **image).logits, base(x, **image).logits
    torch.testing.assert_close(got[:, :11], want[:, :11], rtol=1e-5, atol=1e-5)  # before the image
    assert not torch.allclose(got[:, 11:], want[:, 11:], atol=1e-3)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "qwen3_5", "glm4v"])
def test_fused_prefill_then_cached_decoding_with_an_image_generates_like_transformers(name, fused_calls):
    base = make(name)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config)
    x, image = with_image(name, ids(1, 70))
    with torch.no_grad():
        a = model.generate(x, **image, max_new_tokens=6, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        b = ref.generate(x, **image, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-5, atol=1e-5)
    assert fused_calls == [(1, 70, 4, 16)] * MROPE[name][6]  # the prefill; decode steps take the cached path


def packed_positions(name):
    """Two sequences of 50 packed into one row, an image in each, as transformers' 4-row
    position_ids: the text positions (restarting at the second sequence), then the three sections."""
    model = make(name)
    x, image = with_image(name, ids(1, 50))
    with torch.no_grad():
        one = model.model.get_rope_index(x, image_grid_thw=GRID, mm_token_type_ids=image["mm_token_type_ids"])[0]
    text = torch.arange(50)[None, None]
    return torch.cat([torch.cat([text, one], dim=0)] * 2, dim=-1)  # (4, 1, 100)


@pytest.mark.parametrize("impl", ["sdpa", MASK_FREE])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "glm4v"])
def test_packed_sequences_with_images_attend_within_themselves(name, impl, mask_free, fused_calls):
    # the language model on embeddings and 4-row position_ids: sdpa gets a packed-sequence mask
    # tensor from the text positions (fused on CPU as rope_attention's packed sequences); a backend
    # without a mask (flash attention's way) reads the packing from the position_ids the layers get,
    # so the fused path, which would attend across the sequences, must not be taken
    positions = packed_positions(name)
    base = language_model(make(name))
    base.config._attn_implementation = impl
    model = patch_rope(copy.deepcopy(base), attention="fused")
    embeds = torch.randn(1, 100, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        want = base(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        alone = base(inputs_embeds=embeds[:, 50:], position_ids=positions[1:, :, 50:] - 50,
                     use_cache=False).last_hidden_state
    assert_same_logits(got, want)
    torch.testing.assert_close(got[:, 50:], alone, rtol=1e-5, atol=1e-5)  # the premise: attended within
    assert fused_calls == ([(100, 4, 16)] * 2 if impl == "sdpa" else [])


def test_sectioned_rows_equal_a_float64_reference():
    # each token's row: pair j turns by inv_freq[j] times the token's position in section rows[j]
    inv_freq = 10000.0 ** -(torch.arange(8, dtype=torch.float64) / 8)
    positions = torch.randint(-5, 40000, (3, 2, 7), generator=torch.Generator().manual_seed(0))
    rows = (2, 0, 1, 1, 0, 2, 2, 0)
    cos, sin, index = rows_of_sectioned_positions(inv_freq.float(), positions, rows, 0.75)
    assert index.shape == (2, 7) and torch.equal(index.flatten(), torch.arange(14))
    picked = torch.stack([positions[r].flatten() for r in rows], dim=-1).double()  # (14, 8)
    angles = picked * inv_freq.float().double()
    torch.testing.assert_close(cos, (angles.cos() * 0.75).float(), rtol=0, atol=0)
    torch.testing.assert_close(sin, (angles.sin() * 0.75).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pair_rows"):
        rows_of_sectioned_positions(inv_freq.float(), positions, (0, 1, 2, 3, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="pair_rows"):
        rows_of_sectioned_positions(inv_freq.float(), positions, (0, 1))


def test_the_rotary_embedding_rejects_malformed_position_ids():
    rotary = language_model(patch_rope(make("qwen2_vl"))).rotary_emb
    x = torch.zeros(1, 5, 64)
    with pytest.raises(ValueError, match=r"position_ids .*\(3, batch, seqlen\)"):
        rotary(x, torch.zeros(2, 1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids must be int32, int64 or floating-point"):
        rotary(x, torch.zeros(3, 1, 5, dtype=torch.bool))
    # one section, or (batch, seqlen): text, the plain table
    tables = rotary(x, torch.arange(5)[None, None])
    assert torch.equal(tables.position_ids, torch.arange(5)[None])
    assert torch.equal(rotary(x, torch.arange(5)[None]).cos, tables.cos)
    for pair_rows in ((0, 1, 2), (0, 1, 2, 3, 0, 0, 0, 0), (0, 1, 2, -1, 0, 0, 0, 0)):  # 8 pairs, sections 0-2
        with pytest.raises(ValueError, match="pair_rows"):
            PiropeMultimodalRotaryEmbedding(16, pair_rows=pair_rows, max_position_embeddings=WINDOW)


def test_floating_point_positions_get_the_rows_of_their_own_positions():
    # Qwen3-Omni's positions are float32 (video and audio timed in fractions of a position)
    rotary = language_model(patch_rope(make("qwen3_vl"))).rotary_emb
    x = torch.zeros(1, 4, 64)
    positions = torch.tensor([[[0.0, 1.0, 2.5, 7.25]], [[0.0, 1.0, 2.0, 3.0]], [[0.0, 1.5, 2.0, 40000.75]]])
    tables = rotary(x, positions)
    assert torch.equal(tables.position_ids, torch.arange(4)[None])
    picked = torch.stack([positions[r, 0].double() for r in rotary.pair_rows], dim=-1)  # (4, 8)
    angles = picked * rotary.inv_freq.double()  # (the frequencies are rope_frequencies', tested on their own)
    torch.testing.assert_close(tables.cos, angles.cos().float(), rtol=0, atol=0)
    torch.testing.assert_close(tables.sin, angles.sin().float(), rtol=0, atol=0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="position_ids must be finite"):
            rotary(x, positions.index_fill(-1, torch.tensor([1]), bad))
    text = rotary(x, positions[:1])  # one section of floats: the same positions in all three
    assert torch.equal(text.cos, rotary(x, positions[:1].expand(3, 1, 4)).cos) and text.cos.shape == (4, 8)
    whole = positions.floor()  # whole positions as floats: the rows of the same positions as ints
    assert torch.equal(rotary(x, whole).cos, rotary(x, whole.long()).cos[rotary(x, whole.long()).position_ids[0]])


@pytest.mark.parametrize("scaling", [{"rope_type": "dynamic", "factor": 2.0},
                                     {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 8,
                                      "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]}],
                         ids=["dynamic", "longrope"])
@pytest.mark.parametrize("largest", [63.25, 73.25, 63, 73])
def test_sections_that_disagree_pick_the_length_dependent_table_as_transformers(scaling, largest):
    # transformers' length is max(position_ids) + 1, with the fraction of floating-point positions: 64.25 is
    # past the window of 64, 64 is not, 74 is
    base = language_model(make("qwen3_vl"))
    model = patch_rope(copy.deepcopy(base), scaling=scaling)
    ref = twin(base, model.config)
    positions = torch.arange(40, dtype=torch.float32 if isinstance(largest, float) else torch.long)
    positions = positions.expand(3, 1, 40).clone()
    positions[0, :, 10:] += largest - 39  # temporal positions (with a fraction where floats)
    embeds = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        want = ref(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
    assert_same_logits(got, want)


def test_sections_that_do_not_fit_the_head_are_refused_unchanged():
    # Qwen2-VL's sections must split the 8 pairs exactly (transformers' own forward fails otherwise)
    base = make("qwen2_vl")
    language_model(base).rotary_emb.mrope_section = [2, 3, 4]
    with pytest.raises(ValueError, match="mrope_section"):
        apply_position_interpolation(base, 2.0)
    assert type(language_model(base).rotary_emb).__module__.startswith("transformers")
    assert base.config.get_text_config().max_position_embeddings == WINDOW


@pytest.mark.parametrize("layout", [
    lambda f: torch.cat([f[0].flip(-1)] * 2, dim=-1),  # pair i turned at pair (pairs - 1 - i)'s frequency
    lambda f: torch.cat([f[0], f[1]], dim=-1),  # the two halves of a pair turned by different sections
    lambda f: f[0]],  # half a head's frequencies
    ids=["flipped", "halves_differ", "half"])
def test_a_layout_that_moves_frequencies_between_pairs_is_refused(monkeypatch, layout):
    base = make("qwen2_vl")
    rotary = language_model(base).rotary_emb
    monkeypatch.setattr(rotary, "recomposition_frequencies", layout)
    with pytest.raises(TypeError, match="moves frequencies between pairs"):
        patch_rope(base)
    assert language_model(base).rotary_emb is rotary


def test_patching_again_with_another_number_of_rotary_pairs_is_refused_unchanged():
    # GLM-4V rotates 4 of its 8 pairs (partial_rotary_factor 0.5): the sections read at the first patch are
    # those 4 pairs', a scaling of the whole head does not fit them
    model = patch_rope(make("glm4v"))
    rotary, params = language_model(model).rotary_emb, dict(model.config.get_text_config().rope_parameters)
    with pytest.raises(ValueError, match="rotates 4 pairs per head .* a scaling of 8 pairs does not fit"):
        patch_rope(model, {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.0})
    assert language_model(model).rotary_emb is rotary and rotary.pair_rows == MROPE["glm4v"][5]
    assert model.config.get_text_config().rope_parameters == params


def test_patching_again_keeps_the_sections(fused_calls):
    base = make("qwen3_vl")
    model = patch_rope(copy.deepcopy(base))
    model = apply_position_interpolation(model, 2.0)  # the rotary embedding is pirope's now
    assert language_model(model).rotary_emb.pair_rows == MROPE["qwen3_vl"][5]
    x, image = with_image("qwen3_vl", ids(1, 100))
    assert_same(logits_and_grads(model, x, **image), logits_and_grads(twin(base, model.config), x, **image))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_compiled_model_with_an_image_equals_transformers(name):
    # under torch.compile the rows of the call's own positions are built (no host read of them,
    # nor of the text positions: one graph)
    base = make(name)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    lm = torch.compile(language_model(model), fullgraph=True)
    x, image = with_image(name, ids(1, 40))
    with torch.no_grad():
        positions = base.model.get_rope_index(x, image_grid_thw=GRID, mm_token_type_ids=image["mm_token_type_ids"])[0]
        embeds = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(7))
        got = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        want = language_model(base)(inputs_embeds=embeds, position_ids=positions,
                                         use_cache=False).last_hidden_state
    assert_same_logits(got, want)


# ---- GLM-Image: an autoregressive image generator --------------------------------------------

# its language model: GLM-4V-MoE's attention (rotate-half pairs, partial rotary: 4 of the 8 pairs of a head of
# 16 turn, sections [1, 2, 1]) handed the text positions; the tokens of an image are VQ codes (the vision tower
# and VQ-VAE kept tiny, unused here), laid out on a grid of 2D positions like the tokens it generates
GLM_IMAGE = dict(text_config=dict(COMMON, vision_vocab_size=256, rope_parameters=GLM_SECTIONS, pad_token_id=0,
                                  eos_token_id=2),
                 vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14,
                                    image_size=56),
                 vq_config=dict(embed_dim=16, num_embeddings=32, latent_channels=32),
                 image_token_id=IMAGE, image_start_token_id=VISION_START, image_end_token_id=VISION_END)
GLM_IMAGE_GRID = torch.tensor([[1, 4, 4]])  # 16 tokens, 4 rows of 4


def make_glm_image():
    if not hasattr(transformers, "GlmImageConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no GlmImageConfig")
    torch.manual_seed(0)
    model = transformers.GlmImageForConditionalGeneration(transformers.GlmImageConfig(**copy.deepcopy(GLM_IMAGE)))
    with torch.no_grad():  # scores of a few units, so that the sections' angles show (as make's SHARPEN)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(SHARPEN)
            layer.self_attn.k_proj.weight.mul_(SHARPEN)
    return model.eval()


def glm_image_positions(model, seqlen, at=10):
    """(3, 1, seqlen) positions of text with an image of GLM_IMAGE_GRID's tokens from token `at`, as its
    get_rope_index lays out a source image: the text's own position in all three sections, the image's rows
    and columns from `at` on, the text after it from `at` plus the grid's larger side."""
    image = model.model.get_vision_position_ids(start_position=at, grid_thw=GLM_IMAGE_GRID[0])
    size = image.shape[1]
    after = torch.arange(at + 4, at + 4 + seqlen - at - size).expand(3, -1)
    return torch.cat([torch.arange(at).expand(3, -1), image, after], dim=-1)[:, None]


def test_glm_image_language_model_is_patched():
    lm = make_glm_image().model.language_model
    assert lm.config.model_type == "glm_image_text" and lm.config is lm.config.get_text_config()


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_glm_image_position_interpolation_with_an_image_equals_transformers(attention, fused_calls, sectioned,
                                                                            monkeypatch, tmp_path):
    base = make_glm_image()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    lm = model.model.language_model
    assert isinstance(lm.rotary_emb, PiropeMultimodalRotaryEmbedding) and lm.rotary_emb.pair_rows == (0, 1, 1, 2)
    params = model.config.get_text_config().rope_parameters
    assert params["rope_type"] == "linear" and params["factor"] == 2.0 and params["mrope_section"] == [1, 2, 1]
    ref = twin(base, model.config)
    x = ids(1, 100)  # text past the original window, then the same with an image's 2D positions
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    positions = glm_image_positions(base, 100)
    assert_same(logits_and_grads(model, x, position_ids=positions), logits_and_grads(ref, x, position_ids=positions))
    assert fused_calls == ([(1, 100, 4, 16)] * 4 if attention == "fused" else []) and sectioned == [(3, 1, 100)]
    model.save_pretrained(tmp_path)
    loaded = type(base).from_pretrained(tmp_path).eval()
    assert loaded.config.get_text_config().rope_parameters == params
    assert_same(logits_and_grads(model, x, position_ids=positions), logits_and_grads(loaded, x, position_ids=positions))
    # the premise: with every pair turned by the temporal section, the image's logits are not transformers'
    monkeypatch.setattr(lm.rotary_emb, "pair_rows", (0,) * 4)
    with torch.no_grad():
        got, want = model(x, position_ids=positions).logits, ref(x, position_ids=positions).logits
    torch.testing.assert_close(got[:, :11], want[:, :11], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:, 11:], want[:, 11:], atol=1e-3)


def test_glm_image_generates_an_image_grid_like_transformers(fused_calls):
    # text to image: the prefill is text (fused), each token generated then turns by its place on the grid
    # of the image asked for (image_grid_thw), which the model's cached decode positions give
    base = make_glm_image()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config)
    x = ids(1, 70)
    with torch.no_grad():
        a, b = (m.generate(x, image_grid_thw=GLM_IMAGE_GRID, max_new_tokens=10, do_sample=False, output_logits=True,
                           return_dict_in_generate=True) for m in (model, ref))
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-5, atol=1e-5)
    assert fused_calls == [(1, 70, 4, 16)] * 2  # the prefill; decode steps take the cached path
