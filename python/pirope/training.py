"""Training helpers for long-context fine-tuning.

* :func:`causal_lm_loss` - the next-token cross entropy of a Hugging Face causal LM
  computed a chunk of tokens at a time, so that a long sequence with a large
  vocabulary never holds its whole ``(tokens, vocab)`` logits. At 32k tokens a
  128k-token vocabulary (Llama 3) makes 8 GB of bfloat16 logits per sequence, plus
  their float32 copy, log-softmax and gradient (~40 GB), more than the 8B model's
  weights; chunked, the loss holds one chunk's (256 MB in float32 by default, with its
  copy in the autocast dtype), computing each chunk's gradients while its logits exist
  (the same three matmuls as the whole logits' forward and backward, nothing
  recomputed), and the output projection's float32 weight gradient from the forward to
  the backward (2.1 GB for Llama 3 8B's 128k x 4096; one per loss not yet backpropagated).

    from pirope.training import causal_lm_loss
    loss = causal_lm_loss(model, batch[:, :-1], batch[:, 1:])   # batch: (B, L + 1) token ids
    loss.backward()

Works under torch.autocast, activation checkpointing, DDP and FSDP2 (the loss is
computed inside the model's own forward call, so FSDP's hooks gather and reduce the
output projection as they do for the logits; an output projection sharded as its own
FSDP unit, or with any forward hook, gets the whole logits). A torch.compile'd model compiles
its forward but the loss, which runs as it is (a graph break; with fullgraph=True, or
model.compile() in place, the chunks' loop is traced, unrolled, weighing unscored rows 0).
Higher-order gradients need chunk_tokens=0.

A mixture of experts whose config sets ``output_router_logits`` gets its router balance loss
added as transformers adds it to the ``labels=`` loss (``router_aux_loss_coef * aux_loss``),
and Bamba with a ``z_loss_coefficient`` its z-loss (which takes the whole logits). This
module needs only torch.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .eval import _accepts, _check_positions, _chain, _compiled_inner, _eval_mode, _logits, _unwrapped, _vocab_size

__all__ = ["causal_lm_loss", "default_loss_chunk"]

# Logits per chunk by default: 2**26 values are 256 MB in float32 (523 tokens of a
# 128k vocabulary, 2097 tokens of LLaMA's 32k).
_CHUNK_LOGITS = 1 << 26

# Config attributes of families whose forward post-processes the output projection
# (Gemma 2/3's and RecurrentGemma's tanh soft-capping, Cohere's logit scale, Granite's
# logit divisor, Falcon-H1's head multiplier): their logits are not lm_head(hidden), so
# they take the whole-logits path. A probe (below) catches the families this list misses.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logits_soft_cap", "logit_scale", "logits_scaling",
                         "lm_head_multiplier")

# model -> (output projection, whether logits == output_projection(last hidden state))
_PLAIN_HEAD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_loss_chunk(vocab_size: int) -> int:
    """Tokens per chunk that :func:`causal_lm_loss` uses by default for a vocabulary of
    ``vocab_size``: 2**26 logits (256 MB in float32) per chunk, at least one token."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return max(1, _CHUNK_LOGITS // int(vocab_size))


def _check_ids(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, seqlen), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def _check_ranges(input_ids, n_in: Optional[int], targets, n_out: Optional[int], ignore_index: int) -> bool:
    """ValueError if a token id is outside the embedding (n_in) or a scored target outside the
    logits (n_out); None skips a check. Returns whether every target is scored (the chunked
    loss then selects no rows). One device sync, before the forward: CUDA would assert inside
    the embedding or the loss kernel instead, losing the process."""
    flags = [(targets != ignore_index).all()]
    if input_ids is not None:
        flags.append(((input_ids < 0) | (input_ids >= n_in)).any() if n_in is not None else (input_ids < 0).any())
    if n_out is not None:
        flags.append(((targets != ignore_index) & ((targets < 0) | (targets >= n_out))).any())
    bad = torch.stack(flags).tolist()
    all_scored = bool(bad.pop(0))
    if input_ids is not None and bad.pop(0):
        raise ValueError(f"input_ids must be token ids in [0, {n_in if n_in is not None else 'vocab'}), "
                         f"found values in [{int(input_ids.min())}, {int(input_ids.max())}]")
    if bad and bad[0]:
        t = targets[targets != ignore_index]
        raise ValueError(f"targets must be in [0, {n_out}) (the logits' size) or ignore_index={ignore_index}, "
                         f"found values in [{int(t.min())}, {int(t.max())}]")
    return all_scored


@contextlib.contextmanager
def _forward_replaced(model: torch.nn.Module, fn):
    """Calls of model (or of a wrapper around it) run fn(input_ids) in place of model.forward,
    inside the module's own call (its hooks: FSDP2 gathers the root's parameters, reduces
    their gradients). A wrapper's other keywords (PEFT passes attention_mask=None, ...) are
    dropped: only input_ids is ever passed."""
    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    model.forward = lambda input_ids=None, **unused: fn(input_ids)
    try:
        yield
    finally:
        if had:
            model.forward = old
        else:
            del model.forward


def _parts(model):
    """(causal LM, its decoder, its output projection) of a Hugging Face causal LM (or the one
    a PEFT wrapper holds), or None when the model is not one (or its logits are not a plain
    linear projection of the decoder's last hidden state)."""
    model = _unwrapped(model)
    if model is None:
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    base = getattr(model, "base_model", None)
    try:
        head = get_head() if callable(get_head) else None
    except Exception:  # a model that defines no output projection
        return None
    if (not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward
            or not isinstance(base, torch.nn.Module) or base is model):
        return None  # (a quantised or adapted Linear computes something else from its weight)
    if _has_hooks(head):
        return None  # the chunks read head.weight without calling head
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for attr in _LOGIT_POSTPROCESSING:
            if getattr(cfg, attr, None) not in (None, 1, 1.0):
                return None
    return model, base, head


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling module runs more than its class's forward: its own or global forward
    hooks (FSDP2 sharding lm_head by itself gathers its weight in one), or a forward set on
    the instance (accelerate's offloading loads the weight in it)."""
    from torch.nn.modules import module as nn_module

    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def _hidden(base, input_ids):
    kwargs = {"use_cache": False} if _accepts(base, "use_cache") else {}
    return base(input_ids=input_ids, **kwargs)[0]  # last_hidden_state (ModelOutput or tuple)


def _text_config(model):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _routes(lm) -> bool:
    """Whether lm is a mixture of experts whose forward computes its router balance loss
    (config.output_router_logits; transformers adds it to the labels= loss)."""
    return bool(getattr(_text_config(lm), "output_router_logits", False))


def _aux_term(lm, aux):
    """What lm's forward adds to its labels= loss for the router balance loss aux (None, or a
    tensor, from its output's aux_loss): router_aux_loss_coef * aux (JetMoE: aux_loss_coef)."""
    if not isinstance(aux, torch.Tensor):
        return None  # (a family that reports none, or none computed)
    cfg = _text_config(lm)
    for owner, attr in ((lm, "router_aux_loss_coef"), (lm, "aux_loss_coef"),
                        (cfg, "router_aux_loss_coef"), (cfg, "aux_loss_coef")):
        coef = getattr(owner, attr, None)
        if isinstance(coef, numbers.Real) and not isinstance(coef, bool):
            return float(coef) * aux
    raise ValueError(f"causal_lm_loss: {type(lm).__name__} returns a router balance loss (aux_loss) but no "
                     f"router_aux_loss_coef to weigh it by; set config.output_router_logits=False to leave it out")


def _z_loss_coefficient(lm) -> float:
    """The weight Bamba's forward adds its z-loss to its labels= loss with (mean over every position
    of logsumexp(logits) ** 2; config.z_loss_coefficient), 0.0 for other models."""
    coef = getattr(lm, "z_loss_coefficient", None)
    ok = isinstance(coef, numbers.Real) and not isinstance(coef, bool) and coef > 0
    return float(coef) if ok else 0.0


def _with_extra_losses(loss, model, out, logits):
    """loss (the cross entropy of the whole logits) plus what model's forward adds to its labels=
    loss: a routing mixture of experts' balance term, Bamba's z-loss."""
    inner = _unwrapped(model, data_parallel=True)
    if inner is None:
        return loss
    aux = getattr(out, "aux_loss", None)
    if isinstance(aux, torch.Tensor) and _routes(inner):
        # (nn.DataParallel gathers one balance loss per replica, as it does their labels= losses)
        loss = loss + _aux_term(inner, aux.mean() if aux.dim() else aux).to(loss.device)
    elif isinstance(aux, torch.Tensor) and _text_config(inner) is None:
        warnings.warn(f"causal_lm_loss: the output of {type(inner).__name__} holds an aux_loss, but it has no config "
                      "saying how transformers weighs it: left out (pass the Hugging Face model, or a DDP, PEFT or "
                      "torch.compile wrapper of it)", stacklevel=4)
    z_coef = _z_loss_coefficient(inner)
    if z_coef:
        loss = loss + z_coef * logits.logsumexp(dim=-1).to(loss.dtype).pow(2).mean()
    return loss


def _head_name(lm, head):
    """The attribute of lm that holds head (None when head is not lm's own child)."""
    return next((name for name, child in lm.named_children() if child is head), None)


class _LastHidden(torch.nn.Module):
    """Stands in for the output projection: the forward's logits are then its hidden states."""

    def forward(self, hidden):
        return hidden


def _hidden_and_aux(lm, base, head, input_ids, aux: bool):
    """(the last hidden state at input_ids, what lm's forward adds to its labels= loss for its
    router balance loss or None). A routing mixture of experts runs its own forward (it computes
    the balance loss from its decoder's router logits) with the output projection replaced by
    _LastHidden; other models run the decoder alone."""
    if not (aux and _routes(lm)):
        return _hidden(base, input_ids), None
    name = _head_name(lm, head)
    forward = type(lm).forward  # (the instance's is _forward_replaced's)
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(forward).parameters else {}
    setattr(lm, name, _LastHidden())
    try:
        out = forward(lm, input_ids=input_ids, **kwargs)
    finally:
        setattr(lm, name, head)
    return _logits(out), _aux_term(lm, getattr(out, "aux_loss", None))


def _plain_head(model, lm, base, head, input_ids) -> bool:
    """Whether model(input_ids).logits is head(last hidden state of lm's decoder), bit for bit,
    on a few tokens (in eval mode: no dropout, no random numbers drawn). Cached per model and
    head."""
    cached = _PLAIN_HEAD.get(model)
    if cached is not None and cached[0] is head:
        return cached[1]
    probe = input_ids[:1, :8]
    # (the module torch.compile wraps, or a module compiled in place by its own call: the probe
    # compiles no graphs of its own)
    caller = _compiled_inner(model) or model
    if getattr(caller, "_compiled_call_impl", None) is not None:
        caller = caller._call_impl
    with _eval_mode(model):
        ref = _logits(caller(input_ids=probe))
        if not isinstance(ref, torch.Tensor) or bool(ref.max() == ref.min()):
            return False  # equal logits (a zero head) cannot tell a transform apart: not cached
        try:
            with _forward_replaced(lm, lambda ids: head(_hidden(base, ids))):
                got = caller(input_ids=probe)
        except Exception:  # a decoder that does not take input_ids alone, a head of another width
            got = None
    plain = isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.shape == got.shape \
        and torch.equal(ref, got)
    _PLAIN_HEAD[model] = (head, plain)
    return plain


def _chunkable(model, input_ids) -> bool:
    """Whether causal_lm_loss computes model's loss by chunks (a Hugging Face causal LM whose
    logits are its output projection of the decoder's last hidden state)."""
    parts = _parts(model)
    return parts is not None and _plain_head(model, *parts, input_ids)


def _compute_dtype(hidden, weight) -> torch.dtype:
    """The dtype nn.Linear computes the logits in: autocast's (float64 is never cast) or the weight's."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


class _HeadCrossEntropy(torch.autograd.Function):
    """The mean over scored tokens of cross_entropy(float(linear(hidden, weight, bias)),
    targets), `chunk` tokens at a time, with its gradients: each chunk's are computed
    while its logits exist (in forward, where gradients are wanted), kept, and scaled by
    the incoming gradient in backward, so no logits are kept or recomputed.

    Only the scored tokens' logits are computed. Each chunk computes what Hugging Face's
    loss computes for its rows: logits in `dtype` upcast to float32, -log softmax at the
    target, and the logits' gradient (softmax - one_hot(target)) / count cast back to
    `dtype`, the softmax written over the float32 logits (one chunk-sized float32 buffer).
    The weight's gradient is summed over the chunks in float32 (each chunk's rounded to
    `dtype` once, as the whole matmul's is)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, ignore_index: int, dtype, grad_enabled: bool,
                all_scored: bool):
        # (needs_input_grad says requires_grad only, also under no_grad: the caller's grad mode decides)
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        tokens = targets.shape[0]
        # (all_scored: known from the range check's sync, so the usual case syncs no more here)
        rows = weights = None
        if not all_scored and torch.compiler.is_compiling():
            # traced (fullgraph=True), where a row count cannot depend on the data: every row's
            # logits, the unscored rows weighed 0
            scored = targets != ignore_index
            weights, targets = scored.to(torch.float32).unsqueeze(1), targets.masked_fill(~scored, 0)
        elif not all_scored:  # only the scored tokens' logits are computed (a prompt, a window's context)
            rows = (targets != ignore_index).nonzero().squeeze(1)
            hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
        # (no token scored: 0 * inf, a nan loss, as F.cross_entropy's)
        if weights is not None:
            scale = 1.0 / weights.sum()
        else:
            scale = 1.0 / targets.shape[0] if targets.shape[0] else float("inf")
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.detach().to(dtype)
            b = None if bias is None else bias.detach().to(dtype)
            for i in range(0, hidden.shape[0], chunk):
                h, t = hidden[i : i + chunk].detach().to(dtype), targets[i : i + chunk].unsqueeze(1)
                logits = F.linear(h, w, b).float()
                lse = torch.logsumexp(logits, dim=1, keepdim=True)
                nll = lse - logits.gather(1, t)
                total += (nll if weights is None else nll * weights[i : i + chunk]).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d(nll_r)/d(logits_r) = (softmax(logits_r) - one_hot(t_r)) / count
                probs = logits.sub_(lse).exp_()
                probs.scatter_add_(1, t, torch.full_like(lse, -1.0))
                if weights is not None:
                    probs.mul_(weights[i : i + chunk])
                dlogits = probs.mul_(scale).to(dtype)
                del logits, probs
                if need_h:
                    grad_h[i : i + chunk] = dlogits @ w
                if need_w:
                    grad_w += (dlogits.t() @ h).float()
                if need_b:
                    grad_b += dlogits.sum(0).float()
        if need_h and rows is not None:  # unscored tokens: no gradient
            grad_h = hidden.new_zeros((tokens, hidden.shape[1])).index_copy_(0, rows, grad_h)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the stored gradients have no graph of their own
            raise RuntimeError("causal_lm_loss: the chunked loss is differentiable once; for higher-order "
                               "gradients (create_graph=True) compute it with chunk_tokens=0")
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h * grad.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad).to(w_dtype)
        grad_b = None if grad_b is None else (grad_b * grad).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _traced_head_loss(hidden, weight, bias, targets, chunk: int, ignore_index: int, all_scored: bool):
    """_HeadCrossEntropy of the output projection (traced into a compiled model's graph when it is
    compiled with fullgraph=True, which allows no graph break: its loop unrolled)."""
    return _HeadCrossEntropy.apply(hidden, weight, bias, targets, chunk, ignore_index,
                                   _compute_dtype(hidden, weight), torch.is_grad_enabled(), all_scored)


# A torch.compile'd model's graph breaks here and the chunks run as they are: a traced loop
# would be unrolled (compile time growing with the chunks: ~1 s a chunk on a slow CPU) and its
# buffers planned by the compiler, not freed a chunk at a time.
_head_loss = torch.compiler.disable(_traced_head_loss)


def _traces_loss(model) -> bool:
    """Whether compiling model traces the loss into its graph: torch.compile(module,
    fullgraph=True) somewhere in its wrappers (no graph break allowed), or module.compile()
    in place (its options unknown: traced, which works under any)."""
    def traces(m) -> bool:
        if getattr(m, "_compiled_call_impl", None) is not None:
            return True
        return _compiled_inner(m) is not None and getattr(getattr(m, "dynamo_ctx", None), "fullgraph", False) is True

    return any(traces(m) for m in _chain(model) if m is not None)


def _chunked_loss(lm, base, head, input_ids, targets, chunk: int, ignore_index: int, aux: bool,
                  all_scored: bool, head_loss):
    hidden, aux_term = _hidden_and_aux(lm, base, head, input_ids, aux)
    hidden = hidden.flatten(0, 1)  # (tokens, hidden)
    weight = head.weight
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.device != hidden.device:
        # a sharded (DTensor) or offloaded weight the model's forward would have gathered:
        # the whole logits, through the head's own call
        loss = F.cross_entropy(head(hidden).float(), targets.flatten(), ignore_index=ignore_index)
    else:
        loss = head_loss(hidden, weight, head.bias, targets.flatten(), chunk, ignore_index, all_scored)
    return loss if aux_term is None else loss + aux_term.to(loss.device)


def causal_lm_loss(model, input_ids: torch.Tensor, targets: torch.Tensor, *,
                   chunk_tokens: Optional[int] = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross entropy of ``model``'s predictions at ``input_ids`` against ``targets``.

    Equals ``F.cross_entropy(model(input_ids=input_ids).logits.float().flatten(0, 1),
    targets.flatten(), ignore_index=ignore_index)`` (Hugging Face's causal-LM loss, with the
    labels already shifted; plus the losses its ``labels=`` loss adds, under Returns) up to
    float rounding, computed ``chunk_tokens`` tokens at a time so that the whole
    ``(batch * seqlen, vocab)`` logits never exist.

    Args:
        model: a Hugging Face causal LM (any model whose ``forward(input_ids=...)`` returns
            logits is accepted; one that is not a decoder plus a linear output projection,
            or whose forward transforms the projection's output (Gemma 2's soft-capping,
            Cohere's logit scale, ...), takes the whole-logits path).
        input_ids: (batch, seqlen) integer token ids.
        targets: (batch, seqlen) the token each position predicts (for a training window
            ``w`` of seqlen + 1 tokens: ``input_ids = w[:, :-1]``, ``targets = w[:, 1:]``);
            ``ignore_index`` marks positions that are not scored.
        chunk_tokens: tokens per chunk (None: :func:`default_loss_chunk` of the vocabulary;
            0: the whole logits at once, as transformers does).
        ignore_index: the target value of unscored positions.

    Returns:
        A float32 scalar tensor (nan when every target is ignored). A mixture of experts
        whose config sets ``output_router_logits`` adds its router balance loss as
        transformers' ``labels=`` loss does (``router_aux_loss_coef * aux_loss``); Bamba
        its z-loss (``z_loss_coefficient``).
    """
    return _causal_lm_loss(model, input_ids, targets, chunk_tokens, ignore_index, aux=True)


def _causal_lm_loss(model, input_ids, targets, chunk_tokens, ignore_index, aux: bool) -> torch.Tensor:
    """causal_lm_loss; aux=False leaves the losses transformers adds to the cross entropy out (a
    mixture of experts' router balance, Bamba's z-loss: pirope.eval's perplexity)."""
    input_ids = _check_ids(input_ids, "input_ids")
    if input_ids.dtype not in (torch.int32, torch.int64):  # (an embedding takes these only)
        input_ids = input_ids.long()
    targets = _check_ids(targets, "targets").long()  # (F.cross_entropy takes int64 targets only)
    if targets.shape != input_ids.shape:
        raise ValueError(f"targets must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(targets.shape)}")
    if targets.device != input_ids.device:
        raise ValueError(f"targets must be on input_ids' device {input_ids.device}, got {targets.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(1 << 63) <= ignore_index < (1 << 63):
        raise ValueError(f"ignore_index must fit in int64 (the targets' dtype), got {ignore_index}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or
                                     not isinstance(chunk_tokens, numbers.Integral)):
        raise TypeError(f"chunk_tokens must be an int or None, got {type(chunk_tokens).__name__}")
    if chunk_tokens is not None and chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0: the whole logits at once), got {chunk_tokens}")
    if not callable(model):
        raise TypeError(f"model must be a callable causal LM, got {type(model).__name__}")
    parts = _parts(model)
    _check_positions(input_ids.shape[1], parts[0] if parts is not None else model, "input_ids' seqlen")
    ignore_index = int(ignore_index)
    n_out = parts[2].out_features if parts is not None else None
    if chunk_tokens is None:
        chunk_tokens = default_loss_chunk(n_out) if n_out else 0
    all_scored = _check_ranges(input_ids, _vocab_size(parts[0] if parts is not None else model), targets, n_out,
                               ignore_index)
    routed = aux and parts is not None and _routes(parts[0])
    z_loss = aux and parts is not None and _z_loss_coefficient(parts[0]) > 0  # (from all the logits)
    if (parts is None or chunk_tokens == 0 or z_loss or (routed and _head_name(parts[0], parts[2]) is None)
            or not _plain_head(model, *parts, input_ids)):
        out = model(input_ids=input_ids)
        logits = _logits(out)
        if n_out is None or logits.shape[-1] != n_out:
            _check_ranges(None, None, targets, logits.shape[-1], ignore_index)
        loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index)
        return _with_extra_losses(loss, model, out, logits) if aux else loss
    lm, base, head = parts
    head_loss = _traced_head_loss if _traces_loss(model) else _head_loss
    with _forward_replaced(lm, lambda ids: _chunked_loss(lm, base, head, ids, targets, int(chunk_tokens),
                                                          ignore_index, aux, all_scored, head_loss)):
        return model(input_ids=input_ids)
