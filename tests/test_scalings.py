"""pirope.scaling against Hugging Face transformers' own RoPE code, bit for bit.

Every table is compared with ``torch.equal`` (bit-exact) against
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (and the models'
``compute_default_rope_parameters`` for plain RoPE), and every attention factor with ``==``.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import pathlib
import types

import pytest
import torch

try:
    from pirope import scaling
except Exception:  # the extension may not be built yet: load the pure-Python module directly
    _spec = importlib.util.spec_from_file_location(
        "pirope_scaling", pathlib.Path(__file__).resolve().parents[1] / "python/pirope/scaling.py"
    )
    scaling = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(scaling)

import transformers  # noqa: E402  (the reference; a hard dependency of this test file)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    # transformers logs a warning for some valid-but-unusual configs (e.g. an int factor); keep output clean
    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(old)


# ---------------------------------------------------------------------------------------
# Reference: transformers
# ---------------------------------------------------------------------------------------


def hf_config(head_dim, rope_parameters, max_position_embeddings):
    """A tiny LlamaConfig; transformers standardises (and mutates) the dict, so pass a copy."""
    return transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=copy.deepcopy(rope_parameters),
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=8,
    )


def hf_rope(head_dim, rope_parameters, max_position_embeddings, seq_len=None):
    config = hf_config(head_dim, rope_parameters, max_position_embeddings)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        # GPT-NeoX's version honours partial_rotary_factor; LLaMA's ignores it (checked separately)
        inv_freq, attn = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config, device="cpu")
    else:
        inv_freq, attn = ROPE_INIT_FUNCTIONS[rope_type](config, device="cpu", seq_len=seq_len)
    return inv_freq, attn, config


def assert_same(ours, theirs, rotary_dim):
    inv_freq, attn = ours
    ref_inv_freq, ref_attn = theirs
    assert isinstance(inv_freq, torch.Tensor)
    assert inv_freq.dtype == torch.float32
    assert inv_freq.device.type == "cpu"
    assert inv_freq.shape == (rotary_dim // 2,)
    assert ref_inv_freq.dtype == torch.float32 and ref_inv_freq.shape == inv_freq.shape
    assert torch.equal(inv_freq, ref_inv_freq), (inv_freq - ref_inv_freq).abs().max()
    assert isinstance(attn, float)
    assert attn == ref_attn


def table_dim(head_dim, params, prf):
    """2 x the table's length: the rotated features, or for "proportional" the whole head (its
    unrotated pairs have frequency 0)."""
    return head_dim if params.get("rope_type") == "proportional" else int(head_dim * prf)


def check_against_hf(head_dim, theta, params, max_position_embeddings, seq_len=None, prf=1.0):
    """Compare both ways of calling pirope with transformers for one configuration.

    `params` is a scaling dict without rope_theta / partial_rotary_factor.
    """
    hf_params = dict(params, rope_theta=theta)
    if prf != 1.0:
        hf_params["partial_rotary_factor"] = prf
    ref_inv_freq, ref_attn, config = hf_rope(head_dim, hf_params, max_position_embeddings, seq_len)
    rotary_dim = table_dim(head_dim, params, prf)

    # 1. pirope style: base and partial_rotary_factor as arguments
    ours = scaling.compute_inv_freq(
        head_dim,
        base=theta,
        scaling=copy.deepcopy(params),
        max_position_embeddings=max_position_embeddings,
        partial_rotary_factor=prf,
        seq_len=seq_len,
    )
    assert_same(ours, (ref_inv_freq, ref_attn), rotary_dim)

    # 2. the transformers-standardised rope_parameters dict as is (rope_theta, partial_rotary_factor,
    #    original_max_position_embeddings filled in by transformers)
    ours = scaling.compute_inv_freq(
        head_dim,
        scaling=copy.deepcopy(dict(config.rope_parameters)),
        max_position_embeddings=max_position_embeddings,
        seq_len=seq_len,
    )
    assert_same(ours, (ref_inv_freq, ref_attn), rotary_dim)
    return ours


def phi3_factors(n):
    """Phi-3-style LongRoPE rescale lists: short ~1.0-1.1, long growing to ~60 for the slow pairs."""
    short = [round(1.0 + 0.1 * (i / n) ** 2, 6) for i in range(n)]
    long = [round(1.0 + 60.0 * (i / n) ** 3, 6) for i in range(n)]
    return short, long


SHORT48, LONG48 = phi3_factors(48)

# (id, head_dim, theta, scaling params without rope_theta, max_position_embeddings, seq_lens)
REAL_WORLD = [
    ("llama2-7b-default", 128, 10000.0, {"rope_type": "default"}, 4096, [None]),
    ("llama1-7b-pi-2k-to-8k", 128, 10000.0, {"rope_type": "linear", "factor": 4.0}, 8192, [None]),
    ("llama1-7b-pi-2k-to-16k", 128, 10000.0, {"rope_type": "linear", "factor": 8.0}, 16384, [None]),
    ("llama1-7b-pi-2k-to-32k", 128, 10000.0, {"rope_type": "linear", "factor": 16.0}, 32768, [None]),
    ("llama2-7b-pi-4k-to-16k", 128, 10000.0, {"rope_type": "linear", "factor": 4.0}, 16384, [None]),
    ("llama2-7b-pi-int-factor", 128, 10000.0, {"rope_type": "linear", "factor": 2}, 8192, [None]),
    ("llama2-7b-pi-legacy-type-key", 128, 10000.0, {"type": "linear", "factor": 4.0}, 16384, [None]),
    ("llama2-7b-pi-odd-factor", 128, 10000.0, {"rope_type": "linear", "factor": 3.7}, 15155, [None]),
    ("codellama-7b", 128, 1000000.0, {"rope_type": "default"}, 16384, [None]),
    ("codellama-7b-pi-2x", 128, 1000000.0, {"rope_type": "linear", "factor": 2.0}, 32768, [None]),
    ("gpt-neox-20b-partial-0.25", 96, 10000.0, {"rope_type": "default"}, 2048, [None]),
    ("phi-2-partial-0.4", 80, 10000.0, {"rope_type": "default"}, 2048, [None]),
    # Gemma 4's full-attention layers (Gemma4TextConfig's defaults: global head_dim 512, a quarter of
    # the pairs rotating), and those extended 4x by Position Interpolation
    ("gemma4-global", 512, 1000000.0, {"rope_type": "proportional"}, 131072, [None]),
    ("gemma4-global-pi-4x", 512, 1000000.0, {"rope_type": "proportional", "factor": 4.0}, 524288, [None]),
    # 7 of 8 pairs rotate: one zero frequency appended
    ("proportional-one-unrotated-pair", 16, 10000.0, {"rope_type": "proportional"}, 64, [None]),
    (
        "llama3.1-8b",
        128,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        131072,
        [None],
    ),
    (
        "llama3.2-1b",
        64,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        131072,
        [None],
    ),
    (
        "llama3-no-ompe-uses-max-position-embeddings",
        128,
        500000.0,
        {"rope_type": "llama3", "factor": 8, "low_freq_factor": 2, "high_freq_factor": 8},
        8192,
        [None],
    ),
    (
        "yarn-16x-from-4k",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096},
        65536,
        [None],
    ),
    (
        "yarn-16x-from-8k",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192},
        131072,
        [None],
    ),
    (
        "yarn-16x-explicit-attention-factor",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "attention_factor": 1.5},
        65536,
        [None],
    ),
    (
        "yarn-deepseek-v3-mscale",
        64,
        10000.0,
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        163840,
        [None],
    ),
    (
        "yarn-mscale-ratio",
        128,
        10000.0,
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 8192,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
        },
        131072,
        [None],
    ),
    (
        "yarn-mscale-alone-is-ignored",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192, "mscale": 0.707},
        131072,
        [None],
    ),
    (
        # None as a missing key (transformers reads them with .get)
        "yarn-mscales-none",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192, "mscale": None,
         "mscale_all_dim": None},
        131072,
        [None],
    ),
    (
        # low == high == 16 (equal betas, no truncation; the rotation count whose correction dim is
        # exactly 16): the ramp's singularity guard, which pair 16 (0 / 0 without it) reads
        "yarn-equal-betas-no-truncate",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "truncate": False,
         "beta_fast": 4096 / (2 * math.pi * 10000.0 ** (32 / 128)),
         "beta_slow": 4096 / (2 * math.pi * 10000.0 ** (32 / 128))},
        16384,
        [None],
    ),
    (
        # beta_slow's correction dim past the last feature: clipped to rotary_dim - 1
        "yarn-range-past-the-last-pair",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_slow": 1e-6},
        16384,
        [None],
    ),
    (
        "yarn-attention-factor-none",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192, "attention_factor": None},
        131072,
        [None],
    ),
    (
        "yarn-mscale-zero-is-ignored",
        128,
        10000.0,
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 8192,
            "mscale": 0,
            "mscale_all_dim": 1.0,
        },
        131072,
        [None],
    ),
    (
        "yarn-qwen2.5",
        128,
        1000000.0,
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        131072,
        [None],
    ),
    (
        "yarn-gpt-oss-no-truncate",
        64,
        150000.0,
        {
            "rope_type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        131072,
        [None],
    ),
    (
        "yarn-truncate-none-means-no-truncation",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "truncate": None},
        65536,
        [None],
    ),
    (
        "yarn-custom-betas",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
        32768,
        [None],
    ),
    (
        # one correction dim for both (no truncation): transformers' ramp over an empty range, max + 0.001
        "yarn-equal-betas-untruncated",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 4, "beta_slow": 4,
         "truncate": False},
        32768,
        [None],
    ),
    (
        "yarn-zero-betas-mean-default",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 0, "beta_slow": None},
        32768,
        [None],
    ),
    (
        "yarn-factor-none-derived-from-windows",
        128,
        10000.0,
        {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096},
        32768,
        [None],
    ),
    # correction dims past the pairs (below 0: a window shorter than beta_fast's rotations; above dim - 1: a
    # small base), clamped to them
    ("yarn-short-window-clamps-low", 128, 10000.0,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "truncate": False}, 512, [None]),
    ("yarn-small-base-clamps-high", 128, 100.0,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 65536, "truncate": False}, 262144,
     [None]),
    ("yarn-no-ompe-uses-max-position-embeddings", 128, 10000.0, {"rope_type": "yarn", "factor": 4.0}, 4096, [None]),
    ("yarn-factor-1", 128, 10000.0, {"rope_type": "yarn", "factor": 1.0}, 4096, [None]),
    (
        "longrope-phi3-mini-128k",
        96,
        10000.0,
        {
            "rope_type": "longrope",
            "short_factor": SHORT48,
            "long_factor": LONG48,
            "original_max_position_embeddings": 4096,
        },
        131072,
        [None, 1, 4095, 4096, 4097, 8192, 131072],
    ),
    (
        "longrope-explicit-factor",
        96,
        10000.0,
        {
            "type": "longrope",
            "short_factor": SHORT48,
            "long_factor": LONG48,
            "original_max_position_embeddings": 4096,
            "factor": 32.0,
        },
        131072,
        [None, 4096, 4097],
    ),
    (
        "longrope-explicit-attention-factor",
        96,
        10000.0,
        {
            "rope_type": "longrope",
            "short_factor": SHORT48,
            "long_factor": LONG48,
            "original_max_position_embeddings": 4096,
            "attention_factor": 1.2,
        },
        131072,
        [None, 4097],
    ),
    (
        # None as a missing key (transformers reads it with .get): the default attention factor
        "longrope-attention-factor-none",
        96,
        10000.0,
        {
            "rope_type": "longrope",
            "short_factor": SHORT48,
            "long_factor": LONG48,
            "original_max_position_embeddings": 4096,
            "attention_factor": None,
        },
        131072,
        [None, 4097],
    ),
    (
        "longrope-int-factors-no-ompe",
        96,
        10000.0,
        {"rope_type": "longrope", "short_factor": [1] * 48, "long_factor": [2] * 48},
        4096,
        [None, 4096, 4097],
    ),
    (
        "dynamic-ntk-2x",
        128,
        10000.0,
        {"rope_type": "dynamic", "factor": 2.0},
        4096,
        [None, 1, 2048, 4095, 4096, 4097, 8192, 16384, 1_000_000],
    ),
    (
        "dynamic-ntk-4x",
        128,
        10000.0,
        {"rope_type": "dynamic", "factor": 4.0},
        4096,
        [None, 4096, 4097, 12345, 65536, 1_000_000],
    ),
    (
        "dynamic-ntk-codellama-odd-window",
        128,
        1000000.0,
        {"rope_type": "dynamic", "factor": 2.5},
        3000,
        [None, 2999, 3000, 3001, 7777, 500_000],
    ),
]

_REAL_WORLD_PRF = {"gpt-neox-20b-partial-0.25": 0.25, "phi-2-partial-0.4": 0.4, "gemma4-global": 0.25,
                   "gemma4-global-pi-4x": 0.25, "proportional-one-unrotated-pair": 0.875}


@pytest.mark.parametrize(
    "head_dim, theta, params, mpe, seq_lens", [pytest.param(*c[1:], id=c[0]) for c in REAL_WORLD]
)
def test_real_world_configs_match_transformers(request, head_dim, theta, params, mpe, seq_lens):
    prf = _REAL_WORLD_PRF.get(request.node.callspec.id, 1.0)
    for seq_len in seq_lens:
        check_against_hf(head_dim, theta, params, mpe, seq_len=seq_len, prf=prf)


def _typed_params(rope_type, rotary_dim):
    if rope_type == "default":
        return {"rope_type": "default"}, [None]
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": 4.0}, [None]
    if rope_type == "dynamic":
        return {"rope_type": "dynamic", "factor": 4.0}, [None, 4096, 4097, 100_000]
    if rope_type == "yarn":
        return {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}, [None]
    if rope_type == "llama3":
        return {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        }, [None]
    if rope_type == "proportional":
        return {"rope_type": "proportional", "factor": 4.0}, [None]
    short, long = phi3_factors(rotary_dim // 2)
    return {
        "rope_type": "longrope",
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": 4096,
    }, [None, 4096, 4097]


@pytest.mark.parametrize("prf", [0.5, 0.25])
@pytest.mark.parametrize("rope_type", list(scaling.SUPPORTED_ROPE_TYPES))
def test_partial_rotary_matches_transformers(rope_type, prf):
    head_dim = 128
    params, seq_lens = _typed_params(rope_type, int(head_dim * prf))
    for theta in (10000.0, 500000.0):
        for seq_len in seq_lens:
            inv_freq, _ = check_against_hf(head_dim, theta, params, 16384, seq_len=seq_len, prf=prf)
            assert inv_freq.shape == (table_dim(head_dim, params, prf) // 2,)


def test_default_matches_llama_rotary_embedding():
    for head_dim, theta in [(128, 10000.0), (128, 1000000.0), (64, 500000.0), (256, 10000)]:
        config = hf_config(head_dim, {"rope_type": "default", "rope_theta": theta}, 4096)
        ref = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        for scaling_arg in (None, {"rope_type": "default"}, {"type": "default"}, {}):
            assert_same(scaling.compute_inv_freq(head_dim, base=theta, scaling=scaling_arg), ref, head_dim)
        # the module itself (what a LLaMA model really uses)
        rotary = LlamaRotaryEmbedding(config)
        assert torch.equal(scaling.compute_inv_freq(head_dim, base=theta)[0], rotary.inv_freq)


@pytest.mark.parametrize(
    "params, seq_len",
    [
        ({"rope_type": "default"}, None),
        ({"rope_type": "linear", "factor": 4.0}, None),
        ({"rope_type": "dynamic", "factor": 2.0}, 3000),  # past 2048, inside 4096: depends on the window
        ({"rope_type": "yarn", "factor": 4.0}, None),  # no original window: the default one is used
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, None),
    ],
    ids=lambda v: v["rope_type"] if isinstance(v, dict) else str(v),
)
def test_public_rope_frequencies_defaults_are_the_documented_ones(params, seq_len):
    # pirope.rope_frequencies(head_dim, scaling=...) with nothing else: base 10000,
    # max_position_embeddings 2048, partial_rotary_factor 1.0 -- transformers' values
    # for that configuration
    import pirope

    ref_inv_freq, ref_attn, _ = hf_rope(64, dict(params, rope_theta=10000.0), 2048, seq_len)
    kwargs = {} if seq_len is None else {"seq_len": seq_len}
    assert_same(pirope.rope_frequencies(64, scaling=copy.deepcopy(params), **kwargs), (ref_inv_freq, ref_attn), 64)


# ---------------------------------------------------------------------------------------
# What Hugging Face models compute in forward (seq_len as a tensor)
# ---------------------------------------------------------------------------------------


def test_dynamic_tensor_seq_len_matches_transformers_tensor_path():
    params = {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}
    config = hf_config(128, params, 4096)
    int_vs_tensor_differ = False
    for s in list(range(4097, 60000, 2311)) + [1, 4096]:
        for dtype in (torch.int64, torch.int32):
            ref_t, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, device="cpu", seq_len=torch.tensor(s, dtype=dtype))
            ours_t, attn = scaling.compute_inv_freq(
                128, scaling=params, max_position_embeddings=4096, seq_len=torch.tensor(s, dtype=dtype)
            )
            assert torch.equal(ours_t, ref_t) and attn == 1.0
        ref_i, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, device="cpu", seq_len=s)
        ours_i, _ = scaling.compute_inv_freq(128, scaling=params, max_position_embeddings=4096, seq_len=s)
        assert torch.equal(ours_i, ref_i)
        int_vs_tensor_differ |= not torch.equal(ours_i, ours_t)
    # transformers computes the dynamic base in float32 for a tensor seq_len and in float64 for an int:
    # the two paths really are different, which is why pirope reproduces both.
    assert int_vs_tensor_differ


def test_dynamic_int32_seq_len_against_a_window_past_int32():
    # the window joins the length in one tensor: an int32 one would overflow
    params = {"rope_type": "dynamic", "factor": 2.0}
    for s in (5, 2**41):
        want, _ = scaling.compute_inv_freq(8, scaling=params, max_position_embeddings=2**40,
                                           seq_len=torch.tensor(s, dtype=torch.int64))
        if s < 2**31:
            got, _ = scaling.compute_inv_freq(8, scaling=params, max_position_embeddings=2**40,
                                              seq_len=torch.tensor(s, dtype=torch.int32))
            assert torch.equal(got, want)
            assert torch.equal(want, scaling.compute_inv_freq(8)[0])  # inside the window: plain RoPE
        else:
            assert not torch.equal(want, scaling.compute_inv_freq(8)[0])


@pytest.mark.parametrize("seq_len", [100, 4096, 4097, 9000, 31000])
def test_dynamic_matches_llama_rotary_embedding_forward(seq_len):
    params = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    rotary = LlamaRotaryEmbedding(hf_config(64, params, 4096))
    position_ids = torch.arange(seq_len)[None]
    cos, _ = rotary(torch.zeros(1, dtype=torch.float32), position_ids)
    ours, attn = scaling.compute_inv_freq(
        64, scaling=params, max_position_embeddings=4096, seq_len=position_ids.max() + 1
    )
    if seq_len > 4096:  # transformers recomputes only when the sequence grows past the window
        assert torch.equal(rotary.inv_freq, ours)
    else:
        assert torch.equal(rotary.inv_freq, scaling.compute_inv_freq(64, scaling=params, max_position_embeddings=4096)[0])
    assert attn == rotary.attention_scaling == 1.0


@pytest.mark.parametrize("seq_len", [10, 4096, 4097, 20000])
def test_longrope_matches_llama_rotary_embedding_forward(seq_len):
    short, long = phi3_factors(32)
    params = {
        "rope_type": "longrope",
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
    }
    rotary = LlamaRotaryEmbedding(hf_config(64, params, 65536))
    position_ids = torch.arange(seq_len)[None]
    rotary(torch.zeros(1), position_ids)
    for sl in (seq_len, position_ids.max() + 1):
        ours, attn = scaling.compute_inv_freq(64, scaling=params, max_position_embeddings=65536, seq_len=sl)
        assert torch.equal(rotary.inv_freq, ours)
        assert attn == rotary.attention_scaling == math.sqrt(1 + math.log(16) / math.log(4096))


# ---------------------------------------------------------------------------------------
# The tables mean what the docs say (guards against comparing two equally wrong things)
# ---------------------------------------------------------------------------------------


def test_scalings_change_the_table_as_documented():
    plain, _ = scaling.compute_inv_freq(128, base=10000.0)
    assert torch.allclose(plain, 10000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128).float())

    # proportional: plain RoPE's pairs over the whole head, the first quarter rotating (divided by
    # the factor), the rest frequency 0
    prop, attn = scaling.compute_inv_freq(128, scaling={"rope_type": "proportional", "factor": 4.0},
                                          partial_rotary_factor=0.25)
    assert prop.shape == (64,) and attn == 1.0
    assert torch.allclose(prop[:16], plain[:16] / 4) and torch.equal(prop[16:], torch.zeros(48))
    whole, _ = scaling.compute_inv_freq(128, scaling={"rope_type": "proportional"})
    assert torch.equal(whole, plain)  # every pair rotates: plain RoPE

    pi, attn = scaling.compute_inv_freq(128, scaling={"rope_type": "linear", "factor": 4.0})
    assert torch.allclose(pi, plain / 4) and attn == 1.0

    ll3, _ = scaling.compute_inv_freq(
        128,
        base=500000.0,
        scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    plain3, _ = scaling.compute_inv_freq(128, base=500000.0)
    assert torch.equal(ll3[:10], plain3[:10])  # high frequencies kept
    assert torch.allclose(ll3[-10:], plain3[-10:] / 8)  # low frequencies interpolated

    yarn, attn = scaling.compute_inv_freq(
        128, scaling={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}
    )
    assert attn == pytest.approx(0.1 * math.log(16) + 1)
    assert torch.allclose(yarn[:5], plain[:5]) and torch.allclose(yarn[-5:], plain[-5:] / 16)

    dyn_short, _ = scaling.compute_inv_freq(128, scaling={"rope_type": "dynamic", "factor": 4.0}, seq_len=100)
    dyn_long, _ = scaling.compute_inv_freq(128, scaling={"rope_type": "dynamic", "factor": 4.0}, seq_len=8192)
    assert torch.allclose(dyn_short, plain) and (dyn_long[1:] < dyn_short[1:]).all()

    short, long = phi3_factors(48)
    lr = {"rope_type": "longrope", "short_factor": short, "long_factor": long, "original_max_position_embeddings": 4096}
    plain96, _ = scaling.compute_inv_freq(96)
    s_tab, s_attn = scaling.compute_inv_freq(96, scaling=lr, max_position_embeddings=131072, seq_len=4096)
    l_tab, l_attn = scaling.compute_inv_freq(96, scaling=lr, max_position_embeddings=131072, seq_len=4097)
    assert torch.allclose(s_tab, plain96 / torch.tensor(short)) and torch.allclose(l_tab, plain96 / torch.tensor(long))
    assert s_attn == l_attn == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


# ---------------------------------------------------------------------------------------
# Random configurations (hypothesis): still bit-exact
# ---------------------------------------------------------------------------------------

_head_and_prf = st.sampled_from(
    [(h, p) for h in (16, 32, 64, 80, 96, 128, 256) for p in (1.0, 0.5, 0.25) if int(h * p) % 2 == 0 and h * p >= 4]
)
_theta = st.one_of(st.sampled_from([10000.0, 500000.0, 1000000.0, 10000]), st.floats(100.0, 1e7))
_factor = st.one_of(st.sampled_from([2, 4.0, 8.0, 32.0]), st.floats(1.0, 64.0))
_window = st.sampled_from([512, 2048, 4096, 8192, 3000])
_fast_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast_settings
@given(hp=_head_and_prf, theta=_theta, factor=_factor, mpe=_window, data=st.data())
def test_random_configs_match_transformers(hp, theta, factor, mpe, data):
    head_dim, prf = hp
    rotary_dim = int(head_dim * prf)
    rope_type = data.draw(st.sampled_from(scaling.SUPPORTED_ROPE_TYPES))
    seq_len = data.draw(st.one_of(st.none(), st.integers(1, 200_000)))
    ompe = data.draw(st.sampled_from([256, 1024, mpe]))
    if rope_type == "default":
        params = {"rope_type": "default"}
    elif rope_type in ("linear", "dynamic"):
        params = {"rope_type": rope_type, "factor": factor}
    elif rope_type == "yarn":
        params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": ompe}
        beta_slow = data.draw(st.sampled_from([None, 1, 0.5, 2.0]))
        beta_fast = data.draw(st.sampled_from([None, 32, 16.0, 64]))
        for key, value in (("beta_fast", beta_fast), ("beta_slow", beta_slow)):
            if value is not None:
                params[key] = value
        params["truncate"] = data.draw(st.sampled_from([True, False]))
        if data.draw(st.booleans()):
            params["mscale"] = data.draw(st.floats(0.5, 1.5))
            params["mscale_all_dim"] = data.draw(st.floats(0.5, 1.5))
    elif rope_type == "llama3":
        low = data.draw(st.floats(0.5, 4.0))
        params = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": low + data.draw(st.floats(0.5, 8.0)),
            "original_max_position_embeddings": ompe,
        }
    elif rope_type == "proportional":
        params = {"rope_type": "proportional"}
        if data.draw(st.booleans()):
            params["factor"] = factor
    else:
        n = rotary_dim // 2
        factors = st.lists(st.floats(1.0, 100.0), min_size=n, max_size=n)
        params = {
            "rope_type": "longrope",
            "short_factor": data.draw(factors),
            "long_factor": data.draw(factors),
            "original_max_position_embeddings": ompe,
            "factor": factor,
        }
    check_against_hf(head_dim, theta, params, mpe, seq_len=seq_len, prf=prf)


# ---------------------------------------------------------------------------------------
# rope_theta / partial_rotary_factor inside the dict, aliases, normalisation
# ---------------------------------------------------------------------------------------


def test_rope_theta_in_dict_overrides_default_base_like_transformers():
    params = {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}
    ref, _, _ = hf_rope(128, params, 8192)
    for base in (10000.0, 500000.0):  # the default, or the same value: the dict's theta is used
        ours, _ = scaling.compute_inv_freq(128, base=base, scaling=params)
        assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="base.*rope_theta"):
        scaling.compute_inv_freq(128, base=1e6, scaling=params)


def test_partial_rotary_factor_in_dict():
    params = {"rope_type": "yarn", "factor": 8.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 4096}
    ref, ref_attn, _ = hf_rope(128, dict(params, rope_theta=10000.0), 32768)
    for prf in (1.0, 0.5):
        assert_same(scaling.compute_inv_freq(128, scaling=params, partial_rotary_factor=prf), (ref, ref_attn), 64)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        scaling.compute_inv_freq(128, scaling=params, partial_rotary_factor=0.25)


def test_llama3_wavelengths_on_the_band_edges_match_transformers():
    # pairs whose wavelength is exactly L / low_freq_factor and L / high_freq_factor: the comparisons'
    # ties decide whether such a pair is interpolated, blended or kept
    base, head_dim, window = 500000.0, 128, 65536
    wavelen = 2 * math.pi / (1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim)))
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": window / float(wavelen[40]),
              "high_freq_factor": window / float(wavelen[20]), "original_max_position_embeddings": window}
    assert wavelen[40] == window / params["low_freq_factor"] and wavelen[20] == window / params["high_freq_factor"]
    check_against_hf(head_dim, base, params, 4 * window)


def test_normalize_scaling():
    assert scaling.normalize_scaling(None) is None
    assert scaling.normalize_scaling({}) == {"rope_type": "default"}
    assert scaling.normalize_scaling({"rope_theta": 5e5}) == {"rope_type": "default", "rope_theta": 5e5}
    src = {"type": "linear", "factor": 4}
    out = scaling.normalize_scaling(src)
    assert out == {"rope_type": "linear", "factor": 4}
    assert src == {"type": "linear", "factor": 4}  # input untouched
    assert out is not src
    same = {"rope_type": "yarn", "type": "yarn", "factor": 2.0}
    assert scaling.normalize_scaling(same) == {"rope_type": "yarn", "factor": 2.0}
    # any Mapping, not only a dict (a read-only view of a config's dict)
    view = types.MappingProxyType({"rope_type": "linear", "factor": 4.0})
    out = scaling.normalize_scaling(view)
    assert type(out) is dict and out == {"rope_type": "linear", "factor": 4.0}
    assert torch.equal(scaling.compute_inv_freq(128, scaling=view)[0],
                       scaling.compute_inv_freq(128, scaling=dict(view))[0])

    import numpy as np

    out = scaling.normalize_scaling(
        {"rope_type": "longrope", "short_factor": np.ones(3).tolist(), "long_factor": (1, np.float32(2.5), 3),
         "original_max_position_embeddings": np.int64(4096), "factor": np.float64(4.0)}
    )
    assert out["long_factor"] == [1.0, 2.5, 3.0] and all(type(v) is float for v in out["long_factor"])
    assert type(out["original_max_position_embeddings"]) is int and type(out["factor"]) is float

    # a list in the input is not shared with the output
    lst = [1.0, 2.0]
    out = scaling.normalize_scaling({"rope_type": "longrope", "short_factor": lst, "long_factor": lst})
    out["short_factor"].append(3.0)
    assert lst == [1.0, 2.0]


def test_compute_does_not_mutate_scaling():
    params = {"type": "yarn", "factor": 16.0}
    before = copy.deepcopy(params)
    scaling.compute_inv_freq(128, scaling=params, max_position_embeddings=65536)
    assert params == before


@pytest.mark.parametrize(
    "params, expected",
    [
        (None, False),
        ({"rope_type": "default"}, False),
        ({"rope_type": "linear", "factor": 2.0}, False),
        ({"rope_type": "dynamic", "factor": 2.0}, True),
        ({"type": "dynamic", "factor": 2.0}, True),
        ({"rope_type": "yarn", "factor": 2.0}, False),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, False),
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, True),
        ({"rope_type": "proportional", "factor": 4.0}, False),
    ],
)
def test_scaling_needs_seq_len(params, expected):
    assert scaling.scaling_needs_seq_len(params) is expected
    # and it agrees with reality: the table changes with seq_len exactly for these types
    if params is not None and expected:
        head = 4 if params.get("rope_type", params.get("type")) == "dynamic" else 2
        a, _ = scaling.compute_inv_freq(head, scaling=params, max_position_embeddings=64, seq_len=10)
        b, _ = scaling.compute_inv_freq(head, scaling=params, max_position_embeddings=64, seq_len=1000)
        assert not torch.equal(a, b)


def test_scaling_needs_seq_len_validates():
    with pytest.raises(ValueError, match="rope_type"):
        scaling.scaling_needs_seq_len({"rope_type": "ntk"})


# ---------------------------------------------------------------------------------------
# Invalid configurations
# ---------------------------------------------------------------------------------------

_LINEAR = {"rope_type": "linear", "factor": 2.0}
_SHORT64, _LONG64 = phi3_factors(64)
_LONGROPE = {"rope_type": "longrope", "short_factor": _SHORT64, "long_factor": _LONG64,
             "original_max_position_embeddings": 4096}
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
_YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}

INVALID = [
    # scaling itself
    ("scaling-str", dict(scaling="linear"), TypeError, "scaling"),
    ("scaling-list", dict(scaling=[("rope_type", "linear")]), TypeError, "scaling"),
    ("scaling-non-str-key", dict(scaling={1: 2}), TypeError, "scaling keys"),
    ("rope-type-unknown", dict(scaling={"rope_type": "ntk", "factor": 2.0}), ValueError, "rope_type.*'ntk'"),
    ("rope-type-axial", dict(scaling={"rope_type": "axial"}), ValueError, "rope_type.*'axial'.*vision"),
    ("rope-type-not-str", dict(scaling={"rope_type": 3}), TypeError, "rope_type"),
    ("type-alias-conflict", dict(scaling={"rope_type": "linear", "type": "dynamic", "factor": 2.0}), ValueError,
     "'type'"),
    ("unknown-key", dict(scaling={"rope_type": "linear", "factor": 2.0, "facter": 3.0}), ValueError, "'facter'"),
    ("factor-without-rope-type", dict(scaling={"factor": 4.0}), ValueError,
     r"'factor'.*did you forget scaling\['rope_type'\]"),
    ("dynamic-with-ompe", dict(scaling={"rope_type": "dynamic", "factor": 2.0,
                                        "original_max_position_embeddings": 4096}), ValueError,
     "'original_max_position_embeddings'.*dynamic NTK uses the max_position_embeddings argument"),
    ("default-with-factor", dict(scaling={"rope_type": "default", "factor": 2.0}), ValueError, "'factor'"),
    # factor
    ("linear-factor-missing", dict(scaling={"rope_type": "linear"}), ValueError, "factor"),
    ("linear-factor-below-1", dict(scaling={"rope_type": "linear", "factor": 0.5}), ValueError, "factor.*>= 1"),
    ("linear-factor-zero", dict(scaling={"rope_type": "linear", "factor": 0}), ValueError, "factor"),
    ("linear-factor-none", dict(scaling={"rope_type": "linear", "factor": None}), TypeError, "factor"),
    ("linear-factor-str", dict(scaling={"rope_type": "linear", "factor": "4"}), TypeError, "factor"),
    ("linear-factor-bool", dict(scaling={"rope_type": "linear", "factor": True}), TypeError, "factor"),
    ("linear-factor-nan", dict(scaling={"rope_type": "linear", "factor": float("nan")}), ValueError, "factor"),
    ("linear-factor-inf", dict(scaling={"rope_type": "linear", "factor": float("inf")}), ValueError, "factor"),
    ("dynamic-factor-missing", dict(scaling={"rope_type": "dynamic"}), ValueError, "factor"),
    ("dynamic-factor-below-1", dict(scaling={"rope_type": "dynamic", "factor": 0.9}), ValueError, "factor"),
    ("yarn-factor-missing", dict(scaling={"rope_type": "yarn"}), ValueError, "factor"),
    ("yarn-factor-below-1", dict(scaling=dict(_YARN, factor=0.5)), ValueError, "factor"),
    ("yarn-derived-factor-below-1", dict(scaling=dict(_YARN, factor=None), max_position_embeddings=2048),
     ValueError, "factor.*max_position_embeddings"),
    ("llama3-factor-below-1", dict(scaling=dict(_LLAMA3, factor=0.25)), ValueError, "factor"),
    ("longrope-factor-below-1", dict(scaling=dict(_LONGROPE, factor=0.5)), ValueError, "factor"),
    ("longrope-derived-factor-below-1", dict(scaling=_LONGROPE, max_position_embeddings=2048), ValueError,
     "factor.*max_position_embeddings"),
    # ints past the float range or int64
    ("linear-factor-int-past-float", dict(scaling={"rope_type": "linear", "factor": 10**400}), ValueError,
     "factor.*within the float range"),
    ("yarn-ompe-past-int64", dict(scaling=dict(_YARN, original_max_position_embeddings=2**63)), ValueError,
     "original_max_position_embeddings.*int64"),
    ("head-dim-below-int64", dict(head_dim=-2**63 - 1), ValueError, "head_dim.*int64"),
    # an int base past torch's int64 (1e30 as a float works)
    ("base-int-past-int64", dict(base=10**30), ValueError, "base=1000000000000000000000000000000 overflows.*int64"),
    # yarn options
    ("yarn-attention-factor-negative", dict(scaling=dict(_YARN, attention_factor=-1.0)), ValueError,
     "attention_factor"),
    ("yarn-attention-factor-zero", dict(scaling=dict(_YARN, attention_factor=0.0)), ValueError, "attention_factor"),
    ("yarn-attention-factor-str", dict(scaling=dict(_YARN, attention_factor="1.2")), TypeError, "attention_factor"),
    ("yarn-beta-fast-below-slow", dict(scaling=dict(_YARN, beta_fast=1, beta_slow=32)), ValueError, "beta_fast"),
    ("yarn-beta-slow-above-default-fast", dict(scaling=dict(_YARN, beta_slow=64)), ValueError, "beta_slow"),
    ("yarn-beta-fast-negative", dict(scaling=dict(_YARN, beta_fast=-32)), ValueError, "beta_fast"),
    ("yarn-beta-slow-str", dict(scaling=dict(_YARN, beta_slow="1")), TypeError, "beta_slow"),
    ("yarn-truncate-str", dict(scaling=dict(_YARN, truncate="false")), TypeError, "truncate"),
    ("yarn-truncate-int", dict(scaling=dict(_YARN, truncate=0)), TypeError, "truncate"),
    ("yarn-mscale-str", dict(scaling=dict(_YARN, mscale="1", mscale_all_dim=1.0)), TypeError, "mscale"),
    ("yarn-mscale-all-dim-zero-denominator",
     dict(scaling=dict(_YARN, factor=math.e, mscale=1.0, mscale_all_dim=-10.0)), ValueError, "mscale_all_dim"),
    ("yarn-ompe-zero", dict(scaling=dict(_YARN, original_max_position_embeddings=0)), ValueError,
     "original_max_position_embeddings"),
    ("yarn-ompe-float", dict(scaling=dict(_YARN, original_max_position_embeddings=4096.5)), TypeError,
     "original_max_position_embeddings"),
    ("yarn-ompe-none", dict(scaling=dict(_YARN, original_max_position_embeddings=None)), TypeError,
     "original_max_position_embeddings"),
    ("yarn-base-1", dict(scaling=_YARN, base=1.0), ValueError, "base"),
    # llama3 options
    ("llama3-low-missing", dict(scaling={k: v for k, v in _LLAMA3.items() if k != "low_freq_factor"}), ValueError,
     "low_freq_factor"),
    ("llama3-high-missing", dict(scaling={k: v for k, v in _LLAMA3.items() if k != "high_freq_factor"}), ValueError,
     "high_freq_factor"),
    ("llama3-high-not-above-low", dict(scaling=dict(_LLAMA3, high_freq_factor=1.0)), ValueError,
     "high_freq_factor.*low_freq_factor"),
    ("llama3-low-zero", dict(scaling=dict(_LLAMA3, low_freq_factor=0)), ValueError, "low_freq_factor"),
    ("llama3-high-str", dict(scaling=dict(_LLAMA3, high_freq_factor="4")), TypeError, "high_freq_factor"),
    # longrope options
    ("longrope-short-missing", dict(scaling={k: v for k, v in _LONGROPE.items() if k != "short_factor"}),
     ValueError, "short_factor"),
    ("longrope-long-missing", dict(scaling={k: v for k, v in _LONGROPE.items() if k != "long_factor"}),
     ValueError, "long_factor"),
    ("longrope-short-wrong-length", dict(scaling=dict(_LONGROPE, short_factor=_SHORT64[:-1])), ValueError,
     r"short_factor.*64"),
    ("longrope-long-wrong-length", dict(scaling=dict(_LONGROPE, long_factor=_LONG64 + [1.0])), ValueError,
     r"long_factor.*64"),
    ("longrope-length-1-would-broadcast", dict(scaling=dict(_LONGROPE, long_factor=[4.0])), ValueError,
     "long_factor"),
    ("longrope-length-vs-partial", dict(scaling=_LONGROPE, partial_rotary_factor=0.5), ValueError,
     r"short_factor.*32"),
    ("longrope-not-a-list", dict(scaling=dict(_LONGROPE, short_factor="1.0, 2.0")), TypeError, "short_factor"),
    ("longrope-tensor", dict(scaling=dict(_LONGROPE, short_factor=torch.ones(64))), TypeError, "short_factor"),
    ("longrope-empty", dict(scaling=dict(_LONGROPE, short_factor=[])), ValueError, "short_factor"),
    ("longrope-bad-element", dict(scaling=dict(_LONGROPE, long_factor=_LONG64[:-1] + ["x"])), TypeError,
     r"long_factor'\]\[63\]|long_factor.*\[63\]"),
    ("longrope-zero-element", dict(scaling=dict(_LONGROPE, short_factor=[0.0] + _SHORT64[1:])), ValueError,
     "short_factor"),
    ("longrope-attention-factor-negative", dict(scaling=dict(_LONGROPE, attention_factor=-0.5)), ValueError,
     "attention_factor"),
    # head_dim / partial_rotary_factor / rotary_dim
    ("head-dim-zero", dict(head_dim=0), ValueError, "head_dim must be a positive int"),
    ("head-dim-negative", dict(head_dim=-128), ValueError, "head_dim must be a positive int"),
    ("head-dim-float", dict(head_dim=128.0), TypeError, "head_dim"),
    ("head-dim-bool", dict(head_dim=True), TypeError, "head_dim"),
    ("head-dim-odd", dict(head_dim=127), ValueError, "rotary_dim"),
    ("head-dim-2-partial", dict(head_dim=2, partial_rotary_factor=0.5), ValueError, "rotary_dim"),
    ("partial-gives-odd", dict(head_dim=64, partial_rotary_factor=0.3), ValueError, "rotary_dim"),
    ("partial-gives-zero", dict(head_dim=64, partial_rotary_factor=0.01), ValueError, "rotary_dim"),
    ("partial-zero", dict(partial_rotary_factor=0.0), ValueError, "partial_rotary_factor"),
    ("partial-above-1", dict(partial_rotary_factor=1.5), ValueError, "partial_rotary_factor"),
    ("partial-str", dict(partial_rotary_factor="0.5"), TypeError, "partial_rotary_factor"),
    ("partial-in-dict-above-1", dict(scaling=dict(_LINEAR, partial_rotary_factor=2.0)), ValueError,
     "partial_rotary_factor"),
    ("partial-conflict", dict(scaling=dict(_LINEAR, partial_rotary_factor=0.5), partial_rotary_factor=0.25),
     ValueError, "partial_rotary_factor"),
    ("dynamic-rotary-dim-2", dict(head_dim=2, scaling={"rope_type": "dynamic", "factor": 2.0}), ValueError,
     "rotary_dim"),
    # proportional (its table spans the whole head: head_dim, not rotary_dim, must be even)
    ("proportional-head-dim-odd", dict(head_dim=127, scaling={"rope_type": "proportional"}), ValueError,
     "proportional.*even head_dim.*127"),
    ("proportional-factor-below-1", dict(scaling={"rope_type": "proportional", "factor": 0.5}), ValueError,
     "factor.*>= 1"),
    ("proportional-factor-str", dict(scaling={"rope_type": "proportional", "factor": "4"}), TypeError, "factor"),
    ("proportional-factor-none", dict(scaling={"rope_type": "proportional", "factor": None}), TypeError, "factor"),
    ("proportional-unknown-key", dict(scaling={"rope_type": "proportional", "original_max_position_embeddings": 8}),
     ValueError, "original_max_position_embeddings.*proportional"),
    ("proportional-factor-underflows", dict(scaling={"rope_type": "proportional", "factor": 1e300}), ValueError,
     "proportional.*frequency of 0"),
    ("proportional-base-underflows", dict(base=1e300, scaling={"rope_type": "proportional"}), ValueError,
     "proportional.*frequency of 0"),
    # base / rope_theta
    ("base-zero", dict(base=0.0), ValueError, r"base \(the RoPE theta\) must be > 0"),
    ("base-negative", dict(base=-10000.0), ValueError, r"base \(the RoPE theta\) must be > 0"),
    ("base-nan", dict(base=float("nan")), ValueError, "base must be finite"),
    ("base-inf", dict(base=float("inf")), ValueError, "base must be finite"),
    ("base-str", dict(base="10000"), TypeError, "base"),
    ("base-none", dict(base=None), TypeError, "base"),
    ("rope-theta-zero", dict(scaling=dict(_LINEAR, rope_theta=0.0)), ValueError, "rope_theta"),
    ("rope-theta-str", dict(scaling=dict(_LINEAR, rope_theta="1e4")), TypeError, "rope_theta"),
    ("base-conflicts-with-rope-theta", dict(scaling=dict(_LINEAR, rope_theta=1e4), base=5e5), ValueError,
     "base.*rope_theta"),
    # seq_len / max_position_embeddings
    ("seq-len-zero", dict(seq_len=0), ValueError, "seq_len must be >= 1"),
    ("seq-len-negative", dict(seq_len=-5, scaling={"rope_type": "dynamic", "factor": 2.0}), ValueError,
     "seq_len must be >= 1"),
    ("seq-len-float", dict(seq_len=4096.0), TypeError, "seq_len"),
    ("seq-len-bool", dict(seq_len=True), TypeError, "seq_len"),
    ("seq-len-float-tensor", dict(seq_len=torch.tensor(4096.0)), TypeError,
     "seq_len tensor must have an integer dtype"),
    ("seq-len-bool-tensor", dict(seq_len=torch.tensor(True)), TypeError, "seq_len tensor must have an integer dtype"),
    ("seq-len-complex-tensor", dict(seq_len=torch.tensor(4096 + 0j)), TypeError,
     "seq_len tensor must have an integer dtype"),
    ("seq-len-empty-tensor", dict(seq_len=torch.tensor([], dtype=torch.long)), ValueError,
     "one-element tensor, got a tensor of shape \\(0,\\)"),
    ("seq-len-tensor-2-elements", dict(seq_len=torch.tensor([1, 2])), ValueError, "seq_len"),
    ("seq-len-tensor-zero", dict(seq_len=torch.tensor(0)), ValueError, "seq_len must be >= 1"),
    ("seq-len-meta-tensor", dict(seq_len=torch.tensor(8, device="meta"), scaling={"rope_type": "dynamic", "factor": 2.0}),
     ValueError, "seq_len.*meta"),
    ("mpe-zero", dict(max_position_embeddings=0), ValueError, "max_position_embeddings must be a positive int"),
    ("mpe-float", dict(max_position_embeddings=2048.0), TypeError, "max_position_embeddings"),
    ("misspelt-required-key", dict(scaling={"rope_type": "linear", "facter": 4.0}), ValueError,
     "missing required key.*'factor'.*'facter'.*misspelling"),
    # values each valid alone whose result is not
    ("base-underflows-the-frequencies", dict(base=1e300), ValueError, "non-finite or non-positive frequencies"),
    ("base-overflows-the-frequencies", dict(base=1e-300), ValueError, "non-finite or non-positive frequencies"),
    ("dynamic-base-overflows-float64", dict(head_dim=4, scaling={"rope_type": "dynamic", "factor": 1e150},
                                            max_position_embeddings=1, seq_len=10**18), ValueError, "overflows"),
    ("yarn-beta-fast-past-float64", dict(scaling=dict(_YARN, beta_fast=1e308)), ValueError, "beta_fast"),
    # (0.1 * mscale * ln(factor) + 1 past the float range: an infinite ratio)
    ("yarn-attention-factor-overflows", dict(scaling={"rope_type": "yarn", "factor": 1e6, "mscale": 1.7e308,
                                                      "mscale_all_dim": 1.0}), ValueError, "attention factor.*inf"),
    ("yarn-negative-attention-factor", dict(scaling={"rope_type": "yarn", "factor": 4.0, "mscale": -100.0,
                                                     "mscale_all_dim": 1.0}), ValueError, "attention factor"),
    ("longrope-window-1-no-attention-factor",
     dict(head_dim=8, scaling={"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0] * 4,
                               "long_factor": [1.0] * 4, "original_max_position_embeddings": 1}),
     ValueError, "original_max_position_embeddings"),
]


@pytest.mark.parametrize("seq_len", [None, 5000])
def test_longrope_with_an_attention_factor_derives_no_factor(seq_len):
    # transformers uses the factor for the attention factor only: with one given, a window below the
    # original (this call's max_position_embeddings 2048 < 4096) derives none, and nothing is refused
    params = dict(_LONGROPE, attention_factor=1.2)
    _, attention_factor = check_against_hf(128, 10000.0, params, 2048, seq_len)
    assert attention_factor == 1.2


def test_yarn_truncate_takes_numpy_bools():
    import numpy as np
    for flag in (False, True):
        ours = scaling.compute_inv_freq(128, scaling=dict(_YARN, truncate=np.bool_(flag)))
        want = scaling.compute_inv_freq(128, scaling=dict(_YARN, truncate=flag))
        assert torch.equal(ours[0], want[0]) and ours[1] == want[1]
    assert scaling.normalize_scaling(dict(_YARN, truncate=np.bool_(False)))["truncate"] is False


@pytest.mark.parametrize("kwargs, exc, match", [pytest.param(*c[1:], id=c[0]) for c in INVALID])
def test_invalid_configuration_raises(kwargs, exc, match):
    kwargs = dict(kwargs)
    head_dim = kwargs.pop("head_dim", 128)
    with pytest.raises(exc, match=match):
        scaling.compute_inv_freq(head_dim, **kwargs)


def test_fractional_seq_len_is_taken_as_it_is_where_at_least_one():
    # (private: the length transformers reads from floating-point position_ids, max + 1 with its fraction)
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    got = scaling._compute_inv_freq(128, base=10000.0, scaling=dynamic, max_position_embeddings=64,
                                    partial_rotary_factor=1.0, seq_len=torch.tensor(100.5), fractional_seq_len=True)
    want, _, _ = hf_rope(128, dict(dynamic, rope_theta=10000.0), 64, seq_len=torch.tensor(100.5))
    assert torch.equal(got[0], want)
    assert not torch.equal(got[0], hf_rope(128, dict(dynamic, rope_theta=10000.0), 64, seq_len=torch.tensor(100))[0])
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="seq_len must be finite and >= 1"):
            scaling._compute_inv_freq(128, base=10000.0, scaling=dynamic, max_position_embeddings=64,
                                      partial_rotary_factor=1.0, seq_len=torch.tensor(bad), fractional_seq_len=True)
    with pytest.raises(ValueError, match="seq_len must hold a value, got a tensor on the meta device"):
        scaling._compute_inv_freq(128, base=10000.0, scaling=dynamic, max_position_embeddings=64,
                                  partial_rotary_factor=1.0, seq_len=torch.tensor(100.5, device="meta"),
                                  fractional_seq_len=True)


@pytest.mark.parametrize("bad, exc, match", [
    ({"rope_type": "linear", "factor": 0.5}, ValueError, "factor.*>= 1"),
    ({"rope_type": "llama3", "factor": 8.0}, ValueError, "missing"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "no"}, TypeError, "truncate"),
    ("yarn", TypeError, "scaling must be None or a dict"),
    # values the dict alone rules out, which a table might otherwise only fail on later, or not at all
    (dict(_YARN, attention_factor=0.0), ValueError, "attention_factor.*must be > 0"),
    (dict(_LONGROPE, attention_factor=0), ValueError, "attention_factor.*must be > 0"),
    (dict(_YARN, beta_fast=-32), ValueError, "beta_fast.*must be > 0"),
    (dict(_YARN, beta_slow=-1.0), ValueError, "beta_slow.*must be > 0"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0}, ValueError,
     r"partial_rotary_factor.*\(0, 1\]"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.5}, ValueError,
     r"partial_rotary_factor.*\(0, 1\]"),
    ({"rope_type": "default", "rope_theta": 0}, ValueError, "rope_theta.*must be > 0"),
    (dict(_LONGROPE, short_factor=[]), ValueError, "short_factor.*non-empty"),
    # the alias holding something other than a type name (not read as a missing one)
    ({"type": None, "factor": 2.0}, TypeError, r"scaling\['rope_type'\] must be a str"),
    ({"type": "", "factor": 2.0}, ValueError, r"scaling\['rope_type'\] must be one of"),
])
def test_invalid_scaling_also_rejected_by_normalize_scaling(bad, exc, match):
    with pytest.raises(exc, match=match):
        scaling.normalize_scaling(bad)


def test_transformers_only_warns_where_pirope_raises():
    """Documents the difference: transformers computes (and only logs) for these; pirope refuses."""
    for params in (
        {"rope_type": "linear", "factor": 0.5},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
         "original_max_position_embeddings": 8192},
        {"rope_type": "yarn", "factor": 8.0, "beta_fast": 1, "beta_slow": 32, "original_max_position_embeddings": 4096},
    ):
        inv_freq, _, _ = hf_rope(128, dict(params, rope_theta=10000.0), 16384)
        assert torch.isfinite(inv_freq).all()
        with pytest.raises(ValueError):
            scaling.compute_inv_freq(128, scaling=params, max_position_embeddings=16384)
