"""pirope.eval: passkey prompts within their length for any tokenizer, and bad input.
(The perplexity and passkey behaviour on models is tested in test_examples.py.)"""

import pytest
import torch

from pirope.eval import passkey_retrieval, sliding_window_perplexity, sliding_windows


class LengthRecorder(torch.nn.Module):
    """A causal LM stand-in that records every prompt length and predicts token 0."""

    def __init__(self, vocab=300):
        super().__init__()
        self.vocab, self.lengths = vocab, []
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        self.lengths.append(input_ids.shape[1])
        return (torch.zeros(*input_ids.shape, self.vocab),)


def byte_encode(text):
    return list(text.encode())


def digits_cost_more(text):
    """Bytes, except that digits 1-9 take two ids: a random key is longer than the
    zeros the filler was sized with (as with BPE tokenizers, where " 00000" and a
    random key tokenize differently)."""
    out = []
    for b in text.encode():
        out += [b, 256] if 49 <= b <= 57 else [b]
    return out


def decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


@pytest.mark.parametrize("encode", [byte_encode, digits_cost_more])
def test_prompts_never_exceed_the_length(encode):
    model = LengthRecorder()
    lengths = [260, 333, 517]
    r = passkey_retrieval(model, encode, decode, lengths, trials=12, seed=5, max_new_tokens=1, progress=False,
                          prefix_ids=[1])
    prompts = model.lengths  # one forward per trial (max_new_tokens=1)
    assert len(prompts) == 12 * len(lengths)
    for i, k in enumerate(sorted(lengths)):
        mine = prompts[12 * i: 12 * (i + 1)]
        assert max(mine) <= k and min(mine) > k - 40, (k, mine)  # as many sentences as fit
    assert all(s["n_tokens"] <= s["length"] for s in r["samples"])


def test_a_truncating_tokenizer_is_an_error_not_a_hang():
    for encode in (lambda s: list(s.encode())[:200], lambda s: []):
        with pytest.raises(ValueError, match="must not truncate"):
            passkey_retrieval(LengthRecorder(), encode, decode, [300], trials=1, progress=False)


def test_passkey_lengths_must_be_ints():
    with pytest.raises(TypeError, match="lengths must be ints"):
        passkey_retrieval(LengthRecorder(), byte_encode, decode, [300.5], progress=False)
    with pytest.raises(TypeError, match="lengths must be an iterable"):
        passkey_retrieval(LengthRecorder(), byte_encode, decode, 300, progress=False)


def test_too_short_names_the_requested_length():
    with pytest.raises(ValueError, match="passkey length 100 is shorter than the prompt without filler \\(10 prefix"):
        passkey_retrieval(LengthRecorder(), byte_encode, decode, [100], prefix_ids=[1] * 10, progress=False)


def test_perplexity_bad_tokens_and_counts():
    with pytest.raises(ValueError, match="tokens must not be empty"):
        sliding_window_perplexity(LengthRecorder(), [], 8, 4, progress=False)
    with pytest.raises(TypeError, match="n_tokens must be an int"):
        sliding_windows(10.5, 4, 2)
    with pytest.raises(ValueError, match="n_tokens must be >= 0"):
        sliding_windows(-1, 4, 2)
    # stride = window: back-to-back windows, each scoring all but its first token
    assert sliding_windows(12, 4, 4) == [(0, 3), (3, 3), (6, 3), (8, 2)]
