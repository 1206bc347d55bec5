"""The README's drop-in recipes ("Drop-in recipes") give the same results as the
code they replace:

(i)   Hugging Face: apply_position_interpolation(model, 4.0) == transformers' own
      rope_parameters {"rope_type": "linear", "factor": 4.0} model; a YaRN checkpoint's
      factor doubled by patch_rope == transformers' model with that config;
(ii)  Meta-style LLaMA code: precompute_freqs_cis / apply_rotary_emb (complex numbers
      on interleaved pairs) with PI as t = arange(end) / factor ==
      pirope.apply_rope_qk(..., interleaved=True) with pirope.rope_cos_sin tables;
(iii) a plain nn.Module attention: pirope.RotaryEmbedding == hand-written rotate_half
      RoPE with PI.

The originals compute the angles in float32 (t / factor * inv_freq), pirope in float64,
so results agree to float32 rounding of angles up to ~100 rad: atol 1e-4 on O(1) values.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pirope

ANGLE_TOL = dict(rtol=1e-5, atol=1e-4)


# ---- (i) Hugging Face ----------------------------------------------------------------


def test_recipe_huggingface():
    transformers = pytest.importorskip("transformers")
    from pirope.integrations.transformers import apply_position_interpolation

    def config(window, rope):
        return transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=window, rope_parameters=rope)

    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config(64, {"rope_type": "default", "rope_theta": 10000.0})).eval()
    hf = transformers.LlamaForCausalLM(
        config(256, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})).eval()
    hf.load_state_dict(original.state_dict())

    # --- recipe ---
    model = apply_position_interpolation(copy.deepcopy(original), 4.0)  # 64 -> 256 tokens
    # --------------
    x = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)


def test_recipe_huggingface_yarn_checkpoint():
    # an MLA checkpoint's YaRN (DeepSeek-V3's form, the windows scaled down) extended by a longer YaRN ==
    # transformers' model with that config (its table and its softmax scale's mscale_all_dim factor)
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-V3")
    from pirope.integrations.transformers import patch_rope

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
    config = transformers.DeepseekV3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
        max_position_embeddings=64, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        head_dim=8, v_head_dim=12, first_k_dense_replace=2, rope_parameters=yarn)
    torch.manual_seed(0)
    original = transformers.DeepseekV3ForCausalLM(config).eval()

    # --- recipe ---
    model = copy.deepcopy(original)
    config = model.config.get_text_config()
    params = config.rope_parameters
    model = patch_rope(model, {**params, "factor": 2 * params["factor"]}, attention="fused")
    config.max_position_embeddings *= 2
    # --------------
    assert model.config.rope_parameters == {**yarn, "factor": 8.0} and model.config.max_position_embeddings == 128
    hf = transformers.DeepseekV3ForCausalLM(copy.deepcopy(model.config)).eval()
    hf.load_state_dict(original.state_dict())
    x = torch.randint(0, 256, (2, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)


# ---- (ii) Meta-style LLaMA code ------------------------------------------------------
# The reference: the well-known functions of Meta's llama model.py, rewritten here, with
# Position Interpolation added as positions divided by `factor`.


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, factor: float = 1.0):
    """Unit complex numbers e^{i * t * theta_j} for t in 0..end-1 (PI: t / factor)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(end, dtype=torch.float32) / factor
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)  # complex64 (end, dim // 2)


def apply_rotary_emb(xq, xk, freqs_cis):
    """Rotates (batch, seqlen, heads, head_dim) q/k: features (2j, 2j+1) form a complex
    number multiplied by freqs_cis[position, j]."""
    xq_c = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_c = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis.view(1, xq.shape[1], 1, xq_c.shape[-1])  # broadcast over batch and heads
    xq_out = torch.view_as_real(xq_c * f).flatten(3)
    xk_out = torch.view_as_real(xk_c * f).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start_pos", [0, 300])
def test_recipe_meta_llama(dtype, start_pos):
    dim, end, factor, theta = 64, 512, 4.0, 10000.0
    g = torch.Generator().manual_seed(0)
    xq = torch.randn(2, 37, 8, dim, generator=g).to(dtype)
    xk = torch.randn(2, 37, 2, dim, generator=g).to(dtype)  # GQA: fewer kv heads
    seqlen = xq.shape[1]

    freqs_cis = precompute_freqs_cis(dim, end, theta, factor)
    ref_q, ref_k = apply_rotary_emb(xq, xk, freqs_cis[start_pos:start_pos + seqlen])

    # --- recipe ---
    inv_freq, _ = pirope.rope_frequencies(dim, base=theta, scaling={"rope_type": "linear", "factor": factor})
    cos, sin = pirope.rope_cos_sin(inv_freq, end)              # once, like precompute_freqs_cis
    positions = torch.arange(start_pos, start_pos + seqlen)    # freqs_cis[start_pos : start_pos + seqlen]
    q, k = pirope.apply_rope_qk(xq, xk, cos, sin, positions, interleaved=True)
    # --------------
    tol = ANGLE_TOL if dtype == torch.float32 else dict(rtol=1.6e-2, atol=3e-2)
    torch.testing.assert_close(q, ref_q, **tol)
    torch.testing.assert_close(k, ref_k, **tol)


def test_recipe_meta_llama_gradients():
    dim, end, factor = 32, 128, 2.0
    g = torch.Generator().manual_seed(0)
    xq = torch.randn(1, 100, 4, dim, generator=g, requires_grad=True)
    xk = torch.randn(1, 100, 4, dim, generator=g, requires_grad=True)
    gq, gk = torch.randn(2, 1, 100, 4, dim, generator=g)

    ref_q, ref_k = apply_rotary_emb(xq, xk, precompute_freqs_cis(dim, end, factor=factor)[:100])
    ref = torch.autograd.grad((ref_q * gq).sum() + (ref_k * gk).sum(), (xq, xk))

    inv_freq, _ = pirope.rope_frequencies(dim, scaling={"rope_type": "linear", "factor": factor})
    cos, sin = pirope.rope_cos_sin(inv_freq, end)
    q, k = pirope.apply_rope_qk(xq, xk, cos, sin, interleaved=True)
    got = torch.autograd.grad((q * gq).sum() + (k * gk).sum(), (xq, xk))
    torch.testing.assert_close(got[0], ref[0], **ANGLE_TOL)
    torch.testing.assert_close(got[1], ref[1], **ANGLE_TOL)


# ---- (iii) plain nn.Module attention ---------------------------------------------------


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class HandWrittenRope(nn.Module):
    """The usual GPT-NeoX / Hugging Face style RoPE, with PI: t = arange(n) / factor."""

    def __init__(self, head_dim, max_position_embeddings, base=10000.0, factor=1.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        t = torch.arange(max_position_embeddings).float() / factor
        emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)  # (P, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, q, k, position_ids):  # (B, S, H, D)
        cos = self.cos[position_ids].unsqueeze(-2)  # (B or 1, S, 1, D)
        sin = self.sin[position_ids].unsqueeze(-2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, dim=128, n_heads=8, n_kv_heads=2, max_seq_len=512, factor=4.0, use_pirope=True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        if use_pirope:
            # --- recipe ---
            self.rope = pirope.RotaryEmbedding(self.head_dim, max_position_embeddings=max_seq_len,
                                               scaling={"rope_type": "linear", "factor": factor})
            # --------------
        else:
            self.rope = HandWrittenRope(self.head_dim, max_seq_len, factor=factor)

    def forward(self, x, position_ids):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = self.rope(q, k, position_ids)  # the only line RoPE touches
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("offset", [0, 250])
def test_recipe_plain_module(offset):
    torch.manual_seed(0)
    ref = Attention(use_pirope=False)
    mod = Attention(use_pirope=True)
    mod.load_state_dict(ref.state_dict())  # the RoPE modules have no saved state
    x = torch.randn(2, 200, 128, requires_grad=True)
    pos = torch.arange(offset, offset + 200)[None]
    out_ref = ref(x, pos)
    out = mod(x, pos)
    torch.testing.assert_close(out, out_ref, **ANGLE_TOL)
    g = torch.randn_like(out)
    out_ref.backward(g)
    gx_ref, x.grad = x.grad, None
    out.backward(g)
    torch.testing.assert_close(x.grad, gx_ref, **ANGLE_TOL)
    for (name, p), p_ref in zip(mod.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)
