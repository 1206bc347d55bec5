"""pirope.integrations.transformers.apply_position_interpolation against Hugging Face's
own linear-scaled (Position Interpolation) LLaMA on the same weights.

Tiny random float32 models (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 256,
window 64) so the whole file runs in seconds on a CPU.
"""

import copy
import pickle

import pytest
import torch

import pirope

transformers = pytest.importorskip("transformers")
from pirope.integrations.transformers import (  # noqa: E402
    RopeTables,
    apply_position_interpolation,
    patch_rope,
)
from hf_compare import assert_same_grads, assert_same_logits, logits_and_grads  # noqa: E402

WINDOW = 64
THETA = 10000.0

def llama_config(window=WINDOW, rope=None, **kw):
    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=window,
                rope_parameters=rope or {"rope_type": "default", "rope_theta": THETA})
    args.update(kw)
    return transformers.LlamaConfig(**args)


def linear(factor):
    return {"rope_type": "linear", "factor": factor, "rope_theta": THETA}


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config()).eval()


def hf_pi_model(base, factor, window=None, **kw):
    """transformers' own PI model: rope_parameters linear `factor`, same weights."""
    ref = transformers.LlamaForCausalLM(
        llama_config(window or int(WINDOW * factor), linear(factor), **kw)).eval()
    ref.load_state_dict(base.state_dict())
    return ref


def with_attention(base, implementation):
    """A copy of the base model with transformers' attention backend `implementation`."""
    model = transformers.LlamaForCausalLM(llama_config(attn_implementation=implementation)).eval()
    model.load_state_dict(base.state_dict())
    return model


def ids(batch, seqlen, seed=1):
    return torch.randint(0, 256, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def _spy(monkeypatch, name):
    """Spies on pirope.<name>: records the shape of the first argument of every call."""
    calls = []
    real = getattr(pirope, name)

    def op(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(pirope, name, op)
    return calls


@pytest.fixture
def fused_stand_in(monkeypatch):
    """Spies on pirope.rope_attention: records the q shape of every fused call."""
    return _spy(monkeypatch, "rope_attention")


# ---- (a) attention="sdpa": logits and gradients ----------------------------------------


@pytest.mark.parametrize("seqlen", [48, 200])
def test_sdpa_logits_and_gradients_equal_transformers_linear(base_model, seqlen):
    ref = hf_pi_model(base_model, 4.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention="sdpa")
    assert model.config.rope_parameters == linear(4.0)
    assert model.config.max_position_embeddings == 4 * WINDOW
    x = ids(2, seqlen)
    la, ga = logits_and_grads(model, x)
    lb, gb = logits_and_grads(ref, x)
    assert_same_logits(la, lb)
    assert_same_grads(ga, gb)


def test_rope_really_goes_through_pirope(base_model, monkeypatch):
    model = apply_position_interpolation(copy.deepcopy(base_model), 2.0, attention="sdpa")
    assert isinstance(model.model.rotary_emb(torch.zeros(1, 3, 64), torch.arange(3)[None]), RopeTables)
    calls = []
    real = pirope.apply_rope_qk

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(pirope, "apply_rope_qk", spy)
    model(ids(1, 10))
    assert len(calls) == 2  # one per layer, q in (B, S, H, D)
    assert calls[0] == (1, 10, 4, 16)


# ---- (b) attention="fused" -----------------------------------------------------------


@pytest.mark.parametrize("seqlen", [48, 200])
def test_fused_logits_and_gradients_equal_transformers_linear(base_model, seqlen):
    ref = hf_pi_model(base_model, 4.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention="fused")
    x = ids(2, seqlen)
    la, ga = logits_and_grads(model, x)
    lb, gb = logits_and_grads(ref, x)
    assert_same_logits(la, lb)
    assert_same_grads(ga, gb)


def test_fused_path_stand_in(base_model, fused_stand_in):
    ref = hf_pi_model(base_model, 4.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention="fused")
    x = ids(2, 100)
    la, ga = logits_and_grads(model, x)
    assert len(fused_stand_in) == 2 and fused_stand_in[0] == (2, 100, 4, 16)
    lb, gb = logits_and_grads(ref, x)
    assert_same_logits(la, lb)
    assert_same_grads(ga, gb)


def test_attention_defaults_to_fused(base_model, fused_stand_in):
    # apply_position_interpolation(model, factor) without attention= is the "fused" mode:
    # attention runs through pirope.rope_attention, and the logits are transformers' own
    ref = hf_pi_model(base_model, 4.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0)
    x = ids(2, 100)
    with torch.no_grad():
        la, lb = model(x).logits, ref(x).logits
    assert fused_stand_in == [(2, 100, 4, 16)] * 2  # one fused call per layer
    assert_same_logits(la, lb)


def test_fused_path_stand_in_prefill_fills_the_cache_and_decode_matches(base_model, fused_stand_in):
    ref = hf_pi_model(base_model, 4.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention="fused")
    x = ids(1, 70)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=6, do_sample=False)
        expected = ref.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)
    assert len(fused_stand_in) == 2  # prefill only: decode steps have cached keys


def test_fused_path_stand_in_falls_back_for_padding(base_model, fused_stand_in):
    ref = hf_pi_model(base_model, 2.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 2.0, attention="fused")
    x = ids(2, 30)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        a = model(x, attention_mask=mask).logits
        b = ref(x, attention_mask=mask).logits
    assert fused_stand_in == []
    assert_same_logits(a[0], b[0])
    assert_same_logits(a[1, 7:], b[1, 7:])


# ---- (c) max_position_embeddings form, composition ------------------------------------


def test_max_position_embeddings_form(base_model):
    ref = hf_pi_model(base_model, 2.5, window=160)
    model = apply_position_interpolation(copy.deepcopy(base_model), max_position_embeddings=160,
                                         attention="sdpa")
    assert model.config.rope_parameters == linear(2.5)
    assert model.config.max_position_embeddings == model.model.rotary_emb.max_position_embeddings == 160
    x = ids(2, 150)
    with torch.no_grad():
        assert_same_logits(model(x).logits, ref(x).logits)
    # a factor whose window is fractional: rounded to the nearest position count (64 * 1.01 = 64.64)
    model = apply_position_interpolation(copy.deepcopy(base_model), 1.01)
    assert model.config.max_position_embeddings == model.model.rotary_emb.max_position_embeddings == 65
    assert model.config.rope_parameters == linear(1.01)


def test_composes_with_existing_linear_scaling(base_model):
    # a PI model (factor 2, window 128) extended again by 2 is transformers' factor-4 model
    torch.manual_seed(0)
    pi2 = hf_pi_model(base_model, 2.0)
    model = apply_position_interpolation(pi2, max_position_embeddings=256, attention="sdpa")
    assert model.config.rope_parameters == linear(4.0)
    assert model.config.max_position_embeddings == 256
    ref = hf_pi_model(base_model, 4.0)
    x = ids(1, 220)
    with torch.no_grad():
        assert_same_logits(model(x).logits, ref(x).logits)


def test_a_config_without_rope_parameters_is_plain_rope_at_its_rope_theta(base_model):
    # (transformers 5's configs hold rope_parameters; one with only a rope_theta means plain RoPE at it)
    model = copy.deepcopy(base_model)
    model.config.rope_parameters = None
    model.config.rope_theta = 5e5
    rotary = patch_rope(model).model.rotary_emb
    assert (rotary.base, rotary.scaling) == (5e5, None)


def test_legacy_type_key_in_a_configs_rope_parameters_is_read_as_rope_type(base_model):
    # ("type" is rope_type's legacy alias, which a config edited after its init may still hold)
    legacy = {"type": "linear", "factor": 2.0, "rope_theta": 5e5}
    model = copy.deepcopy(base_model)
    model.config.rope_parameters = dict(legacy)
    rotary = patch_rope(model).model.rotary_emb
    assert (rotary.base, rotary.scaling) == (5e5, {"rope_type": "linear", "factor": 2.0})
    model = copy.deepcopy(base_model)  # (the type key alone makes it a RoPE dict; the base: config.rope_theta)
    model.config.rope_parameters = {"type": "linear", "factor": 2.0}
    model.config.rope_theta = 5e5
    rotary = patch_rope(model).model.rotary_emb
    assert (rotary.base, rotary.scaling) == (5e5, {"rope_type": "linear", "factor": 2.0})
    model.config.rope_parameters = {"type": "linear", "factor": 2.0}  # (and PI of it keeps that base)
    rotary = apply_position_interpolation(model, 3.0).model.rotary_emb
    assert (rotary.base, rotary.scaling) == (5e5, {"rope_type": "linear", "factor": 6.0})
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 6.0, "rope_theta": 5e5}
    # Position Interpolation composes with the linear factor it names
    model = copy.deepcopy(base_model)
    model.config.rope_parameters = dict(legacy)
    rotary = apply_position_interpolation(model, 3.0).model.rotary_emb
    assert (rotary.base, rotary.scaling) == (5e5, {"rope_type": "linear", "factor": 6.0})


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 2.0},
    {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
], ids=lambda s: s["rope_type"])
def test_patch_rope_writes_the_default_original_window_as_transformers_does(base_model, scaling):
    # a windowed rope type without original_max_position_embeddings: the config gets the one transformers'
    # standardize_rope_params gives the same dict (the model's window), and equals transformers' model
    model = patch_rope(copy.deepcopy(base_model), copy.deepcopy(scaling))
    hf = llama_config(rope={**scaling, "rope_theta": THETA})
    assert model.config.rope_parameters == hf.rope_parameters
    assert hf.rope_parameters["original_max_position_embeddings"] == WINDOW
    ref = transformers.LlamaForCausalLM(hf).eval()
    ref.load_state_dict(base_model.state_dict())
    x = ids(1, 2 * WINDOW)  # past the original window, where the scaled types differ from plain RoPE
    with torch.no_grad():
        assert_same_logits(model(x).logits, ref(x).logits)


def test_llama_model_and_kv_cache_generate(base_model):
    ref = hf_pi_model(base_model, 4.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention="sdpa")
    x = ids(2, 80)
    with torch.no_grad():
        assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=False),
                           ref.generate(x, max_new_tokens=5, do_sample=False))
        # the bare LlamaModel works too
        inner = apply_position_interpolation(copy.deepcopy(base_model.model), 4.0, attention="sdpa")
        torch.testing.assert_close(inner(x).last_hidden_state, ref.model(x).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_eager_attention_and_output_attentions(base_model):
    ref = hf_pi_model(base_model, 2.0, attn_implementation="eager")
    eager = transformers.LlamaForCausalLM(llama_config(attn_implementation="eager")).eval()
    eager.load_state_dict(base_model.state_dict())
    model = apply_position_interpolation(eager, 2.0, attention="sdpa")
    x = ids(1, 40)
    with torch.no_grad():
        a = model(x, output_attentions=True)
        b = ref(x, output_attentions=True)
    assert_same_logits(a.logits, b.logits)
    assert len(a.attentions) == 2
    torch.testing.assert_close(a.attentions[1], b.attentions[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["fused", "sdpa"])
def test_output_attentions_asked_by_the_config(base_model, attention):
    # transformers reads config.output_attentions when the call does not pass the keyword,
    # and then no keyword reaches the attention layers: the fused path must still give way
    ref = hf_pi_model(base_model, 2.0, attn_implementation="eager")
    eager = transformers.LlamaForCausalLM(llama_config(attn_implementation="eager")).eval()
    eager.load_state_dict(base_model.state_dict())
    model = apply_position_interpolation(eager, 2.0, attention=attention)
    model.config.output_attentions = ref.config.output_attentions = True
    x = ids(2, 40)
    with torch.no_grad():
        a, b = model(x), ref(x)
        plain = model(x, output_attentions=False)  # the keyword still wins over the config
    assert_same_logits(a.logits, b.logits)
    assert len(a.attentions) == len(b.attentions) == 2
    for got, want in zip(a.attentions, b.attentions):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not plain.attentions
    assert_same_logits(plain.logits, b.logits)


# ---- (d) save_pretrained / from_pretrained with plain transformers --------------------


def test_save_pretrained_round_trips_with_plain_transformers(base_model, tmp_path):
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention="sdpa")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"  # no pirope inside
    assert loaded.config.rope_parameters["rope_type"] == "linear"
    assert loaded.config.rope_parameters["factor"] == 4.0
    assert loaded.config.max_position_embeddings == 256
    x = ids(2, 180)
    with torch.no_grad():
        assert_same_logits(loaded(x).logits, model(x).logits)


def phi3_model(partial=1.0, window=WINDOW, original=None):
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=window, original_max_position_embeddings=original or window,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": partial},
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.Phi3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_phi3_pi_is_saved_as_uniform_longrope_and_round_trips(partial, tmp_path):
    # transformers' Phi3Config rejects rope_type "linear": PI is written as the LongRoPE
    # scaling with one factor for every pair (and attention_factor 1), which plain
    # transformers loads back as the same model.
    model = apply_position_interpolation(phi3_model(partial), 4.0, attention="sdpa")
    params = model.config.rope_parameters
    rotary_pairs = int(16 * partial) // 2
    assert params["rope_type"] == "longrope" and params["attention_factor"] == 1.0
    assert params["short_factor"] == params["long_factor"] == [4.0] * rotary_pairs
    assert params["original_max_position_embeddings"] == WINDOW  # the pretraining window
    assert model.config.max_position_embeddings == 4 * WINDOW
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.model.rotary_emb).__name__ == "Phi3RotaryEmbedding"  # no pirope inside
    # the loaded model's frequencies are PI's: base^(-2i/d) / 4 (float64 reference)
    d = 2 * rotary_pairs
    want = THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) / 4.0
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq.double(), want, rtol=2e-7, atol=0)
    assert loaded.model.rotary_emb.attention_scaling == 1.0
    x = ids(2, 180)  # past the original window, inside the new one
    with torch.no_grad():
        assert_same_logits(loaded(x).logits, model(x).logits)
    # composing again: factor 4 * 2, still as LongRoPE
    again = apply_position_interpolation(loaded, 2.0, attention="sdpa")
    assert again.config.rope_parameters["short_factor"] == [8.0] * rotary_pairs
    assert again.config.rope_parameters["original_max_position_embeddings"] == WINDOW  # still the pretraining one
    assert again.config.max_position_embeddings == 8 * WINDOW


def test_phi3_pi_keeps_the_configs_original_window(tmp_path):
    # a Phi-3 whose config names a pretraining window below max_position_embeddings: the LongRoPE that
    # PI is written as keeps it (transformers would take the config's over the dict's on loading anyway)
    model = apply_position_interpolation(phi3_model(original=WINDOW // 2), 2.0, attention="sdpa")
    assert model.config.rope_parameters["original_max_position_embeddings"] == WINDOW // 2
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == model.config.rope_parameters
    x = ids(1, 2 * WINDOW - 10)
    with torch.no_grad():
        assert_same_logits(loaded(x).logits, model(x).logits)


def test_phi3_real_longrope_is_not_interpolated():
    # a LongRoPE model with per-pair factors (Phi-3-128k style) is not PI: refused
    model = phi3_model()
    model.config.rope_parameters = {
        "rope_type": "longrope", "rope_theta": THETA, "short_factor": [1.0] * 8,
        "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": WINDOW}
    with pytest.raises(ValueError, match="rope_type"):
        apply_position_interpolation(model, 2.0)
    # nor is uniform LongRoPE with LongRoPE's attention scaling (not PI's cos/sin)
    model.config.rope_parameters = {
        "rope_type": "longrope", "rope_theta": THETA, "short_factor": [2.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": WINDOW}
    with pytest.raises(ValueError, match="rope_type"):
        apply_position_interpolation(model, 2.0)
    # nor one factor for short sequences and another for long ones (PI by 2 within the window, by 4 past it)
    model.config.rope_parameters = {
        "rope_type": "longrope", "rope_theta": THETA, "short_factor": [2.0] * 8, "long_factor": [4.0] * 8,
        "attention_factor": 1.0, "original_max_position_embeddings": WINDOW}
    with pytest.raises(ValueError, match="rope_type"):
        apply_position_interpolation(model, 2.0)
    # nor empty factor lists (a config edited by hand)
    model.config.rope_parameters = {
        "rope_type": "longrope", "rope_theta": THETA, "short_factor": [], "long_factor": [],
        "attention_factor": 1.0, "original_max_position_embeddings": WINDOW}
    with pytest.raises(ValueError, match="rope_type"):
        apply_position_interpolation(model, 2.0)
    # nor per-pair factors the same for short and long sequences
    per_pair = [2.0 + i for i in range(8)]
    model.config.rope_parameters = {
        "rope_type": "longrope", "rope_theta": THETA, "short_factor": per_pair, "long_factor": list(per_pair),
        "attention_factor": 1.0, "original_max_position_embeddings": WINDOW}
    with pytest.raises(ValueError, match="rope_type"):
        apply_position_interpolation(model, 2.0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": WINDOW // 2, "rope_theta": THETA},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": WINDOW // 2, "rope_theta": THETA},
])
def test_position_interpolation_refused_on_a_scaled_checkpoint_says_how_to_extend_it(rope):
    # Llama 3.x and YaRN checkpoints: PI on top of their scaling is not defined; the error names
    # the patch_rope call that extends them by their own scaling, and that call, followed as
    # written, gives transformers' own model with that config
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(llama_config(rope=rope)).eval()
    with pytest.raises(ValueError, match=r"rope_type .*is not defined") as refused:
        apply_position_interpolation(copy.deepcopy(base), 2.0)
    advice = "patch_rope(model, {**model.config.get_text_config().rope_parameters, 'factor': 4.0})"
    assert advice in str(refused.value)
    model = copy.deepcopy(base)
    model = eval(advice, {"patch_rope": patch_rope, "model": model})  # noqa: S307 - the message's own call
    model.config.max_position_embeddings = 2 * WINDOW
    ref = transformers.LlamaForCausalLM(llama_config(2 * WINDOW, {**rope, "factor": 4.0})).eval()
    ref.load_state_dict(base.state_dict())
    x = ids(2, 100)
    with torch.no_grad():
        assert_same_logits(model(x).logits, ref(x).logits)


def test_position_interpolation_refused_on_longrope_gives_no_factor_recipe():
    # LongRoPE's per-pair factors are searched for one window: a larger "factor" key would not
    # extend it, so the message names patch_rope without a recipe
    model = phi3_model()
    model.config.rope_parameters = {
        "rope_type": "longrope", "rope_theta": THETA, "factor": 2.0, "short_factor": [1.0] * 8,
        "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": WINDOW}
    with pytest.raises(ValueError, match="patch_rope") as refused:
        apply_position_interpolation(model, 2.0)
    assert "'factor':" not in str(refused.value).split("is not defined", 1)[1]


# ---- (e) bad input -------------------------------------------------------------------


def test_bad_inputs(base_model):
    m = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match="factor"):
        apply_position_interpolation(m, 0.5)
    with pytest.raises(ValueError, match="factor"):
        apply_position_interpolation(m, float("nan"))
    with pytest.raises(TypeError, match="factor"):
        apply_position_interpolation(m, "4")
    with pytest.raises(TypeError, match="factor must be a real number"):
        apply_position_interpolation(m, True)
    with pytest.raises(ValueError, match="exactly one of factor"):
        apply_position_interpolation(m)
    with pytest.raises(ValueError, match="exactly one of factor"):
        apply_position_interpolation(m, 2.0, max_position_embeddings=128)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        apply_position_interpolation(m, max_position_embeddings=WINDOW)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        apply_position_interpolation(m, max_position_embeddings=32)
    with pytest.raises(TypeError, match="max_position_embeddings"):
        apply_position_interpolation(m, max_position_embeddings=128.0)
    with pytest.raises(TypeError, match="max_position_embeddings must be an int"):
        apply_position_interpolation(m, max_position_embeddings=True)
    with pytest.raises(ValueError, match="attention"):
        apply_position_interpolation(m, 2.0, attention="flash")
    with pytest.raises(ValueError, match="attention"):
        patch_rope(m, attention=None)
    with pytest.raises(TypeError, match="model"):
        apply_position_interpolation(torch.nn.Linear(2, 2), 2.0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match="model_type"):
        apply_position_interpolation(gpt2, 2.0)
    yarn = transformers.LlamaForCausalLM(llama_config(rope={"rope_type": "yarn", "factor": 2.0, "rope_theta": THETA}))
    with pytest.raises(ValueError, match="rope_type"):
        apply_position_interpolation(yarn, 2.0)
    with pytest.raises(ValueError, match="factor"):
        patch_rope(m, {"rope_type": "linear", "factor": 0.5})
    with pytest.raises(ValueError, match="rope_type"):
        patch_rope(m, {"rope_type": "ntk-by-parts", "factor": 2.0})
    with pytest.raises(TypeError, match="scaling"):
        patch_rope(m, "linear")
    # nothing was changed by the failed calls
    assert m.config.rope_parameters == {"rope_type": "default", "rope_theta": THETA}
    assert m.config.max_position_embeddings == WINDOW
    assert type(m.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"


# ---- (f) beyond the original window --------------------------------------------------


def test_long_sequences_beyond_original_window(base_model):
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention="sdpa")
    ref = hf_pi_model(base_model, 4.0)
    x = ids(1, 256)  # the full new window, 4x the original one
    with torch.no_grad():
        a = model(x).logits
        assert torch.isfinite(a).all()
        assert_same_logits(a, ref(x).logits)
    # and past the new window too (the table grows, as transformers' does)
    x = ids(1, 300)
    with torch.no_grad():
        assert_same_logits(model(x).logits, ref(x).logits)


def test_half_precision_keeps_float32_tables(base_model):
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention="sdpa").to(torch.bfloat16)
    rotary = model.model.rotary_emb
    tables = rotary(torch.zeros(1, 5, 64, dtype=torch.bfloat16), torch.arange(5)[None])
    assert tables.cos.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(ids(1, 20)).logits.float()).all()


def test_gradient_checkpointing_training(base_model):
    ref = hf_pi_model(base_model, 4.0).train()
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention="sdpa").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    x = ids(2, 120)
    la, ga = logits_and_grads(model, x)
    lb, gb = logits_and_grads(ref, x)
    assert_same_logits(la, lb)
    assert_same_grads(ga, gb)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_packed_sequences_position_ids_reset(base_model, fused_stand_in, attention):
    # padding-free training: sequences of 30 and 20 tokens packed in one row, positions
    # restarting at 0; without a cache transformers turns that into a block-diagonal mask,
    # which the fused path computes with rope_attention's cu_seqlens (on CPU)
    ref = hf_pi_model(base_model, 2.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 2.0, attention=attention)
    x = ids(1, 50)
    pos = torch.cat([torch.arange(30), torch.arange(20)])[None]
    la, ga = logits_and_grads(model, x, position_ids=pos)
    lb, gb = logits_and_grads(ref, x, position_ids=pos)
    with torch.no_grad():
        c = ref(x[:, 30:]).logits  # the second sequence alone
    assert_same_logits(la, lb)
    assert_same_grads(ga, gb)
    assert_same_logits(la[:, 30:], c)
    # fused: one packed call per layer, q as (total tokens, heads, head_dim)
    assert fused_stand_in == ([(50, 4, 16)] * 2 if attention == "fused" else [])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_rows_of_a_batch_fuse_like_transformers(base_model, fused_stand_in, implementation):
    # two rows, each its own packing; a sequence may start past position 0 (a continued
    # document): transformers' sequences are runs of consecutive positions
    ref = hf_pi_model(base_model, 2.0, attn_implementation=implementation)
    model = apply_position_interpolation(with_attention(base_model, implementation), 2.0, attention="fused")
    x = ids(2, 40)
    pos = torch.stack([torch.cat([torch.arange(25), torch.arange(15)]),
                       torch.cat([torch.arange(5, 15), torch.arange(7), torch.arange(23)])])
    la, ga = logits_and_grads(model, x, position_ids=pos)
    lb, gb = logits_and_grads(ref, x, position_ids=pos)
    assert_same_logits(la, lb)
    assert_same_grads(ga, gb)
    assert fused_stand_in == [(80, 4, 16)] * 2


def test_eager_causal_mask_takes_the_fused_path(base_model, fused_stand_in):
    # eager always builds a mask tensor; when it is the plain causal one, the call fuses
    ref = hf_pi_model(base_model, 2.0, attn_implementation="eager")
    model = apply_position_interpolation(with_attention(base_model, "eager"), 2.0, attention="fused")
    x = ids(2, 30)
    la, ga = logits_and_grads(model, x)
    lb, gb = logits_and_grads(ref, x)
    assert_same_logits(la, lb)
    assert_same_grads(ga, gb)
    assert fused_stand_in == [(2, 30, 4, 16)] * 2


def test_packed_positions_with_an_attention_mask_are_not_split(base_model, fused_stand_in):
    # with an attention mask given, transformers does not look for packed sequences: every
    # token sees the whole row before it, whatever the positions (and so does pirope)
    ref = hf_pi_model(base_model, 2.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 2.0, attention="fused")
    x = ids(1, 50)
    pos = torch.cat([torch.arange(30), torch.arange(20)])[None]
    mask = torch.ones(1, 50, dtype=torch.long)
    with torch.no_grad():
        a = model(x, position_ids=pos, attention_mask=mask, use_cache=False).logits
        b = ref(x, position_ids=pos, attention_mask=mask, use_cache=False).logits
        c = ref(x[:, 30:], position_ids=pos[:, 30:]).logits
    assert_same_logits(a, b)
    assert not torch.allclose(a[:, 30:], c, atol=1e-3)  # the second part did see the first
    assert all(shape[0] != 50 for shape in fused_stand_in)  # never split into sequences


def test_segments_of_mask_accepts_only_the_exact_mask():
    from pirope.integrations.transformers.fusing import _segments_of_mask

    q = torch.zeros(1, 6, 2, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    same = torch.tensor([0, 0, 0, 1, 1, 1])
    block = (same[:, None] == same[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    assert _segments_of_mask(q, block[None, None], pos, True).tolist() == [0, 3, 6]
    # the additive float form of the same mask (eager)
    additive = torch.zeros(6, 6).masked_fill(~block, torch.finfo(torch.float32).min)
    assert _segments_of_mask(q, additive[None, None], pos, True).tolist() == [0, 3, 6]
    for wrong in (torch.ones(6, 6, dtype=torch.bool).tril(),  # attends across the sequences
                  block & ~torch.eye(6, dtype=torch.bool),  # a token that does not see itself
                  block.clone().fill_diagonal_(True) & (torch.arange(6)[None, :] >= 1)):  # key 0 hidden
        assert _segments_of_mask(q, wrong[None, None], pos, True) is None
    assert _segments_of_mask(q, additive.masked_fill(block, 0.5)[None, None], pos, True) is None  # a bias
    # a finite bias where the mask hides a key: softmax still gives that key weight, so no fusing
    assert _segments_of_mask(q, additive.masked_fill(~block, -5.0)[None, None], pos, True) is None
    assert _segments_of_mask(q, additive.masked_fill(~block, float("-inf"))[None, None], pos, True).tolist() == [0, 3, 6]
    assert _segments_of_mask(q, block.long()[None, None], pos, True) is None  # neither bool nor additive
    # with a sliding window of 2 (transformers' kv_idx > q_idx - 2): each token and its predecessor
    banded = block & (torch.arange(6)[None, :] > torch.arange(6)[:, None] - 2)
    assert _segments_of_mask(q, banded[None, None], pos, True, window=2).tolist() == [0, 3, 6]
    assert _segments_of_mask(q, block[None, None], pos, True, window=2) is None  # no band in the mask
    assert _segments_of_mask(q, banded[None, None], pos, True) is None  # a band rope_attention was not told of
    assert _segments_of_mask(q, block[None, None], pos, None) is None  # packing unknown (compile)
    # with chunks of 2 tokens (Llama 4's, by index in the row), intersected with the sequences: starts 0 2 3 4
    plain = torch.arange(6)[None]
    chunks = torch.ones(6, 6, dtype=torch.bool).tril() & (plain.T // 2 == plain // 2)
    assert _segments_of_mask(q, chunks[None, None], plain, False, chunk=2).tolist() == [0, 2, 4, 6]
    both = block & (plain.T // 2 == plain // 2)
    assert _segments_of_mask(q, both[None, None], pos, True, chunk=2).tolist() == [0, 2, 3, 4, 6]
    assert _segments_of_mask(q, chunks[None, None], plain, False) is None  # chunks rope_attention was not told of
    assert _segments_of_mask(q, block[None, None], pos, True, chunk=2) is None  # no chunks in the mask
    assert _segments_of_mask(q, None, pos, True) is None
    assert _segments_of_mask(q, block[None, None, :5, :5], pos, True) is None  # wrong shape


def test_deepcopy_of_a_patched_model_uses_its_own_weights(base_model):
    model = apply_position_interpolation(copy.deepcopy(base_model), 2.0, attention="sdpa")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.model.layers[0].self_attn.parameters():
            p.mul_(0.5)
        x = ids(1, 20)
        assert not torch.allclose(clone(x).logits, model(x).logits)
        clone.model.layers[0].self_attn.load_state_dict(model.model.layers[0].self_attn.state_dict())
        assert_same_logits(clone(x).logits, model(x).logits)


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_torch_compile_fullgraph_equals_transformers(base_model, attention):
    """A patched model compiles with torch.compile(fullgraph=True), as transformers' own
    does (the rotary module reads no device value on the host while compiling), and the
    compiled model's logits and gradients equal transformers' linear-scaled model's."""
    torch._dynamo.reset()
    ref = hf_pi_model(base_model, 4.0)
    model = apply_position_interpolation(copy.deepcopy(base_model), 4.0, attention=attention)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = ids(2, 200)
    la, ga = logits_and_grads(compiled, x)
    lb, gb = logits_and_grads(ref, x)
    assert_same_logits(la, lb)
    assert_same_grads({n.removeprefix("_orig_mod."): g for n, g in ga.items()}, gb)
    with torch.no_grad():  # positions past the table the eager model built: new rows too
        pos = torch.arange(300, 340)[None]
        assert_same_logits(compiled(x[:, :40], position_ids=pos, use_cache=False).logits,
                           ref(x[:, :40], position_ids=pos, use_cache=False).logits)


# ---- (g) evaluation then training, torch.save / pickle ---------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_training_step_after_an_inference_mode_forward_equals_transformers(base_model, attention):
    # evaluation under torch.inference_mode() builds (and caches) the cos/sin table; the
    # training step that follows saves that table for backward, so it must not be an
    # inference tensor
    if attention == "sdpa":
        model = patch_rope(copy.deepcopy(base_model), attention="sdpa")
        ref = copy.deepcopy(base_model)
    else:
        model = apply_position_interpolation(copy.deepcopy(base_model), 2.0, attention="fused")
        ref = hf_pi_model(base_model, 2.0)
    x = ids(2, 40)
    with torch.inference_mode():
        model(x)
    model.zero_grad(set_to_none=True)
    out = model(x, labels=x, use_cache=False)
    out.loss.backward()
    ref_out = ref(x, labels=x, use_cache=False)
    ref_out.loss.backward()
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    ga = model.model.layers[0].self_attn.q_proj.weight.grad
    gb = ref.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5 * gb.abs().max().item())


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_saved_pickled_or_copied_patched_model_loads_and_still_runs_pirope(base_model, tmp_path, monkeypatch, how):
    from pirope.integrations.transformers import PiropeRotaryEmbedding

    model = apply_position_interpolation(copy.deepcopy(base_model), 2.0, attention="sdpa")
    x = ids(1, 20)
    with torch.no_grad():
        before = model(x).logits
    if how == "torch.save":
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    elif how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        loaded = copy.deepcopy(model)
    assert isinstance(loaded.model.rotary_emb, PiropeRotaryEmbedding)
    calls = _spy(monkeypatch, "apply_rope_qk")
    with torch.no_grad():
        after = loaded(x).logits
    assert len(calls) == 2  # one per layer: the loaded attention still rotates with pirope
    assert_same_logits(after, before)
    # the loaded attention forward runs the loaded module (its weights), not the original's
    with torch.no_grad():
        for p in loaded.model.layers[0].self_attn.parameters():
            p.mul_(0.5)
        assert not torch.allclose(loaded(x).logits, before)
        assert_same_logits(model(x).logits, before)


def test_pickle_from_before_the_integration_became_a_package_loads(base_model):
    # whole-model pickles saved when the integration was one module (before commit d81f6d3) name
    # its private classes and functions there: simulated by a text-protocol pickle whose module
    # paths are rewritten to the package's, then loaded and run
    model = apply_position_interpolation(copy.deepcopy(base_model), 2.0, attention="fused")
    data = pickle.dumps(model, protocol=2)  # GLOBAL opcodes: "c<module>\n<name>\n"
    old = data
    for sub in ("families", "layout", "rope_parameters", "rotary", "fusing", "attention", "patch"):
        old = old.replace(f"cpirope.integrations.transformers.{sub}\n".encode(),
                          b"cpirope.integrations.transformers\n")
    assert old != data and b"transformers.families" not in old and b"cpirope.integrations.transformers\n_" in old
    loaded = pickle.loads(old)
    x = ids(1, 20)
    with torch.no_grad():
        assert_same_logits(loaded(x).logits, model(x).logits)
    import pirope.integrations.transformers as package
    from pirope.integrations.transformers import families

    assert package._Family is families._Family
    with pytest.raises(AttributeError, match="no attribute '_not_a_name'"):
        package._not_a_name


# ---- (h) Phi-3: patch_rope with a linear scaling dict ---------------------------------


def test_phi3_patch_rope_linear_is_written_as_longrope_and_round_trips(tmp_path):
    model = patch_rope(phi3_model(), {"rope_type": "linear", "factor": 2.0}, attention="sdpa")
    params = model.config.rope_parameters
    assert params["rope_type"] == "longrope" and params["attention_factor"] == 1.0
    assert params["short_factor"] == params["long_factor"] == [2.0] * 8  # rotary_dim 16 // 2
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.model.rotary_emb).__name__ == "Phi3RotaryEmbedding"  # no pirope inside
    x = ids(2, 100)  # past original_max_position_embeddings too
    with torch.no_grad():
        assert_same_logits(loaded(x).logits, model(x).logits)
        assert_same_logits(loaded(x[:, :30]).logits, model(x[:, :30]).logits)


def test_phi3_patch_rope_default_undoes_pi_and_round_trips(tmp_path):
    # "default" is one of the two rope types Phi-3's config class accepts: plain RoPE again, as
    # transformers builds it from the same config (its partial_rotary_factor kept)
    base = phi3_model(partial=0.5)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="sdpa")
    model = patch_rope(model, {"rope_type": "default"}, attention="sdpa")
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": 0.5}
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(2, 100)
    with torch.no_grad():
        assert_same_logits(loaded(x).logits, model(x).logits)
        assert_same_logits(base(x).logits, model(x).logits)  # the model before PI


def test_phi3_pi_of_rope_parameters_without_rope_theta_takes_the_configs():
    # (a config edited after its init: rope_parameters without rope_theta, which config.rope_theta gives)
    base = phi3_model()
    base.config.rope_parameters = {"rope_type": "default"}
    base.config.rope_theta = 5e5
    for extend in (lambda m: apply_position_interpolation(m, 2.0, attention="sdpa"),
                   lambda m: patch_rope(m, {"rope_type": "linear", "factor": 2.0}, attention="sdpa")):
        model = extend(copy.deepcopy(base))
        params = model.config.rope_parameters
        assert (params["rope_type"], params["rope_theta"], params["short_factor"]) == ("longrope", 5e5, [2.0] * 8)
        assert model.model.rotary_emb.base == 5e5


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "llama3"])
def test_phi3_patch_rope_with_a_scaling_phi3_cannot_hold_is_refused_unchanged(rope_type):
    model = phi3_model()
    before = copy.deepcopy(model.config.rope_parameters)
    scaling = {"rope_type": rope_type, "factor": 2.0}
    if rope_type == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=WINDOW)
    with pytest.raises(ValueError, match="scaling"):
        patch_rope(model, scaling, attention="sdpa")
    assert model.config.rope_parameters == before
    assert model.config.max_position_embeddings == WINDOW
    assert type(model.model.rotary_emb).__name__ == "Phi3RotaryEmbedding"
    assert "forward" not in vars(model.model.layers[0].self_attn)  # attention not patched either


# ---- (i) factors and windows past int64 --------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    ({"factor": 1e300}, "factor"),
    ({"factor": 1e308}, "factor"),
    ({"max_position_embeddings": 10**400}, "max_position_embeddings"),
])
def test_window_past_int64_is_a_value_error_naming_the_argument(base_model, kwargs, name):
    m = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match=name):
        apply_position_interpolation(m, **kwargs)
    assert m.config.rope_parameters == {"rope_type": "default", "rope_theta": THETA}
    assert m.config.max_position_embeddings == WINDOW
    assert type(m.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"


# ---- (j) negative position_ids (cumsum - 1 at left padding) ---------------------------


@pytest.mark.parametrize("how", ["patch_rope-sdpa", "pi-1.0-fused", "pi-2.0-fused", "dynamic-fused"])
def test_negative_position_ids_at_left_padding_equal_transformers(base_model, how):
    n = 30
    if how == "patch_rope-sdpa":
        model = patch_rope(copy.deepcopy(base_model), attention="sdpa")
        ref = base_model
    elif how == "dynamic-fused":  # past the window: the table of the call's length, max(position_ids) + 1
        torch.manual_seed(0)
        ref = transformers.LlamaForCausalLM(llama_config(rope={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": THETA})).eval()
        model, n = patch_rope(copy.deepcopy(ref), attention="fused"), 100
    else:
        factor = float(how.split("-")[1])
        model = apply_position_interpolation(copy.deepcopy(base_model), factor, attention="fused")
        ref = hf_pi_model(base_model, factor)
    x = ids(2, n)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :7] = 0
    pos = mask.cumsum(-1) - 1  # -1 at the padded tokens, as generate() / many trainers write it
    assert pos.min() == -1
    with torch.no_grad():
        a = model(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
        b = ref(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert_same_logits(a[0], b[0])
    assert_same_logits(a[1, 7:], b[1, 7:])


# ---- (k) partial_rotary_factor on a llama config ----------------------------------------


def test_llama_config_with_partial_rotary_factor_is_interpolated_like_transformers(base_model, tmp_path):
    # transformers' default RoPE ignores partial_rotary_factor for llama (rotates the whole head)
    rope = {"rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": 0.5}
    model = transformers.LlamaForCausalLM(llama_config(rope=rope)).eval()
    model.load_state_dict(base_model.state_dict())
    apply_position_interpolation(model, 2.0, attention="fused")
    assert "partial_rotary_factor" not in model.config.rope_parameters
    assert model.config.rope_parameters == linear(2.0)
    ref = hf_pi_model(base_model, 2.0)
    x = ids(2, 100)
    with torch.no_grad():
        got = model(x).logits
        assert_same_logits(got, ref(x).logits)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"
    with torch.no_grad():
        assert_same_logits(loaded(x).logits, got)


# ---- (l) huge position offsets ---------------------------------------------------------


def test_huge_position_offset_builds_only_its_rows_and_equals_relative_positions(base_model):
    # RoPE attention depends on relative positions only: positions 5_000_000 .. +7 give the
    # logits of positions 0 .. 7 (transformers' own model at 0..7 is the reference; its
    # float32 angles at 5e6 would be off by ~0.3 rad, so it is not run there)
    model = patch_rope(copy.deepcopy(base_model), attention="sdpa")
    x = ids(1, 8)
    pos = torch.arange(8)[None] + 5_000_000
    with torch.no_grad():
        tables = model.model.rotary_emb(torch.zeros(1, 8, 64), pos)
        a = model(x, position_ids=pos, use_cache=False).logits
        b = base_model(x, position_ids=torch.arange(8)[None], use_cache=False).logits
    assert tables.cos.shape[0] < 100_000
    assert all(cos.shape[0] < 100_000 for _, cos, _ in model.model.rotary_emb._cache.values())
    assert_same_logits(a, b)
