"""Every architecture pirope.integrations.transformers supports, against transformers' own
model on the same weights: Position Interpolation by apply_position_interpolation gives
the logits and gradients of the model transformers builds from the updated config, on
both attention paths; sliding windows and Qwen3's q/k norms are followed; a fused prefill
then cached decoding generates what transformers generates.

Tiny random float32 models (hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16),
seconds on a CPU.
"""

import copy

import pytest
import torch

import pirope

transformers = pytest.importorskip("transformers")
from pirope.integrations.transformers import SUPPORTED_MODEL_TYPES, apply_position_interpolation, patch_rope  # noqa: E402
from hf_compare import assert_same_grads, assert_same_logits, logits_and_grads  # noqa: E402

WINDOW = 64
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=WINDOW)

# model_type -> (config class, model class, what sets the family apart in a tiny model)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(sliding_window=4096)),
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
}


def test_every_supported_family_is_tested_here():
    assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)


def make(model_type, seed=0, **kw):
    config_cls, model_cls, extra = FAMILIES[model_type]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **kw})
    assert config.model_type == model_type
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


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


@pytest.fixture
def fused_calls(monkeypatch):
    """Records the q shape of every pirope.rope_attention call."""
    calls = []
    real = pirope.rope_attention

    def spy(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(pirope, "rope_attention", spy)
    return calls


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_position_interpolation_equals_transformers(model_type, attention, fused_calls):
    base = make(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention=attention)
    assert model.config.max_position_embeddings == 2 * WINDOW
    ref = twin(base, model.config)  # the PI model as transformers builds it from the config
    x = ids(2, 100)  # past the original window
    assert_same(logits_and_grads(model, x), logits_and_grads(ref, x))
    # the fused kernel ran in every layer (no window here is shorter than the sequence)
    assert fused_calls == ([(2, 100, 4, 16)] * 2 if attention == "fused" else [])


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe"])
def test_qk_norms_run_before_rope(model_type):
    # scaled norm weights: a patch that skipped or misplaced them would change the logits
    base = make(model_type)
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.2, 3.0)
            layer.self_attn.k_norm.weight.uniform_(0.2, 3.0)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x = ids(1, 50)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))


def windowed(model_type):
    """A model whose layer 0 attends within a 16-token window (layer 1: as configured)."""
    if model_type == "mistral":
        return make(model_type, sliding_window=16)  # every layer
    return make(model_type, sliding_window=16, use_sliding_window=True,
                layer_types=["sliding_attention", "full_attention"])


@pytest.mark.parametrize("model_type", ["mistral", "ministral", "qwen2", "qwen3"])
def test_sliding_windows_are_followed(model_type, fused_calls):
    base = windowed(model_type)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    windowed_layers = 2 if model_type == "mistral" else 1
    for seqlen, fused in ((40, 2 - windowed_layers), (15, 2)):  # past the window / within it
        fused_calls.clear()
        x = ids(2, seqlen, seed=seqlen)
        assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
        assert len(fused_calls) == fused, seqlen


@pytest.mark.parametrize("model_type", ["qwen3", "gemma", "granite"])
def test_fused_prefill_then_cached_decoding_generates_like_transformers(model_type, fused_calls):
    base = make(model_type)
    model = apply_position_interpolation(copy.deepcopy(base), 2.0, attention="fused")
    ref = twin(base, model.config)
    x = ids(1, 70)
    with torch.no_grad():
        a = model.generate(x, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        b = ref.generate(x, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-5, atol=1e-5)
    assert fused_calls == [(1, 70, 4, 16)] * 2  # the prefill; the decode steps take the cached path


def test_bidirectional_gemma_takes_the_exact_path(fused_calls):
    base = make("gemma", use_bidirectional_attention=True)
    model = patch_rope(copy.deepcopy(base), attention="fused")
    x = ids(1, 30)
    assert_same(logits_and_grads(model, x), logits_and_grads(twin(base), x))
    assert fused_calls == []  # rope_attention is causal only


def test_no_fused_call_where_a_window_without_mask_would_cut_keys():
    # attention implementations that apply the window themselves (flash_attention_2) get no
    # mask tensor: the window alone must keep such a layer off the fused path
    from pirope.integrations.transformers import _can_fuse

    model = patch_rope(windowed("qwen3"), attention="fused")
    windowed_attn, full_attn = (layer.self_attn for layer in model.model.layers)
    assert not _can_fuse(windowed_attn, 17, None, None, {})
    assert _can_fuse(windowed_attn, 16, None, None, {})
    assert _can_fuse(full_attn, 17, None, None, {})
