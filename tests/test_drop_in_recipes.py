"""The README's drop-in recipes ("Drop-in recipes") give the same results as the
code they replace:

(i)   Hugging Face: apply_position_interpolation(model, 4.0) == transformers' own
      rope_parameters {"rope_type": "linear", "factor": 4.0} model; a YaRN checkpoint's
      factor doubled by patch_rope == transformers' model with that config;
(ii)  Meta-style LLaMA code: precompute_freqs_cis / apply_rotary_emb (complex numbers
      on interleaved pairs) with PI as t = arange(end) / factor ==
      pirope.apply_rope_qk(..., interleaved=True) with pirope.rope_cos_sin tables;
(iii) a plain nn.Module attention: pirope.RotaryEmbedding == hand-written rotate_half
      RoPE with PI;
(iv)  flash-attn's apply_rotary_emb (the same (seqlen, rotary_dim / 2) tables; seqlen_offsets,
      cu_seqlens, partial rotary, both layouts) == pirope.apply_rope with position ids;
(v)   LitGPT's build_rope_cache(condense_ratio=factor) / apply_rope on (B, heads, T, head_size)
      q and k with rope_n_elem < head_size == pirope.apply_rope_qk on the transposed views;
(vi)  torchtune's RotaryPositionalEmbeddings (interleaved, input_pos) == the README's module
      on pirope.apply_rope, with PI or Llama 3's scaling.

The references of (iv)-(vi) are the libraries' documented behaviour rewritten here (none of
them is a dependency); each was compared once by hand with the library's own code (see the
README's recipes).

The originals compute the angles in float32 (t / factor * inv_freq), pirope in float64,
so results agree to float32 rounding of angles up to ~100 rad: atol 1e-4 on O(1) values.
"""

import copy
import os
import re

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


# ---- (iv) flash-attn's rotary ---------------------------------------------------------
# The reference: flash_attn.layers.rotary.apply_rotary_emb's behaviour. Tables cos/sin of
# shape (seqlen_ro, rotary_dim / 2), the same as pirope's; token t of sequence b takes row
# seqlen_offsets[b] + t (packed: t counted from the start of its sequence); only the first
# rotary_dim features rotate; float32 math. Computed here in float64.


def flash_rotary_reference(x, cos, sin, interleaved=False, seqlen_offsets=0, cu_seqlens=None):
    if cu_seqlens is None:
        batch, seqlen = x.shape[:2]
        offsets = torch.as_tensor(seqlen_offsets).expand(batch)
        rows = offsets[:, None] + torch.arange(seqlen)                         # (batch, seqlen)
    else:
        lengths = cu_seqlens.diff()
        sequence = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        offsets = torch.as_tensor(seqlen_offsets).expand(len(lengths))
        rows = torch.arange(x.shape[0]) - cu_seqlens[sequence] + offsets[sequence]   # (total,)
    c, s = cos.double()[rows].unsqueeze(-2), sin.double()[rows].unsqueeze(-2)  # (..., 1, rotary_dim / 2)
    half = cos.shape[-1]
    xr = x.double()
    if interleaved:
        a, b = xr[..., 0:2 * half:2], xr[..., 1:2 * half:2]
        rotated = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        a, b = xr[..., :half], xr[..., half:2 * half]
        rotated = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return torch.cat((rotated, xr[..., 2 * half:]), dim=-1).to(x.dtype)


def flash_tables(rotary_dim, seqlen_ro, factor=4.0):
    # flash-attn's RotaryEmbedding builds its tables from inv_freq as outer(t, inv_freq): any
    # table of that shape will do, PI's included; the recipe builds them with pirope
    inv_freq, _ = pirope.rope_frequencies(rotary_dim, scaling={"rope_type": "linear", "factor": factor})
    return pirope.rope_cos_sin(inv_freq, seqlen_ro)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", ["none", "int", "per-sequence"])
def test_recipe_flash_attn_rotary(dtype, interleaved, offsets):
    g = torch.Generator().manual_seed(0)
    batch, seqlen, head_dim, rotary_dim = 3, 40, 64, 32   # partial rotary: 32 of 64 features
    cos, sin = flash_tables(rotary_dim, 256)
    x = torch.randn(batch, seqlen, 4, head_dim, generator=g).to(dtype)
    seqlen_offsets = {"none": 0, "int": 100, "per-sequence": torch.tensor([0, 7, 200])}[offsets]
    ref = flash_rotary_reference(x, cos, sin, interleaved, seqlen_offsets)

    # --- recipe: apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=seqlen_offsets) ---
    positions = torch.arange(seqlen) + torch.as_tensor(seqlen_offsets).view(-1, 1)   # (batch or 1, seqlen)
    out = pirope.apply_rope(x, cos, sin, positions.expand(batch, seqlen), interleaved=interleaved)
    # -----------------------------------------------------------------------------------------
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out[..., rotary_dim:], x[..., rotary_dim:], rtol=0, atol=0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_recipe_flash_attn_rotary_packed(interleaved):
    g = torch.Generator().manual_seed(1)
    cu_seqlens = torch.tensor([0, 13, 14, 60, 97], dtype=torch.int32)      # 4 sequences, one of 1 token
    cos, sin = flash_tables(64, 128)
    x = torch.randn(97, 6, 64, generator=g, requires_grad=True)
    ref = flash_rotary_reference(x.detach(), cos, sin, interleaved, cu_seqlens=cu_seqlens)

    # --- recipe: apply_rotary_emb(x, cos, sin, interleaved, cu_seqlens=cu_seqlens, max_seqlen=...) ---
    lengths = cu_seqlens.diff()
    positions = torch.arange(x.shape[0]) - torch.repeat_interleave(cu_seqlens[:-1], lengths)
    out = pirope.apply_rope(x, cos, sin, positions, interleaved=interleaved)
    # -------------------------------------------------------------------------------------------------
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # flash-attn's backward rotates the gradient by the negative angle: so does pirope's
    grad = torch.randn(out.shape, generator=g)
    (gx,) = torch.autograd.grad(out, x, grad)
    inverse = flash_rotary_reference(grad, cos, -sin, interleaved, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(gx, inverse, rtol=1e-5, atol=1e-5)


def test_recipe_flash_attn_rotary_qkv_in_place():
    # apply_rotary_emb_qkv_(qkv, cos, sin): q and k of a packed (batch, seqlen, 3, heads, head_dim)
    # projection rotated in place: apply_rope_qk on its q and k views (strided, not copied)
    g = torch.Generator().manual_seed(2)
    cos, sin = flash_tables(64, 64)
    qkv = torch.randn(2, 50, 3, 4, 64, generator=g)
    expected_q = flash_rotary_reference(qkv[:, :, 0], cos, sin)
    expected_k = flash_rotary_reference(qkv[:, :, 1], cos, sin)
    v = qkv[:, :, 2].clone()

    # --- recipe ---
    pirope.apply_rope_qk(qkv[:, :, 0], qkv[:, :, 1], cos, sin, inplace=True)
    # --------------
    torch.testing.assert_close(qkv[:, :, 0], expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, :, 1], expected_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, :, 2], v, rtol=0, atol=0)


# ---- (v) LitGPT --------------------------------------------------------------------------
# The reference: litgpt.model's build_rope_cache (PI as condense_ratio: positions divided by
# it) and apply_rope (rotate-half on the first rope_n_elem features of (B, heads, T, head_size)
# q and k, with rows cos[input_pos] of (seqlen, rope_n_elem) tables), float32 angles.


def litgpt_rope_cache(seq_len, n_elem, base=10000, condense_ratio=1):
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2).float() / n_elem))
    angles = torch.outer(torch.arange(seq_len).float() / condense_ratio, theta).repeat(1, 2)
    return angles.cos(), angles.sin()                                 # (seq_len, n_elem)


def litgpt_apply_rope(x, cos, sin):
    """x: (B, heads, T, n_elem); cos, sin: (B or 1, T, n_elem)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos + rotated * sin).to(x.dtype)


def litgpt_attention_rope(q, k, cos, sin, rope_n_elem):
    q_roped, k_roped = litgpt_apply_rope(q[..., :rope_n_elem], cos, sin), litgpt_apply_rope(k[..., :rope_n_elem], cos, sin)
    return torch.cat((q_roped, q[..., rope_n_elem:]), dim=-1), torch.cat((k_roped, k[..., rope_n_elem:]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decoding", [False, True])
def test_recipe_litgpt(dtype, decoding):
    head_size, rope_n_elem, rope_base, rope_condense_ratio, max_seq_length = 64, 16, 10000, 4, 512
    g = torch.Generator().manual_seed(0)
    B, T = 2, 30
    q = torch.randn(B, 8, T, head_size, generator=g).to(dtype)       # (B, n_head, T, head_size)
    k = torch.randn(B, 2, T, head_size, generator=g).to(dtype)       # (B, n_query_groups, T, head_size)
    # training: rows 0..T-1 for every sequence; decoding with a KV cache: input_pos (B, T)
    input_pos = torch.stack((torch.arange(300, 300 + T), torch.arange(17, 17 + T))) if decoding else None

    cache_cos, cache_sin = litgpt_rope_cache(max_seq_length, rope_n_elem, rope_base, rope_condense_ratio)
    rows = (lambda t: t[input_pos]) if decoding else (lambda t: t[:T].unsqueeze(0))
    ref_q, ref_k = litgpt_attention_rope(q, k, rows(cache_cos), rows(cache_sin), rope_n_elem)

    # --- recipe ---
    inv_freq, _ = pirope.rope_frequencies(rope_n_elem, base=rope_base,
                                          scaling={"rope_type": "linear", "factor": rope_condense_ratio})
    cos, sin = pirope.rope_cos_sin(inv_freq, max_seq_length)      # in GPT.rope_cache
    # in CausalSelfAttention.forward, in place of apply_rope and the torch.cat of both q and k:
    q_out, k_out = pirope.apply_rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin, input_pos)
    q_out, k_out = q_out.transpose(1, 2), k_out.transpose(1, 2)
    # --------------
    tol = ANGLE_TOL if dtype == torch.float32 else dict(rtol=1.6e-2, atol=3e-2)
    torch.testing.assert_close(q_out, ref_q, **tol)
    torch.testing.assert_close(k_out, ref_k, **tol)


# ---- (vi) torchtune ----------------------------------------------------------------------
# The reference: torchtune.modules.RotaryPositionalEmbeddings' behaviour. forward(x, *,
# input_pos=None) on x (b, s, n_h, h_d), interleaved pairs (2j, 2j+1), a float32 cache of
# max_seq_len rows indexed by input_pos ((b, s) or (s,)), float32 math; the attention calls
# it on q and on k. Llama3ScaledRoPE is the same with Llama 3.1's frequencies.


class TorchtuneRope(nn.Module):
    def __init__(self, dim, max_seq_len=4096, base=10_000, inv_freq=None):
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq.float())
        self.register_buffer("cache", torch.stack((angles.cos(), angles.sin()), dim=-1), persistent=False)

    def forward(self, x, *, input_pos=None):
        rows = self.cache[: x.shape[1]] if input_pos is None else self.cache[input_pos]
        rows = rows.view(-1, x.shape[1], 1, x.shape[-1] // 2, 2)
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b, c, s = pairs[..., 0], pairs[..., 1], rows[..., 0], rows[..., 1]
        return torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(3).type_as(x)


def readme_torchtune_module():
    """The README's torchtune recipe, its class as written there (the lines that install it
    in a model need one)."""
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    (block,) = [b for b in blocks if "class PiropeRotaryPositionalEmbeddings" in b]
    scope = {"nn": nn, "pirope": pirope, "torch": torch}
    exec(compile(block.split("\nrope = ")[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    return scope["PiropeRotaryPositionalEmbeddings"]


PiropeRotaryPositionalEmbeddings = readme_torchtune_module()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_pos", ["none", "packed", "decode"])
def test_recipe_torchtune(dtype, input_pos):
    dim, max_seq_len, factor = 64, 1024, 4.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 4, dim, generator=g).to(dtype)
    pos = {"none": None,
           "packed": torch.cat((torch.arange(10), torch.arange(14))).expand(2, 24),  # restarting per document
           "decode": torch.arange(900, 924)}[input_pos]
    # torchtune's module has no PI: the reference gets PI's frequencies (theta / factor)
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, dim, 2).float() / dim)) / factor
    ref = TorchtuneRope(dim, max_seq_len, inv_freq=inv_freq)(x, input_pos=pos)

    rope = PiropeRotaryPositionalEmbeddings(dim, max_seq_len, scaling={"rope_type": "linear", "factor": factor})
    out = rope(x, input_pos=pos)
    tol = ANGLE_TOL if dtype == torch.float32 else dict(rtol=1.6e-2, atol=3e-2)
    torch.testing.assert_close(out, ref, **tol)
    # torchtune casts the model (its RoPE module included) to the training dtype: the tables stay float32
    rope.to(dtype)
    torch.testing.assert_close(rope(x, input_pos=pos), out, rtol=0, atol=0)


def test_recipe_torchtune_built_on_meta_then_rope_init():
    # torchtune's distributed recipes build the model on the meta device, shard it, then call
    # rope_init() of every module that has one under the training device (and dtype) as default
    with torch.device("meta"):
        rope = PiropeRotaryPositionalEmbeddings(32, 256, scaling={"rope_type": "linear", "factor": 4.0})
    assert rope.cos.is_meta
    with torch.device("cpu"):
        rope.rope_init()
    x = torch.randn(2, 50, 4, 32, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(150, 200).expand(2, 50)
    fresh = PiropeRotaryPositionalEmbeddings(32, 256, scaling={"rope_type": "linear", "factor": 4.0})
    torch.testing.assert_close(rope(x, input_pos=pos), fresh(x, input_pos=pos), rtol=0, atol=0)
    # rope_init on a module already on its device recomputes the same tables (to_empty alone
    # would leave uninitialised memory there)
    fresh.rope_init()
    torch.testing.assert_close(fresh(x, input_pos=pos), rope(x, input_pos=pos), rtol=0, atol=0)


def test_recipe_torchtune_llama3_scaled():
    # torchtune's Llama3ScaledRoPE(dim, max_seq_len, base, scale_factor=8) == the same module with
    # Llama 3.1's scaling dict (its defaults: low 1, high 4, old context 8192)
    dim, base, max_seq_len = 128, 500_000, 16384
    theta = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    wavelen = 2 * torch.pi / theta
    smooth = ((8192 / wavelen - 1) / (4 - 1)).clamp(0, 1)          # Llama 3.1's blend, torchtune's form
    scaled = torch.where(wavelen < 8192 / 4, theta,
                         torch.where(wavelen > 8192 / 1, theta / 8, (1 - smooth) * theta / 8 + smooth * theta))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 2, dim, generator=g)
    pos = torch.arange(16000, 16064)
    ref = TorchtuneRope(dim, max_seq_len, inv_freq=scaled)(x, input_pos=pos)

    rope = PiropeRotaryPositionalEmbeddings(dim, max_seq_len, base, scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    # angles up to 16064 rad: float32 angles (the reference's) are off by up to ~1e-3 rad there
    torch.testing.assert_close(rope(x, input_pos=pos), ref, rtol=0, atol=5e-3)
