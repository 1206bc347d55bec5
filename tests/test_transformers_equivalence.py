"""pirope's RoPE against Hugging Face transformers' own code (LlamaRotaryEmbedding,
apply_rotary_pos_emb) with Position Interpolation (rope_type "linear")."""

import pytest
import torch

import pirope

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)


def llama_config(head_dim=128, heads=32, kv_heads=8, window=8192, factor=4.0, theta=10000.0):
    rope = {"rope_type": "default", "rope_theta": theta}
    if factor != 1.0:
        rope = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    return transformers.LlamaConfig(
        hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=window, rope_parameters=rope)


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_inv_freq_bit_identical_to_transformers(factor):
    cfg = llama_config(factor=factor)
    hf = LlamaRotaryEmbedding(cfg)
    scaling = None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    inv_freq, attn = pirope.rope_frequencies(128, scaling=scaling, max_position_embeddings=8192)
    assert inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq, hf.inv_freq)
    assert attn == hf.attention_scaling == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seqlen", [(1, 64), (2, 333)])
def test_apply_rope_qk_matches_llama_linear_scaling(dtype, batch, seqlen):
    # LLaMA-2 7B-shaped heads (GQA 32/8, head dim 128), PI from 2k to 8k
    cfg = llama_config(factor=4.0)
    hf = LlamaRotaryEmbedding(cfg)
    q = torch.randn(batch, 32, seqlen, 128, dtype=dtype)  # HF layout (B, H, S, D)
    k = torch.randn(batch, 8, seqlen, 128, dtype=dtype)
    pos = torch.arange(100, 100 + seqlen).expand(batch, seqlen)
    cos_hf, sin_hf = hf(q.float(), pos)
    ref_q, ref_k = apply_rotary_pos_emb(q.float(), k.float(), cos_hf, sin_hf)

    inv_freq, attn = pirope.rope_frequencies(128, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, 8192, attn)
    oq, ok = pirope.apply_rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin, pos)
    # HF computes angles in float32 (error ~ position * 6e-8 rad), pirope in float64
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=1.6e-2)
    torch.testing.assert_close(oq.transpose(1, 2).float(), ref_q, **tol)
    torch.testing.assert_close(ok.transpose(1, 2).float(), ref_k, **tol)


def test_rotary_embedding_module_matches_transformers():
    cfg = llama_config(head_dim=64, heads=4, kv_heads=2, window=256, factor=2.0)
    hf = LlamaRotaryEmbedding(cfg)
    rope = pirope.RotaryEmbedding(64, max_position_embeddings=256, scaling={"rope_type": "linear", "factor": 2.0})
    q = torch.randn(2, 4, 50, 64)
    k = torch.randn(2, 2, 50, 64)
    pos = torch.arange(50).expand(2, 50)
    cos_hf, sin_hf = hf(q, pos)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    oq, ok = rope(q.transpose(1, 2), k.transpose(1, 2), pos)
    torch.testing.assert_close(oq.transpose(1, 2), ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok.transpose(1, 2), ref_k, atol=1e-5, rtol=1e-5)
