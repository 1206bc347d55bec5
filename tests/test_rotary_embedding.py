"""RotaryEmbedding: tables, growth past the window, layouts, device moves."""

import pytest
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


def test_half_and_bfloat16_moves_keep_float32_tables():
    # model.to(bfloat16) must not round the tables (nor the frequencies a longer table
    # is rebuilt from): the module stays exactly the float32 one
    ref = pirope.RotaryEmbedding(128, max_position_embeddings=16, scaling={"rope_type": "linear", "factor": 2.0})
    for move in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        rope = move(pirope.RotaryEmbedding(128, max_position_embeddings=16,
                                           scaling={"rope_type": "linear", "factor": 2.0}))
        assert rope.cos.dtype == rope.sin.dtype == rope.inv_freq.dtype == torch.float32
        for seqlen in (8, 4096, 8):  # inside the table, growing it, inside again
            q = torch.randn(1, seqlen, 1, 128)
            torch.testing.assert_close(rope(q, q.clone())[0], ref(q, q.clone())[0], rtol=0, atol=0)


def test_grows_for_position_ids_past_the_table():
    # a decode step (one token) at a position past max_position_embeddings and seqlen
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=16)
    q, k = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 1, 32)
    pos = torch.tensor([[20]])
    oq, ok = rope(q, k, pos)
    assert rope.cos.shape[0] == 21
    want = pirope.RotaryEmbedding(32, max_position_embeddings=64)
    torch.testing.assert_close(oq.double(), rope_reference(q, want.cos, want.sin, pos))
    torch.testing.assert_close(ok.double(), rope_reference(k, want.cos, want.sin, pos))
    # the maximum is read again when the same tensor is changed in place
    pos[0, 0] = 40
    rope(q, k, pos)
    assert rope.cos.shape[0] == 41


def test_rejects_a_head_dim_other_than_the_modules():
    rope = pirope.RotaryEmbedding(64, max_position_embeddings=32)
    q = torch.randn(1, 8, 4, 64)
    with pytest.raises(ValueError, match="q must have head_dim 64"):
        rope(torch.randn(1, 8, 4, 128), q)
    with pytest.raises(ValueError, match="k must have head_dim 64"):
        rope(q, torch.randn(1, 8, 4, 32))
