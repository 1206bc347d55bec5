"""Every public function called with malformed arguments, in a child process: each call
must raise a Python exception with a message (never crash the process or hang).

One child runs all cases in order and reports each outcome; if it dies, the case it
had started is the culprit."""

import json
import re
import subprocess
import sys
import textwrap

import pytest

CASES = textwrap.dedent(r'''
import torch, pirope
ops = torch.ops.pirope
inv, _ = pirope.rope_frequencies(64)
cos, sin = pirope.rope_cos_sin(inv, 16)
x = torch.randn(1, 4, 2, 64)
CASES = {
  "apply_rope x=None": lambda: pirope.apply_rope(None, cos, sin),
  "apply_rope x=int": lambda: pirope.apply_rope(3, cos, sin),
  "apply_rope x=0-d": lambda: pirope.apply_rope(torch.tensor(1.0), cos, sin),
  "apply_rope x=complex": lambda: pirope.apply_rope(torch.randn(1, 4, 2, 64, dtype=torch.cfloat), cos, sin),
  "apply_rope x=bool": lambda: pirope.apply_rope(torch.ones(1, 4, 2, 64, dtype=torch.bool), cos, sin),
  "apply_rope cos=None": lambda: pirope.apply_rope(x, None, sin),
  "apply_rope cos int": lambda: pirope.apply_rope(x, cos.long(), sin.long()),
  "apply_rope cos 3-d": lambda: pirope.apply_rope(x, cos[None], sin[None]),
  "apply_rope empty table": lambda: pirope.apply_rope(x, cos[:0], sin[:0]),
  "apply_rope huge position": lambda: pirope.apply_rope(x, cos, sin, torch.tensor([0, 1, 2**62, 3])),
  "apply_rope min int position": lambda: pirope.apply_rope(x, cos, sin, torch.tensor([0, 1, -2**63, 3])),
  "apply_rope int32 negative": lambda: pirope.apply_rope(x, cos, sin, torch.tensor([0, -2**31, 1, 2], dtype=torch.int32)),
  "apply_rope float positions": lambda: pirope.apply_rope(x, cos, sin, torch.zeros(4)),
  "apply_rope uint8 positions": lambda: pirope.apply_rope(x, cos, sin, torch.zeros(4, dtype=torch.uint8)),
  "apply_rope 3-d positions": lambda: pirope.apply_rope(x, cos, sin, torch.zeros(1, 1, 4, dtype=torch.long)),
  "apply_rope list positions": lambda: pirope.apply_rope(x, cos, sin, [0, 1, 2, 3]),
  "apply_rope meta x": lambda: pirope.apply_rope(torch.empty(1, 4, 2, 64, device="meta"), cos, sin),
  "apply_rope table wider than head": lambda: pirope.apply_rope(torch.randn(1, 4, 2, 8), cos, sin),
  "apply_rope interleaved=None": lambda: pirope.apply_rope(x, cos, sin, interleaved=None),
  "apply_rope_qk k=None": lambda: pirope.apply_rope_qk(x, None, cos, sin),
  "apply_rope_qk k wrong rank": lambda: pirope.apply_rope_qk(x, torch.randn(4, 64), cos, sin),
  "apply_rope_qk same tensor in place": lambda: pirope.apply_rope_qk(x, x, cos, sin, inplace=True),
  "apply_rope_qk overlapping views in place": lambda: pirope.apply_rope_qk(x[:, :, :1], x[:, :, :2], cos, sin, inplace=True),
  "op apply_rope None x": lambda: ops.apply_rope(None, cos, sin, None, False),
  "op apply_rope wrong arity": lambda: ops.apply_rope(x, cos, sin),
  "op apply_rope_ expanded": lambda: ops.apply_rope_(x[:, :, :1].expand(1, 4, 3, 64), cos, sin, None, False),
  "op apply_rope_backward bad pos": lambda: ops.apply_rope_backward(x, cos, sin, torch.full((4,), 99), False),
  "op apply_rope_qk mismatched": lambda: ops.apply_rope_qk(x, torch.randn(2, 4, 2, 64), cos, sin, None, False),
  "op apply_rope_qk_backward bad": lambda: ops.apply_rope_qk_backward(x, x.double(), cos, sin, None, False),
  "rope_cos_sin None": lambda: pirope.rope_cos_sin(None, 4),
  "rope_cos_sin int inv_freq": lambda: pirope.rope_cos_sin(torch.arange(4), 4),
  "rope_cos_sin positions str": lambda: pirope.rope_cos_sin(inv, "8"),
  "rope_cos_sin negative": lambda: pirope.rope_cos_sin(inv, -3),
  "rope_cos_sin inf factor": lambda: pirope.rope_cos_sin(inv, 4, float("inf")),
  "rope_frequencies head_dim str": lambda: pirope.rope_frequencies("64"),
  "rope_frequencies head_dim 0": lambda: pirope.rope_frequencies(0),
  "rope_frequencies negative base": lambda: pirope.rope_frequencies(64, base=-1.0),
  "rope_frequencies nan factor": lambda: pirope.rope_frequencies(64, scaling={"rope_type": "linear", "factor": float("nan")}),
  "rope_frequencies bad type": lambda: pirope.rope_frequencies(64, scaling={"rope_type": 5}),
  "rope_frequencies list scaling": lambda: pirope.rope_frequencies(64, scaling=[("rope_type", "linear")]),
  "rope_frequencies longrope short list": lambda: pirope.rope_frequencies(64, scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0], "original_max_position_embeddings": 16}, max_position_embeddings=64),
  "RotaryEmbedding None": lambda: pirope.RotaryEmbedding(None, max_position_embeddings=8),
  "RotaryEmbedding huge factor type": lambda: pirope.RotaryEmbedding(64, max_position_embeddings="8"),
  "RotaryEmbedding forward non-tensor": lambda: pirope.RotaryEmbedding(64, max_position_embeddings=8)(1, 2),
  "RotaryEmbedding odd rotary": lambda: pirope.RotaryEmbedding(63, max_position_embeddings=8),
  "rope_attention q=None": lambda: pirope.rope_attention(None, x, x, cos, sin),
  "rope_attention v=str": lambda: pirope.rope_attention(x, x, "v", cos, sin),
  "rope_attention 3-d q": lambda: pirope.rope_attention(x[0], x[0], x[0], cos, sin),
  "rope_attention heads not multiple": lambda: pirope.rope_attention(torch.randn(1, 4, 3, 64), x, x, cos, sin),
  "rope_attention kv heads differ": lambda: pirope.rope_attention(x, x, torch.randn(1, 4, 1, 64), cos, sin),
  "rope_attention head dim mismatch": lambda: pirope.rope_attention(x, torch.randn(1, 4, 2, 32), x, cos, sin),
  "rope_attention seqlen mismatch": lambda: pirope.rope_attention(x, torch.randn(1, 5, 2, 64), torch.randn(1, 5, 2, 64), cos, sin),
  "rope_attention mixed dtypes": lambda: pirope.rope_attention(x, x.double(), x, cos, sin),
  "rope_attention int q": lambda: pirope.rope_attention(x.long(), x.long(), x.long(), cos, sin),
  "rope_attention meta v": lambda: pirope.rope_attention(x, x, torch.empty(1, 4, 2, 64, device="meta"), cos, sin),
  "rope_attention zero scale": lambda: pirope.rope_attention(x, x, x, cos, sin, softmax_scale=0.0),
  "rope_attention nan scale": lambda: pirope.rope_attention(x, x, x, cos, sin, softmax_scale=float("nan")),
  "rope_attention huge position": lambda: pirope.rope_attention(x, x, x, cos, sin, torch.tensor([0, 2**62, 1, 2])),
  "rope_attention causal=None": lambda: pirope.rope_attention(x, x, x, cos, sin, causal=None),
  "op rope_attention_backward bad lse": lambda: ops.rope_attention_backward(x, x, x, x, x, torch.zeros(3), cos, sin, None, True, 0.1, False),
  "op rope_attention negative scale": lambda: ops.rope_attention(x, x, x, cos, sin, None, True, -1.0, False),
}
''')

RUNNER = CASES + textwrap.dedent(r'''
import json, sys
for name, fn in CASES.items():
    print(json.dumps({"start": name}), flush=True)
    try:
        fn()
        out = {"name": name, "raised": None}
    except Exception as e:  # noqa: BLE001
        out = {"name": name, "raised": type(e).__name__, "message": str(e).splitlines()[0] if str(e) else ""}
    print(json.dumps(out), flush=True)
''')


@pytest.fixture(scope="module")
def child():
    """The one child run of every case: (completed process, its JSON lines)."""
    r = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True, timeout=300)
    return r, [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_malformed_inputs_raise_clean_python_errors(child):
    r, lines = child
    started = [d["start"] for d in lines if "start" in d]
    results = {d["name"]: d for d in lines if "name" in d}
    assert r.returncode == 0, f"child died (rc {r.returncode}) in case {started[-1]!r}:\n{r.stderr[-2000:]}"
    assert len(results) == len(started) > 40
    silent = [n for n, d in results.items() if d["raised"] is None]
    assert not silent, f"accepted malformed input without an error: {silent}"
    allowed = {"TypeError", "ValueError", "IndexError", "RuntimeError", "NotImplementedError"}
    wrong = {n: d["raised"] for n, d in results.items() if d["raised"] not in allowed}
    assert not wrong, f"unexpected exception types: {wrong}"
    empty = [n for n, d in results.items() if len(d["message"]) < 15]
    assert not empty, f"errors without a useful message: {empty}"


# The argument each case gets wrong, as its error message must name it (a whole word).
ARGUMENT = {
    "apply_rope x=None": "x", "apply_rope x=int": "x", "apply_rope x=0-d": "x", "apply_rope x=complex": "x",
    "apply_rope x=bool": "x", "apply_rope cos=None": "cos", "apply_rope cos int": "cos",
    "apply_rope cos 3-d": "cos", "apply_rope empty table": "cos", "apply_rope huge position": "position_ids",
    "apply_rope min int position": "position_ids", "apply_rope int32 negative": "position_ids",
    "apply_rope float positions": "position_ids", "apply_rope uint8 positions": "position_ids",
    "apply_rope 3-d positions": "position_ids", "apply_rope list positions": "position_ids",
    "apply_rope meta x": "x", "apply_rope table wider than head": "cos", "apply_rope interleaved=None": "interleaved",
    "apply_rope_qk k=None": "k", "apply_rope_qk k wrong rank": "k", "apply_rope_qk same tensor in place": "k",
    "apply_rope_qk overlapping views in place": "k", "op apply_rope None x": "x",
    "op apply_rope wrong arity": "position_ids", "op apply_rope_ expanded": "x",
    "op apply_rope_backward bad pos": "position_ids", "op apply_rope_qk mismatched": "k",
    "op apply_rope_qk_backward bad": "grad_k", "rope_cos_sin None": "inv_freq",
    "rope_cos_sin int inv_freq": "inv_freq", "rope_cos_sin positions str": "positions",
    "rope_cos_sin negative": "positions", "rope_cos_sin inf factor": "attention_factor",
    "rope_frequencies head_dim str": "head_dim", "rope_frequencies head_dim 0": "head_dim",
    "rope_frequencies negative base": "base", "rope_frequencies nan factor": "factor",
    "rope_frequencies bad type": "rope_type", "rope_frequencies list scaling": "scaling",
    "rope_frequencies longrope short list": "short_factor", "RotaryEmbedding None": "head_dim",
    "RotaryEmbedding huge factor type": "max_position_embeddings", "RotaryEmbedding forward non-tensor": "q",
    "RotaryEmbedding odd rotary": "head_dim", "rope_attention q=None": "q", "rope_attention v=str": "v",
    "rope_attention 3-d q": "q", "rope_attention heads not multiple": "nheads_kv",
    "rope_attention kv heads differ": "v", "rope_attention head dim mismatch": "k",
    "rope_attention seqlen mismatch": "k", "rope_attention mixed dtypes": "k", "rope_attention int q": "q",
    "rope_attention meta v": "v", "rope_attention zero scale": "softmax_scale",
    "rope_attention nan scale": "softmax_scale", "rope_attention huge position": "position_ids",
    "rope_attention causal=None": "causal", "op rope_attention_backward bad lse": "lse",
    "op rope_attention negative scale": "softmax_scale",
}


def test_malformed_input_errors_name_the_argument(child):
    _, lines = child
    results = {d["name"]: d for d in lines if "name" in d}
    assert set(ARGUMENT) == set(results)  # every case has its argument here
    unnamed = {n: results[n]["message"] for n, arg in ARGUMENT.items()
               if not re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", results[n]["message"])}
    assert not unnamed, f"errors that do not name the argument: {unnamed}"
