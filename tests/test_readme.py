"""The README's "API by example" code runs as written (the drop-in recipes, which are
fragments of other code bases, are checked for equivalence in test_drop_in_recipes.py)."""

import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def api_examples():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## API by example", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_api_examples_run_and_do_what_they_say():
    blocks = api_examples()
    assert len(blocks) >= 2, "the README's API section lost its examples"
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    # What the comments promise: shapes kept, GQA, tables float32 (8192, 64), the fused
    # attention's output like q and its gradients computed.
    assert scope["cos"].shape == (8192, 64) and scope["cos"].dtype == torch.float32
    assert scope["q_rot"].shape == (2, 512, 32, 128) and scope["k_rot"].shape == (2, 512, 8, 128)
    assert scope["x"].shape == (512, 32, 128)
    assert scope["k_new"].shape == (2, 1, 8, 128) and scope["rope"].cos.shape[0] > 8192  # grew for position 8192
    assert scope["out"].shape == scope["q"].shape
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (scope["q"], scope["k"], scope["v"]))
    # packed sequences: one output row per token, gradients through the fused kernels
    assert scope["out_packed"].shape == (4096, 32, 128)
    assert scope["q_packed"].grad is not None and torch.isfinite(scope["q_packed"].grad).all()
    # the evaluations: a finite perplexity, a success rate per passkey length
    assert 1 < scope["ppl"] < float("inf") and sorted(scope["pk"]["success"]) == [300, 400, 512]
    # the chunked loss: a finite loss, gradients in the model
    assert torch.isfinite(scope["loss"]) and scope["lm"].lm_head.weight.grad is not None


def test_drop_in_recipes_name_every_supported_model_type():
    # the README's list of architectures is the one users read: it must not fall behind the code
    import pytest

    pytest.importorskip("transformers")
    from pirope.integrations.transformers import SUPPORTED_MODEL_TYPES

    with open(README, encoding="utf-8") as f:
        recipes = f.read().split("## Drop-in recipes", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z0-9_]+)`", recipes.split("other architectures raise", 1)[0]))
    assert set(SUPPORTED_MODEL_TYPES) <= listed, sorted(set(SUPPORTED_MODEL_TYPES) - listed)


def test_markdown_headings_stand_alone():
    # a heading marker glued to the end of a line (a paste gone wrong) renders as text and
    # leaves its section without a title; code blocks may hold any text
    with open(README, encoding="utf-8") as f:
        prose = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    glued = [line for line in prose.splitlines() if re.search(r"\S#{1,6} \S", line) and not line.startswith("#")]
    assert not glued, glued
    headings = [line for line in prose.splitlines() if line.startswith("#")]
    assert len(headings) == len(set(headings)), "a heading appears twice"


def test_links_to_sections_resolve():
    # GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces as -
    with open(README, encoding="utf-8") as f:
        text = f.read()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    anchors = {re.sub(r"[^\w\- ]", "", h.lstrip("#").strip().lower()).replace(" ", "-")
               for h in prose.splitlines() if h.startswith("#")}
    links = re.findall(r"\]\(#([^)]+)\)", prose)
    assert links and set(links) <= anchors, sorted(set(links) - anchors)
