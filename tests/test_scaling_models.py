"""Issue 3: Hugging Face models built with every rope_scaling configuration give the same
logits when their RoPE runs through pirope (pirope.integrations.transformers.patch_rope),
and pirope.RotaryEmbedding's length-dependent ("dynamic", "longrope") behaviour.

Tolerance. transformers computes the angles ``position * inv_freq`` in float32 (error up
to ``position * 6e-8`` rad: 8e-6 rad at position 128), pirope in float64 before
rounding cos/sin to float32. With sequences of at most 128 tokens the logits of the tiny
float32 models below agree to rtol 1e-5 / atol 1e-5 (logits are O(1)); at longer
positions the two differ by HF's angle error, not by a pirope bug.
"""

import copy
import math

import pytest
import torch

import pirope

transformers = pytest.importorskip("transformers")
from pirope.integrations.transformers import patch_rope  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

WINDOW = 64
HEAD_DIM = 16
PAIRS = HEAD_DIM // 2
TOL = dict(rtol=1e-5, atol=1e-5)

SHORT = [1.0 + 0.05 * i for i in range(PAIRS)]
LONG = [1.0 + 0.5 * i for i in range(PAIRS)]

CONFIGS = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, WINDOW),
    "linear": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 4 * WINDOW),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, WINDOW),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
              "original_max_position_embeddings": WINDOW}, 4 * WINDOW),
    "yarn_mscale": ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2, "truncate": False,
                     "original_max_position_embeddings": WINDOW}, 4 * WINDOW),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "rope_theta": 500000.0, "original_max_position_embeddings": 32}, 8 * 32),
    "longrope": ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "rope_theta": 10000.0,
                  "original_max_position_embeddings": WINDOW}, 4 * WINDOW),
    # Gemma 4's: the first half of the head's pairs rotate (divided by the factor), the rest do not
    "proportional": ({"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 4.0,
                      "rope_theta": 10000.0}, 4 * WINDOW),
}


def llama(rope, window, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=window,
        rope_parameters=copy.deepcopy(rope), **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(batch, seqlen, seed=1):
    return torch.randint(0, 256, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def compare(model, lengths, batch=2):
    """Logits of fresh copies of `model` (HF) and of its pirope-patched copy, per length."""
    patched = patch_rope(copy.deepcopy(model))
    for n in lengths:
        hf = copy.deepcopy(model)  # fresh: transformers' dynamic RoPE keeps state between calls
        x = ids(batch, n, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(patched(x).logits, hf(x).logits, **TOL, msg=f"length {n}")
    return patched


# ---- every rope_scaling type through the patched model ------------------------------


@pytest.mark.parametrize("name", ["default", "linear", "yarn", "yarn_mscale", "llama3", "proportional"])
def test_static_scalings_equal_transformers(name):
    rope, window = CONFIGS[name]
    compare(llama(rope, window), [17, 128])


def test_dynamic_below_at_and_above_the_window():
    rope, window = CONFIGS["dynamic"]
    patched = compare(llama(rope, window), [40, WINDOW, WINDOW + 1, 100, 128])
    # a later short request on the same patched model is unaffected by the long ones
    x = ids(1, 40, seed=40)
    with torch.no_grad():
        torch.testing.assert_close(patched(x).logits, llama(rope, window)(x).logits, **TOL)


def test_dynamic_reads_the_models_window_not_an_original_one_in_its_parameters():
    # transformers' dynamic NTK stretches its base past config.max_position_embeddings, whatever
    # original_max_position_embeddings its rope_parameters hold (a checkpoint may write one): at 40
    # tokens, past that key's 32 but within the window, the base is still the original one
    rope = dict(CONFIGS["dynamic"][0], original_max_position_embeddings=WINDOW // 2)
    compare(llama(rope, WINDOW), [40, WINDOW + 1, 100])


def test_dynamic_generation_matches_transformers():
    # prefill below the window, decode past it: both recompute the base as the length grows
    rope, window = CONFIGS["dynamic"]
    model = llama(rope, window)
    patched = patch_rope(copy.deepcopy(model))
    x = ids(1, WINDOW - 3)
    with torch.no_grad():
        a = patched.generate(x, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
        b = model.generate(x, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), **TOL)


def test_longrope_short_and_long_factors():
    rope, window = CONFIGS["longrope"]
    # <= original window: short_factor; above: long_factor (and the attention factor always)
    compare(llama(rope, window), [30, WINDOW, WINDOW + 1, 128])


def test_longrope_with_explicit_factor_and_attention_factor():
    rope, window = CONFIGS["longrope"]
    rope = dict(rope, factor=3.0, attention_factor=1.3)
    compare(llama(rope, window), [50, 100])


def test_scaling_argument_replaces_the_config():
    # the model's rope_theta is kept; original_max_position_embeddings defaults to the
    # model's window, as transformers' standardize_rope_params does
    window = 4 * WINDOW
    model = llama({"rope_type": "default", "rope_theta": 500.0}, window)
    patched = patch_rope(copy.deepcopy(model), {"rope_type": "yarn", "factor": 4.0})
    assert patched.config.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0,
                                              "original_max_position_embeddings": window}
    ref = llama({"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}, window)
    ref.load_state_dict(model.state_dict())
    x = ids(1, 90)
    with torch.no_grad():
        torch.testing.assert_close(patched(x).logits, ref(x).logits, **TOL)


def test_scaling_argument_proportional_keeps_the_configs_partial_rotary_factor():
    # "proportional" reads partial_rotary_factor (the share of the pairs that rotate) on any
    # architecture, so a new proportional dict without its own keeps the config's, as rope_theta
    rope = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 10000.0}
    model = llama(rope, WINDOW)
    patched = patch_rope(copy.deepcopy(model), {"rope_type": "proportional", "factor": 4.0})
    assert patched.config.rope_parameters == dict(rope, factor=4.0)
    ref = llama(dict(rope, factor=4.0), WINDOW)
    ref.load_state_dict(model.state_dict())
    x = ids(1, 90)
    with torch.no_grad():
        torch.testing.assert_close(patched(x).logits, ref(x).logits, **TOL)
        # it matters: a quarter of the pairs rotating is not the whole head
        assert not torch.allclose(patched(x).logits, patch_rope(copy.deepcopy(model), {
            "rope_type": "proportional", "factor": 4.0, "partial_rotary_factor": 1.0})(x).logits, **TOL)


def test_llama_ignores_partial_rotary_factor_like_transformers():
    # LlamaRotaryEmbedding's default init rotates the whole head whatever the factor says
    model = llama({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, WINDOW)
    compare(model, [50])


# ---- partial rotary: Phi-3 (fused qkv_proj, rotates the first rotary_dim features) ---


def phi3(rope, window, original, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=window,
        original_max_position_embeddings=original, rope_parameters=copy.deepcopy(rope),
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.Phi3ForCausalLM(cfg).eval()


def test_phi3_partial_rotary_default():
    model = phi3({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, WINDOW, WINDOW)
    assert model.model.rotary_emb.inv_freq.numel() == PAIRS // 2
    compare(model, [20, 100])


def test_phi3_partial_rotary_longrope():
    half = PAIRS // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": SHORT[:half], "long_factor": LONG[:half]}
    model = phi3(rope, 4 * WINDOW, WINDOW)
    assert model.config.rope_parameters["original_max_position_embeddings"] == WINDOW
    compare(model, [40, WINDOW, WINDOW + 1, 120])


def test_mistral_family():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=4 * WINDOW, sliding_window=None,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    compare(transformers.MistralForCausalLM(cfg).eval(), [100])


# ---- pirope.RotaryEmbedding: dynamic / longrope behaviour -----------------------------


def hf_rotary(rope, window):
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=window, rope_parameters=copy.deepcopy(rope))
    return LlamaRotaryEmbedding(cfg)


def pirope_rotary(rope, window):
    rope = dict(rope)
    theta = rope.pop("rope_theta")
    return pirope.RotaryEmbedding(HEAD_DIM, max_position_embeddings=window, base=theta, scaling=rope)


def run(module, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, 4, HEAD_DIM, generator=g)
    k = torch.randn(1, n, 2, HEAD_DIM, generator=g)
    return module(q, k, torch.arange(n)[None])


def hf_cos_sin(rope, window, n):
    """cos/sin (n, pairs) of a fresh transformers LlamaRotaryEmbedding call of length n."""
    hf = hf_rotary(rope, window)
    cos, sin = hf(torch.zeros(1, n, 64), torch.arange(n)[None])
    return cos[0, :, :PAIRS], sin[0, :, :PAIRS]


def angle_tol(n):
    # HF float32 angles: |error| <= position * inv_freq * 2**-24 <= n * 6e-8
    return dict(rtol=0, atol=max(2e-6, 2 * n * 6e-8))


@pytest.mark.parametrize("n", [20, WINDOW, WINDOW + 1, 100, 200])
def test_rotary_embedding_dynamic_table_equals_transformers_fresh_call(n):
    rope, window = CONFIGS["dynamic"]
    module = pirope_rotary(rope, window)
    run(module, n)
    cos, sin = hf_cos_sin(rope, window, n)
    torch.testing.assert_close(module.cos[:n], cos, **angle_tol(n))
    torch.testing.assert_close(module.sin[:n], sin, **angle_tol(n))


def test_rotary_embedding_dynamic_long_call_does_not_change_a_later_short_one():
    rope, window = CONFIGS["dynamic"]
    module = pirope_rotary(rope, window)
    for short in (40, WINDOW, 100):
        run(module, 256, seed=5)  # a long request first
        got = run(module, short, seed=short)
        want = run(pirope_rotary(rope, window), short, seed=short)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), short


def test_rotary_embedding_dynamic_table_is_recomputed_as_length_grows():
    rope, window = CONFIGS["dynamic"]
    module = pirope_rotary(rope, window)
    run(module, WINDOW)
    plain = pirope.rope_cos_sin(pirope.rope_frequencies(HEAD_DIM, max_position_embeddings=window)[0], WINDOW)[0]
    torch.testing.assert_close(module.cos[:WINDOW], plain, rtol=0, atol=1e-6)  # inside: plain RoPE
    tables = []
    for n in (100, 150, 200):
        run(module, n)
        assert module.cos.shape[0] >= n
        tables.append(module.cos[10].clone())
    # the NTK base grows with the length: lower frequencies, different angles at position 10
    assert not torch.equal(tables[0], tables[1]) and not torch.equal(tables[1], tables[2])
    # the table of a length equals what rope_frequencies gives for it (tensor seq_len, as HF's forward)
    inv, attn = pirope.rope_frequencies(HEAD_DIM, scaling={"rope_type": "dynamic", "factor": 2.0},
                                        max_position_embeddings=window, seq_len=torch.tensor(200))
    assert torch.equal(module.cos[:200], pirope.rope_cos_sin(inv, 200, attn)[0])


def test_rotary_embedding_longrope_switches_at_original_window():
    rope, window = CONFIGS["longrope"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    short = pirope.rope_frequencies(HEAD_DIM, scaling=scaling, max_position_embeddings=window)
    long = pirope.rope_frequencies(HEAD_DIM, scaling=scaling, max_position_embeddings=window, seq_len=WINDOW + 1)
    assert short[1] == long[1] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(WINDOW)))
    module = pirope_rotary(rope, window)
    for n, (inv, attn) in ((WINDOW, short), (WINDOW + 1, long), (30, short), (200, long), (WINDOW, short)):
        run(module, n)
        assert torch.equal(module.cos[:n], pirope.rope_cos_sin(inv, n, attn)[0]), n
        cos, sin = hf_cos_sin(rope, window, n)
        torch.testing.assert_close(module.cos[:n], cos, **angle_tol(n))
        torch.testing.assert_close(module.sin[:n], sin, **angle_tol(n))


@pytest.mark.parametrize("name", ["linear", "yarn", "llama3", "proportional"])
def test_rotary_embedding_static_tables_equal_transformers(name):
    rope, window = CONFIGS[name]
    module = pirope_rotary(rope, window)
    run(module, 100)
    cos, sin = hf_cos_sin(rope, window, 100)
    torch.testing.assert_close(module.cos[:100], cos, **angle_tol(100))
    torch.testing.assert_close(module.sin[:100], sin, **angle_tol(100))
