"""Numerical limits promised in README: table accuracy at long positions (against
50-digit arithmetic) and the one-rounding error bound of reduced-precision outputs."""

import mpmath
import pytest
import torch

import pirope
from reference import rope_reference


@pytest.mark.parametrize("position", [10**6, 10**9, 2**31 - 1])
def test_table_within_1e6_of_exact_up_to_int32_positions(position):
    mpmath.mp.dps = 50
    inv_freq, _ = pirope.rope_frequencies(128, scaling={"rope_type": "linear", "factor": 8.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, torch.tensor([position]))
    worst = 0.0
    for i in range(inv_freq.numel()):
        angle = mpmath.mpf(position) * mpmath.mpf(float(inv_freq[i]))
        worst = max(worst, abs(float(cos[0, i]) - float(mpmath.cos(angle))),
                    abs(float(sin[0, i]) - float(mpmath.sin(angle))))
    assert worst < 1e-6, worst


def test_float32_angles_would_not_be():
    # why the angles are float64: the float32 product (what HF computes) is far off
    inv_freq, _ = pirope.rope_frequencies(128)
    p = torch.tensor([10**6])
    f32 = (p.float()[:, None] * inv_freq[None]).cos()
    cos, _ = pirope.rope_cos_sin(inv_freq, p)
    assert (f32 - cos).abs().max() > 1e-3


@pytest.mark.parametrize("dtype,unit", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_reduced_precision_error_is_one_rounding(dtype, unit):
    inv_freq, _ = pirope.rope_frequencies(128, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, 4096)
    x = torch.randn(1, 4096, 4, 128).to(dtype)
    out = pirope.apply_rope(x, cos, sin)
    ref = rope_reference(x, cos, sin)  # exact math on the same (rounded) inputs
    err = (out.double() - ref).abs()
    # round to nearest: at most half a unit in the last place, plus float32 math noise
    assert (err <= unit * ref.abs() + 1e-6).all()
