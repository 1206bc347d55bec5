"""Tests of pirope.eval and the examples (examples/finetune_pi.py, evaluate.py,
attention_score_bound.py) on tiny configurations: seconds each, CPU only."""

import copy
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import pirope
from pirope.eval import (
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    passkey_k_max,
    passkey_prompt,
    passkey_retrieval,
    sliding_window_perplexity,
    sliding_windows,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _load(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fp():
    return _load("finetune_pi")


def encode(text):
    return list(text.encode("utf-8"))


def decode(ids):
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------
# sliding-window perplexity
# ---------------------------------------------------------------------------------
class UniformLM(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.calls = []

    def forward(self, input_ids):
        self.calls.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class BigramLM(torch.nn.Module):
    """Logits depend only on the current token: perplexity is context independent."""

    def __init__(self, vocab, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g), requires_grad=False)

    def forward(self, input_ids, logits_to_keep=0):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def bigram_ppl(model, tokens):
    logp = torch.log_softmax(model.table[tokens[:-1]].double(), -1)
    return math.exp(float(-logp.gather(-1, tokens[1:, None]).mean()))


@pytest.mark.parametrize("vocab", [7, 260])
def test_uniform_logits_perplexity_is_vocab_size(vocab):
    tokens = torch.randint(0, vocab, (300,), generator=torch.Generator().manual_seed(0))
    model = UniformLM(vocab)
    ppl = sliding_window_perplexity(model, tokens, 64, 16, batch_size=3, progress=False)
    assert ppl == pytest.approx(vocab, rel=1e-6)  # float32 log_softmax
    assert all(shape[1] == 64 for shape in model.calls)  # every window has the full length


@pytest.mark.parametrize("n,window,stride", [(100, 10, 3), (64, 64, 8), (65, 64, 64), (257, 32, 32), (50, 2, 1),
                                             (1000, 128, 100)])
def test_sliding_windows_score_each_token_once(n, window, stride):
    count = torch.zeros(n, dtype=torch.long)
    wins = sliding_windows(n, window, stride)
    assert wins[0] == (0, window - 1)
    for begin, n_scored in wins:
        assert 0 <= begin and begin + window <= n
        assert 1 <= n_scored <= window - 1 or (begin == 0 and n_scored == window - 1)
        count[begin + window - n_scored : begin + window] += 1
    assert count[0] == 0 and bool((count[1:] == 1).all())
    assert all(b2 - b1 <= stride for (b1, _), (b2, _) in zip(wins, wins[1:]))


@pytest.mark.parametrize("window,stride,batch", [(16, 4, 1), (16, 16, 5), (40, 7, 2), (300, 300, 1)])
def test_sliding_window_matches_hand_computed_bigram(window, stride, batch):
    model = BigramLM(11)
    tokens = torch.randint(0, 11, (300,), generator=torch.Generator().manual_seed(1))
    ppl, nll, n = sliding_window_perplexity(model, tokens, window, stride, batch_size=batch, progress=False,
                                            return_nll=True)
    assert n == 299
    assert ppl == pytest.approx(bigram_ppl(model, tokens), rel=1e-6)


def test_sliding_window_uses_context_and_restores_training_mode():
    """A model that can only predict from context far away: the longer window helps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=64))
    model.train()
    tokens = torch.randint(0, 16, (100,))
    a = sliding_window_perplexity(model, tokens, 32, 8, batch_size=4, progress=False)
    b = sliding_window_perplexity(model, tokens.tolist(), 32, 8, batch_size=1, progress=False)
    assert model.training
    assert a == pytest.approx(b, rel=1e-5)
    # logits_to_keep path == full logits path
    with torch.no_grad():
        full = torch.log_softmax(model.eval()(input_ids=tokens[None, :32]).logits[0, :-1], -1)
    nll = -full.gather(-1, tokens[1:32, None]).sum()
    ppl1, tot, n = sliding_window_perplexity(model, tokens[:32], 32, 8, progress=False, return_nll=True)
    assert n == 31 and tot == pytest.approx(float(nll), rel=1e-5)


@pytest.mark.parametrize("window,stride,batch", [(32, 8, 1), (32, 8, 3), (40, 40, 2), (100, 100, 1)])
def test_sliding_window_scores_by_chunks_as_from_the_logits(window, stride, batch, monkeypatch):
    """A Hugging Face causal LM is scored by pirope.training's chunked loss (the output
    projection of the scored tokens only, no (window, vocab) logits): the same perplexity
    as from its logits."""
    import pirope.training
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=128))
    tokens = torch.randint(0, 50, (150,), generator=torch.Generator().manual_seed(2))
    calls = []
    chunkable = pirope.training._chunkable
    monkeypatch.setattr(pirope.training, "_chunkable", lambda *a: calls.append(1) or chunkable(*a))
    got = sliding_window_perplexity(model, tokens, window, stride, batch_size=batch, progress=False, return_nll=True)
    monkeypatch.setattr(pirope.training, "_chunkable", lambda *a: False)
    want = sliding_window_perplexity(model, tokens, window, stride, batch_size=batch, progress=False,
                                     return_nll=True)
    assert calls == [1] and got[2] == want[2] == 149
    assert got[1] == pytest.approx(want[1], rel=1e-6)


@pytest.mark.parametrize("use_keep", [True, False])
def test_sliding_window_upcasts_logits_a_block_of_rows_at_a_time(use_keep):
    # the logits path (models the chunked loss does not take) never holds (window, vocab) float32
    # copies: blocks of rows, the same numbers (log_softmax is row by row)
    from pirope.eval import _scored_nll_from_logits

    model = BigramLM(11)
    ids = torch.randint(0, 11, (2, 40), generator=torch.Generator().manual_seed(3))
    batch = [(0, 39), (10, 5)]
    whole = _scored_nll_from_logits(model, ids, batch, 10, use_keep)
    assert _scored_nll_from_logits(model, ids, batch, 10, use_keep, rows=7) == whole
    logp = torch.log_softmax(model.table[ids[:, :-1]].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert whole == pytest.approx(-float(logp[0].double().sum() + logp[1, -5:].double().sum()), rel=1e-12)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(window=1, stride=1), ValueError, "window must be >= 2"),
    (dict(window=16, stride=17), ValueError, "stride must be <= window"),
    (dict(window=16, stride=0), ValueError, "stride must be >= 1"),
    (dict(window=1000, stride=8), ValueError, "at least as long as window"),
    (dict(window=16.0, stride=8), TypeError, "window must be an int"),
    (dict(window=16, stride=8, batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(window=16, stride=8, device="meta"), ValueError, "device must hold data"),
    (dict(window=16, stride=8, device="bogus"), ValueError, "device must be a torch device"),
])
def test_sliding_window_bad_input(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        sliding_window_perplexity(UniformLM(5), torch.zeros(100, dtype=torch.long), progress=False, **kwargs)


@pytest.mark.parametrize("tokens,exc,msg", [
    (torch.zeros(2, 50, dtype=torch.long), ValueError, "tokens must be 1-D"),
    (torch.zeros(50), TypeError, "integer token ids"),
    (torch.full((50,), -1), ValueError, "non-negative"),
])
def test_sliding_window_bad_tokens(tokens, exc, msg):
    with pytest.raises(exc, match=msg):
        sliding_window_perplexity(UniformLM(5), tokens, 8, 4, progress=False)


# ---------------------------------------------------------------------------------
# passkey retrieval
# ---------------------------------------------------------------------------------
def test_passkey_k_max_rule():
    assert passkey_k_max({256: 1.0, 512: 0.2, 768: 0.1, 1024: 1.0}) == 512
    assert passkey_k_max({256: 0.1, 512: 1.0}) == 0
    assert passkey_k_max({1024: 0.3, 256: 0.5, 512: 0.9}) == 1024  # order of the dict does not matter
    assert passkey_k_max({256: 0.5, 512: 0.4}, threshold=0.5) == 256


def test_passkey_prompt_is_the_papers():
    p = passkey_prompt(7, 3, "12345")
    assert p.startswith(PASSKEY_INTRO)
    assert p.endswith("What is the pass key? The pass key is")
    assert "The pass key is 12345. Remember it. 12345 is the pass key." in p
    assert p.count("The grass is green.") == 2 and PASSKEY_FILLER.split(". ")[1] + "." in p
    before = p.split("The pass key is 12345")[0]
    assert before.count(".") - PASSKEY_INTRO.count(".") == 3  # key after 3 filler sentences
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(3, 4, "12345")


class OracleLM(torch.nn.Module):
    """Byte-level 'model' that reads the key from the prompt and answers it
    (or a wrong key): the logits put all mass on the next answer byte."""

    def __init__(self, wrong=False, max_len=None):
        super().__init__()
        self.wrong, self.max_len, self.lengths = wrong, max_len, []

    def forward(self, input_ids):
        text = decode(input_ids[0].tolist())
        self.lengths.append(input_ids.shape[1])
        key = re.search(r"The pass key is (\d{5})\. Remember", text).group(1)
        if self.wrong or (self.max_len is not None and self.lengths[-1] > self.max_len + 6):
            key = "%05d" % ((int(key) + 1) % 100000)
        answer = " " + key + "."
        done = len(text) - (text.rindex("The pass key is") + len("The pass key is"))
        logits = torch.zeros(1, input_ids.shape[1], 256)
        logits[0, -1, ord(answer[min(done, len(answer) - 1)])] = 1.0
        return SimpleNamespace(logits=logits)


def test_passkey_retrieval_oracle_and_wrong_models():
    lengths = [300, 500, 700, 900]
    oracle = OracleLM()
    r = passkey_retrieval(oracle, encode, decode, lengths, trials=3, seed=1, progress=False)
    assert r["success"] == {k: 1.0 for k in lengths} and r["k_max"] == 900 and r["trials"] == 3
    assert all(s["key"] in s["output"] and 10000 <= int(s["key"]) <= 99999 for s in r["samples"])
    assert all(s["n_tokens"] <= s["length"] and s["n_tokens"] > s["length"] - 25 for s in r["samples"])
    r = passkey_retrieval(OracleLM(wrong=True), encode, decode, lengths, trials=2, progress=False)
    assert r["success"] == {k: 0.0 for k in lengths} and r["k_max"] == 0
    # succeeds only on prompts up to 500 tokens: k_max = 500
    r = passkey_retrieval(OracleLM(max_len=500), encode, decode, lengths, trials=2, progress=False)
    assert r["k_max"] == 500 and r["success"][700] == 0.0


def test_passkey_keys_and_depths_are_random_but_seeded():
    a = passkey_retrieval(OracleLM(), encode, decode, [600], trials=5, seed=3, progress=False)
    b = passkey_retrieval(OracleLM(), encode, decode, [600], trials=5, seed=3, progress=False)
    c = passkey_retrieval(OracleLM(), encode, decode, [600], trials=5, seed=4, progress=False)
    assert a["samples"] == b["samples"] and a["samples"] != c["samples"]


def test_passkey_bad_input():
    with pytest.raises(ValueError, match="shorter than the prompt"):
        passkey_retrieval(OracleLM(), encode, decode, [50], progress=False)
    with pytest.raises(ValueError, match="lengths must not be empty"):
        passkey_retrieval(OracleLM(), encode, decode, [], progress=False)
    with pytest.raises(ValueError, match="trials must be >= 1"):
        passkey_retrieval(OracleLM(), encode, decode, [300], trials=0, progress=False)
    with pytest.raises(TypeError, match="callables"):
        passkey_retrieval(OracleLM(), None, decode, [300], progress=False)
    with pytest.raises(TypeError, match="key must be a str, got NoneType"):
        passkey_prompt(1, 0, None)
    with pytest.raises(TypeError, match="intro must be a str, got int"):
        passkey_prompt(1, 0, "12345", intro=3)


def test_passkey_with_real_model_and_kv_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=128))
    r = passkey_retrieval(model, encode, decode, [100, 128], trials=2, intro="", progress=False)
    assert set(r["success"]) == {100, 128} and r["k_max"] in (0, 100, 128)


# ---------------------------------------------------------------------------------
# examples/finetune_pi.py: demo (tiny) and real-checkpoint fine-tuning
# ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_demo_runs_all_paths_and_caches_pretraining(fp, tmp_path):
    out = str(tmp_path / "demo")
    s = fp.main(["--tiny", "--out", out, "--no-progress"])
    assert not s["pretrain_cached"]
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert len(saved["results"]) == 6 and saved["windows"] == [128, 256, 512]
    for r in saved["results"].values():
        assert set(r["ppl"]) == {"128", "256", "512"} and all(v > 1 for v in r["ppl"].values())
        assert "k_max" in r["passkey"]
        assert set(r["copy_check"]) == {"nll_first_copy", "nll_second_copy"}
    log = saved["finetune_perplexity_log"]["PI fine-tuning"]["512"]
    assert set(log) == {"0", "2", "4"}
    assert os.path.getsize(os.path.join(out, "results.png")) > 1000
    assert "| model | 128 | 256 | 512 | passkey k_max |" in saved["table"]
    assert saved["passkey_lengths"][0] >= 90 and saved["passkey_lengths"][-1] == 512
    assert "| 512 |" in saved["passkey_table"].splitlines()[0]
    assert len(saved["losses"]["PI fine-tuning"]) == len(saved["losses"]["NTK-by-parts fine-tuning"]) == 4
    ablation = saved["pair_ablation"]
    assert [r["scaled"] for r in ablation][0] == "all pairs (PI)" and ablation[-1]["pairs"] == []
    assert all(set(r["passkey"]) == {str(k) for k in saved["passkey_lengths"] if k <= 128} for r in ablation)
    assert "| all pairs (PI) |" in saved["pair_ablation_table"]
    # PI zero-shot equals original at positions < L? No: PI changes every angle. But the
    # PI model's config must be the linear-scaled one and load with plain transformers.
    from transformers import AutoModelForCausalLM

    pi = AutoModelForCausalLM.from_pretrained(os.path.join(out, "pi_ft"))
    assert pi.config.rope_parameters["rope_type"] == "linear" and pi.config.rope_parameters["factor"] == 4
    assert pi.config.max_position_embeddings == 512
    nb = AutoModelForCausalLM.from_pretrained(os.path.join(out, "ntk_by_parts_ft"))
    assert nb.config.rope_parameters["rope_type"] == "llama3" and nb.config.max_position_embeddings == 512
    s2 = fp.main(["--tiny", "--out", out, "--no-progress"])
    assert s2["pretrain_cached"]
    assert s2["results"]["original (extrapolation)"]["ppl"] == pytest.approx(
        s["results"]["original (extrapolation)"]["ppl"])


def test_demo_training_mix_is_deterministic_and_well_formed(fp):
    """The demo's pretraining / fine-tuning data: stdlib text mixed with passkey
    documents (starting at position 0, answered) and repeated random strings."""
    from pirope.eval import PASSKEY_QUESTION

    cfg = dict(fp.DEMO, mix=(0.5, 0.3))
    text = torch.tensor(list(b"def f(x):\n    return x + 1\n\n" * 400), dtype=torch.long)
    fn = fp.mixed_batch_fn(text, cfg)
    a = fn(64, 129, torch.Generator().manual_seed(0))
    b = fn(64, 129, torch.Generator().manual_seed(0))
    assert a.shape == (64, 129) and torch.equal(a, b) and int(a.max()) < 256
    docs = [fp.byte_decode(r.tolist()) for r in a]
    pk = [d for d in docs if d.startswith("The pass key is")]
    assert 15 <= len(pk) <= 50
    for d in pk:
        key = re.match(r"The pass key is (\d{5})\.", d).group(1)
        assert d.split(PASSKEY_QUESTION)[1].startswith(f" {key}.")
    copies = [d for d in docs if re.search(r"([a-z0-9]{8,}).*\1", d, re.S) and "def f" in d and d not in pk]
    assert len(copies) >= 5
    c = fn(8, 513, torch.Generator().manual_seed(1))  # fine-tuning length
    assert c.shape == (8, 513)


def test_ntk_by_parts_keeps_fast_pairs_and_interpolates_slow_ones(fp):
    """The demo's control arm: rotary pairs with a wavelength below the old window keep
    their frequency, those above factor x window are divided by the factor (PI), and
    the saved model equals transformers' own llama3-scaled model on the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    inv, att = pirope.rope_frequencies(64, scaling=fp.ntk_by_parts_scaling(128, 4), max_position_embeddings=512)
    plain, _ = pirope.rope_frequencies(64)
    wavelength = 2 * math.pi / plain.double()
    fast, slow = wavelength < 128, wavelength > 512
    assert att == 1.0 and fast.sum() >= 8 and slow.sum() >= 8
    torch.testing.assert_close(inv[fast], plain[fast], rtol=0, atol=0)
    torch.testing.assert_close(inv[slow], plain[slow] / 4)
    mid = ~(fast | slow)
    assert bool(((inv[mid] < plain[mid]) & (inv[mid] > plain[mid] / 4)).all())

    torch.manual_seed(0)
    conf = dict(vocab_size=32, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    m = LlamaForCausalLM(LlamaConfig(**conf, max_position_embeddings=128))
    ref = LlamaForCausalLM(LlamaConfig(**conf, max_position_embeddings=512, rope_parameters={
        **fp.ntk_by_parts_scaling(128, 4), "rope_theta": 10000.0}))
    ref.load_state_dict(m.state_dict())
    fp.extend_model_ntk_by_parts(m, 4)
    assert m.config.max_position_embeddings == 512
    assert m.model.rotary_emb.max_position_embeddings == 512  # the patched module says so too, as after PI
    ids = torch.randint(0, 32, (1, 300))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_scale_pairs_divides_only_the_given_pairs(fp):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=128))
    before = m.model.rotary_emb.inv_freq.clone()
    fp.scale_pairs(m, 4.0, range(3, before.numel()))
    after = m.model.rotary_emb.inv_freq
    torch.testing.assert_close(after[:3], before[:3], rtol=0, atol=0)
    torch.testing.assert_close(after[3:], before[3:] / 4)
    # what transformers restores the frequencies to (its dynamic update, back inside the window)
    torch.testing.assert_close(m.model.rotary_emb.original_inv_freq, after, rtol=0, atol=0)


def test_cosine_schedule_of_the_demos_pretraining(fp):
    """Linear warm-up to the full rate over the warm-up steps, then a half cosine down to
    ``floor`` at the last step, and ``floor`` after it."""
    f = fp.cosine_lambda(10, 110, floor=0.1)
    steps = (0, 4, 9, 10, 35, 60, 85, 110, 200)
    expected = [0.1, 0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55,
                0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.1, 0.1]
    assert [f(s) for s in steps] == pytest.approx(expected)


def test_extend_model_transformers_fallback(fp):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=64))
    ids = torch.randint(0, 32, (1, 200))
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=256,
                                       rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}))
    ref.load_state_dict(m.state_dict())
    fp.extend_model(m, 4, impl="transformers")
    assert m.config.max_position_embeddings == 256 and m.config.rope_parameters["rope_type"] == "linear"
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref(input_ids=ids).logits)
    with pytest.raises(ValueError, match="impl"):
        fp.extend_model(m, 2, impl="nope")
    try:
        import pirope.integrations.transformers  # noqa: F401
    except ImportError:
        return
    m2 = LlamaForCausalLM(ref.config.__class__(**{**ref.config.to_dict(), "max_position_embeddings": 64,
                                                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}))
    m2.load_state_dict(ref.state_dict())
    fp.extend_model(m2, max_position_embeddings=256, impl="pirope")
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=32))
    model.save_pretrained(str(d / "model"))
    data = d / "data.txt"
    data.write_bytes(open(os.path.join(os.path.dirname(os.__file__), "os.py"), "rb").read()[:20000])
    return str(d / "model"), str(data)


def _ft_args(ckpt, data, out, *extra):
    return ["--model", ckpt, "--data", data, "--factor", "2", "--steps", "3", "--batch-size", "4",
            "--lr", "1e-3", "--warmup-steps", "2", "--out", out, "--no-progress", *extra]


def test_finetune_checkpoint_round_trip(fp, tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt, data = tiny_ckpt
    out = str(tmp_path / "ft")
    r = fp.main(_ft_args(ckpt, data, out))
    assert r["new_window"] == 64 and len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    assert loaded.config.rope_parameters["rope_type"] == "linear"
    assert loaded.config.rope_parameters["factor"] == 2.0 and loaded.config.max_position_embeddings == 64
    ids = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, r["model"].eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    with open(os.path.join(out, "train_log.json")) as f:
        log = json.load(f)
    assert log["losses"] == r["losses"]
    # 3 steps x 4 sequences x 64 tokens in the time it took
    assert log["tokens_per_s"] == pytest.approx(3 * 4 * 64 / log["train_time_s"], rel=1e-9)
    # the weights did change
    orig = AutoModelForCausalLM.from_pretrained(ckpt)
    assert not torch.equal(orig.lm_head.weight, loaded.lm_head.weight)


@pytest.mark.parametrize("impl", ["pirope", "transformers"])
@pytest.mark.parametrize("family", ["Qwen2", "Mistral", "Glm"])
def test_finetune_checkpoint_of_another_family(fp, tmp_path, family, impl):
    # not only LLaMA: any architecture the integration supports, by either PI implementation
    # (GLM: partial rotary, kept in the saved config)
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32, pad_token_id=0, eos_token_id=1)
    getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(str(tmp_path / "model"))
    data = tmp_path / "data.txt"
    data.write_bytes(open(os.path.join(os.path.dirname(os.__file__), "os.py"), "rb").read()[:20000])
    out = str(tmp_path / "ft")
    r = fp.main(_ft_args(str(tmp_path / "model"), str(data), out, "--pi-impl", impl, "--no-gradient-checkpointing"))
    assert r["new_window"] == 64 and all(math.isfinite(x) for x in r["losses"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    assert type(loaded).__name__ == f"{family}ForCausalLM"
    assert loaded.config.rope_parameters["factor"] == 2.0 and loaded.config.max_position_embeddings == 64
    assert loaded.config.rope_parameters.get("partial_rotary_factor") == config.rope_parameters.get(
        "partial_rotary_factor")
    ids = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, r["model"].eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def _phi3_ckpt(path):
    """A tiny Phi-3 checkpoint (window 32; its config class takes only default or LongRoPE) at path."""
    import transformers

    config = transformers.Phi3Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                     original_max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2)
    transformers.Phi3ForCausalLM(config).save_pretrained(str(path))
    return str(path)


def _gemma3_ckpt(path):
    """A tiny Gemma 3 text checkpoint (window 32, RoPE per layer type) at path."""
    import transformers

    config = transformers.Gemma3TextConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                           max_position_embeddings=32, sliding_window=16,
                                           layer_types=["sliding_attention", "full_attention"])
    transformers.Gemma3ForCausalLM(config).save_pretrained(str(path))
    return str(path)


def test_finetune_transformers_impl_refuses_what_it_cannot_write(fp, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_bytes(b"x" * 1000)
    _bad(fp, _ft_args(_phi3_ckpt(tmp_path / "phi3"), str(data), str(tmp_path / "o"), "--pi-impl", "transformers"),
         capsys, "--pi-impl transformers cannot extend a 'phi3' model")
    _bad(fp, _ft_args(_gemma3_ckpt(tmp_path / "gemma3"), str(data), str(tmp_path / "o"), "--pi-impl", "transformers"),
         capsys, "cannot extend a 'gemma3_text' model: RoPE per layer type")


def test_finetune_max_position_embeddings_flag(fp, tiny_ckpt, tmp_path):
    ckpt, data = tiny_ckpt
    r = fp.main(["--model", ckpt, "--data", data, "--max-position-embeddings", "96", "--steps", "1",
                 "--batch-size", "2", "--out", str(tmp_path / "o"), "--no-progress", "--pi-impl", "transformers",
                 "--no-gradient-checkpointing"])
    assert r["new_window"] == 96 and r["factor"] == pytest.approx(3.0)


def _scaled_ckpt(tmp_path, rope, family="Llama"):
    """A tiny checkpoint of ``family`` (window 32) whose RoPE is already scaled by ``rope``, and data."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rope_parameters=rope)
    getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(str(tmp_path / "scaled"))
    data = tmp_path / "data.txt"
    data.write_bytes(open(os.path.join(os.path.dirname(os.__file__), "os.py"), "rb").read()[:20000])
    return str(tmp_path / "scaled"), str(data)


LLAMA3 = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 10000.0}
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
# Ministral 3's checkpoints: YaRN with its attention temperature's keys, the window among them
MINISTRAL3 = {**YARN, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
              "llama_4_scaling_beta": 0.1, "max_position_embeddings": 32}


@pytest.mark.parametrize("scaling", ["ntk-by-parts", "own-llama3", "own-yarn", "own-ministral3"])
def test_finetune_by_another_scaling_saves_it_and_round_trips(fp, tiny_ckpt, tmp_path, scaling):
    # --scaling ntk-by-parts on a plain-RoPE checkpoint: the demo's control arm's dict over its
    # window; --scaling own on a Llama 3.x / YaRN checkpoint: its own dict with the factor times
    # --factor (the same original window); either saved, and loaded back by plain transformers
    from transformers import AutoModelForCausalLM

    flag = "own" if scaling.startswith("own") else scaling
    if scaling == "ntk-by-parts":
        (ckpt, data), expected = tiny_ckpt, {**fp.ntk_by_parts_scaling(32, 2.0), "rope_theta": 10000.0}
    elif scaling == "own-ministral3":  # (the window inside its rope_parameters follows the new one)
        (ckpt, data), expected = (_scaled_ckpt(tmp_path, MINISTRAL3, "Ministral3"),
                                  {**MINISTRAL3, "factor": 4.0, "max_position_embeddings": 64})
    else:
        rope = LLAMA3 if scaling == "own-llama3" else YARN
        (ckpt, data), expected = _scaled_ckpt(tmp_path, rope), {**rope, "factor": 4.0}
    out = str(tmp_path / "ft")
    r = fp.main(_ft_args(ckpt, data, out, "--scaling", flag))
    assert r["new_window"] == 64 and all(math.isfinite(x) for x in r["losses"])
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    assert "Pirope" not in type(loaded.model.rotary_emb).__name__
    assert loaded.config.rope_parameters == expected and loaded.config.max_position_embeddings == 64
    ids = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, r["model"].eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    with open(os.path.join(out, "train_log.json")) as f:
        log = json.load(f)
    assert log["scaling"] == flag
    assert log["rope_parameters"] == expected


def test_finetune_scaling_bad_input(fp, tiny_ckpt, tmp_path, capsys):
    ckpt, data = tiny_ckpt
    out = str(tmp_path / "o")
    _bad(fp, _ft_args(ckpt, data, out, "--scaling", "own"), capsys,
         "--scaling own extends a checkpoint's own 'yarn' or 'llama3' scaling (its factor times F); --model")
    _bad(fp, _ft_args(ckpt, data, out, "--scaling", "ntk-by-parts", "--pi-impl", "transformers"), capsys,
         "--pi-impl transformers is a Position Interpolation implementation (--scaling pi), not for --scaling "
         "ntk-by-parts")
    llama3, data = _scaled_ckpt(tmp_path, LLAMA3)
    for scaling in ("pi", "ntk-by-parts"):
        _bad(fp, _ft_args(llama3, data, out, "--scaling", scaling), capsys,
             f"already uses rope scaling 'llama3'; --scaling {scaling} extends plain-RoPE models; extend it by its "
             "own scaling with --scaling own")
    _bad(fp, _ft_args(_gemma3_ckpt(tmp_path / "gemma3"), data, out, "--scaling", "ntk-by-parts"), capsys,
         "has RoPE per layer type; this example extends those by --scaling pi")
    # refused only once the model is loaded: Phi-3's config class takes no llama3 scaling
    _bad(fp, _ft_args(_phi3_ckpt(tmp_path / "phi3"), data, out, "--scaling", "ntk-by-parts"), capsys,
         "--scaling ntk-by-parts: ")
    assert not os.path.exists(out)


def _config_json(path, **fields):
    """A directory holding only a hand-written config.json: a tiny model's sizes (window 32) and ``fields``."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 32, **fields}))
    return str(path)


def test_scaling_checks_read_the_config_as_transformers_does(fp, tmp_path, capsys):
    # the checks before any weights load read config.json through transformers: a multimodal
    # model's text config (Llama 3.2 Vision's llama3 RoPE and window), a Gemma 3 config in its
    # legacy form (no rope_parameters: RoPE per layer type all the same), a YaRN without its factor
    import transformers

    failures = []

    def fail(msg):
        failures.append(msg)
        raise SystemExit(2)

    mllama = transformers.MllamaConfig(
        text_config=dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         cross_attention_layers=[1], rope_parameters=LLAMA3),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, image_size=28, patch_size=14,
                           max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
                           supported_aspect_ratios=[[1, 1], [1, 2]], attention_heads=2, intermediate_size=64))
    mllama.save_pretrained(str(tmp_path / "mllama"))
    config, text = fp.read_text_config(str(tmp_path / "mllama"), fail)
    assert text is config.text_config and text.max_position_embeddings == 32
    fp.check_scaling(config, text, "mllama", "own", "auto", fail)  # accepted
    with pytest.raises(SystemExit):
        fp.check_scaling(config, text, "mllama", "pi", "auto", fail)
    assert "already uses rope scaling 'llama3'" in failures[-1]
    with pytest.raises(SystemExit):
        fp.check_scaling(config, text, "mllama", "pi", "transformers", fail)
    assert "its RoPE is in a multimodal model's text config ('mllama')" in failures[-1]
    gemma3 = _config_json(tmp_path / "gemma3", model_type="gemma3_text", num_key_value_heads=2, head_dim=16,
                          sliding_window=16, rope_theta=10000.0, rope_local_base_freq=10000.0, rope_scaling=None,
                          layer_types=["sliding_attention", "full_attention"])
    config, text = fp.read_text_config(gemma3, fail)
    with pytest.raises(SystemExit):
        fp.check_scaling(config, text, "gemma3", "ntk-by-parts", "auto", fail)
    assert "has RoPE per layer type" in failures[-1]
    yarn = _config_json(tmp_path / "yarn", model_type="llama", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": 16})  # (no factor)
    data = tmp_path / "data.txt"
    data.write_bytes(b"x" * 1000)
    _bad(fp, _ft_args(yarn, str(data), str(tmp_path / "o"), "--scaling", "own"), capsys,
         f"--model {yarn!r}: transformers cannot read its config.json (KeyError")
    assert not os.path.exists(tmp_path / "o")
    # evaluate.py --factor: the same checks, before any weights load
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    _bad(_load("evaluate"), ["--model", str(tmp_path / "gpt2"), "--factor", "2", "--no-progress"], capsys,
         "is a 'gpt2' model; this example extends the architectures")


def _bad(fp, argv, capsys, msg):
    with pytest.raises(SystemExit) as e:
        fp.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err, err


def test_finetune_bad_input(fp, tiny_ckpt, tmp_path, capsys, monkeypatch):
    ckpt, data = tiny_ckpt
    out = str(tmp_path / "o")
    _bad(fp, _ft_args(str(tmp_path / "missing"), data, out), capsys, "is not a directory")
    (tmp_path / "empty").mkdir()
    _bad(fp, _ft_args(str(tmp_path / "empty"), data, out), capsys, "has no config.json")
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    _bad(fp, _ft_args(str(gpt), data, out), capsys, "is a 'gpt2' model; this example extends the architectures")
    short = tmp_path / "short.txt"
    short.write_text("x" * 64)  # the new window (2 x 32): one token short of a window + its target
    # (the byte count, checked before loading anything)
    _bad(fp, _ft_args(ckpt, str(short), out), capsys, "fewer than the new window + 1 (65 tokens needed)")
    _bad(fp, _ft_args(ckpt, str(tmp_path / "nodata"), out), capsys, "does not exist")
    args = _ft_args(ckpt, data, out)
    i = args.index("--factor")
    _bad(fp, args[:i + 1] + ["0.5"] + args[i + 2:], capsys, "--factor must be >= 1")
    _bad(fp, args[:i + 1] + ["1"] + args[i + 2:], capsys, "must be larger than the model's own window")
    _bad(fp, args[:i] + ["--max-position-embeddings", "16"] + args[i + 2:], capsys,
         "must be larger than the model's own window")
    _bad(fp, args[:i] + args[i + 2:], capsys, "give --factor F or --max-position-embeddings N")
    _bad(fp, args + ["--max-position-embeddings", "65"], capsys,
         "--factor 2.0 and --max-position-embeddings 65 disagree")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _bad(fp, _ft_args(ckpt, data, str(blocker / "sub")), capsys, "is not writable")
    _bad(fp, ["--data", data, "--factor", "2"], capsys, "need --model")
    with monkeypatch.context() as env:  # as torchrun sets it: one sequence per process and micro-step
        env.setenv("WORLD_SIZE", "3")
        _bad(fp, _ft_args(ckpt, data, out), capsys, "--batch-size 4 must be divisible by the world size 3")
    assert not os.path.exists(out)  # nothing was written for any of the bad inputs


def test_extend_model_non_integer_factor_same_in_both_impls(fp):
    """A factor that gives no whole-number window (32 x 3.3 = 105.6): pirope's integration
    and transformers' linear scaling apply the same factor (exactly the one given) and the
    same window, and compute the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32)
    torch.manual_seed(0)
    state = LlamaForCausalLM(LlamaConfig(**conf)).state_dict()
    ids = torch.randint(0, 32, (1, 106))
    got = {}
    for impl in ("auto", "transformers"):
        m = LlamaForCausalLM(LlamaConfig(**conf))
        m.load_state_dict(state)
        fp.extend_model(m, 3.3, impl=impl)
        with torch.no_grad():
            got[impl] = (m.config.rope_parameters["factor"], m.config.max_position_embeddings,
                         m.eval()(input_ids=ids).logits)
    assert got["auto"][:2] == got["transformers"][:2] == (3.3, 106)
    torch.testing.assert_close(got["auto"][2], got["transformers"][2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one of factor and max_position_embeddings"):
        fp.extend_model(LlamaForCausalLM(LlamaConfig(**conf)), 3.3, max_position_embeddings=106)


def test_finetune_non_integer_factor_applied_and_logged_exactly(fp, tiny_ckpt, tmp_path):
    """--factor 3.3 on a window-32 model: both --pi-impl save and log factor 3.3, window 106."""
    ckpt, data = tiny_ckpt
    for impl in ("auto", "transformers"):
        out = str(tmp_path / impl)
        r = fp.main(["--model", ckpt, "--data", data, "--factor", "3.3", "--steps", "1", "--batch-size", "1",
                     "--out", out, "--no-progress", "--no-gradient-checkpointing", "--pi-impl", impl])
        assert r["factor"] == 3.3 and r["new_window"] == 106
        with open(os.path.join(out, "config.json")) as f:
            conf = json.load(f)
        assert conf["rope_parameters"]["factor"] == 3.3 and conf["max_position_embeddings"] == 106, impl
        with open(os.path.join(out, "train_log.json")) as f:
            log = json.load(f)
        assert log["factor"] == 3.3 and log["new_window"] == 106


@pytest.mark.parametrize("flag,value,msg", [
    ("--lr", "inf", "--lr must be a finite number > 0"),
    ("--lr", "nan", "--lr must be a finite number > 0"),
    ("--lr", "0", "--lr must be a finite number > 0"),
    ("--warmup-start", "-0.5", "--warmup-start must be in [0, 1]"),
    ("--warmup-start", "1.5", "--warmup-start must be in [0, 1]"),
    ("--steps", "0", "--steps must be >= 1"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--grad-accum", "0", "--grad-accum must be >= 1"),
    ("--warmup-steps", "-1", "--warmup-steps must be >= 0"),
    ("--beta1", "1", "--beta1 must be in [0, 1)"),
    ("--beta2", "-0.1", "--beta2 must be in [0, 1)"),
    ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0"),
    ("--grad-clip", "nan", "--grad-clip must be a finite number >= 0"),
    ("--grad-clip", "inf", "--grad-clip must be a finite number >= 0"),
    ("--threads", "0", "--threads must be >= 1"),
    ("--save-every", "-1", "--save-every must be >= 0"),
    ("--loss-chunk", "-1", "--loss-chunk must be >= 0"),
])
def test_finetune_bad_numeric_flags(fp, tiny_ckpt, tmp_path, capsys, flag, value, msg):
    ckpt, data = tiny_ckpt
    out = str(tmp_path / "o")
    _bad(fp, _ft_args(ckpt, data, out, flag, value), capsys, msg)
    assert not os.path.exists(out)


@pytest.mark.parametrize("argv,msg", [
    (["--steps", "5"], "--steps need --model"),
    (["--tiny", "--batch-size", "2", "--lr", "1e-3"], "--batch-size / --lr need --model"),
    (["--no-gradient-checkpointing"], "--no-gradient-checkpointing need --model"),
    (["--pi-impl", "transformers"], "--pi-impl need --model"),
    (["--scaling", "ntk-by-parts"], "--scaling need --model"),
    (["--save-every", "5", "--resume"], "--save-every / --resume need --model"),
    (["--loss-chunk", "512"], "--loss-chunk need --model"),
    (["--steps", "-5"], "--steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
])
def test_demo_rejects_fine_tuning_flags_and_bad_values(fp, tmp_path, capsys, monkeypatch, argv, msg):
    """The demo runs its built-in settings: fine-tuning flags without --model are usage
    errors (not silently ignored), and so are out-of-range values."""
    def boom(args):
        raise AssertionError("the demo must not start")

    monkeypatch.setattr(fp, "run_demo", boom)
    out = str(tmp_path / "demo")
    _bad(fp, argv + ["--out", out, "--no-progress"], capsys, msg)
    assert not os.path.exists(out)


@pytest.mark.parametrize("flags", [["--tiny"], ["--no-cache"], ["--tiny", "--no-cache"]])
def test_finetune_rejects_demo_flags(fp, tiny_ckpt, tmp_path, capsys, monkeypatch, flags):
    """--tiny / --no-cache only mean something to the demo: with --model they are usage
    errors, not silently ignored; PIROPE_EXAMPLES_TINY in the environment is not a flag."""
    ckpt, data = tiny_ckpt
    started = []
    monkeypatch.setattr(fp, "run_finetune", lambda args, error: started.append(args))
    out = str(tmp_path / "o")
    _bad(fp, _ft_args(ckpt, data, out, *flags), capsys, f"{' / '.join(flags)}: demo options")
    assert not started and not os.path.exists(out)
    monkeypatch.setenv("PIROPE_EXAMPLES_TINY", "1")
    fp.main(_ft_args(ckpt, data, out))
    assert len(started) == 1 and started[0].tiny


def test_sample_batch_windows_and_data_of_exactly_seq_len(fp):
    data = torch.arange(10)
    b = fp.sample_batch(data, 500, 4, torch.Generator().manual_seed(0))
    assert b.shape == (500, 4) and bool((b[:, 1:] - b[:, :-1] == 1).all())
    assert set(b[:, 0].tolist()) == set(range(6))  # starts 0 .. 10 - 4 - 1 (the demo's draws, see sample_batch)
    exact = fp.sample_batch(data, 3, 10, torch.Generator().manual_seed(0))  # data of exactly seq_len tokens
    assert torch.equal(exact, data.expand(3, 10))
    with pytest.raises(ValueError, match="fewer than the sequence length"):
        fp.sample_batch(data, 1, 11, torch.Generator())


def test_finetune_data_of_exactly_new_window_plus_one_tokens(fp, tiny_ckpt, tmp_path, capsys):
    """The minimum data validation accepts (new window + 1 tokens) trains; one less does not."""
    ckpt, _ = tiny_ckpt
    text = open(os.path.join(os.path.dirname(os.__file__), "os.py"), "rb").read()
    data = tmp_path / "d65.txt"
    data.write_bytes(text[:65])  # window 32 x 2 = 64, + 1
    r = fp.main(["--model", ckpt, "--data", str(data), "--factor", "2", "--steps", "1", "--batch-size", "2",
                 "--out", str(tmp_path / "o"), "--no-progress", "--no-gradient-checkpointing"])
    assert r["new_window"] == 64 and len(r["losses"]) == 1 and math.isfinite(r["losses"][0])
    data.write_bytes(text[:64])
    _bad(fp, ["--model", ckpt, "--data", str(data), "--factor", "2", "--out", str(tmp_path / "o2")], capsys,
         "fewer than the new window + 1")


def test_demo_cache_with_corrupt_weights_is_a_miss(fp, tmp_path):
    cfg = dict(fp.TINY)
    d = str(tmp_path / "pretrained")
    fp.build_demo_model(cfg).save_pretrained(d)
    with open(os.path.join(d, "demo_config.json"), "w") as f:
        json.dump({"cfg": cfg, "losses": [1.0]}, f)
    model, losses = fp._load_cached(d, cfg)
    assert model is not None and losses == [1.0]
    weights = os.path.join(d, "model.safetensors")
    blob = open(weights, "rb").read()
    for cut in (len(blob) // 2, 20):  # data truncated; header truncated
        with open(weights, "wb") as f:
            f.write(blob[:cut])
        assert fp._load_cached(d, cfg) == (None, None)


def _torchrun_finetune(argv, out, script=os.path.join(EXAMPLES, "finetune_pi.py")):
    """script (examples/finetune_pi.py) argv, writing into out, in two CPU processes (FSDP2,
    gloo); a second launch (below) starts from what out held before the first."""
    before = out + ".before"
    if os.path.exists(out):
        shutil.copytree(out, before)
    # the children must import the same pirope as this process (installed, or built in place)
    import pirope

    pirope_home = os.path.dirname(os.path.dirname(os.path.abspath(pirope.__file__)))
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints its Python stack
    env = dict(os.environ, PYTHONPATH=pirope_home + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    if os.path.exists("/sys/class/net/lo"):
        # gloo on Linux's loopback interface: the host name may resolve to an address the
        # two local processes cannot reach each other on.
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           script, *argv]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    full = p.stdout + p.stderr  # what the retry below looks for may be far from the end
    output = p.stdout[-3000:] + p.stderr[-3000:]
    # This launch failed about once in 20 full test runs, never when run alone. A second
    # launch is allowed only for failures of the launcher's sockets and rendezvous (a race
    # for a free port, a refused connection), and for one seen on a loaded 2-core VM (a
    # clean-clone CI run beside a build; not reproduced in 44 launches since, loaded or
    # not): a rank aborting in C++ teardown ("terminate called without an active
    # exception") after the run had finished and saved its results, as torch's gloo
    # process groups are described doing at interpreter exit in pytorch/pytorch PR 179291. Not
    # for anything the example computes; both outputs are kept if it fails again.
    finished_then_aborted = "[finetune] done" in full and "terminate called without an active exception" in full
    if p.returncode != 0 and (finished_then_aborted or re.search(
            r"(?i)address already in use|connection (refused|reset)|rendezvous|EADDRINUSE|ECONNREFUSED|timed out",
            full)):
        shutil.rmtree(out, ignore_errors=True)
        if os.path.exists(before):
            shutil.copytree(before, out)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        output = "first launch:\n" + output + "\nsecond launch:\n" + p.stdout[-3000:] + p.stderr[-3000:]
    assert p.returncode == 0, output
    shutil.rmtree(before, ignore_errors=True)
    return p.stdout + p.stderr


@pytest.mark.slow
def test_fsdp2_two_process_cpu_matches_single_process(fp, tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt, data = tiny_ckpt
    single = str(tmp_path / "single")
    r = fp.main(_ft_args(ckpt, data, single))
    dist_out = str(tmp_path / "fsdp")
    # and the loss 7 tokens at a time (its output projection gathered and its gradient
    # reduced by FSDP inside the model's forward), against one process's whole logits
    _torchrun_finetune(_ft_args(ckpt, data, dist_out, "--loss-chunk", "7"), dist_out)
    with open(os.path.join(dist_out, "train_log.json")) as f:
        log = json.load(f)
    assert log["world_size"] == 2
    assert log["losses"] == pytest.approx(r["losses"], rel=1e-4)
    loaded = AutoModelForCausalLM.from_pretrained(dist_out).eval()
    single_model = AutoModelForCausalLM.from_pretrained(single).eval()
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, single_model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


LOAD_SHARDED = """
import json, os, sys
from argparse import Namespace
import torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
sys.path.insert(0, {examples!r})
import finetune_pi as fp
from transformers import AutoModelForCausalLM

ckpt, out, impl = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
args = Namespace(model=ckpt, scaling="pi", pi_impl=impl, max_position_embeddings=None,
                 no_gradient_checkpointing=False)
model = fp.load_for_training(args, 2.0, 64, torch.device("cpu"), sys.exit)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
local = {{n: p.to_local().numel() for n, p in model.named_parameters()}}
ref = fp.extend_checkpoint(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), "pi", 2.0, impl=impl)
ref_buffers = dict(ref.named_buffers())
result = {{"params_equal": sorted(full) == sorted(ref.state_dict())
                         and all(torch.equal(full[k], v) for k, v in ref.state_dict().items()),
           "buffers": sorted(ref_buffers),
           "buffers_equal": all(torch.equal(b, ref_buffers[n]) for n, b in model.named_buffers()),
           "sharded": sum(local.values()) < sum(p.numel() for p in ref.parameters())}}
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
print("[finetune] done")
"""


@pytest.mark.slow
def test_fsdp2_ranks_receive_rank0s_weights_and_buffers(tiny_ckpt, tmp_path):
    """Only rank 0 reads the checkpoint (other ranks build the model on the meta device):
    after load_for_training every rank's shards gather to the checkpoint's weights and its
    buffers equal the extended checkpoint's, and each rank holds only a share of the
    parameters. With transformers' RoPE (--pi-impl transformers), which has buffers; with
    pirope's, test_fsdp2_two_process_cpu_matches_single_process compares whole runs."""
    impl = "transformers"
    ckpt, _ = tiny_ckpt
    script = tmp_path / "load_sharded.py"
    script.write_text(LOAD_SHARDED.format(examples=EXAMPLES))
    out = str(tmp_path / "out")
    os.makedirs(out)
    _torchrun_finetune([ckpt, out, impl], out, script=str(script))
    for rank in (0, 1):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            r = json.load(f)
        assert r["params_equal"] and r["buffers_equal"] and r["sharded"], (rank, r)
        assert "model.rotary_emb.inv_freq" in r["buffers"], r["buffers"]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model.safetensors"))


def test_finetune_resume_continues_as_if_never_stopped(fp, tiny_ckpt, tmp_path, capsys):
    """--save-every / --resume: a run stopped after 2 of 4 steps and resumed gives the
    uninterrupted run's losses and weights bit for bit (weights, AdamW's moments, the
    schedule, the data order and the dropout draws restored); a run killed between the
    renames of a save resumes from the state it kept; --resume without a state starts at
    step 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, data = tiny_ckpt
    ckpt = str(tmp_path / "dropout")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_ckpt[0], attention_dropout=0.2)).save_pretrained(ckpt)
    whole = str(tmp_path / "whole")
    ref = fp.main(_ft_args(ckpt, data, whole, "--steps", "4"))["losses"]
    out = str(tmp_path / "out")
    first = fp.main(_ft_args(ckpt, data, out, "--steps", "2", "--save-every", "1"))["losses"]
    assert first == ref[:2]
    state = os.path.join(out, "training_state")
    assert sorted(os.listdir(out)) == sorted(os.listdir(whole) + ["training_state"])  # only the latest state
    # killed between a save's two renames: the last state is training_state.old, a partial one .tmp
    os.replace(state, state + ".old")
    os.makedirs(state + ".tmp")
    capsys.readouterr()
    resumed = fp.main(_ft_args(ckpt, data, out, "--steps", "4", "--resume"))
    assert "--resume: continuing from step 2" in capsys.readouterr().out
    assert resumed["losses"] == ref
    with open(os.path.join(out, "train_log.json")) as f:
        log = json.load(f)
    assert log["losses"] == ref and log["resumed_from_step"] == 2
    # it went on saving every step, as the run it continued did; the older states are gone
    assert torch.load(os.path.join(state, "trainer_state.pt"), weights_only=True)["step"] == 4
    assert not os.path.exists(state + ".old") and not os.path.exists(state + ".tmp")
    a, b = _weights(whole), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # no state yet: step 0, as without --resume; the final state is saved (to continue later)
    fresh = str(tmp_path / "fresh")
    assert fp.main(_ft_args(ckpt, data, fresh, "--steps", "4", "--resume", "--save-every", "3"))["losses"] == ref
    assert "no saved state" in capsys.readouterr().out
    assert torch.load(os.path.join(fresh, "training_state", "trainer_state.pt"), weights_only=True)["step"] == 4


def test_finetune_weight_decay_spares_norms_and_biases(fp, tmp_path, monkeypatch):
    """--weight-decay decays weight matrices and embeddings; norms' scales and biases (1-D)
    are in a group without decay, as in transformers' Trainer. (The demo's pretraining keeps
    its decay on every parameter: its committed results came from that.)"""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ckpt = str(tmp_path / "qwen2")  # q/k/v projections with biases
    Qwen2ForCausalLM(Qwen2Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=32)).save_pretrained(ckpt)
    data = tmp_path / "data.txt"
    data.write_bytes(open(os.path.join(os.path.dirname(os.__file__), "os.py"), "rb").read()[:5000])
    made = []
    adamw = torch.optim.AdamW

    def spy(params, **kw):
        made.append((params, kw))
        return adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    r = fp.main(_ft_args(ckpt, str(data), str(tmp_path / "o"), "--weight-decay", "0.1", "--steps", "1"))
    (groups, kw), = made
    assert kw["weight_decay"] == 0.1
    names = {id(p): n for n, p in r["model"].named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    spared = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed | spared == set(names.values()) and not decayed & spared
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"} <= decayed
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.bias"} <= spared
    assert all(n.endswith(("norm.weight", ".bias")) for n in spared)


def test_finetune_resume_refuses_another_run(fp, tiny_ckpt, tmp_path, capsys):
    """A saved state continues only the run that saved it: other settings or data, or no
    steps left, are usage errors that name what differs."""
    ckpt, data = tiny_ckpt
    out = str(tmp_path / "out")
    fp.main(_ft_args(ckpt, data, out, "--steps", "2", "--save-every", "2"))
    base = _ft_args(ckpt, data, out, "--steps", "3", "--resume")
    i = base.index("--lr")
    _bad(fp, base[:i + 1] + ["2e-3"] + base[i + 2:], capsys, "--lr 0.001 there, 0.002 here")
    _bad(fp, base + ["--seed", "1"], capsys, "--seed 0 there, 1 here")
    other = tmp_path / "other.txt"
    other.write_bytes(open(data, "rb").read()[::-1])
    j = base.index("--data")
    _bad(fp, base[:j + 1] + [str(other)] + base[j + 2:], capsys, "--data (tokens, crc32)")
    _bad(fp, base + ["--steps", "2"], capsys, "is at step 2 already; give --steps larger")
    edited = str(tmp_path / "edited")
    shutil.copytree(ckpt, edited)
    with open(os.path.join(edited, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(edited, "config.json"), "w") as f:
        json.dump({**cfg, "rms_norm_eps": 1e-5}, f)
    m = base.index("--model")
    _bad(fp, base[:m + 1] + [edited] + base[m + 2:], capsys, "--model (its config.json, crc32)")
    # the same command again without --resume would start anew and overwrite the saved state
    _bad(fp, _ft_args(ckpt, data, out, "--steps", "2", "--save-every", "2"), capsys,
         "holds the training state of a run at step 2; add --resume to continue it")


def test_resume_leaves_parameters_without_gradients_without_state(fp, tiny_ckpt, tmp_path):
    """A parameter that never gets a gradient (a frozen or unused module, an expert no token
    was routed to) has no AdamW state in the save; resuming loads the others' and leaves it
    without, as the uninterrupted run has it (bit for bit). With tied embeddings (one
    parameter under two names)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = torch.randint(0, 256, (2000,))

    def model():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_ckpt[0], tie_word_embeddings=True))
        assert m.lm_head.weight is m.model.embed_tokens.weight
        m.unused = torch.nn.Linear(32, 4)  # not in forward
        return m

    kw = dict(seq_len=16, batch_size=2, lr=1e-3, lr_lambda=fp.warmup_lambda(2, 0.1), progress=False,
              weight_decay=0.1, decay_matrices_only=True)
    whole = model()
    ref = fp.train(whole, data, steps=3, **kw)
    path = str(tmp_path / "state")
    fp.train(model(), data, steps=2, resume=fp.ResumePoint(path, 1, False, {}, pytest.fail), **kw)
    resumed = model()
    assert fp.train(resumed, data, steps=3, resume=fp.ResumePoint(path, 0, True, {}, pytest.fail), **kw) == ref
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# not slow-marked, though it is: the one FSDP2 + distributed checkpoint run under compat.sh's torch
def test_fsdp2_saves_and_resumes_with_another_number_of_processes(fp, tiny_ckpt, tmp_path):
    """The training state is torch.distributed.checkpoint's: two FSDP2 processes resume a
    single process's state and save theirs, which a single process resumes; the losses
    are those of one uninterrupted run (to FSDP's reduction order). With transformers' own
    RoPE (--pi-impl transformers), whose inv_freq buffer ranks other than 0, built on the
    meta device, receive from rank 0."""
    ckpt, data = tiny_ckpt
    hf = ("--pi-impl", "transformers")
    ref = fp.main(_ft_args(ckpt, data, str(tmp_path / "whole"), "--steps", "4", *hf))["losses"]
    out = str(tmp_path / "out")
    fp.main(_ft_args(ckpt, data, out, "--steps", "1", "--save-every", "1", *hf))
    log = _torchrun_finetune(_ft_args(ckpt, data, out, "--steps", "3", "--resume", "--save-every", "1", *hf), out)
    assert "continuing from step 1" in log
    with open(os.path.join(out, "train_log.json")) as f:
        assert json.load(f)["world_size"] == 2
    last = fp.main(_ft_args(ckpt, data, out, "--steps", "4", "--resume", *hf))["losses"]
    assert last == pytest.approx(ref, rel=1e-4)


# ---------------------------------------------------------------------------------
# examples/evaluate.py and examples/attention_score_bound.py
# ---------------------------------------------------------------------------------
def test_evaluate_cli(tiny_ckpt, tmp_path):
    ev = _load("evaluate")
    ckpt, data = tiny_ckpt
    js = str(tmp_path / "r.json")
    r = ev.main(["--model", ckpt, "--data", data, "--windows", "16", "32", "--stride", "8", "--max-tokens", "400",
                 "--passkey-lengths", "100", "120", "--passkey-trials", "2", "--passkey-intro", "",
                 "--json", js, "--no-progress"])
    assert set(r["perplexity"]) == {"16", "32"} and all(v > 1 for v in r["perplexity"].values())
    assert set(r["passkey"]["success"]) == {"100", "120"}
    assert json.load(open(js))["perplexity"] == r["perplexity"]
    with pytest.raises(SystemExit):
        ev.main(["--model", str(tmp_path), "--no-progress"])


@pytest.mark.parametrize("keys_cost_more", [False, True])
def test_evaluate_default_passkey_lengths_fit_a_short_window(tmp_path, monkeypatch, keys_cost_more):
    # a 512-token window cannot hold the paper's prompt at 64 tokens (window / 8): the default
    # lengths then run from the shortest prompt to the window. With a tokenizer where digits
    # 1-9 take two ids (as BPE tokenizers split keys unevenly), the shortest prompt is that of
    # the costliest key, not of "00000": every trial's key fits the first length.
    from transformers import LlamaConfig, LlamaForCausalLM

    ev = _load("evaluate")
    if keys_cost_more:
        def encode(text):
            return [i for b in text.encode() for i in ([b, 256] if 49 <= b <= 57 else [b])]

        monkeypatch.setattr(ev, "load_tokenizer", lambda *a: (encode, lambda ids: bytes(
            i for i in ids if i < 256).decode("utf-8", "replace"), None))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=512)).save_pretrained(
        str(tmp_path / "m"))
    r = ev.main(["--model", str(tmp_path / "m"), "--passkey-trials", "3", "--no-progress"])
    lengths = sorted(map(int, r["passkey"]["success"]))
    assert len(lengths) == 8 and lengths[-1] == 512 and 64 < lengths[0] < 512


@pytest.mark.parametrize("extra,msg", [
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--max-tokens", "-5"], "--max-tokens must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--passkey-lengths", "0"], "--passkey-lengths must be >= 1"),
    (["--passkey-lengths", "20", "120"], "20 is shorter than the passkey prompt"),
    ([], "--passkey-lengths (default [4, 8,"),  # the default lengths of a 32-token model are too short
    (["--device", "bogus"], "--device 'bogus' is not usable here"),
    (["--device", "meta"], "--device 'meta' holds no data"),
    (["--json", "/nonexistent-dir/r.json"], "--json '/nonexistent-dir/r.json': its directory does not exist"),
    (["--json", "/tmp"], "--json '/tmp' is a directory"),  # not after the whole evaluation
    (["--json", "results/"], "--json 'results/' is a directory"),
    (["--scaling", "pi"], "--scaling needs --factor F"),
    (["--factor", "0.5"], "--factor must be > 1"),
    (["--factor", "1", "--scaling", "ntk-by-parts"], "--factor must be > 1"),
    (["--factor", "nan"], "--factor must be > 1"),
    (["--factor", "2", "--scaling", "own"], "--scaling own extends a checkpoint's own 'yarn' or 'llama3' scaling"),
])
def test_evaluate_bad_args_before_any_work(tiny_ckpt, tmp_path, capsys, monkeypatch, extra, msg):
    """Usage errors come before the model loads and before any perplexity is computed."""
    import transformers

    ev = _load("evaluate")

    def boom(*a, **k):
        raise AssertionError("no model must load / no perplexity be computed for bad arguments")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(ev, "sliding_window_perplexity", boom)
    ckpt, data = tiny_ckpt
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", ckpt, "--data", data, "--windows", "16", "--stride", "8", "--passkey-intro", "",
                 "--no-progress", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err, err


@pytest.mark.parametrize("scaling", ["pi", "ntk-by-parts"])
def test_evaluate_zero_shot_extension_equals_the_extended_checkpoint(tiny_ckpt, tmp_path, scaling):
    # --factor 2 evaluates the model extended as examples/finetune_pi.py extends it, without
    # fine-tuning: the same perplexities as that extension written into a checkpoint of plain
    # transformers (same weights) and evaluated as saved
    from transformers import AutoModelForCausalLM

    ev = _load("evaluate")
    fp = _load("finetune_pi")
    ckpt, data = tiny_ckpt
    rope = ({"rope_type": "linear", "factor": 2.0} if scaling == "pi" else fp.ntk_by_parts_scaling(32, 2.0))
    base = AutoModelForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():  # sharper attention than at init, so that positions move the perplexity
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    ckpt = str(tmp_path / "sharp")
    base.save_pretrained(ckpt)
    config = copy.deepcopy(base.config)
    config.rope_parameters = {**rope, "rope_theta": 10000.0}
    config.max_position_embeddings = 64
    extended = AutoModelForCausalLM.from_config(config)
    extended.load_state_dict(base.state_dict())
    extended.save_pretrained(str(tmp_path / "extended"))
    common = ["--data", data, "--windows", "32", "64", "--stride", "16", "--max-tokens", "400", "--no-passkey",
              "--no-progress"]
    r = ev.main(["--model", ckpt, "--factor", "2", "--scaling", scaling, *common])
    ref = ev.main(["--model", str(tmp_path / "extended"), *common])
    assert r["window"] == ref["window"] == 64
    assert r["rope_parameters"] == ref["rope_parameters"] == config.rope_parameters
    assert r["extension"] == {"factor": 2.0, "scaling": scaling} and "extension" not in ref
    # (a random model's perplexity is near its vocabulary size: the extension moves it by ~1e-4)
    for w in ("32", "64"):
        assert r["perplexity"][w] == pytest.approx(ref["perplexity"][w], rel=1e-6, abs=0)
    plain = ev.main(["--model", ckpt, *common])  # the control: not extended, another perplexity
    assert plain["perplexity"]["64"] != pytest.approx(r["perplexity"]["64"], rel=3e-5, abs=0)


def test_evaluate_passkey_only_ignores_the_perplexity_stride(tiny_ckpt, monkeypatch):
    # no --data: no perplexity, so a window below the default --stride (256) is no error
    ev = _load("evaluate")
    ckpt, _ = tiny_ckpt
    seen = []
    monkeypatch.setattr(ev, "passkey_retrieval", lambda *a, **k: seen.append(k) or {"success": {}, "k_max": 0})
    r = ev.main(["--model", ckpt, "--passkey-lengths", "100", "--passkey-trials", "1", "--passkey-intro", "",
                 "--no-progress"])
    assert "perplexity" not in r and len(seen) == 1


def _vocab_ckpt(path, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)).save_pretrained(str(path))
    return str(path)


def test_a_missing_or_broken_tokenizer_is_a_usage_error_not_bytes(fp, tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Bytes stand in for a tokenizer only for a byte-level vocabulary without tokenizer
    files (the demo's models): a 32k-vocabulary model without one, or a tokenizer that
    does not load, is a usage error, not byte ids read as token ids (perplexity ~3e4)."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("no model must load without a tokenizer")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    ev = _load("evaluate")
    _, data = tiny_ckpt
    no_tok = _vocab_ckpt(tmp_path / "no_tok", 32000)
    broken = _vocab_ckpt(tmp_path / "broken", 32000)
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    for ckpt, msg in ((no_tok, "has no tokenizer (tokenizer.json"), (broken, "its tokenizer does not load")):
        _bad(ev, ["--model", ckpt, "--data", data, "--windows", "16", "--stride", "8", "--no-passkey",
                  "--no-progress"], capsys, msg)
        _bad(fp, _ft_args(ckpt, data, str(tmp_path / "o")), capsys, msg)
    # a byte-level vocabulary without tokenizer files: bytes, and it says so
    encode, decode, tok = fp.load_tokenizer(_vocab_ckpt(tmp_path / "bytes", 260), 260, None)
    assert tok is None and encode("ab") == [97, 98] and decode([97, 98]) == "ab"
    assert "read as UTF-8 bytes" in capsys.readouterr().err


def test_data_directory_reads_its_text_files_only(fp, tmp_path):
    """--data DIR: the text files under it, sorted by path; hidden files and folders,
    __pycache__ and files that are not UTF-8 text (a source tree's .pyc) left out."""
    d = tmp_path / "src"
    (d / "pkg" / "__pycache__").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "b.py").write_text("b = 2\n")
    (d / "pkg" / "a.py").write_text("a = 'é'\n")
    (d / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0code")
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / ".hidden.txt").write_text("secret\n")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "empty.txt").write_text("")
    assert fp.read_text_data(str(d)) == "b = 2\n\n\na = 'é'\n".encode()  # b.py, pkg/a.py
    assert fp.read_text_data(str(d / "latin1.txt")) == "caf\xe9".encode("latin-1")  # a file named: as it is


def test_device_cuda_is_this_processs_gpu(fp, monkeypatch):
    """--device cuda means cuda:LOCAL_RANK: torch.cuda.set_device refuses a device without
    an index, and torchrun's ranks each have their own GPU."""
    monkeypatch.setattr(fp.torch, "empty", lambda *a, **k: None)  # no GPU here to place a tensor on
    assert fp.check_device("cuda", "--device", None, local_rank=3) == torch.device("cuda", 3)
    assert fp.check_device("cuda:1", "--device", None, local_rank=3) == torch.device("cuda", 1)
    assert fp.check_device("cpu", "--device", None, local_rank=3) == torch.device("cpu")


def test_finetune_token_ids_past_the_vocabulary_are_a_usage_error(fp, tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A tokenizer with more ids than the model (another model's): a usage error before the
    model loads, not an IndexError from the embedding at some random step."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    _, data = tiny_ckpt
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train([data], trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False))
    ckpt = _vocab_ckpt(tmp_path / "m", 300)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(ckpt)

    def boom(*a, **k):
        raise AssertionError("no model must load")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    _bad(fp, _ft_args(ckpt, data, str(tmp_path / "o")), capsys, "outside the model's vocabulary of 300 ids")


def _bpe_tokenizer(data, template=None, **specials):
    """A small byte-level BPE tokenizer trained on `data` (<s>, </s> as ids 0 and 1); with
    `template`, the special tokens it adds to a text (TemplateProcessing)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train([data], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if template:
        tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 0), ("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


@pytest.mark.parametrize("template,specials,before,after", [
    ("<s> $A", dict(bos_token="<s>", eos_token="</s>"), [0], []),      # Llama, Mistral, Gemma: BOS first
    ("<s> $A </s>", dict(bos_token="<s>", eos_token="</s>"), [0], [1]),
    (None, dict(eos_token="</s>"), [], [1]),                            # Qwen, GPT-NeoX: EOS between
    (None, {}, [], []),
])
def test_documents_are_marked_as_the_tokenizer_marks_a_text(fp, tiny_ckpt, template, specials, before, after):
    _, data = tiny_ckpt
    tok = _bpe_tokenizer(data, template, **specials)
    assert fp.document_markers(tok) == (before, after)
    encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731 (load_tokenizer's)
    ids = fp.encode_documents([b"import os\n", b"def f():\n    pass\n"], encode, before, after)
    want = before + encode("import os\n") + after + before + encode("def f():\n    pass\n") + after
    assert ids.tolist() == want
    for limit in (1, 3, len(want) - 2, len(want) + 5):  # --max-tokens: the documents after it not tokenized
        seen = []
        got = fp.encode_documents([b"import os\n", b"def f():\n    pass\n", b"x = 1\n"],
                                  lambda t: seen.append(t) or encode(t), before, after, limit=limit)
        assert got.tolist() == (want + before + encode("x = 1\n") + after)[:limit]
        assert len(seen) == (1 if limit <= len(before) + len(encode("import os\n")) + len(after) else
                             2 if limit <= len(want) else 3)


def test_finetune_on_a_directory_marks_each_file_as_a_document(fp, tiny_ckpt, tmp_path, monkeypatch, capsys):
    ckpt, data = tiny_ckpt
    model = _vocab_ckpt(tmp_path / "m", 300)
    _bpe_tokenizer(data, "<s> $A", bos_token="<s>").save_pretrained(model)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = open(data, "rb").read()
    (corpus / "a.py").write_bytes(text[:6000])
    (corpus / "b.py").write_bytes(text[6000:12000])
    seen = []
    monkeypatch.setattr(fp, "train", lambda model, ids, **kw: seen.append(ids) or [1.0])
    fp.main(_ft_args(model, str(corpus), str(tmp_path / "o")))
    assert "documents marked by ['<s>'] before and [] after" in capsys.readouterr().out
    (ids,) = seen
    assert ids[0] == 0 and int((ids == 0).sum()) == 2  # a BOS before each of the two files
    second = int((ids == 0).nonzero()[1])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    assert tok.decode(ids[1:second]) == text[:6000].decode() and tok.decode(ids[second + 1:]) == text[6000:12000].decode()


def test_finetune_takes_one_sequence_per_micro_step_by_default(fp, tiny_ckpt, tmp_path, monkeypatch):
    """The global batch (64 by default) is not one forward: --grad-accum defaults to the batch
    per process (one sequence per micro-step), as the paper's 1-2 sequences per GPU."""
    ckpt, data = tiny_ckpt
    seen = []
    monkeypatch.setattr(fp, "train", lambda model, ids, **kw: seen.append(kw["grad_accum"]) or [1.0])
    fp.main(_ft_args(ckpt, data, str(tmp_path / "a")))
    fp.main(_ft_args(ckpt, data, str(tmp_path / "b"), "--grad-accum", "2"))
    assert seen == [4, 2]  # --batch-size 4


def test_warmup_is_the_papers_linear_ramp_from_a_tenth(fp):
    # the paper's recipe: linear warm-up over 20 steps from 10% of the lr, then the lr itself
    f = fp.warmup_lambda(20, 0.1)
    assert [f(s) for s in (0, 1, 10, 19, 20, 21, 1000)] == pytest.approx([0.1, 0.145, 0.55, 0.955, 1, 1, 1])
    assert fp.warmup_lambda(0, 0.1)(0) == 1.0  # no warm-up


def test_training_log_shows_the_lr_each_step_used(fp, capsys):
    _, seen = _train_seeing(fp, torch.randint(0, 256, (500,)), lambda opt: opt.param_groups[0]["lr"], steps=3,
                            batch_size=2, lr_lambda=fp.warmup_lambda(20, 0.1))
    logged = [float(m) for m in re.findall(r"lr (\S+)", capsys.readouterr().out)]
    assert logged == pytest.approx(seen, rel=1e-2) and seen[0] == pytest.approx(1e-4)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=32))


def _train_seeing(fp, data, read, **kw):
    """fp.train's losses (of a fresh tiny model, seq_len 16, lr 1e-3, a constant schedule unless kw
    says otherwise), and read(optimizer) at each AdamW step, as it is about to update."""
    import unittest.mock

    received = []
    capture = torch.optim.AdamW.step

    def step(self, *a, **k):
        received.append(read(self))
        return capture(self, *a, **k)

    kw = {"seq_len": 16, "lr": 1e-3, "lr_lambda": lambda s: 1.0, "progress": False, **kw}
    with unittest.mock.patch.object(torch.optim.AdamW, "step", step):
        losses = fp.train(_tiny_llama(), data, **kw)
    return losses, received


def _train_seeing_the_gradients(fp, data, **kw):
    """fp.train's losses, and the gradients AdamW receives at each step (after clipping)."""
    return _train_seeing(fp, data, lambda opt: [p.grad.clone() for g in opt.param_groups for p in g["params"]], **kw)


def _whole_batch_gradients(fp, data, batch_size, seed):
    """The reference: a plain cross-entropy over the step's whole batch, backpropagated once."""
    model = _tiny_llama()
    # the windows train() draws with this seed: seq_len 16 (_train_seeing's) + the last target
    batch = fp.sample_batch(data, batch_size, 17, torch.Generator().manual_seed(seed))
    logits = model(batch[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten())
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_gradient_accumulation_gives_the_whole_batchs_gradient(fp, grad_accum):
    """k micro-steps of a step give the gradient (and the logged loss) of the step's whole
    batch at once. (AdamW's per-parameter scaling would hide a constant factor in the
    update, so the gradients are read as the optimizer receives them.)"""
    data = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(1))
    loss, expected = _whole_batch_gradients(fp, data, 4, seed=3)
    losses, (got,) = _train_seeing_the_gradients(fp, data, steps=1, batch_size=4, grad_clip=0.0,
                                                  grad_accum=grad_accum, seed=3)
    assert losses == [pytest.approx(loss, rel=1e-5)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_gradients_are_clipped_to_the_norm_given(fp):
    data = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(1))
    _, expected = _whole_batch_gradients(fp, data, 2, seed=3)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(e) for e in expected])).item()
    for clip in (norm / 4, 2 * norm, 0.0):  # 0: off
        _, (got,) = _train_seeing_the_gradients(fp, data, steps=1, batch_size=2, grad_clip=clip, seed=3)
        scale = clip / norm if 0 < clip < norm else 1.0
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e * scale, rtol=1e-4, atol=1e-6)


def test_the_callback_sees_each_step_done(fp):
    seen = []
    fp.train(_tiny_llama(), torch.randint(0, 256, (500,)), steps=3, seq_len=16, batch_size=2, lr=1e-3,
             lr_lambda=lambda s: 1.0, progress=False, callback=lambda step, model: seen.append(step))
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("fields,dtype", [
    (dict(dtype=torch.bfloat16), torch.bfloat16),
    (dict(dtype="float16"), torch.float16),  # the name, as config.json writes it
    (dict(dtype=None, torch_dtype="bfloat16"), torch.bfloat16),  # the older key
    (dict(dtype="int8"), torch.float32),  # not a floating-point dtype
    (dict(dtype="no_such_dtype"), torch.float32),
    (dict(), torch.float32),
])
def test_checkpoint_dtype_reads_the_configs_dtype(fp, fields, dtype):
    assert fp.checkpoint_dtype(SimpleNamespace(**fields)) == dtype


def test_finetune_saves_in_the_checkpoints_own_dtype(fp, tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt, data = tiny_ckpt
    AutoModelForCausalLM.from_pretrained(ckpt).to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    fp.main(_ft_args(str(tmp_path / "bf16"), data, str(tmp_path / "o"), "--steps", "1"))
    saved = json.load(open(tmp_path / "o" / "config.json"))
    assert saved["dtype"] == "bfloat16", saved.get("dtype")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"), dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_data_is_tokenized_in_pieces_cut_at_lines(fp):
    """Tokenizing the corpus in ~chunk-byte pieces (cut after a newline, never inside a UTF-8
    character) gives the ids of the whole text for a tokenizer that splits at lines."""
    def encode(text):
        return list(text.encode())

    for text in (("héllo wörld\n" * 500 + "x" * 3000).encode(), ("é" * 2000).encode(), b"", b"abc"):
        ids = fp.encode_data(text, encode, chunk=101)
        assert ids.dtype == torch.int64 and ids.tolist() == list(text)
        assert fp.encode_data(text).tolist() == list(text)  # bytes
        for limit in (1, 150, 10**6):  # the first ids only, and no piece tokenized past them
            pieces = []
            ids = fp.encode_data(text, lambda t: pieces.append(t) or encode(t), chunk=101, limit=limit)
            assert ids.tolist() == list(text)[:limit] and fp.encode_data(text, limit=limit).tolist() == ids.tolist()
            assert sum(len(p.encode()) for p in pieces[:-1]) < limit


def test_evaluate_tokenizes_only_what_max_tokens_keeps(tiny_ckpt, tmp_path, monkeypatch):
    ev = _load("evaluate")
    ckpt, data = tiny_ckpt
    seen = []
    real = ev.encode_data
    monkeypatch.setattr(ev, "encode_data", lambda *a, **kw: seen.append(kw.get("limit")) or real(*a, **kw))
    r = ev.main(["--model", ckpt, "--data", data, "--windows", "32", "--stride", "16", "--max-tokens", "300",
                 "--no-passkey", "--no-progress"])
    assert seen == [300] and set(r["perplexity"]) == {"32"}


def test_finetune_bad_device_is_a_usage_error(fp, tiny_ckpt, tmp_path, capsys):
    ckpt, data = tiny_ckpt
    _bad(fp, _ft_args(ckpt, data, str(tmp_path / "o"), "--device", "bogus"), capsys, "--device 'bogus' is not usable")
    _bad(fp, _ft_args(ckpt, data, str(tmp_path / "o"), "--device", "meta"), capsys, "--device 'meta' holds no data")


@pytest.mark.parametrize("argv, msg", [
    (["--base", "nan"], "--base finite and > 1"),
    (["--base", "1"], "--base finite and > 1"),
    (["--ridge", "nan"], "--ridge must be finite and >= 0"),
    (["--ridge", "-1"], "--ridge must be finite and >= 0"),
])
def test_attention_score_bound_bad_numbers(tmp_path, capsys, argv, msg):
    asb = _load("attention_score_bound")
    with pytest.raises(SystemExit) as e:
        asb.main(["--head-dim", "8", "--window", "16", "--out", str(tmp_path / "b.png"), *argv])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_quickstart_seqlen_below_pretrained_window(capsys):
    qs = _load("quickstart")
    with pytest.raises(SystemExit) as e:
        qs.main(["--seqlen", "1024", "--device", "cpu"])
    assert e.value.code == 2
    assert "--seqlen must be >= 2048" in capsys.readouterr().err


def test_attention_score_bound_checkpoint_must_be_a_local_directory(tmp_path, capsys, monkeypatch):
    """--checkpoint is never resolved on the Hugging Face hub."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("from_pretrained must not be called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    asb = _load("attention_score_bound")
    base = ["--head-dim", "8", "--window", "16", "--out", str(tmp_path / "b.png")]
    for ckpt, msg in (("meta-llama/Llama-2-7b-hf", "is not a directory"), (str(tmp_path), "has no config.json")):
        with pytest.raises(SystemExit) as e:
            asb.main(["--checkpoint", ckpt, *base])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--checkpoint" in err and msg in err, err
    assert not os.path.exists(tmp_path / "b.png")


def test_attention_score_bound(tmp_path, capsys):
    asb = _load("attention_score_bound")
    png = str(tmp_path / "b.png")
    r = asb.main(["--head-dim", "64", "--window", "256", "--out", png])
    out = capsys.readouterr().out
    assert "32 ln(10000) = 294.73" in out and "589.5" in out
    assert asb.interpolation_bound(128, 10000.0) == pytest.approx(128 / 294.73, rel=1e-4)
    for k in ("fitted", "random"):
        assert r[k]["bound holds"]
    # the fitted score explodes beyond L, stays small at interpolated positions
    f = r["fitted"]
    assert f["max|a| at extrapolated positions [L, 4L)"] > 20 * f["max|a| at fractional positions in [0, L)"]
    assert os.path.getsize(png) > 1000


def test_quickstart_unusable_device_is_a_usage_error(capsys):
    qs = _load("quickstart")
    device = "foo" if torch.cuda.is_available() else "cuda"  # no GPU here: cuda is unusable too
    with pytest.raises(SystemExit) as e:
        qs.main(["--device", device])
    assert e.value.code == 2
    assert f"--device {device!r} is not usable here" in capsys.readouterr().err
