"""Evaluations from the Position Interpolation paper (arXiv 2306.15595, Section 3).

* :func:`sliding_window_perplexity` - perplexity with a sliding window (the paper's
  PG19 / Proof-pile protocol, stride 256 there): every window has the same length,
  the first window scores all of its tokens, every later window scores only its last
  ``stride`` tokens, so each token after the first is predicted exactly once.
* :func:`passkey_retrieval` - the paper's passkey task (prompt, filler, a random
  5-digit key at a random depth, greedy decoding) and its effective context window
  ``k_max`` (:func:`passkey_k_max`).

Both work with any Hugging Face causal LM (anything whose ``forward(input_ids=...)``
returns an object with ``.logits`` or a tuple whose first item is the logits), and
:func:`passkey_retrieval` with any tokenizer given as ``encode``/``decode`` callables,
e.g. bytes::

    encode = lambda text: list(text.encode("utf-8"))
    decode = lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", "replace")

This module needs only torch (tqdm is used for progress bars when installed).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import random
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

__all__ = [
    "PASSKEY_INTRO",
    "PASSKEY_FILLER",
    "PASSKEY_QUESTION",
    "passkey_prompt",
    "passkey_k_max",
    "passkey_min_length",
    "passkey_retrieval",
    "sliding_window_perplexity",
    "sliding_windows",
]

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize them. I will quiz you about the important information there."
)
PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again."
)
PASSKEY_KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
_KEYS = range(10000, 100000)  # the trials' random 5-digit keys


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an optional dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _logits(out) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"model output has no logits (got {type(out).__name__})")


def _accepts(model, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword ``name``; through the wrappers whose
    forward is ``(*args, **kwargs)`` and passes them on (``torch.compile``'s module, PEFT's
    model), by the wrapped model's signature."""
    fn = getattr(model, "forward", model)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        inner = getattr(model, "_orig_mod", None)  # torch.compile(model)
        if inner is None and callable(getattr(model, "get_base_model", None)):  # PEFT
            inner = model.get_base_model()
        if isinstance(inner, torch.nn.Module) and inner is not model:
            return _accepts(inner, name)
    return False


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


@contextlib.contextmanager
def _eval_mode(model):
    # Every module's own mode is restored (a model being fine-tuned may have frozen parts
    # in eval mode; model.train() afterwards would flip them to train mode).
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    modes = [m.training for m in modules]
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode


def _as_token_tensor(tokens, name: str = "tokens") -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        t = tokens
    else:
        try:
            t = torch.as_tensor(list(tokens) if not isinstance(tokens, (list, tuple)) else tokens)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a 1-D sequence of integer token ids ({e})") from None
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (or (1, n)), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be non-negative token ids, found {int(t.min())}")
    return t.long()


def _check_int(value, name: str, minimum) -> int:
    """An int (numpy ints too; not bool, not float) >= minimum (None: no minimum)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not 0.0 < threshold <= 1.0:  # also rejects nan
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return float(threshold)


def _perplexity(total_nll: float, n_scored: int) -> float:
    """exp(mean NLL); inf (not OverflowError) past float range, as for extrapolating models.
    (n_scored >= 1: the first window scores window - 1 >= 1 tokens.)"""
    try:
        return math.exp(total_nll / n_scored)
    except OverflowError:
        return math.inf


def _vocab_size(model):
    """The input embedding's size when the model exposes it (Hugging Face models), else None."""
    try:
        emb = model.get_input_embeddings()
    except Exception:  # not a Hugging Face model / no embedding
        return None
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


# What transformers names learned absolute position embeddings beside the token embeddings
# (GPT-2, GPT-Neo, GPT-BigCode: wpe; OPT, BioGPT: embed_positions, offset by 2; OpenAI GPT:
# positions_embed; RoBERTa-style decoders: position_embeddings, starting past padding_idx)
_LEARNED_POSITIONS = ("wpe", "embed_positions", "positions_embed", "position_embeddings")


def _compiled_inner(model):
    """The module torch.compile(module) wraps (None if model is not such a wrapper)."""
    if not (isinstance(model, torch.nn.Module) and type(model).__name__ == "OptimizedModule"):
        return None
    inner = model._modules.get("_orig_mod")
    return inner if isinstance(inner, torch.nn.Module) else None


def _chain(model, data_parallel: bool = False):
    """model, then what each DDP, torch.compile and PEFT wrapper around it calls in turn
    (data_parallel: also nn.DataParallel, which calls copies of it); None at the end where a
    wrapper's model cannot be had."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel) if data_parallel else \
        torch.nn.parallel.DistributedDataParallel
    chain = [model]
    for _ in range(8):
        if isinstance(model, wrappers):
            model = model.module  # its forward calls the module's
        elif (compiled := _compiled_inner(model)) is not None:  # (its compiled forward calls the module's)
            model = compiled
        elif callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
            try:
                inner = model.get_base_model()
            except Exception:
                return chain + [None]
            if inner is model:
                break
            model = inner
        else:
            break
        chain.append(model)
    return chain


def _unwrapped(model, data_parallel: bool = False):
    """The model that DDP, torch.compile and PEFT wrappers (any nesting; data_parallel: also
    nn.DataParallel) end up calling (model itself if none), None if it cannot be had."""
    inner = _chain(model, data_parallel)[-1]
    return inner if isinstance(inner, torch.nn.Module) else None


def _position_limit(model) -> Optional[int]:
    """How many positions a model with learned absolute position embeddings has (GPT-2's
    n_positions: a longer input indexes past them, an IndexError on CPU and a device-side
    assert, which ends the process, on CUDA), or None (RoPE, ALiBi, ...: any length)."""
    model = _unwrapped(model, data_parallel=True)
    try:
        emb = model.get_input_embeddings()
    except Exception:  # not a Hugging Face model
        return None
    if not isinstance(model, torch.nn.Module) or not isinstance(emb, torch.nn.Module):
        return None
    for owner in model.modules():  # the module holding the token embeddings, and beside them...
        children = dict(owner.named_children())
        if any(child is emb for child in children.values()):
            pos = next((children[n] for n in _LEARNED_POSITIONS if isinstance(children.get(n), torch.nn.Embedding)),
                       None)  # ...a table of positions: its rows, less those before the first position
            if pos is None:
                return None
            first = int(getattr(pos, "offset", 0) or 0) + (pos.padding_idx + 1 if pos.padding_idx is not None else 0)
            return pos.weight.shape[0] - first
    return None


def _check_positions(n: int, model, name: str) -> None:
    limit = _position_limit(model)
    if limit is not None and n > limit:
        raise ValueError(f"{name} must be at most {limit} tokens: {type(_unwrapped(model, True)).__name__} has learned "
                         f"position embeddings for {limit} positions and none beyond (got {n})")


def _check_vocab(max_id: int, vocab, what: str, name: str = "tokens") -> None:
    if vocab is not None and max_id >= vocab:
        raise ValueError(f"{name} contain id {max_id}, outside the model's vocabulary of {vocab} ids ({what})")


def sliding_windows(n_tokens: int, window: int, stride: int) -> List[tuple]:
    """The windows of the sliding-window evaluation as ``(begin, n_scored)`` pairs.

    Every window is ``tokens[begin:begin + window]`` and scores its last ``n_scored``
    tokens (predicted from everything before them in the window). Windows start at
    0, stride, 2*stride, ...; the last one is aligned to the end of the text so that
    all windows have the same length. The first window scores ``window - 1`` tokens
    (all but the first token, which has no context), and every token in
    ``tokens[1:]`` is scored by exactly one window. A window's first token has no
    context in it either, so a window scores at most ``window - 1`` tokens: ``stride =
    window`` (back-to-back windows) is taken as ``window - 1``.
    """
    n_tokens = _check_int(n_tokens, "n_tokens", 0)
    window = _check_int(window, "window", 2)
    stride = _check_int(stride, "stride", 1)
    if stride > window:
        raise ValueError(f"stride must be <= window, got stride={stride} > window={window}")
    if n_tokens < window:
        raise ValueError(
            f"tokens must be at least as long as window: got {n_tokens} tokens for window={window}"
        )
    out = [(0, window - 1)]
    end = window
    stride = min(stride, window - 1)
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        out.append((new_end - window, new_end - end))
        end = new_end
    return out


def _check_device(device) -> torch.device:
    """``device`` as a torch.device that holds data (not meta: a model there computes nothing),
    or a ValueError naming the argument."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r} "
                         f"({str(e).splitlines()[0]})") from None
    if device.type == "meta":
        raise ValueError("device must hold data: 'meta' tensors have none (use the model's device)")
    return device


def _scored_nll(model, ids, batch) -> float:
    """Summed NLL of the windows' scored tokens by pirope.training's chunked loss: the output
    projection of the scored tokens only, a chunk at a time (no (window, vocab) logits); the
    cross entropy alone (a mixture of experts' router balance loss, Bamba's z-loss left out)."""
    from .training import _causal_lm_loss

    window = ids.shape[1]
    targets = torch.full_like(ids, -100)
    for row, (_, n) in enumerate(batch):  # position i predicts token i + 1
        targets[row, window - 1 - n : window - 1] = ids[row, window - n :]
    n_total = sum(n for _, n in batch)
    mean = _causal_lm_loss(model, ids, targets, None, -100, aux=False)
    return float(mean) * n_total  # (a float32 mean: 1e-7 relative)


def _scored_nll_from_logits(model, ids, batch, max_id: int, use_keep: bool, rows: int = 1024) -> float:
    """Summed NLL of the windows' scored tokens from the model's logits (of the last positions
    only where the model takes logits_to_keep), upcast a block of `rows` positions at a time."""
    window = ids.shape[1]
    keep = max(n for _, n in batch) + 1  # logits for the last keep positions
    kwargs = {"logits_to_keep": keep} if use_keep and keep < window else {}
    logits = _logits(model(input_ids=ids, **kwargs))
    _check_vocab(max_id, logits.shape[-1], "logits")
    logits = logits[:, -keep:] if logits.shape[1] >= keep else logits
    # logits[:, j] predicts token window - keep + j + 1; the last one predicts nothing.
    target = ids[:, window - keep + 1 :]
    nll = torch.cat([
        -torch.log_softmax(logits[:, j : j + rows].float(), dim=-1).gather(-1, target[:, j : j + rows, None])[..., 0]
        for j in range(0, keep - 1, rows)], dim=1)  # (B, keep - 1)
    return sum(float(nll[row, nll.shape[1] - n :].double().sum()) for row, (_, n) in enumerate(batch))


def sliding_window_perplexity(
    model,
    tokens,
    window: int,
    stride: int,
    *,
    batch_size: int = 1,
    progress: bool = True,
    device=None,
    return_nll: bool = False,
):
    """Sliding-window perplexity of a causal LM on one token sequence.

    Args:
        model: a Hugging Face causal LM (``model(input_ids=...)`` returns ``.logits``).
        tokens: 1-D integer tensor / sequence of token ids (at least ``window`` long).
        window: the context length every window has (>= 2).
        stride: how many new tokens each window after the first scores (1..window;
            window means window - 1, see :func:`sliding_windows`).
        batch_size: windows per forward pass.
        progress: show a tqdm bar.
        device: where to run (default: the model's parameters' device).
        return_nll: also return ``(total_nll, n_scored)``.

    A Hugging Face causal LM whose logits are its output projection of the last hidden
    state (most; not Gemma 2's soft-capped ones) is scored by
    :func:`pirope.training.causal_lm_loss`: the logits of the scored tokens only, a chunk at
    a time (a 32k window with a 128k vocabulary otherwise makes 8 GB of bfloat16 logits for
    the first window, which scores all of its tokens). Other models' logits are upcast and
    scored a block of rows at a time.

    Returns:
        ``exp(mean negative log-likelihood)`` over ``len(tokens) - 1`` predictions
        (a float; ``inf`` past the float range), or ``(ppl, total_nll, n_scored)`` with
        ``return_nll=True``. The model's train/eval modes are restored afterwards.
    """
    t = _as_token_tensor(tokens)
    batch_size = _check_int(batch_size, "batch_size", 1)
    progress = _check_flag(progress, "progress")
    return_nll = _check_flag(return_nll, "return_nll")
    windows = sliding_windows(t.numel(), window, stride)
    _check_positions(window, model, "window")
    max_id = int(t.max())
    _check_vocab(max_id, _vocab_size(model), "input embeddings")
    device = _check_device(device) if device is not None else _model_device(model)
    use_keep = _accepts(model, "logits_to_keep")
    total_nll = 0.0
    n_scored = 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with _eval_mode(model):
        for k, batch in enumerate(_progress(batches, len(batches), f"ppl@{window}", progress)):
            ids = torch.stack([t[b : b + window] for b, _ in batch]).to(device)
            if k == 0:  # a Hugging Face causal LM whose logits are its output projection's
                from .training import _chunkable  # (the training module imports this one)

                chunked = _chunkable(model, ids)
            if chunked:
                total_nll += _scored_nll(model, ids, batch)
            else:
                total_nll += _scored_nll_from_logits(model, ids, batch, max_id, use_keep)
            n_scored += sum(n for _, n in batch)
    ppl = _perplexity(total_nll, n_scored)
    if return_nll:
        return ppl, total_nll, n_scored
    return ppl


# --------------------------------------------------------------------------------------
# Passkey retrieval
# --------------------------------------------------------------------------------------

_FILLER_SENTENCES = [s.strip() + "." for s in PASSKEY_FILLER.split(".") if s.strip()]


def passkey_prompt(n_filler: int, depth: int, key: str, *, intro: str = PASSKEY_INTRO) -> str:
    """The paper's passkey prompt with ``n_filler`` filler sentences.

    The filler is the paper's five sentences repeated (cut at sentence granularity
    so the prompt can fit any length); the key line goes after ``depth`` of them
    (0 <= depth <= n_filler). The prompt ends with "The pass key is".
    """
    n_filler = _check_int(n_filler, "n_filler", 0)
    depth = _check_int(depth, "depth", None)
    for name, value in (("key", key), ("intro", intro)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not 0 <= depth <= n_filler:
        raise ValueError(f"depth must be in [0, n_filler={n_filler}], got {depth}")
    filler = [_FILLER_SENTENCES[i % len(_FILLER_SENTENCES)] for i in range(n_filler)]
    parts = [intro] + filler[:depth] + [PASSKEY_KEY_LINE.format(key=key)] + filler[depth:]
    parts.append(PASSKEY_QUESTION)
    return " ".join(p for p in parts if p)


def _too_short(k: int, n_prefix: int, n_prompt: int) -> ValueError:
    return ValueError(
        f"passkey length {k} is shorter than the prompt without filler ({n_prefix} prefix ids + {n_prompt} "
        f"tokens with the key that takes the most); use longer lengths or a shorter intro")


def passkey_min_length(encode: Callable[[str], Sequence[int]], *, intro: str = PASSKEY_INTRO,
                       prefix_ids: Sequence[int] = ()) -> int:
    """The shortest length :func:`passkey_retrieval` accepts: ``len(prefix_ids)`` plus the
    tokens of the prompt without filler, with the 5-digit key that takes the most of them
    (with a BPE tokenizer keys differ: " 00000" may be 4 tokens and " 12345" 6). Encodes
    the 90,000 keys' prompts once."""
    if not callable(encode):
        raise TypeError("encode must be a callable (text -> ids)")
    if not isinstance(intro, str):
        raise TypeError(f"intro must be a str, got {type(intro).__name__}")
    prefix_ids = _check_prefix_ids(prefix_ids)
    # The last answer is kept (a slow Python tokenizer takes seconds for the 90,000 prompts,
    # and callers ask before passkey_retrieval does), for the same encode (a bound method
    # of the same tokenizer compares equal) and intro; only the last, so that no more than
    # one tokenizer is kept alive by it.
    last = _MIN_LENGTH_MEMO.get("last")
    if last is not None and last[1] == intro and _same_encode(last[0], encode):
        return len(prefix_ids) + last[2]
    _check_encoded(encode(passkey_prompt(0, 0, str(_KEYS.start), intro=intro)))
    n = max(len(encode(passkey_prompt(0, 0, str(key), intro=intro))) for key in _KEYS)
    _MIN_LENGTH_MEMO["last"] = (encode, intro, n)
    return len(prefix_ids) + n


_MIN_LENGTH_MEMO: dict = {}


def _check_encoded(ids) -> None:
    """What encode returned must be a sequence of int ids (a Hugging Face tokenizer called
    as encode returns a dict: its len would count its keys)."""
    kind = type(ids).__name__
    if isinstance(ids, torch.Tensor):  # (its items are tensors; a numpy array's are numbers.Integral)
        ids = ids.tolist()  # (other than 1-D: an int or nested lists, refused below)
    if isinstance(ids, (Mapping, str, bytes)) or not isinstance(ids, Iterable) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        hint = " (for a tokenizer: lambda text: tok(text, add_special_tokens=False)['input_ids'])" if isinstance(
            ids, Mapping) else ""
        raise TypeError(f"encode must return a 1-D sequence of int token ids, got {kind}{hint}")


def _same_encode(a, b) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # an object whose == raises or is not a bool (an array)
        return False


def _max_filler(encode, k: int, n_prefix: int, intro: str) -> int:
    """Largest number of filler sentences whose prompt (with a key of zeros) has at
    most k - n_prefix tokens (0 if none: the trial's own key decides, see
    passkey_retrieval)."""
    budget = k - n_prefix

    def n_tok(n):
        return len(encode(passkey_prompt(n, 0, "00000", intro=intro)))

    if n_tok(0) > budget:
        return 0
    lo, hi = 0, 1
    while n_tok(hi) <= budget:
        if hi > budget:  # every sentence adds a token with any tokenizer that keeps the text
            raise ValueError(
                f"encode gives at most {budget} tokens however long the passkey prompt is ({hi} filler sentences: "
                f"{n_tok(hi)} tokens); it must not truncate the text")
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # n_tok(lo) <= budget < n_tok(hi)
        mid = (lo + hi) // 2
        if n_tok(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _check_prefix_ids(prefix_ids) -> List[int]:
    if isinstance(prefix_ids, (str, bytes)):
        raise TypeError(f"prefix_ids must be int token ids, got {type(prefix_ids).__name__} {prefix_ids!r}")
    if isinstance(prefix_ids, torch.Tensor):
        prefix_ids = prefix_ids.reshape(-1).tolist()
    try:
        ids = list(prefix_ids)
    except TypeError:
        raise TypeError(f"prefix_ids must be a sequence of int token ids, got {type(prefix_ids).__name__}") from None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"prefix_ids must be int token ids, got {type(i).__name__} {i!r}")
        if i < 0:
            raise ValueError(f"prefix_ids must be non-negative token ids, got {i}")
    return [int(i) for i in ids]


def passkey_k_max(success: Dict[int, float], threshold: float = 0.2) -> int:
    """The paper's effective context window: the largest length k such that every
    tested length k' <= k has success rate >= threshold (0 if the shortest fails, or
    if ``success`` is empty). Keys are int lengths, rates are in [0, 1], threshold in (0, 1]."""
    if not isinstance(success, Mapping):
        raise TypeError(f"success must be a dict {{length: success rate}}, got {type(success).__name__}")
    threshold = _check_threshold(threshold)
    for k, v in success.items():
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            # e.g. str keys from a JSON round trip would sort "1024" before "256"
            raise TypeError(f"success keys must be int lengths, got {type(k).__name__} {k!r}")
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"success rates must be numbers, got {type(v).__name__} {v!r} for length {k}")
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"success rates must be in [0, 1], got {v!r} for length {k}")
    k_max = 0
    for k in sorted(success):
        if success[k] >= threshold:
            k_max = int(k)
        else:
            break
    return k_max


def _greedy(model, ids: torch.Tensor, n_new: int) -> List[int]:
    """Greedy decoding of n_new tokens (KV cache when the model supports it)."""
    # transformers >= 5.2x names the cache argument/output `cache`, older ones `past_key_values`.
    cache_arg = "cache" if _accepts(model, "cache") else ("past_key_values" if _accepts(model, "past_key_values") else None)
    use_cache = cache_arg is not None and _accepts(model, "use_cache")
    # the prompt's pass needs only its last position's logits (not a (len, vocab) matrix)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out: List[int] = []
    res = model(input_ids=ids, use_cache=True, **keep) if use_cache else model(input_ids=ids, **keep)
    for step in range(n_new):
        nxt = int(_logits(res)[0, -1].argmax())
        out.append(nxt)
        if step == n_new - 1:
            break
        past = getattr(res, "cache", None) or getattr(res, "past_key_values", None) if use_cache else None
        if past is not None:
            res = model(input_ids=torch.tensor([[nxt]], device=ids.device), use_cache=True, **{cache_arg: past})
        else:
            ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
            res = model(input_ids=ids, **keep)
    return out


def passkey_retrieval(
    model,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    lengths: Iterable[int],
    trials: int = 10,
    seed: int | None = 0,
    *,
    max_new_tokens: int = 10,
    threshold: float = 0.2,
    intro: str = PASSKEY_INTRO,
    prefix_ids: Sequence[int] = (),
    progress: bool = True,
    device=None,
) -> dict:
    """The paper's passkey retrieval task.

    For every length k (in tokens of ``encode``) and each of ``trials`` trials: a
    random 5-digit key is hidden at a random depth of the paper's filler text, the
    prompt (at most k tokens, as many filler sentences as fit) ends with
    "What is the pass key? The pass key is", the model greedily decodes
    ``max_new_tokens`` tokens, and the trial succeeds when the first run of digits in
    the decoded text equals the key.

    Args:
        encode / decode: the tokenizer (text -> ids, ids -> text).
        lengths: prompt lengths k in tokens, each at least :func:`passkey_min_length`
            (the prompt without filler fits with any key; checked before the model runs).
        trials: trials per length.
        seed: seeds the keys and depths of all trials (one random stream over the lengths
            in increasing order, then the trials); ``None``: fresh ones every call.
        max_new_tokens: tokens decoded per trial.
        threshold: the success rate :func:`passkey_k_max` asks of every length.
        intro: the sentence before the filler (the paper's; ``""`` for short windows).
        prefix_ids: ids put before every prompt (e.g. the tokenizer's BOS); they
            count towards the length.
        progress: show a tqdm bar.
        device: where the prompts go (default: the model's parameters' device).

    Returns:
        dict with ``lengths`` (sorted), ``success`` ({k: success rate}), ``k_max``
        (:func:`passkey_k_max`), ``trials``, ``threshold`` and ``samples`` (the first
        trial of every length, as dicts with ``length``, ``n_tokens``, ``depth`` (filler
        sentences before the key line), ``key`` and ``output`` (the decoded text)).
    """
    if not callable(encode) or not callable(decode):
        raise TypeError("encode and decode must be callables (text -> ids, ids -> text)")
    try:
        lengths = list(lengths)
    except TypeError:
        raise TypeError("lengths must be an iterable of ints") from None
    for k in lengths:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"lengths must be ints, got {type(k).__name__} {k!r}")
    lengths = sorted({int(k) for k in lengths})
    if not lengths:
        raise ValueError("lengths must not be empty")
    if lengths[0] < 1:
        raise ValueError(f"lengths must be positive, got {lengths[0]}")
    trials = _check_int(trials, "trials", 1)
    if seed is not None:
        seed = _check_int(seed, "seed", None)
    max_new_tokens = _check_int(max_new_tokens, "max_new_tokens", 1)
    threshold = _check_threshold(threshold)
    progress = _check_flag(progress, "progress")
    prefix_ids = _check_prefix_ids(prefix_ids)
    device = _check_device(device) if device is not None else _model_device(model)
    vocab = _vocab_size(model)
    if prefix_ids:
        _check_vocab(max(prefix_ids), vocab, "input embeddings", "prefix_ids")
    # (the prompt and the answer's tokens but the last, which is decoded, not read)
    _check_positions(lengths[-1] + max_new_tokens - 1, model, "lengths (the longest plus max_new_tokens - 1)")
    shortest = passkey_min_length(encode, intro=intro, prefix_ids=prefix_ids)
    if lengths[0] < shortest:
        raise _too_short(lengths[0], len(prefix_ids), shortest - len(prefix_ids))
    n_fill = {k: _max_filler(encode, k, len(prefix_ids), intro) for k in lengths}
    rng = random.Random(seed)
    success: Dict[int, float] = {}
    samples = []
    jobs = [(k, t) for k in lengths for t in range(trials)]
    hits: Dict[int, int] = {k: 0 for k in lengths}
    with _eval_mode(model):
        for k, t in _progress(jobs, len(jobs), "passkey", progress):
            key = str(rng.randint(_KEYS.start, _KEYS.stop - 1))
            n = n_fill[k]
            depth = rng.randint(0, n)
            ids = prefix_ids + list(encode(passkey_prompt(n, depth, key, intro=intro)))
            while len(ids) > k:  # this key takes more tokens than the zeros n_fill was sized with
                if n == 0:  # not with an encode that gives a text the same ids every time
                    raise _too_short(k, len(prefix_ids), len(ids) - len(prefix_ids))
                n, depth = n - 1, min(depth, n - 1)
                ids = prefix_ids + list(encode(passkey_prompt(n, depth, key, intro=intro)))
            if min(ids) < 0:
                raise ValueError(f"encode's ids contain a negative id ({min(ids)})")
            _check_vocab(max(ids), vocab, "input embeddings", "encode's ids")
            ids_t = torch.tensor([ids], dtype=torch.long, device=device)
            text = decode(_greedy(model, ids_t, max_new_tokens))
            m = re.search(r"\d+", text)
            ok = m is not None and m.group(0) == key
            hits[k] += int(ok)
            if t == 0:
                samples.append({"length": k, "n_tokens": len(ids), "depth": depth, "key": key, "output": text})
    success = {k: hits[k] / trials for k in lengths}
    return {
        "lengths": lengths,
        "success": success,
        "k_max": passkey_k_max(success, threshold),
        "trials": trials,
        "threshold": threshold,
        "samples": samples,
    }
