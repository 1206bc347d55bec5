"""Multi-head Latent Attention (DeepSeek-V2's MLA: DeepSeek-V2/V3, GLM-4.7-Flash, Youtu, A.X K1,
MiniCPM3, Mistral 4, LongCat-Flash) against transformers' own model on the same weights.

What sets MLA apart from LLaMA's attention: each query head is a part without RoPE then a rotary part;
the keys' rotary part is one head shared by all heads, their other part and the values come from a
compressed latent, which the cache holds with the rotated shared key; the values' head size differs
from the queries'; DeepSeek's YaRN also scales the softmax (mscale_all_dim). The family's generic
checks (Position Interpolation on both attention paths, patch_rope, fused prefill then cached
generation) run in test_model_families.py; here the rest.

Tiny random float32 models (hidden 64, 2 layers, 4 heads: q 16 + 8 rotary features, values 12,
latent 16), seconds on a CPU.
"""

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from pirope.integrations.transformers import apply_position_interpolation, patch_rope  # noqa: E402
from hf_compare import logits_and_grads  # noqa: E402
from test_model_families import (  # noqa: E402,F401  (fused_calls, fused_tables, rotations: fixtures)
    COMMON, MLA, PACKED, WINDOW, _with_family, assert_checkpoint_rope_kept_then_replaced,
    assert_compiled_pi_equals_transformers, assert_generates_like, assert_left_padded_generation_like_transformers,
    assert_same, fused_calls, fused_tables, ids, make, rotations, twin)

# DeepSeek-V3's RoPE as its checkpoints write it (YaRN with both mscales; the window scaled down)
DEEPSEEK_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
                 "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}

# Mistral 4's checkpoints' RoPE: YaRN over the whole head's table, a third of it rotating (the rotary part), with
# Llama 4's temperature keys (the window scaled down)
MISTRAL4_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
                 "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0,
                 "partial_rotary_factor": 1 / 3, "llama_4_scaling_beta": 0.1}


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("rope_interleave", [False, True])
@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe_lite"])
def test_rope_interleave_chooses_the_pairs_as_in_transformers(model_type, rope_interleave, attention, rotations):
    base = make(model_type, rope_interleave=rope_interleave)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    x = ids(2, 100)
    ref = logits_and_grads(twin(base, model.config), x)
    assert_same(logits_and_grads(model, x), ref)
    # pirope rotated the rotary part of q (4 heads of 8) and the one shared key in each layer
    assert rotations == [(2, 100, 4, 8)] * 2
    # the other pairs' rotation is another model (the test sees the layout)
    wrong = _with_family(model, interleaved=not rope_interleave, interleave_flag=None)
    assert not torch.allclose(logits_and_grads(wrong, x)[0], ref[0], atol=1e-3)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "minicpm3"])
def test_a_fixed_layout_ignores_rope_interleave(model_type):
    # DeepSeek-V2's complex rotation is always interleaved, MiniCPM3's always rotate-half; neither reads
    # the config's rope_interleave (which their configs may hold, from DeepSeek-V3's)
    base = make(model_type, rope_interleave=model_type == "minicpm3")
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x = ids(2, 40)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", ["deepseek_v3", "mistral4"])
def test_a_checkpoints_yarn_is_kept_and_a_longer_one_rescales_the_softmax(model_type, attention, tmp_path):
    # a longer YaRN: the table's and the softmax's mscale change (yarn_get_mscale(factor, mscale_all_dim) ** 2);
    # Mistral 4's dict also holds its temperature's keys, passed along
    yarn = {"deepseek_v3": DEEPSEEK_YARN, "mistral4": MISTRAL4_YARN}[model_type]
    base = make(model_type, rope_parameters=yarn)
    models = assert_checkpoint_rope_kept_then_replaced(base, "yarn", dict(yarn, factor=8.0), attention, tmp_path,
                                                       ids(2, 100))
    model_scales, ref_scales, loaded_scales = ([layer.self_attn.scaling for layer in m.model.layers] for m in models)
    assert model_scales == ref_scales == loaded_scales
    assert model_scales[0] > base.model.layers[0].self_attn.scaling * 1.01  # (mscale 1 + 0.1 ln 8 > 1 + 0.1 ln 4)


def test_a_refused_scaling_leaves_the_softmax_scale_as_it_was():
    base = make("deepseek_v3", rope_parameters=DEEPSEEK_YARN)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="factor"):
        patch_rope(model, dict(DEEPSEEK_YARN, factor=-1.0))
    assert [layer.self_attn.scaling for layer in model.model.layers] == \
        [layer.self_attn.scaling for layer in base.model.layers]
    assert model.config.rope_parameters == DEEPSEEK_YARN


@pytest.mark.parametrize(("v_head_dim", "fused_width"), [(12, 24), (24, 24), (40, 40)])
def test_values_of_another_head_size_fuse_padded_with_zero_features(v_head_dim, fused_width, fused_calls,
                                                                    fused_tables):
    # q and k (16 + 8 features) and v pad to the larger head size: zeros add nothing to a score or output
    base = make("deepseek_v3", v_head_dim=v_head_dim)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(2, 100)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config), x))
    assert fused_calls == [(2, 100, 4, fused_width)] * 2
    assert fused_tables == [True, True]  # q and k rotated before it, as transformers caches the shared key


def test_packed_sequences_fuse_as_one_call_of_three_sequences(fused_calls):
    # padding-free training (positions restarting, no mask): transformers' sdpa mask is block-causal
    base = make("deepseek_v3")
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(1, 100)
    assert_same(logits_and_grads(model, x, position_ids=PACKED),
                logits_and_grads(twin(base, model.config), x, position_ids=PACKED))
    assert fused_calls == [(100, 4, 24)] * 2  # (total tokens, heads, head size): packed


def test_left_padded_generation_follows_transformers(fused_calls):
    assert_left_padded_generation_like_transformers("deepseek_v3", 70, 5)
    assert fused_calls == []  # the padded row's mask is not causal: transformers' attention, on pirope's rotation


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3", "minicpm3", "longcat_flash"])
def test_a_static_cache_prefill_fuses_on_the_calls_own_keys(model_type, fused_calls):
    # with a static cache transformers' sdpa mask is None (exactly causal): the prefill fuses, on this call's
    # keys, not the cache's whole (zero-padded) buffer
    base = make(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    assert_generates_like(model, twin(base, model.config), ids(1, 20), cache_implementation="static")
    assert fused_calls == [(1, 20, 4, 24)] * 2


def cache_of(output):
    """The cache a forward returned (`cache` in newer transformers, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def test_the_cache_holds_the_latent_and_the_rotated_shared_key():
    base = make("deepseek_v3")
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config)
    x = ids(1, 70)
    with torch.no_grad():
        a, b = (cache_of(m(x, use_cache=True)) for m in (model, ref))
    for layer in range(2):
        la, ra, lb, rb = a.layers[layer].keys, a.layers[layer].values, b.layers[layer].keys, b.layers[layer].values
        assert la.shape == lb.shape == (1, 1, 70, 16)  # the normalized latent, as transformers caches it
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
        # the rotated shared key: transformers' DeepSeek-V3 writes interleaved pairs as evens | odds, pirope
        # in place (a permutation of q's and k's features alike, every score the same)
        assert ra.shape == rb.shape == (1, 1, 70, 8)
        torch.testing.assert_close(torch.cat([ra[..., 0::2], ra[..., 1::2]], dim=-1), rb, rtol=1e-5, atol=1e-5)


def test_training_with_attention_dropout_takes_transformers_attention(fused_calls):
    base = make("deepseek_v2", attention_dropout=0.5)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused").train()
    ref = twin(base, model.config).train()
    x = ids(2, 40)
    torch.manual_seed(3)
    a = logits_and_grads(model, x)
    torch.manual_seed(3)
    b = logits_and_grads(ref, x)
    assert_same(a, b)  # the same dropout masks: the same calls of the same backend
    assert fused_calls == []
    assert model.config.max_position_embeddings == 2 * WINDOW


def test_compiles_fullgraph():
    # both layers dense (first_k_dense_replace 2): the experts' grouped matmul of older transformers (5.17)
    # has a backward that does not compile, with or without pirope
    assert_compiled_pi_equals_transformers(make("deepseek_v3", first_k_dense_replace=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_transformers_attention_runs_on_pirope_rotation(fused_calls, rotations):
    base = make("deepseek_v3").cuda()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(2, 100).cuda()
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base, model.config).cuda(), x))
    assert fused_calls == [] and rotations == [(2, 100, 4, 8)] * 2




def test_a_transformers_without_yarn_apply_mscale_is_refused_unchanged(monkeypatch):
    # a new scaling's softmax scale is transformers' own yarn_apply_mscale: without it, no guess
    from transformers import modeling_rope_utils

    model = make("deepseek_v3")
    # (transformers 5.17 defines it in the model module only, later ones in modeling_rope_utils too)
    monkeypatch.delattr(sys.modules[type(model.model.layers[0].self_attn).__module__], "yarn_apply_mscale",
                        raising=False)
    monkeypatch.delattr(modeling_rope_utils, "yarn_apply_mscale", raising=False)
    params, scale = dict(model.config.rope_parameters), model.model.layers[0].self_attn.scaling
    with pytest.raises(TypeError, match="no yarn_apply_mscale telling the softmax scale of DeepseekV3Attention"):
        patch_rope(model, {"rope_type": "linear", "factor": 2.0})
    assert model.config.rope_parameters == params and model.model.layers[0].self_attn.scaling == scale
    assert type(model.model.rotary_emb).__module__.startswith("transformers")


def test_mistral4_temperature_scales_the_whole_query():
    base = make("mistral4")
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    x = ids(2, 100)
    ref = logits_and_grads(twin(base, model.config), x)
    assert_same(logits_and_grads(model, x), ref)
    # (scores of ~0.1 here: the temperature moves the logits by ~1e-4, ten times what assert_same allows)
    assert not torch.allclose(logits_and_grads(_with_family(model, attn_temperature=False), x)[0], ref[0], rtol=1e-5,
                              atol=1e-5)


@pytest.mark.parametrize(("scaling", "match"), [
    # Mistral 4's table spans the whole head (24): a partial_rotary_factor of 1/2 would rotate 12 features where its
    # heads have 8 rotary ones
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "qk_rope_head_dim"),
    # transformers' own "default" table ignores the factor (12 frequencies for 4 pairs: its model fails), also
    # where a dict without a rope_type means it
    ({"rope_type": "default"}, "'default'"),
    ({"llama_4_scaling_beta": 0.2}, "'default'")])
def test_a_table_that_does_not_fit_the_rotary_part_is_refused_unchanged(scaling, match):
    base = make("mistral4")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        patch_rope(model, scaling)
    assert model.config.rope_parameters == base.config.rope_parameters
    assert type(model.model.rotary_emb) is type(base.model.rotary_emb)
    # (what the refusals spare: transformers' model with that config fails)
    if match == "'default'":
        config = copy.deepcopy(base.config)
        config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1 / 3}
        with pytest.raises(RuntimeError, match="size of tensor"):
            twin(base, config)(ids(1, 8))


def test_kimi_k25_gets_its_deepseek_v3_language_model_extended(tmp_path):
    # Kimi K2.5: a vision tower and a DeepSeek-V3 language model (text-only calls here)
    if not hasattr(transformers, "Kimi_K25Config"):
        pytest.skip(f"transformers {transformers.__version__} has no Kimi K2.5")
    config = transformers.Kimi_K25Config(
        text_config=dict(COMMON, **MLA, model_type="deepseek_v3"),
        vision_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64))
    torch.manual_seed(0)
    base = transformers.Kimi_K25ForConditionalGeneration(config).eval()
    model = apply_position_interpolation(copy.deepcopy(base), 2.0)
    text = model.config.text_config
    assert text.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert text.max_position_embeddings == 2 * WINDOW
    x = ids(2, 100)
    ref = type(base)(copy.deepcopy(model.config)).eval()
    ref.load_state_dict(base.state_dict())
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    model.save_pretrained(tmp_path)
    loaded = type(base).from_pretrained(tmp_path).eval()  # plain transformers
    assert_same(logits_and_grads(model, x), logits_and_grads(loaded, x))
