"""RotaryEmbedding: tables, growth past the window, layouts, device moves."""

import torch

import pirope
from reference import cos_sin_table, rope_reference


def test_tables_cover_the_window_and_match_float64():
    rope = pirope.RotaryEmbedding(128, max_position_embeddings=8192,
                                  scaling={"rope_type": "linear", "factor": 4.0})
    assert rope.cos.shape == (8192, 64) and rope.cos.dtype == torch.float32
    ref_cos, ref_sin = cos_sin_table(rope.inv_freq, 8192)
    assert (rope.cos.double() - ref_cos).abs().max() < 1e-7
    assert (rope.sin.double() - ref_sin).abs().max() < 1e-7
    # PI: position m of the extended model sees the angle of position m / 4
    plain = pirope.RotaryEmbedding(128, max_position_embeddings=2048)
    torch.testing.assert_close(rope.cos[4 * 511], plain.cos[511], atol=1e-6, rtol=0)


def test_grows_for_longer_sequences():
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=16)
    q = torch.randn(1, 40, 2, 32)
    k = torch.randn(1, 40, 1, 32)
    oq, ok = rope(q, k)
    assert rope.cos.shape[0] == 40
    torch.testing.assert_close(oq.double(), rope_reference(q, rope.cos, rope.sin))
    torch.testing.assert_close(ok.double(), rope_reference(k, rope.cos, rope.sin))


def test_interleaved_and_partial():
    rope = pirope.RotaryEmbedding(64, max_position_embeddings=32, partial_rotary_factor=0.5, interleaved=True)
    assert rope.rotary_dim == 32
    q = torch.randn(2, 10, 4, 64)
    k = torch.randn(2, 10, 4, 64)
    oq, _ = rope(q, k)
    torch.testing.assert_close(oq.double(), rope_reference(q, rope.cos, rope.sin, interleaved=True))
    assert torch.equal(oq[..., 32:], q[..., 32:])


def test_buffers_follow_dtype_moves_and_are_not_saved():
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=16)
    assert rope.state_dict() == {}
    rope = rope.to(torch.float64)
    q = torch.randn(1, 4, 2, 32, dtype=torch.float64)
    oq, _ = rope(q, q.clone())
    torch.testing.assert_close(oq, rope_reference(q, rope.cos, rope.sin))
