"""pirope.training.causal_lm_loss: Hugging Face's own causal-LM loss and its gradients,
computed a chunk of tokens at a time (never the whole (tokens, vocab) logits)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")
import transformers  # noqa: E402

from pirope.training import causal_lm_loss, default_loss_chunk  # noqa: E402

VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, **kw})).eval()


def family(name, **kw):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{name}Config")(**{**SMALL, **kw})
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


def window(batch=2, seqlen=33, seed=1, device="cpu"):
    """(input_ids, targets) of random training windows of seqlen tokens."""
    w = torch.randint(0, VOCAB, (batch, seqlen + 1), generator=torch.Generator().manual_seed(seed))
    return w[:, :-1].to(device), w[:, 1:].to(device)


def whole_logits_loss(model, ids, targets):
    """The cross entropy of the logits model's forward returns (nothing it adds to a labels= loss)."""
    return F.cross_entropy(model(input_ids=ids).logits.float().flatten(0, 1), targets.flatten())


def hf_loss(model, ids, targets):
    """transformers' own loss (ForCausalLMLoss): labels shifted inside, so the target of
    position i is given at i + 1; the last position has none."""
    labels = torch.cat([torch.full_like(targets[:, :1], -100), targets], 1)
    return model(input_ids=torch.cat([ids, ids[:, -1:]], 1), labels=labels).loss


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class LogitRows(TorchDispatchMode):
    """The most rows (tokens) of any (..., vocab) tensor an op creates, but the output
    projection's (hidden, vocab) weight gradient."""

    def __init__(self, vocab, hidden=SMALL["hidden_size"]):
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and tuple(t.shape) != (self.hidden, self.vocab)):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("chunk", [None, 0, 1, 5, 64, 65, 1000])
def test_loss_and_gradients_equal_transformers_own(chunk):
    model = llama()
    ids, targets = window()
    # transformers' loss over one more input token (its last position predicts nothing)
    # equals ours: causal attention keeps the extra token out of every scored position
    want = hf_loss(model, ids, targets)
    want_g = grads(model, want)
    got = causal_lm_loss(model, ids, targets, chunk_tokens=chunk)
    got_g = grads(model, got)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-5, atol=1e-6, msg=name)


def test_float64_reference():
    """Against a float64 log-softmax of the model's own hidden states and head."""
    model = llama().double()
    ids, targets = window(seqlen=20)
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state
        logp = torch.log_softmax(h @ model.lm_head.weight.T, -1)
        want = -logp.gather(-1, targets.unsqueeze(-1)).mean()
        got = causal_lm_loss(model, ids, targets, chunk_tokens=7)
    # the loss upcasts the logits to float32 (as transformers'): float32 rounding
    assert abs(float(got) - float(want)) < 1e-6 * abs(float(want))


@pytest.mark.parametrize("chunk,rows", [(5, 5), (64, 64), (0, 66)])
def test_never_holds_more_than_a_chunk_of_logits(chunk, rows):
    model = llama()
    ids, targets = window()  # 66 tokens
    causal_lm_loss(model, ids, targets, chunk_tokens=chunk)  # the first call probes the head
    with LogitRows(VOCAB) as seen:
        loss = causal_lm_loss(model, ids, targets, chunk_tokens=chunk)
        loss.backward()
    assert seen.rows == rows


def test_only_scored_tokens_get_logits():
    """A masked prompt (or a perplexity window's context) costs no output projection."""
    model = llama()
    ids, targets = window()  # 66 tokens
    targets = torch.full_like(targets, -100)
    targets[0, 10:13] = ids[0, 11:14]
    targets[1, -3:] = 5
    want = hf_loss(model, ids, targets)
    want_g = grads(model, want)
    causal_lm_loss(model, ids, targets, chunk_tokens=50)  # the first call probes the head
    with LogitRows(VOCAB) as seen:
        got = causal_lm_loss(model, ids, targets, chunk_tokens=50)
        got_g = grads(model, got)
    assert seen.rows == 6
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)


def test_default_chunk_is_2_to_the_26_logits():
    assert default_loss_chunk(128256) == 523 and default_loss_chunk(32000) == 2097
    assert default_loss_chunk(1 << 27) == 1
    model = llama(vocab_size=1 << 20, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                  num_key_value_heads=1, num_hidden_layers=1)
    ids = torch.randint(0, 1 << 20, (1, 130))
    with LogitRows(1 << 20, hidden=8) as seen:
        causal_lm_loss(model, ids, ids.roll(-1, 1)).backward()
    assert seen.rows == 64  # 2**26 / 2**20 tokens a chunk (130 = 64 + 64 + 2)


@pytest.mark.parametrize("name,extra", [
    ("Qwen2", dict(tie_word_embeddings=True)),  # biases in q/k/v, lm_head = embed_tokens
    ("Mistral", {}),
    ("Phi", {}),  # lm_head with a bias, partial rotary
])
def test_plain_head_families_are_chunked_exactly(name, extra):
    model = family(name, **extra)
    ids, targets = window()
    want = hf_loss(model, ids, targets)
    want_g = grads(model, want)
    with LogitRows(VOCAB) as seen:
        got = causal_lm_loss(model, ids, targets, chunk_tokens=4)
        got_g = grads(model, got)
    assert seen.rows <= 4 + 8  # the chunks, and the 8-token probe of the first call
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name,extra", [
    ("Gemma2", dict(head_dim=8, final_logit_softcapping=2.0)),  # tanh soft-capping of the logits
    ("Cohere", dict(logit_scale=0.5)),                           # scaled logits
    ("Granite", dict(logits_scaling=4.0)),                       # divided logits
])
def test_families_that_transform_logits_take_the_whole_path(name, extra):
    model = family(name, **extra)
    ids, targets = window()
    want = hf_loss(model, ids, targets)
    with LogitRows(VOCAB) as seen:
        got = causal_lm_loss(model, ids, targets, chunk_tokens=4)
    assert seen.rows == ids.numel()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


MOE = {  # tiny mixtures of experts: 4 experts, 2 per token
    "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen2Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                     shared_expert_intermediate_size=16),
    "Olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "JetMoe": dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=8),  # aux_loss_coef
}


def moe_window():
    """(input_ids, targets) whose last target is unscored: transformers' labels= loss over
    exactly these input_ids then scores the same tokens (no extra token routed)."""
    ids, targets = window(seqlen=17)
    targets = targets.clone()
    targets[:, -1] = -100
    labels = torch.cat([torch.full_like(targets[:, :1], -100), targets[:, :-1]], 1)
    return ids, targets, labels


@pytest.mark.parametrize("chunk", [None, 0, 3])
@pytest.mark.parametrize("name", sorted(MOE))
def test_router_balance_loss_added_as_transformers_adds_it(name, chunk):
    """config.output_router_logits: transformers' labels= loss is the cross entropy plus
    router_aux_loss_coef * aux_loss, and so is ours, with every gradient (the routers')."""
    model = family(name, **MOE[name], output_router_logits=True)
    ids, targets, labels = moe_window()
    out = model(input_ids=ids, labels=labels)
    # (JetMoE under older transformers (5.17) computes no balance loss: nor do we, then)
    routed = name != "JetMoe" or out.aux_loss is not None
    assert not routed or float(out.aux_loss.detach()) > 1.0  # the term is not negligible...
    want_g = grads(model, out.loss)
    with LogitRows(VOCAB) as seen:
        got = causal_lm_loss(model, ids, targets, chunk_tokens=chunk)
        got_g = grads(model, got)
    if chunk == 3:
        assert seen.rows <= 8  # chunked (and the first call's 8-token probe)
    torch.testing.assert_close(got, out.loss, rtol=1e-6, atol=1e-6)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
    assert not routed or abs(float(got) - float(ce)) > 1e-3  # ...so leaving it out would fail the line above
    assert got_g.keys() == want_g.keys()
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("chunk", [None, 0])
def test_router_balance_loss_weighed_by_the_models_own_coefficient(chunk):
    # the forward weighs it by the model's attribute (set from the config at construction):
    # a coefficient changed on the model after that is the one transformers uses
    model = family("Mixtral", **MOE["Mixtral"], output_router_logits=True)
    model.router_aux_loss_coef = 0.37
    ids, targets, labels = moe_window()
    want = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(causal_lm_loss(model, ids, targets, chunk_tokens=chunk), want, rtol=1e-6, atol=1e-6)


def test_router_balance_loss_in_train_mode_with_router_noise():
    """Train mode, Mixtral's router jitter (random numbers drawn in the forward): the same
    draws, the same loss and gradients."""
    model = family("Mixtral", **MOE["Mixtral"], output_router_logits=True, router_jitter_noise=0.1).train()
    ids, targets, labels = moe_window()
    torch.manual_seed(5)
    want = model(input_ids=ids, labels=labels).loss
    want_g = grads(model, want)
    causal_lm_loss(model, ids, targets, chunk_tokens=4)  # the first call probes the head (in eval mode)
    torch.manual_seed(5)
    got = causal_lm_loss(model, ids, targets, chunk_tokens=4)
    got_g = grads(model, got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("chunk", [None, 0])
def test_no_router_balance_loss_without_output_router_logits(chunk):
    model = family("Mixtral", **MOE["Mixtral"])  # output_router_logits=False (the default)
    ids, targets, labels = moe_window()
    want = model(input_ids=ids, labels=labels)
    assert want.aux_loss is None
    torch.testing.assert_close(causal_lm_loss(model, ids, targets, chunk_tokens=chunk), want.loss,
                               rtol=1e-6, atol=1e-6)


def test_perplexity_leaves_the_router_balance_loss_out():
    from pirope.eval import sliding_window_perplexity

    routed = family("Mixtral", **MOE["Mixtral"], output_router_logits=True)
    plain = family("Mixtral", **MOE["Mixtral"])  # the same weights (seed 0)
    tokens = window(batch=1, seqlen=60)[0][0]
    got = sliding_window_perplexity(routed, tokens, 24, 8, progress=False, return_nll=True)
    want = sliding_window_perplexity(plain, tokens, 24, 8, progress=False, return_nll=True)
    assert got == want


class PassOn(torch.nn.Module):
    """A wrapper pirope does not know: no config, no get_base_model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("chunk", [None, 0])
def test_router_balance_loss_through_data_parallel_or_an_unknown_wrapper(chunk):
    model = family("Mixtral", **MOE["Mixtral"], output_router_logits=True)
    ids, targets, labels = moe_window()
    want = model(input_ids=ids, labels=labels).loss
    got = causal_lm_loss(torch.nn.DataParallel(model), ids, targets, chunk_tokens=chunk)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="holds an aux_loss, but it has no config"):
        got = causal_lm_loss(PassOn(model), ids, targets, chunk_tokens=chunk)
    ce = whole_logits_loss(model, ids, targets)
    torch.testing.assert_close(got, ce, rtol=1e-6, atol=1e-6)  # (said, not silently)


BAMBA = dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=4)


@pytest.mark.parametrize("chunk", [None, 0, 3])
def test_bamba_z_loss_added_as_transformers_adds_it(chunk):
    """Bamba's labels= loss adds z_loss_coefficient * mean(logsumexp(logits) ** 2) over every
    position: that takes the whole logits; perplexity leaves it out."""
    from pirope.eval import sliding_window_perplexity

    model = family("Bamba", **BAMBA, z_loss_coefficient=0.1)
    ids, targets, labels = moe_window()
    want = model(input_ids=ids, labels=labels).loss
    want_g = grads(model, want)
    got = causal_lm_loss(model, ids, targets, chunk_tokens=chunk)
    got_g = grads(model, got)
    ce = whole_logits_loss(model, ids, targets)
    assert float(got) - float(ce) > 1.0  # the z-loss is there
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)
    if chunk is None:
        tokens = window(batch=1, seqlen=40)[0][0]
        plain = family("Bamba", **BAMBA)  # z_loss_coefficient 0, the same weights
        assert sliding_window_perplexity(model, tokens, 16, 8, progress=False, return_nll=True) == \
            sliding_window_perplexity(plain, tokens, 16, 8, progress=False, return_nll=True)


def test_router_balance_loss_without_a_coefficient_is_refused():
    model = family("Mixtral", **MOE["Mixtral"], output_router_logits=True)
    del model.router_aux_loss_coef
    model.config.__dict__["router_aux_loss_coef"] = None  # (past the config's type validation)
    ids, targets, _ = moe_window()
    for chunk in (None, 0):
        with pytest.raises(ValueError, match="router_aux_loss_coef"):
            causal_lm_loss(model, ids, targets, chunk_tokens=chunk)


class ScaledLogits(transformers.LlamaForCausalLM):
    """A family whose forward rescales the logits without a config attribute saying so:
    the probe must notice."""

    scale = 3.0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.scale
        return out


@pytest.mark.parametrize("scale", [3.0, 1.0 + 2**-20], ids=["3", "1+2^-20"])
def test_probe_catches_unknown_logit_transforms(scale):
    # bit for bit: a transform within float rounding of the head's output is one too
    torch.manual_seed(0)
    model = ScaledLogits(transformers.LlamaConfig(**SMALL)).eval()
    model.scale = scale
    ids, targets = window()
    logits = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    with LogitRows(VOCAB) as seen:
        got = causal_lm_loss(model, ids, targets, chunk_tokens=4)
    assert seen.rows >= ids.numel()  # the whole logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert "forward" not in model.__dict__  # the forward is the class's again


class PeftLike(torch.nn.Module):
    """What causal_lm_loss relies on of peft.PeftModel: get_base_model() returns the wrapped
    transformers model, whose forward PEFT calls directly with every keyword of its own."""

    def __init__(self, model):
        super().__init__()
        self.base = model

    def get_base_model(self):
        return self.base

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        return self.base.forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=None,
                                 labels=labels, output_attentions=None, **kwargs)


def test_a_peft_wrapped_model_is_chunked():
    model = PeftLike(llama())
    ids, targets = window()
    want = hf_loss(model.base, ids, targets)
    want_g = grads(model, want)
    with LogitRows(VOCAB) as seen:
        got = causal_lm_loss(model, ids, targets, chunk_tokens=4)
        got_g = grads(model, got)
    assert seen.rows <= 8  # the chunks, and the 8-token probe of the first call
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)
    assert "forward" not in model.base.__dict__


def test_a_decoder_the_probe_cannot_call_takes_the_whole_path():
    class OddDecoder(transformers.LlamaForCausalLM):  # base_model that wants more than input_ids
        @property
        def base_model(self):
            return torch.nn.Linear(2, 2)

    torch.manual_seed(0)
    model = OddDecoder(transformers.LlamaConfig(**SMALL)).eval()
    ids, targets = window()
    want = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), targets.flatten())
    with LogitRows(VOCAB) as seen:
        got = causal_lm_loss(model, ids, targets, chunk_tokens=4)
    assert seen.rows == ids.numel()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_head_with_hooks_or_an_instance_forward_takes_the_whole_path():
    """FSDP2 sharding lm_head by itself gathers its weight in a forward pre-hook; accelerate's
    offloading loads it in a forward set on the instance: the chunks, which read head.weight
    without calling head, would see the sharded or offloaded weight."""
    ids, targets = window()
    model = llama()
    want = hf_loss(model, ids, targets)
    model.lm_head.register_forward_pre_hook(lambda m, a: None)
    with LogitRows(VOCAB) as seen:
        got = causal_lm_loss(model, ids, targets, chunk_tokens=4)
    assert seen.rows == ids.numel()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    model = llama()
    head = model.lm_head
    stored = head.weight.detach().clone()  # "offloaded": the module's weight is on meta
    head.weight = torch.nn.Parameter(torch.empty_like(stored, device="meta"))
    head.forward = lambda x: torch.nn.functional.linear(x, stored)
    got = causal_lm_loss(model, ids, targets, chunk_tokens=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    # a Linear whose class computes something else from its weight (a quantised or adapted one;
    # the probe calls it too, so it cannot tell)
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = llama()
    head = model.lm_head
    model.lm_head = Doubled(head.in_features, head.out_features, bias=False)
    model.lm_head.weight = head.weight
    want = whole_logits_loss(model, ids, targets)
    torch.testing.assert_close(causal_lm_loss(model, ids, targets, chunk_tokens=4), want, rtol=1e-6, atol=1e-6)
    # ... or an instance forward that does so with the weight where it is
    model = llama()
    head = model.lm_head
    head.forward = lambda x: torch.nn.functional.linear(x, head.weight) * 2
    want = whole_logits_loss(model, ids, targets)
    torch.testing.assert_close(causal_lm_loss(model, ids, targets, chunk_tokens=4), want, rtol=1e-6, atol=1e-6)

    # a global forward hook (torch.nn.modules.module.register_module_forward_hook) that changes
    # the head's output: the probe, which calls the head, cannot see it; the loss must
    model = llama()
    from torch.nn.modules.module import register_module_forward_hook

    handle = register_module_forward_hook(lambda m, a, out: out * 2 if m is model.lm_head else None)
    try:
        want = whole_logits_loss(model, ids, targets)
        got = causal_lm_loss(model, ids, targets, chunk_tokens=4)
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_an_instance_forward_of_the_model_is_kept():
    """The loss runs the chunks in place of lm.forward for the call; a forward set on the
    instance (a wrapper's, a profiler's) is put back afterwards, not deleted."""
    model = llama()
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        return type(model).forward(model, *args, **kwargs)

    model.forward = forward
    ids, targets = window()
    torch.testing.assert_close(causal_lm_loss(model, ids, targets, chunk_tokens=4), hf_loss(llama(), ids, targets),
                               rtol=1e-6, atol=1e-6)
    assert model.forward is forward
    calls.clear()
    model(input_ids=ids)
    assert calls == [1]


class NarrowerLogits(transformers.LlamaForCausalLM):
    """A family whose forward returns fewer logits than its head computes (its padded
    vocabulary cut back)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits[..., :VOCAB - 8]
        return out


def test_targets_are_checked_against_the_logits_the_model_returns():
    torch.manual_seed(0)
    model = NarrowerLogits(transformers.LlamaConfig(**SMALL)).eval()
    ids, targets = window()
    targets[0, 0] = VOCAB - 1  # inside the head, past the logits
    with pytest.raises(ValueError, match=rf"targets must be in \[0, {VOCAB - 8}\)"):
        causal_lm_loss(model, ids, targets, chunk_tokens=4)


def test_a_probe_on_equal_logits_decides_nothing():
    """A zero-initialised head makes every logit 0, which a logit transform (here x3) leaves
    alone: the probe must not conclude (and cache) that the logits are the head's."""
    torch.manual_seed(0)
    model = ScaledLogits(transformers.LlamaConfig(**SMALL)).eval()
    trained = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids, targets = window()
    torch.testing.assert_close(causal_lm_loss(model, ids, targets, chunk_tokens=4),
                               torch.tensor(float(torch.log(torch.tensor(float(VOCAB))))))
    with torch.no_grad():
        model.lm_head.weight.copy_(trained)  # trained since
    logits = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(causal_lm_loss(model, ids, targets, chunk_tokens=4), want, rtol=1e-6, atol=1e-6)


class Shapes(TorchDispatchMode):
    """The shapes of the tensors ops allocate (not views of their inputs)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.seen.add(tuple(t.shape))
        return out


def test_no_gradient_work_without_grad_mode():
    """Under no_grad (evaluation) no gradient is computed: no (vocab, hidden) weight gradient."""
    model = llama()
    ids, targets = window()
    causal_lm_loss(model, ids, targets, chunk_tokens=4)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), Shapes() as shapes:
            causal_lm_loss(model, ids, targets, chunk_tokens=4)
        assert (VOCAB, SMALL["hidden_size"]) not in shapes.seen
    with Shapes() as shapes:  # (what the check sees when gradients are computed)
        causal_lm_loss(model, ids, targets, chunk_tokens=4)
    assert (VOCAB, SMALL["hidden_size"]) in shapes.seen


def test_double_backward_is_refused_not_wrong():
    model = llama()
    ids, targets = window()
    loss = causal_lm_loss(model, ids, targets, chunk_tokens=4)
    with pytest.raises(RuntimeError, match=r"differentiable once.*chunk_tokens=0"):
        torch.autograd.grad(loss, [model.model.norm.weight], create_graph=True)
    loss = causal_lm_loss(model, ids, targets, chunk_tokens=0)  # the whole logits: as transformers'
    (g,) = torch.autograd.grad(loss, [model.model.norm.weight], create_graph=True)
    assert torch.autograd.grad(g.pow(2).sum(), [model.lm_head.weight])[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("chunk", [0, 4])
def test_other_integer_ids_and_targets(chunk, dtype):
    model = llama()
    ids, targets = (t % 256 for t in window())  # (uint8's range)
    torch.testing.assert_close(causal_lm_loss(model, ids.to(dtype), targets.to(dtype), chunk_tokens=chunk),
                               hf_loss(model, ids, targets), rtol=1e-6, atol=1e-6)


def test_a_ddp_wrapped_model_is_chunked(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = llama()
        ids, targets = window()
        want = hf_loss(model, ids, targets)
        want_g = grads(model, want)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        with LogitRows(VOCAB) as seen:
            got = causal_lm_loss(ddp, ids, targets, chunk_tokens=4)
            got_g = grads(model, got)
        assert seen.rows <= 8  # the chunks, and the probe
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for n in want_g:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)
    finally:
        dist.destroy_process_group()


class Syncs(TorchDispatchMode):
    """The ops that copy a value to the host (a device sync on CUDA) or size their output by
    the data (nonzero)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_one_device_sync_per_call():
    """The range check (before the forward) is the only sync when every target is scored: no
    stall between the decoder's forward and the loss's chunks."""
    model = llama()
    ids, targets = window()
    causal_lm_loss(model, ids, targets, chunk_tokens=5)  # the first call probes the head
    with Syncs() as seen:
        causal_lm_loss(model, ids, targets, chunk_tokens=5).backward()
    assert seen.ops == ["_local_scalar_dense.default"]


class Graphs:
    """A torch.compile backend that runs each graph as traced (no code generation) and keeps it."""

    def __init__(self):
        self.graphs, self.shapes = [], set()

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        self.shapes |= {tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)}
        return gm.forward

    def ops(self):  # (of the graphs and their subgraphs: an autograd.Function's fwd_body / bwd_body)
        return {str(n.target) for g in self.graphs for sub in g.modules() if isinstance(sub, torch.fx.GraphModule)
                for n in sub.graph.nodes if n.op in ("call_function", "call_method")}


@pytest.mark.parametrize("name", ["Llama", "Mixtral"])
def test_a_compiled_model_compiles_its_forward_not_the_loss(name):
    """torch.compile(model): the decoder runs in compiled graphs (before, the loss replaced the
    compiled forward and everything ran eagerly), the chunks' loop as it is (a graph break);
    the probe compiles nothing; the next calls reuse the graphs."""
    torch._dynamo.reset()
    if name == "Llama":
        model = llama().train()
        ids, targets = window()
        targets = targets.clone()
        targets[:, -1] = -100
    else:  # the router balance loss's path (the model's own forward, lm_head replaced)
        model = family("Mixtral", **MOE["Mixtral"], output_router_logits=True).train()
        ids, targets, _ = moe_window()
    want = causal_lm_loss(model, ids, targets, chunk_tokens=0)
    want_g = grads(model, want)
    backend = Graphs()
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):
        got = causal_lm_loss(compiled, ids, targets, chunk_tokens=5)
        got_g = grads(model, got)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for n in want_g:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)
        if not backend.graphs:
            raise AssertionError("nothing was compiled")
        graphs = len(backend.graphs)
    assert len(backend.graphs) == graphs  # the second call compiled nothing new
    ops = backend.ops()
    assert any("scaled_dot_product_attention" in op or "matmul" in op for op in ops)  # the decoder's attention
    assert tuple(ids.shape) in backend.shapes and (1, 8) not in backend.shapes  # the batch's, not the probe's
    assert not any("logsumexp" in op for op in ops)  # the loss ran as it is
    torch._dynamo.reset()


@pytest.mark.parametrize("masked", [False, True])
def test_a_model_compiled_with_fullgraph_traces_the_loss(masked):
    """fullgraph=True allows no graph break: the chunks' loop is traced into the graph (with
    unscored targets, whose rows cannot be selected there, every row weighed)."""
    torch._dynamo.reset()
    model = llama().train()
    ids, targets = window()
    if masked:
        targets = targets.clone()
        targets[:, -1] = -100
        targets[0, 3:9] = -100
    want = causal_lm_loss(model, ids, targets, chunk_tokens=0)
    want_g = grads(model, want)
    backend = Graphs()
    got = causal_lm_loss(torch.compile(model, backend=backend, fullgraph=True), ids, targets, chunk_tokens=16)
    got_g = grads(model, got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)
    assert len(backend.graphs) == 1 and any("logsumexp" in op for op in backend.ops())
    torch._dynamo.reset()


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_model_compiled_in_place(fullgraph):
    """model.compile() (its own call compiled; the options unknown to the loss, which is traced
    into the graph under either): the loss as eager's, the probe compiles nothing."""
    torch._dynamo.reset()
    model = llama().train()
    ids, targets = window()
    targets = targets.clone()
    targets[:, -1] = -100
    want = causal_lm_loss(model, ids, targets, chunk_tokens=0)
    want_g = grads(model, want)
    backend = Graphs()
    model.compile(backend=backend, fullgraph=fullgraph)
    got = causal_lm_loss(model, ids, targets, chunk_tokens=7)
    got_g = grads(model, got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)
    assert len(backend.graphs) == 1 and (1, 8) not in backend.shapes
    torch._dynamo.reset()


def test_perplexity_of_a_model_compiled_with_fullgraph():
    from pirope.eval import sliding_window_perplexity

    torch._dynamo.reset()
    model = llama()
    tokens = window(batch=1, seqlen=60)[0][0]
    want = sliding_window_perplexity(model, tokens, 24, 8, progress=False)
    got = sliding_window_perplexity(torch.compile(model, backend="eager", fullgraph=True), tokens, 24, 8,
                                    progress=False)
    assert abs(got - want) < 1e-5 * want
    torch._dynamo.reset()


def test_probe_runs_once_per_model():
    model = llama()
    ids, targets = window()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    causal_lm_loss(model, ids, targets, chunk_tokens=4)
    first = len(calls)
    causal_lm_loss(model, ids, targets, chunk_tokens=4)
    assert first == 3 and len(calls) == first + 1  # probe: 2 calls; then one call per loss


def test_train_mode_dropout_draws_the_same_random_numbers():
    """In training mode (dropout on) the chunked loss draws what the whole path draws: the
    probe runs in eval mode and consumes no random numbers, so resumed runs stay exact."""
    ids, targets = window()
    losses = []
    for chunk in (0, 4):
        model = llama(attention_dropout=0.5).train()
        torch.manual_seed(123)
        losses.append(causal_lm_loss(model, ids, targets, chunk_tokens=chunk))
        assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    torch.manual_seed(124)  # dropout is on: other random numbers, another loss
    assert abs(float(causal_lm_loss(model, ids, targets, chunk_tokens=4)) - float(losses[1])) > 1e-3


def test_gradient_checkpointing_and_bf16_autocast_as_accurate_as_whole_logits():
    """Under bfloat16 autocast the chunks' weight gradients are summed in float32: the
    gradients are as close to the float32 ones as transformers' whole-logits loss is
    (summing 80 chunks' in bfloat16, as autocast's one cached weight cast would, is 3.6x
    further off here)."""
    model = llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, targets = window(seqlen=200)
    exact = grads(model, causal_lm_loss(model, ids, targets, chunk_tokens=0))  # float32
    err = {}
    for chunk in (0, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(model, ids, targets, chunk_tokens=chunk)
        g = grads(model, loss)
        err[chunk] = {n: float((g[n] - exact[n]).norm() / exact[n].norm()) for n in exact}
    for n in exact:
        assert err[5][n] <= 1.2 * err[0][n] + 1e-6, (n, err[5][n], err[0][n])
    assert 1e-4 < err[0]["lm_head.weight"] < 1e-2  # bfloat16 rounding, seen


@pytest.mark.parametrize("chunk", [None, 5])
def test_gradients_follow_the_gradient_the_loss_receives(chunk):
    # a loss divided over accumulation steps, or weighed in a sum of losses: every gradient scales
    # with it, the decoder's (through the hidden states) as the head's
    model = llama()
    ids, targets = window()
    want_g = grads(model, hf_loss(model, ids, targets) * 0.25 - 2.0)
    got_g = grads(model, causal_lm_loss(model, ids, targets, chunk_tokens=chunk) * 0.25 - 2.0)
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        # (the tolerances of test_loss_and_gradients_equal_transformers_own, atol scaled as the gradients)
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-5, atol=0.25e-6, msg=name)


def test_float64_model_under_autocast_stays_float64():
    # autocast casts no float64 tensor (transformers' head computes float64 logits under it): nor do
    # the chunks, whose loss and gradients equal the whole logits'
    model = llama().double()
    ids, targets = window()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = causal_lm_loss(model, ids, targets, chunk_tokens=0)
        got = causal_lm_loss(model, ids, targets, chunk_tokens=5)
    want_g, got_g = grads(model, want), grads(model, got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # (float32 losses of float64 logits)
    for name in want_g:
        assert got_g[name].dtype == torch.float64  # (both paths: float32 rounding of the logits' gradient)
        scale = want_g[name].abs().max().item()
        torch.testing.assert_close(got_g[name], want_g[name], rtol=0, atol=1e-6 * scale, msg=name)


def test_bfloat16_model():
    model = llama().to(torch.bfloat16)
    ids, targets = window(seqlen=100)
    want = hf_loss(model, ids, targets)
    want_g = grads(model, want)
    got = causal_lm_loss(model, ids, targets, chunk_tokens=7)
    got_g = grads(model, got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # float32 loss of the same logits
    for n in want_g:  # the head's weight gradient: rounded to bfloat16 per chunk, not once
        assert got_g[n].dtype == torch.bfloat16
        torch.testing.assert_close(got_g[n].float(), want_g[n].float(), rtol=2e-2, atol=2e-3, msg=n)


def test_no_grad_and_ignore_index():
    model = llama()
    ids, targets = window()
    targets = targets.clone()
    targets[0, :10] = -100
    targets[1, 5] = -100
    with torch.no_grad():
        got = causal_lm_loss(model, ids, targets, chunk_tokens=6)
        want = causal_lm_loss(model, ids, targets, chunk_tokens=0)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    logits = model(input_ids=ids).logits.float()
    mask = targets != -100
    ref = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    other = torch.where(mask, targets, 7)
    torch.testing.assert_close(causal_lm_loss(model, ids, other, chunk_tokens=6, ignore_index=7),
                               causal_lm_loss(model, ids, torch.where(other == 7, -100, other), chunk_tokens=6))
    np = pytest.importorskip("numpy")
    for chunk in (0, 6):  # a NumPy integer (from a tokenizer's config, say), as an int
        torch.testing.assert_close(causal_lm_loss(model, ids, other, chunk_tokens=chunk, ignore_index=np.int64(7)),
                                   causal_lm_loss(model, ids, other, chunk_tokens=chunk, ignore_index=7))
    for chunk in (0, 6):  # nothing scored: nan, as F.cross_entropy
        assert torch.isnan(causal_lm_loss(model, ids, torch.full_like(ids, -100), chunk_tokens=chunk))


def test_device(device):
    model = llama().to(device)
    ids, targets = window(device=device)
    want = hf_loss(model, ids, targets)
    torch.testing.assert_close(causal_lm_loss(model, ids, targets, chunk_tokens=5), want, rtol=1e-5, atol=1e-5)


def test_any_model_that_returns_logits():
    """A model that is not a Hugging Face causal LM is computed whole."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, VOCAB))
    model = lambda input_ids: net(input_ids)  # noqa: E731
    ids, targets = window()
    want = torch.nn.functional.cross_entropy(net(ids).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(causal_lm_loss(model, ids, targets, chunk_tokens=3), want)
    # a module whose get_output_embeddings raises (a model that defines none): computed whole too
    class NoHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def get_output_embeddings(self):
            raise NotImplementedError("no output projection")

        def forward(self, input_ids):
            return self.net(input_ids)

    torch.testing.assert_close(causal_lm_loss(NoHead(), ids, targets, chunk_tokens=3), want)
    # its vocabulary is unknown before the call: negative ids are refused all the same
    with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, vocab\), found values in \[-1, "):
        causal_lm_loss(model, torch.cat((ids[:, :1] * 0 - 1, ids[:, 1:]), dim=1), targets)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    (("ids", "ids.float()"), {}, TypeError, "targets must hold integer"),
    (("ids.float()", "ids"), {}, TypeError, "input_ids must hold integer"),
    (("ids.bool()", "ids"), {}, TypeError, "input_ids must hold integer token ids, got dtype torch.bool"),
    (("ids", "ids.to(torch.complex64)"), {}, TypeError,
     "targets must hold integer token ids, got dtype torch.complex64"),
    (("ids[0]", "ids[0]"), {}, ValueError, r"input_ids must be 2-D \(batch, seqlen\)"),
    (("ids[:, :0]", "ids[:, :0]"), {}, ValueError, "input_ids must not be empty"),
    (("ids", "ids[:, 1:]"), {}, ValueError, "targets must have input_ids' shape"),
    (("ids.tolist()", "ids"), {}, TypeError, "input_ids must be a torch.Tensor"),
    (("ids", "ids"), {"chunk_tokens": -1}, ValueError, "chunk_tokens must be >= 0"),
    (("ids", "ids"), {"chunk_tokens": 2.0}, TypeError, "chunk_tokens must be an int"),
    (("ids", "ids"), {"chunk_tokens": True}, TypeError, "chunk_tokens must be an int"),
    (("ids", "ids"), {"ignore_index": None}, TypeError, "ignore_index must be an int"),
    (("ids", "ids"), {"ignore_index": True}, TypeError, "ignore_index must be an int, got bool"),
    (("ids", "ids"), {"ignore_index": -2**63 - 1}, ValueError, "ignore_index must fit in int64"),
    (("ids", "ids"), {"ignore_index": 2**70}, ValueError, "ignore_index must fit in int64"),
    (("ids", "ids + 1000"), {"chunk_tokens": 4}, ValueError, r"targets must be in \[0, 300\)"),
    (("ids", "ids - 1000"), {"chunk_tokens": 0}, ValueError, r"targets must be in \[0, 300\)"),
    (("ids + 1000", "ids"), {"chunk_tokens": 4}, ValueError, r"input_ids must be token ids in \[0, 300\)"),
    (("ids - 1000", "ids"), {}, ValueError, r"input_ids must be token ids in \[0, 300\)"),
])
def test_bad_input(args, kwargs, exc, match):
    model = llama()
    ids, _ = window()
    a, b = (eval(x, {"ids": ids, "torch": torch}) for x in args)
    with pytest.raises(exc, match=match):
        causal_lm_loss(model, a, b, **kwargs)


def test_bad_model_and_vocab_size():
    ids, targets = window()
    with pytest.raises(TypeError, match="model must be a callable"):
        causal_lm_loss("llama", ids, targets)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="vocab_size must be a positive int"):
            default_loss_chunk(bad)


def test_targets_on_another_device():
    ids, targets = window()
    with pytest.raises(ValueError, match="targets must be on input_ids' device"):
        causal_lm_loss(llama(), ids, targets.to("meta"))
