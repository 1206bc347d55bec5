"""pirope.eval: passkey prompts within their length for any tokenizer, and bad input.
(The perplexity and passkey behaviour on models is tested in test_examples.py.)"""

import inspect

import pytest
import torch

from pirope.eval import passkey_min_length, passkey_retrieval, sliding_window_perplexity, sliding_windows


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


def digits_cost_more(text, extra=1):
    """Bytes, except that digits 1-9 take 1 + ``extra`` ids: a random key is longer than the
    zeros the filler was sized with (as with BPE tokenizers, where " 00000" and a
    random key tokenize differently)."""
    out = []
    for b in text.encode():
        out += [b] + [256] * extra if 49 <= b <= 57 else [b]
    return out


def digits_cost_many_more(text):
    """Digits 1-9 take 21 ids: a random key's prompt is up to 200 ids (about ten filler
    sentences) longer than the zeros', so fitting it takes several sentences out."""
    return digits_cost_more(text, extra=20)


def decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


@pytest.mark.parametrize("encode, extra", [(byte_encode, 0), (digits_cost_more, 0), (digits_cost_many_more, 400)])
def test_prompts_never_exceed_the_length(encode, extra):
    model = LengthRecorder()
    lengths = [260 + extra, 333 + extra, 517 + extra]
    r = passkey_retrieval(model, encode, decode, lengths, trials=12, seed=5, max_new_tokens=1, progress=False,
                          prefix_ids=[1])
    prompts = model.lengths  # one forward per trial (max_new_tokens=1)
    assert len(prompts) == 12 * len(lengths)
    for i, k in enumerate(sorted(lengths)):
        mine = prompts[12 * i: 12 * (i + 1)]
        assert max(mine) <= k and min(mine) > k - 40, (k, mine)  # as many sentences as fit
    assert all(s["n_tokens"] <= s["length"] for s in r["samples"])


@pytest.mark.parametrize("n_filler", [3, 10])
def test_a_prompt_that_fits_the_length_exactly_is_used(n_filler):
    # as many filler sentences as fit, up to the last token: where n sentences make exactly k tokens
    k = 1 + len(byte_encode(passkey_prompt(n_filler, 0, "12345")))
    model = LengthRecorder()
    passkey_retrieval(model, byte_encode, decode, [k], trials=3, seed=0, max_new_tokens=1, progress=False,
                      prefix_ids=[1])
    assert model.lengths == [k] * 3


def test_a_truncating_tokenizer_is_an_error_not_a_hang():
    for encode in (lambda s: list(s.encode())[:200], lambda s: []):
        with pytest.raises(ValueError, match="must not truncate"):
            passkey_retrieval(LengthRecorder(), encode, decode, [300], trials=1, progress=False)


def test_passkey_lengths_must_be_ints():
    with pytest.raises(TypeError, match="lengths must be ints"):
        passkey_retrieval(LengthRecorder(), byte_encode, decode, [300.5], progress=False)
    with pytest.raises(TypeError, match="lengths must be an iterable"):
        passkey_retrieval(LengthRecorder(), byte_encode, decode, 300, progress=False)


def test_a_length_given_twice_is_tested_once():
    model = LengthRecorder()
    r = passkey_retrieval(model, byte_encode, decode, [400, 300, 400], trials=2, max_new_tokens=1, progress=False)
    assert r["lengths"] == [300, 400] and len(r["samples"]) == 2 and len(model.lengths) == 4


def test_min_length_is_that_of_the_costliest_key():
    for encode, costliest in ((byte_encode, "00000"), (digits_cost_more, "99999")):
        assert passkey_min_length(encode) == len(encode(passkey_prompt(0, 0, costliest)))
        assert passkey_min_length(encode, intro="", prefix_ids=[1, 2]) == 2 + len(encode(passkey_prompt(
            0, 0, costliest, intro="")))


@pytest.mark.parametrize("seed", range(4))
def test_lengths_below_the_min_length_are_refused_before_the_model_runs(seed):
    # with digits costing more, "00000" fits 96 ids where most keys do not: which trials fail
    # must not depend on the seed, nor come after forward passes
    shortest = passkey_min_length(digits_cost_more, intro="")
    model = LengthRecorder()
    with pytest.raises(ValueError, match=f"passkey length {shortest - 1} is shorter than the prompt without filler"):
        passkey_retrieval(model, digits_cost_more, decode, [shortest - 1, 300], trials=3, seed=seed,
                          max_new_tokens=1, intro="", progress=False)
    assert model.lengths == []
    passkey_retrieval(model, digits_cost_more, decode, [shortest], trials=20, seed=seed, max_new_tokens=1,
                      intro="", progress=False)
    assert len(model.lengths) == 20 and max(model.lengths) <= shortest


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


# ---------------------------------------------------------------------------------
# sliding-window perplexity against an independent float64 reference
# ---------------------------------------------------------------------------------
import math  # noqa: E402
import re  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from pirope.eval import (  # noqa: E402
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PASSKEY_QUESTION,
    passkey_k_max,
    passkey_prompt,
)

VOCAB = 40


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; with two threads on a busy 2-core machine
    every forward spins for ~0.25 s. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(vocab=VOCAB, window=128, seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=window))
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def text_ids():
    return torch.randint(0, VOCAB, (203,), generator=torch.Generator().manual_seed(7))


def reference_nll(model, tokens, window, stride):
    """The Hugging Face strided-perplexity recipe, in float64 from the model's full logits,
    with the windows the module documents: begins 0, s, 2s, ... (s = min(stride, window - 1)),
    the last window ends at the end of the text; each window scores the tokens after the
    previous window's end (the first: all but its first token)."""
    n = len(tokens)
    s = min(stride, window - 1)
    begins = []
    b = 0
    while True:
        begins.append(min(b, n - window))
        if b + window >= n:
            break
        b += s
    total, count, prev_end = 0.0, 0, 1  # token 0 has no context
    with torch.no_grad():
        for b in begins:
            x = tokens[b:b + window]
            logp = torch.log_softmax(model(input_ids=x[None]).logits[0].double(), -1)
            first = max(prev_end, b + 1)  # absolute position of the first target scored here
            rel = torch.arange(first - b, window)  # target positions inside the window
            total -= float(logp[rel - 1, x[rel]].sum())
            count += window - (first - b)
            prev_end = b + window
    return total, count


@pytest.mark.parametrize("n,window,stride,batch", [
    (203, 32, 8, 1),     # stride divides nothing: last window partial, aligned to the end
    (203, 32, 8, 3),     # batched: windows of different n_scored in one batch
    (200, 32, 8, 100),   # one batch holds every window
    (32, 32, 8, 2),      # n_tokens == window: one window
    (33, 32, 8, 1),      # one token more than the window
    (203, 32, 32, 2),    # stride == window (taken as window - 1)
    (203, 32, 31, 2),
    (203, 32, 7, 4),
    (100, 2, 1, 7),      # the smallest window
    (120, 64, 1, 16),    # stride 1
])
def test_perplexity_matches_float64_reference(llama, text_ids, n, window, stride, batch):
    tokens = text_ids[:n]
    ref_nll, ref_n = reference_nll(llama, tokens, window, stride)
    ppl, nll, n_scored = sliding_window_perplexity(llama, tokens, window, stride, batch_size=batch,
                                                   progress=False, return_nll=True)
    assert n_scored == ref_n == n - 1
    assert nll == pytest.approx(ref_nll, rel=1e-6)
    assert ppl == pytest.approx(math.exp(ref_nll / ref_n), rel=1e-6)
    assert sliding_window_perplexity(llama, tokens.tolist(), window, stride, batch_size=batch,
                                     progress=False) == pytest.approx(ppl, rel=1e-6)


def test_perplexity_context_matters_and_reference_is_not_trivial(llama, text_ids):
    """Sanity of the reference itself: a different window gives a different value, so
    the comparison above would catch wrong windows (not just a wrong average)."""
    a = reference_nll(llama, text_ids, 32, 8)[0]
    b = reference_nll(llama, text_ids, 16, 8)[0]
    assert abs(a - b) > 1e-3


def test_perplexity_bf16_model(llama, text_ids):
    model = tiny_llama().to(torch.bfloat16)
    ref_nll, ref_n = reference_nll(model, text_ids, 32, 8)
    ppl, nll, n = sliding_window_perplexity(model, text_ids, 32, 8, batch_size=3, progress=False, return_nll=True)
    assert n == ref_n and nll == pytest.approx(ref_nll, rel=1e-5)
    assert math.isfinite(ppl) and next(model.parameters()).dtype == torch.bfloat16


class Wrapped(torch.nn.Module):
    """The same model behind forward(input_ids) only, returning a tuple / a tensor /
    a ModelOutput: no logits_to_keep, so every window's full logits are used."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids)
        return {"tuple": (out.logits, None), "list": [out.logits], "tensor": out.logits, "output": out}[self.kind]


@pytest.mark.parametrize("kind", ["tuple", "list", "tensor", "output"])
def test_perplexity_tuple_tensor_or_model_output(llama, text_ids, kind):
    ref = sliding_window_perplexity(llama, text_ids, 32, 8, batch_size=2, progress=False)
    got = sliding_window_perplexity(Wrapped(llama, kind), text_ids, 32, 8, batch_size=2, progress=False)
    assert got == pytest.approx(ref, rel=1e-6)


def test_perplexity_model_output_without_logits_is_a_type_error(text_ids):
    class NoLogits(torch.nn.Module):
        def forward(self, input_ids):
            return {"logits": torch.zeros(*input_ids.shape, VOCAB)}

    with pytest.raises(TypeError, match="no logits"):
        sliding_window_perplexity(NoLogits(), text_ids, 32, 8, progress=False)


def test_perplexity_restores_train_mode_and_runs_without_grad(text_ids):
    model = tiny_llama().train()
    seen = []
    h = model.register_forward_hook(lambda m, a, out: seen.append((m.training, torch.is_grad_enabled())))
    ppl = sliding_window_perplexity(model, text_ids, 32, 8, progress=False)
    h.remove()
    assert model.training and all(m.training for m in model.modules())
    assert seen and all(s == (False, False) for s in seen)
    assert ppl == pytest.approx(sliding_window_perplexity(model.eval(), text_ids, 32, 8, progress=False), rel=1e-6)


# ---------------------------------------------------------------------------------
# passkey: prompt, depth, greedy decoding
# ---------------------------------------------------------------------------------
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
KEY_LINE = "The pass key is {k}. Remember it. {k} is the pass key."


def split_prompt(prompt, key):
    """(filler sentences before the key line, after it) of a passkey prompt."""
    assert prompt.startswith(PASSKEY_INTRO + " ") and prompt.endswith(" " + PASSKEY_QUESTION)
    body = prompt[len(PASSKEY_INTRO) + 1: -len(PASSKEY_QUESTION) - 1]
    line = KEY_LINE.format(k=key)
    assert body.count(line) == 1, body
    before, after = body.split(line)
    sentences = lambda s: re.findall(r"[^.]+\.", s.strip())  # noqa: E731
    return [x.strip() for x in sentences(before)], [x.strip() for x in sentences(after)]


@pytest.mark.parametrize("n_filler", [0, 1, 5, 12])
def test_passkey_prompt_depth_places_the_key_after_depth_sentences(n_filler):
    assert " ".join(FILLER) == PASSKEY_FILLER
    for depth in range(n_filler + 1):
        before, after = split_prompt(passkey_prompt(n_filler, depth, "40961"), "40961")
        # the paper's five sentences repeated, cut at sentence granularity, key after `depth` of them
        assert before + after == [FILLER[i % 5] for i in range(n_filler)]
        assert len(before) == depth
    assert passkey_prompt(2, 1, "40961", intro="") == (
        "The grass is green. " + KEY_LINE.format(k="40961") + " The sky is blue. " + PASSKEY_QUESTION)


class PromptRecorder(torch.nn.Module):
    """Records every full prompt (as text) and predicts byte '7'."""

    def __init__(self):
        super().__init__()
        self.prompts = []
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        self.prompts.append(decode(input_ids[0].tolist()))
        logits = torch.zeros(*input_ids.shape, 256)
        logits[..., ord("7")] = 1.0
        return SimpleNamespace(logits=logits)


def test_passkey_retrieval_hides_the_key_at_the_reported_random_depth():
    model = PromptRecorder()
    r = passkey_retrieval(model, byte_encode, decode, [700, 400], trials=100, seed=2, max_new_tokens=1,
                          progress=False, prefix_ids=[0])
    assert len(model.prompts) == 200
    depths = {400: [], 700: []}
    keys = []
    for i, prompt in enumerate(model.prompts):
        k = 400 if i < 100 else 700  # lengths run in increasing order
        assert prompt.startswith("\0" + PASSKEY_INTRO)  # the prefix ids come first
        key = re.search(r"The pass key is (\d+)\. Remember", prompt).group(1)
        assert len(key) == 5 and key[0] != "0"
        before, after = split_prompt(prompt[1:], key)
        n = len(before) + len(after)
        assert len(prompt) <= k and len(prompt) + len(FILLER[n % 5]) + 1 > k  # as many sentences as fit
        depths[k].append((len(before), n))
        keys.append(key)
        if i % 100 == 0:  # the first trial of each length is the sample
            s = r["samples"][i // 100]
            assert (s["length"], s["key"], s["depth"], s["n_tokens"]) == (k, key, len(before), len(prompt))
    for k, seen in depths.items():
        (n,) = {n for _, n in seen}
        d = [d for d, _ in seen]
        # uniform over [0, n] (n + 1 places): both ends and most places are reached in 100 trials
        assert min(d) == 0 and max(d) == n and len(set(d)) > (n + 1) * 3 // 4, (k, sorted(d))
    assert len(set(keys)) > 190
    # the model always answers 7777777...: never the key
    assert r["success"] == {400: 0.0, 700: 0.0} and r["k_max"] == 0 and r["trials"] == 100


class KeyReader(torch.nn.Module):
    """Answers every passkey prompt with answer.format(key=<the prompt's key>), a byte per step."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        text = decode(input_ids[0].tolist())
        if text.endswith(PASSKEY_QUESTION):  # the prompt's pass: what follows it is the answer
            self.prompt_len = input_ids.shape[1]
            self.text = self.answer.format(key=re.search(r"The pass key is (\d+)\.", text).group(1))
        logits = torch.zeros(*input_ids.shape, 256)
        logits[0, -1, ord(self.text[input_ids.shape[1] - self.prompt_len])] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("answer, success", [(" {key}.", 1.0), (" {key}9", 0.0), (" 1, {key}", 0.0), ("{key}", 1.0)])
def test_a_trial_succeeds_when_the_first_run_of_digits_is_the_key(answer, success):
    # (max_new_tokens: the answer's length, "{key}" standing for the key's 5 digits)
    r = passkey_retrieval(KeyReader(answer), byte_encode, decode, [300], trials=4, max_new_tokens=len(answer),
                          progress=False)
    assert r["success"] == {300: success}


def test_passkey_greedy_decoding_equals_generate():
    """passkey_retrieval decodes what model.generate(do_sample=False) decodes, with the
    KV cache: one full forward per trial, then one token per step."""
    model = tiny_llama(vocab=260, window=256, seed=3, layers=1)
    model.generation_config.eos_token_id = None  # generate must not stop early
    model.generation_config.pad_token_id = 0
    decoded, inputs = [], []
    h = model.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["input_ids"].clone()), with_kwargs=True)

    def record_decode(ids):
        decoded.append(list(ids))
        return decode(ids)

    passkey_retrieval(model, byte_encode, record_decode, [210, 250], trials=2, seed=1, intro="",
                      max_new_tokens=6, progress=False)
    h.remove()
    assert [x.shape[1] for x in inputs[1:6]] == [1] * 5 and len(inputs) == 4 * 6
    prompts = inputs[::6]
    assert [p.shape[1] > 200 for p in prompts] == [True] * 4
    for prompt, out in zip(prompts, decoded):
        with torch.no_grad():
            ref = model.generate(prompt, do_sample=False, max_new_tokens=6)
        assert out == ref[0, prompt.shape[1]:].tolist()
    assert len(set(decoded[0])) > 1  # not a constant answer


def test_progress_bars_shown_or_disabled(capsys, llama, text_ids):
    pytest.importorskip("tqdm")
    sliding_window_perplexity(llama, text_ids[:64], 32, 16, progress=False)
    passkey_retrieval(LengthRecorder(), byte_encode, decode, [300], trials=2, max_new_tokens=1, progress=False)
    assert capsys.readouterr().err == ""
    sliding_window_perplexity(llama, text_ids[:64], 32, 16, progress=True)
    passkey_retrieval(LengthRecorder(), byte_encode, decode, [300], trials=2, max_new_tokens=1, progress=True)
    err = capsys.readouterr().err
    assert "ppl@32" in err and "0/3" in err and "passkey" in err and "0/2" in err  # totals: 3 windows, 2 trials


# ---------------------------------------------------------------------------------
# defects: each test failed before its fix in eval.py
# ---------------------------------------------------------------------------------
def test_mixed_train_eval_modes_are_restored_module_by_module(text_ids):
    """A model being fine-tuned with a frozen (eval-mode) part, or an eval model with
    one submodule in train mode: evaluation must leave every module as it found it."""
    model = tiny_llama().train()
    model.model.layers[0].eval()
    before = [m.training for m in model.modules()]
    sliding_window_perplexity(model, text_ids[:40], 16, 8, progress=False)
    assert [m.training for m in model.modules()] == before
    model.eval()
    model.model.layers[1].train()
    before = [m.training for m in model.modules()]
    passkey_retrieval(model, lambda s: [b % VOCAB for b in s.encode()], decode, [260], trials=1, intro="",
                      max_new_tokens=2, progress=False)
    assert [m.training for m in model.modules()] == before


class ConfidentlyWrong(torch.nn.Module):
    """Puts logit 1e4 on token 0, which never occurs: mean NLL ~1e4, perplexity inf."""

    def __init__(self, vocab=10):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., 0] = 1e4
        return (logits,)


def test_perplexity_overflow_is_inf_not_an_exception():
    """The paper reports '>1000' for extrapolating models: a huge mean NLL must give
    inf, not crash the evaluation with OverflowError from math.exp."""
    tokens = torch.randint(1, 10, (50,), generator=torch.Generator().manual_seed(0))
    ppl, nll, n = sliding_window_perplexity(ConfidentlyWrong(), tokens, 8, 4, progress=False, return_nll=True)
    assert ppl == math.inf and n == 49 and nll == pytest.approx(49 * 1e4, rel=1e-3)


def test_token_ids_beyond_the_vocabulary_are_a_clear_value_error(llama):
    """Ids >= the model's vocabulary: a ValueError naming tokens (not an IndexError from
    the embedding, nor a gather error / device assert on the logits)."""
    tokens = torch.arange(60) % (VOCAB + 5)
    with pytest.raises(ValueError, match=r"tokens.*44.*vocabulary.*40"):
        sliding_window_perplexity(llama, tokens, 16, 8, progress=False)
    with pytest.raises(ValueError, match=r"tokens.*vocabulary.*10"):  # no embedding to read: from the logits
        sliding_window_perplexity(ConfidentlyWrong(10), torch.arange(20), 8, 4, progress=False)
    for model, vocab in ((llama, VOCAB), (ConfidentlyWrong(10), 10)):  # the first id past it
        with pytest.raises(ValueError, match=rf"tokens contain id {vocab}, outside the model's vocabulary of {vocab}"):
            sliding_window_perplexity(model, torch.arange(vocab + 1), 8, 4, progress=False)


@pytest.mark.parametrize("args,exc,msg", [
    ((5, 1.5, "12345"), TypeError, "depth must be an int"),
    ((5, True, "12345"), TypeError, "depth must be an int"),
    ((2.5, 0, "12345"), TypeError, "n_filler must be an int"),
    ((-1, 0, "12345"), ValueError, "n_filler must be >= 0"),
    ((3, -1, "12345"), ValueError, "depth must be in"),
    ((3, 4, "12345"), ValueError, "depth must be in"),
])
def test_passkey_prompt_bad_input(args, exc, msg):
    with pytest.raises(exc, match=msg):
        passkey_prompt(*args)


def test_passkey_prompt_accepts_numpy_ints():
    np = pytest.importorskip("numpy")
    assert passkey_prompt(np.int64(3), np.int64(1), "12345") == passkey_prompt(3, 1, "12345")


def test_passkey_k_max_semantics():
    assert passkey_k_max({}) == 0  # nothing tested: no effective window
    assert passkey_k_max({100: 0.2, 200: 0.2}) == 200  # the threshold itself passes (2/10 >= 20%)
    assert passkey_k_max({100: 2 / 10, 200: 1 / 10}) == 100
    assert passkey_k_max({100: 1.0, 200: 0.0, 300: 1.0}) == 100  # no credit after the first failure
    assert passkey_k_max({300: 1.0, 100: 1.0, 200: 0.5}, threshold=0.6) == 100  # sorted by length, not dict order
    assert passkey_k_max({200: 0.0, 100: 1.0}) == 100 and passkey_k_max({300: 1.0, 100: 1.0}) == 300
    assert passkey_k_max({100: 0.0}) == 0
    np = pytest.importorskip("numpy")
    assert passkey_k_max({np.int64(100): 1.0}) == 100


@pytest.mark.parametrize("success,threshold,exc,msg", [
    # JSON round trips (examples/evaluate.py writes str keys) sort "1024" < "256": silently wrong
    ({"256": 1.0, "512": 0.0, "1024": 1.0}, 0.2, TypeError, "success keys must be int lengths"),
    ({256.0: 1.0}, 0.2, TypeError, "success keys must be int lengths"),
    ([256, 512], 0.2, TypeError, "success must be a dict"),
    ({256: 20.0}, 0.2, ValueError, r"success rates must be in \[0, 1\]"),  # a percentage, not a rate
    ({256: -0.1}, 0.2, ValueError, r"success rates must be in \[0, 1\]"),
    ({256: "1"}, 0.2, TypeError, "success rates must be numbers"),
    ({256: 1.0}, 0.0, ValueError, r"threshold must be in \(0, 1\]"),
    ({256: 1.0}, 1.5, ValueError, r"threshold must be in \(0, 1\]"),
    ({256: 1.0}, "0.2", TypeError, "threshold must be a number"),
    ({256: 1.0}, float("nan"), ValueError, r"threshold must be in \(0, 1\]"),
])
def test_passkey_k_max_bad_input(success, threshold, exc, msg):
    with pytest.raises(exc, match=msg):
        passkey_k_max(success, threshold)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(threshold="0.2"), TypeError, "threshold must be a number"),
    (dict(threshold=True), TypeError, "threshold must be a number"),
    (dict(threshold=0), ValueError, r"threshold must be in \(0, 1\]"),
    (dict(prefix_ids=[1.5]), TypeError, "prefix_ids must be int token ids"),
    (dict(prefix_ids="12"), TypeError, "prefix_ids must be int token ids"),
    (dict(prefix_ids=b"12"), TypeError, "prefix_ids must be int token ids"),
    (dict(prefix_ids=1), TypeError, "prefix_ids must be a sequence"),
    (dict(prefix_ids=[-1]), ValueError, "prefix_ids must be non-negative"),
    (dict(trials=2.0), TypeError, "trials must be an int"),
    (dict(trials=True), TypeError, "trials must be an int"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(lengths=[300, True]), TypeError, "lengths must be ints"),
    (dict(lengths=[300, 0]), ValueError, "lengths must be positive"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed="abc"), TypeError, "seed must be an int"),
    (dict(progress="yes"), TypeError, "progress must be a bool"),
    (dict(device="meta"), ValueError, "device must hold data"),  # NaN logits: silently 0%
    (dict(device="bogus"), ValueError, "device must be a torch device"),
])
def test_passkey_retrieval_bad_input(kwargs, exc, msg):
    kw = {**dict(lengths=[300], trials=1, progress=False), **kwargs}
    with pytest.raises(exc, match=msg):
        passkey_retrieval(LengthRecorder(), byte_encode, decode, **kw)


def test_numpy_ints_are_accepted_like_lengths():
    """passkey_retrieval took numpy ints for lengths but not for trials; the perplexity
    counts now take any integral number (not bool, not float) too."""
    np = pytest.importorskip("numpy")
    assert sliding_windows(np.int64(12), np.int32(4), np.int64(4)) == [(0, 3), (3, 3), (6, 3), (8, 2)]
    r = passkey_retrieval(LengthRecorder(), byte_encode, decode, [np.int64(300)], trials=np.int64(2),
                          max_new_tokens=np.int64(1), progress=False)
    assert r["trials"] == 2 and type(r["trials"]) is int


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(window=True, stride=1), TypeError, "window must be an int"),
    (dict(window=16, stride=4.0), TypeError, "stride must be an int"),
    (dict(window=16, stride=-4), ValueError, "stride must be >= 1"),
    (dict(window=0, stride=1), ValueError, "window must be >= 2"),
    (dict(window=16, stride=17), ValueError, "stride must be <= window, got stride=17 > window=16"),
    (dict(window=41, stride=8), ValueError, "at least as long as window: got 40 tokens for window=41"),
    (dict(window=16, stride=8, batch_size=2.0), TypeError, "batch_size must be an int"),
    (dict(window=16, stride=8, batch_size=False), TypeError, "batch_size must be an int"),
    (dict(window=16, stride=8, progress="no"), TypeError, "progress must be a bool"),
    (dict(window=16, stride=8, return_nll="no"), TypeError, "return_nll must be a bool"),  # was: a tuple
])
def test_perplexity_bad_counts(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        sliding_window_perplexity(LengthRecorder(), torch.zeros(40, dtype=torch.long), **{"progress": False, **kwargs})


@pytest.mark.parametrize("tokens,exc,msg", [
    (torch.zeros(3, 40, dtype=torch.long), ValueError, "tokens must be 1-D"),
    (torch.zeros(1, 1, 40, dtype=torch.long), ValueError, "tokens must be 1-D"),
    (torch.tensor(7), ValueError, "tokens must be 1-D"),
    (torch.zeros(40, dtype=torch.bool), TypeError, "integer token ids"),
    (torch.zeros(40, dtype=torch.float16), TypeError, "integer token ids"),
    ([1, 2, 3.5] * 10, TypeError, "integer token ids"),
    ([True] * 40, TypeError, "integer token ids"),
    ("some text that is long enough", TypeError, "integer token ids"),
    (torch.zeros(0, dtype=torch.long), ValueError, "tokens must not be empty"),
    ([5] * 20 + [-1] * 20, ValueError, "tokens must be non-negative token ids, found -1"),
    (torch.zeros(10, dtype=torch.long), ValueError, "at least as long as window"),  # n_tokens < window
])
def test_perplexity_bad_tokens(tokens, exc, msg):
    with pytest.raises(exc, match=msg):
        sliding_window_perplexity(LengthRecorder(), tokens, 16, 8, progress=False)


def test_perplexity_accepts_1_by_n_int32_and_numpy_tokens(llama, text_ids):
    np = pytest.importorskip("numpy")
    ref = sliding_window_perplexity(llama, text_ids[:64], 32, 8, progress=False)
    for t in (text_ids[None, :64], text_ids[:64].int(), text_ids[:64].numpy(), tuple(text_ids[:64].tolist())):
        assert sliding_window_perplexity(llama, t, 32, 8, progress=False) == pytest.approx(ref, rel=1e-6)
    assert np is not None


@pytest.mark.parametrize("encode", [byte_encode, digits_cost_more])
def test_filler_count_is_the_largest_that_fits(encode):
    """_max_filler (bisection) == the brute-force largest filler count within k - prefix tokens
    (were it one too many, the per-trial shrink loop would hide it but skew the depths)."""
    from pirope.eval import _max_filler

    for k in (250, 251, 300, 517, 1000):
        n_tok = [len(encode(passkey_prompt(n, 0, "00000"))) for n in range(80)]
        best = max(n for n in range(80) if n_tok[n] <= k - 3)
        assert _max_filler(encode, k, 3, PASSKEY_INTRO) == best


def test_passkey_ids_beyond_the_vocabulary_are_a_clear_value_error():
    """Ids >= the model's vocabulary, from prefix_ids or from encode: a ValueError naming
    them before the model runs, not an IndexError from the embedding."""
    model = tiny_llama(vocab=VOCAB, window=512, layers=1)
    small = lambda text: [b % VOCAB for b in text.encode()]  # noqa: E731
    with pytest.raises(ValueError, match=r"prefix_ids.*id 500.*vocabulary of 40"):
        passkey_retrieval(model, small, decode, [300], trials=1, progress=False, prefix_ids=[500])
    with pytest.raises(ValueError, match=r"encode's ids.*vocabulary of 40"):
        passkey_retrieval(model, byte_encode, decode, [300], trials=1, progress=False)


def test_passkey_seed_none_draws_fresh_trials_and_an_int_seed_repeats_them():
    runs = [passkey_retrieval(LengthRecorder(), byte_encode, decode, [300], trials=4, seed=seed,
                              max_new_tokens=1, progress=False)["samples"] for seed in (7, 7, None, None)]
    assert runs[0] == runs[1]
    keys = {tuple(s["key"] for s in r) for r in runs[2:]}
    assert len(keys) == 2  # two fresh draws of a 5-digit key: equal with probability 1e-5


class Wrapper(torch.nn.Module):
    """A wrapper whose forward is (*args, **kwargs), as PEFT's PeftModel (get_base_model)."""

    def __init__(self, model):
        super().__init__()
        self.base = model

    def get_base_model(self):
        return self.base

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


@pytest.mark.parametrize("wrapped", [False, True])
def test_passkey_prompt_pass_keeps_one_position_and_decodes_with_the_cache(wrapped):
    """The prompt's forward asks for the last position's logits only (not a (len, vocab)
    matrix: 8 GB at 32k tokens with a 128k vocabulary), and every later step feeds one
    token with the KV cache, also through a wrapper that passes **kwargs on (PEFT's;
    torch.compile's module, checked below by signature)."""
    model = tiny_llama(vocab=260, window=512, layers=1)
    calls = []
    h = model.register_forward_hook(lambda m, a, kw, out: calls.append(
        (kw["input_ids"].shape[1], tuple(out.logits.shape))), with_kwargs=True)
    runner = Wrapper(model) if wrapped else model
    passkey_retrieval(runner, byte_encode, decode, [300], trials=1, max_new_tokens=4, progress=False)
    h.remove()
    assert [c[0] for c in calls[1:]] == [1, 1, 1] and calls[0][0] > 250
    assert [c[1] for c in calls] == [(1, 1, 260)] * 4


class CacheNamedCache(torch.nn.Module):
    """A causal LM whose cache argument and output are named `cache` (newer transformers' name), not
    past_key_values."""

    def __init__(self, model):
        super().__init__()
        self.lm = model

    def forward(self, input_ids, cache=None, use_cache=False, logits_to_keep=0):
        name = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"  # (5.17's)
        out = self.lm(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep, **{name: cache})
        return SimpleNamespace(logits=out.logits, cache=getattr(out, "cache", None) or out.past_key_values)


def test_passkey_decodes_with_a_cache_named_cache():
    model = tiny_llama(vocab=260, window=512, layers=1)
    calls = []
    h = model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    r = passkey_retrieval(CacheNamedCache(model), byte_encode, decode, [300], trials=1, max_new_tokens=4,
                          progress=False)
    h.remove()
    assert calls[0] > 250 and calls[1:] == [1, 1, 1]
    assert r == passkey_retrieval(model, byte_encode, decode, [300], trials=1, max_new_tokens=4, progress=False)


def test_keyword_support_is_read_through_torch_compile():
    from pirope.eval import _accepts

    model = tiny_llama(layers=1)
    compiled = torch.compile(model)  # never called: its forward's signature is (*args, **kwargs)
    for name in ("logits_to_keep", "use_cache"):
        assert _accepts(compiled, name) and _accepts(Wrapper(model), name)
    assert not _accepts(compiled, "no_such_keyword") and not _accepts(LengthRecorder(), "logits_to_keep")


def test_min_length_is_computed_once_for_the_same_tokenizer():
    """evaluate.py asks for the min length before passkey_retrieval asks again: the 90,000
    prompts are encoded once for the same encode and intro, again for another."""
    class Tok:
        calls = 0

        def encode(self, text):
            Tok.calls += 1
            return list(text.encode())

    tok = Tok()
    first = passkey_min_length(tok.encode, intro="")
    n = Tok.calls
    assert passkey_min_length(tok.encode, intro="", prefix_ids=[1, 2]) == first + 2 and Tok.calls == n
    assert passkey_min_length(tok.encode) > first and Tok.calls == 2 * n  # another intro
    assert passkey_min_length(Tok().encode) > first and Tok.calls == 3 * n  # another tokenizer


@pytest.mark.parametrize("encode,name", [
    (lambda t: {"input_ids": list(t.encode()), "attention_mask": [1] * len(t.encode())}, "dict"),  # tok as encode
    (lambda t: t, "str"),
    (lambda t: [float(b) for b in t.encode()], "list"),
    (lambda t: [b > 100 for b in t.encode()], "list"),  # bools
    (lambda t: torch.tensor(1), "Tensor"),  # 0-D
    (lambda t: torch.tensor([list(t.encode())]), "Tensor"),  # 2-D: a batch of one
    (lambda t: None, "NoneType"),
])
def test_encode_must_return_token_ids(encode, name):
    """A tokenizer called as encode returns a dict, whose len counts its keys: the
    prompt lengths would be nonsense. What encode returns is checked first."""
    with pytest.raises(TypeError, match=f"encode must return a 1-D sequence of int token ids, got {name}"):
        passkey_retrieval(LengthRecorder(), encode, decode, [300], trials=1, progress=False)


def test_negative_ids_from_encode_are_a_clear_value_error():
    model = LengthRecorder()
    with pytest.raises(ValueError, match=r"encode's ids contain a negative id \(-1\)"):
        passkey_retrieval(model, lambda t: [-1] + byte_encode(t), decode, [300], trials=1, progress=False)
    assert model.lengths == []


def test_encode_may_return_a_tensor_or_numpy_array():
    np = pytest.importorskip("numpy")
    ref = passkey_min_length(byte_encode)
    assert passkey_min_length(lambda t: torch.tensor(byte_encode(t))) == ref
    assert passkey_min_length(lambda t: np.frombuffer(t.encode(), dtype=np.uint8)) == ref


def test_prefix_ids_may_be_a_tokenizers_1_by_n_tensor():
    ref = passkey_min_length(byte_encode, prefix_ids=[1, 2])
    assert ref == passkey_min_length(byte_encode) + 2
    assert passkey_min_length(byte_encode, prefix_ids=torch.tensor([[1, 2]])) == ref


def learned_positions(kind, n_positions):
    import transformers

    torch.manual_seed(0)
    if kind == "GPT2":
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=n_positions)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "Roberta":  # positions start past padding_idx (1): a table of n + 2 rows
        cfg = transformers.RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=n_positions + 2, is_decoder=True)
        return transformers.RobertaForCausalLM(cfg).eval()
    cfg = transformers.OPTConfig(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=n_positions, word_embed_proj_dim=32)
    return transformers.OPTForCausalLM(cfg).eval()  # (its table holds 2 more rows: an offset of 2)


@pytest.mark.parametrize("kind", ["GPT2", "OPT", "Roberta"])
def test_learned_position_embeddings_bound_the_lengths(kind):
    """A model with learned absolute positions has none past its table: a longer window,
    prompt or training sequence is a ValueError naming it (it indexed past the table: an
    IndexError on CPU, a device-side assert that ends the process on CUDA). The lengths
    that fit run; RoPE models take any length (tested throughout)."""
    pytest.importorskip("transformers")
    from pirope.training import causal_lm_loss

    model = learned_positions(kind, 256)
    tokens = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(sliding_window_perplexity(model, tokens, 256, 128, progress=False))
    with pytest.raises(ValueError, match="window must be at most 256 tokens: .* has learned position embeddings"):
        sliding_window_perplexity(model, tokens, 257, 128, progress=False)
    ok = passkey_retrieval(model, byte_encode, decode, [250], trials=1, max_new_tokens=7, intro="", progress=False)
    assert ok["lengths"] == [250]  # 250 + 7 - 1 = 256 positions
    with pytest.raises(ValueError, match=r"lengths \(the longest plus max_new_tokens - 1\) must be at most 256"):
        passkey_retrieval(model, byte_encode, decode, [250], trials=1, max_new_tokens=8, intro="", progress=False)
    ids = tokens[None, :257]
    assert math.isfinite(float(causal_lm_loss(model, ids[:, :-1], ids[:, 1:])))
    with pytest.raises(ValueError, match="input_ids' seqlen must be at most 256 tokens"):
        causal_lm_loss(model, tokens[None, :257], tokens[None, 1:258])


def test_a_replaced_position_table_is_read_again():
    """Extending a learned-position baseline (a longer table) lifts the bound at once."""
    model = learned_positions("GPT2", 32)
    tokens = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    sliding_window_perplexity(model, tokens, 32, 16, progress=False)
    with pytest.raises(ValueError, match="window must be at most 32 tokens"):
        sliding_window_perplexity(torch.nn.DataParallel(model), tokens, 48, 16, progress=False)
    old = model.transformer.wpe.weight.data
    model.transformer.wpe = torch.nn.Embedding(64, 32)
    model.transformer.wpe.weight.data[:32] = old
    assert math.isfinite(sliding_window_perplexity(model, tokens, 64, 16, progress=False))
    model.transformer.wpe.weight = torch.nn.Parameter(torch.randn(48, 32))  # (num_embeddings still says 64)
    with pytest.raises(ValueError, match="window must be at most 48 tokens: GPT2LMHeadModel"):
        sliding_window_perplexity(model, tokens, 64, 16, progress=False)
