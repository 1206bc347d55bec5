#!/usr/bin/env python
"""Extend a LLaMA's context window with Position Interpolation (arXiv 2306.15595).

Two modes.

1. Demo (no arguments; CPU, a few minutes on 2 cores)::

       python examples/finetune_pi.py [--out examples/runs/demo]

   Pretrains a small byte-level LLaMA (3 layers, head dim 64) at window L on a mix of
   the CPython standard library's .py sources (held-out files for evaluation) and
   generated long-range documents (passkey documents in the paper's format, repeated
   random strings; see mixed_batch_fn), so that it learns retrieval inside L. Then it
   extends the model to 4L four ways (fine-tuning data: the same mix at 4L) and
   evaluates each at windows L, 2L, 4L (sliding-window perplexity) and on the paper's
   passkey task:  original (extrapolation) / direct fine-tuning at 4L without PI /
   PI zero-shot and PI after the same number of fine-tuning steps / as a control,
   NTK-by-parts (PI on the low-frequency rotary pairs only, see ntk_by_parts_scaling)
   zero-shot and fine-tuned. A last table (pair_ablation) shows which rotary pairs
   PI's rescaling breaks.
   Passkey lengths run from the shortest prompt to 4L in steps of L/4, 10 trials each.
   Prints the paper-style tables, writes results.json and results.png into --out.
   The pretrained model is cached in --out/pretrained (rerun skips pretraining).
   ``--tiny`` (or PIROPE_EXAMPLES_TINY=1) runs every code path in seconds.

2. Fine-tune a real Hugging Face checkpoint (LLaMA, or any architecture
   pirope.integrations.transformers supports: Mistral, Qwen, Gemma, OLMo, ...) with the
   paper's recipe::

       python examples/finetune_pi.py --model DIR --data PATH --factor 4 --out OUT
       torchrun --nproc_per_node 8 examples/finetune_pi.py --model DIR --data PATH \\
           --max-position-embeddings 8192 --out OUT          # FSDP2 (NCCL / gloo)

   Defaults are the paper's: AdamW(0.9, 0.95), weight decay 0, lr 2e-5 (its 7B/13B
   value; 1e-5 for 33B/65B), linear warm-up over 20 steps from 10% of the lr, 1000
   steps, global batch 64, each process taking one sequence per micro-step
   (--grad-accum); and, not in the paper, gradient clipping at 1.0 (--grad-clip 0: off).
   bf16 autocast where supported, gradient checkpointing, and the loss a chunk of tokens
   at a time (pirope.training.causal_lm_loss; --loss-chunk), never the whole
   (tokens x vocabulary) logits. The saved checkpoint (its own dtype; config with
   rope_parameters {"rope_type": "linear", "factor": F}; Phi-3: the equal LongRoPE; RoPE
   per layer type: the full_attention layers') loads with plain
   transformers.AutoModelForCausalLM.from_pretrained. ``--scaling ntk-by-parts``
   interpolates only the rotary pairs slower than the window instead (the demo's control
   arm, which keeps what PI loses there); ``--scaling own`` extends a checkpoint whose RoPE
   is already scaled (Llama 3.x's "llama3", YaRN), on which PI is not defined, by its own
   scaling with a factor F times larger.
   ``--save-every N`` keeps the training state in OUT/training_state (ResumePoint), and
   ``--resume`` continues a stopped run from it (the same command; --steps may grow).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import json
import math
import numbers
import os
import shutil
import sys
import time
import warnings
import zlib
from typing import Callable, Dict, List, Optional

import torch

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it=None, **kw):
        return it

from pirope.eval import passkey_retrieval, sliding_window_perplexity
from pirope.training import causal_lm_loss

# ----------------------------------------------------------------------------------
# Byte-level tokenizer of the demo (256 bytes + specials)
# ----------------------------------------------------------------------------------
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 260  # 256 bytes, BOS, EOS, PAD, one spare


def byte_encode(text: str) -> List[int]:
    return list(text.encode("utf-8"))


def byte_decode(ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", "replace")


# ----------------------------------------------------------------------------------
# The one switch between pirope's integration and transformers' own linear scaling.
# ----------------------------------------------------------------------------------
def extend_model(model, factor: Optional[float] = None, *, max_position_embeddings: Optional[int] = None,
                 impl: str = "auto"):
    """Position Interpolation: window L -> L' = factor * L (or max_position_embeddings).

    Give exactly one of ``factor`` (applied exactly; window round(factor * L)) and
    ``max_position_embeddings`` (window exactly; factor = max_position_embeddings / L).

    impl="auto" / "pirope" use pirope.integrations.transformers.apply_position_interpolation;
    "transformers" uses transformers' own "linear" rope scaling (same math, as a
    reference). Returns the model (modified in place).
    """
    if impl not in ("auto", "pirope", "transformers"):
        raise ValueError(f"impl must be 'auto', 'pirope' or 'transformers', got {impl!r}")
    if (factor is None) == (max_position_embeddings is None):  # both impls must build the same model
        raise ValueError("pass exactly one of factor and max_position_embeddings, got "
                         f"factor={factor!r}, max_position_embeddings={max_position_embeddings!r}")
    if impl != "transformers":
        from pirope.integrations.transformers import apply_position_interpolation as apply_pi

        if max_position_embeddings is not None:
            return apply_pi(model, max_position_embeddings=int(max_position_embeddings))
        return apply_pi(model, float(factor))
    # the same factor and window as apply_position_interpolation: factor exact, window
    # round(old * factor); or window exact, factor = window / old
    cfg = model.config
    refusal = transformers_pi_refusal(cfg.model_type, getattr(cfg, "rope_parameters", None))
    if refusal is not None:
        raise ValueError(f"impl='transformers': {refusal}")
    old = int(cfg.max_position_embeddings)
    if factor is None:
        factor = int(max_position_embeddings) / old
    new = int(max_position_embeddings) if max_position_embeddings is not None else int(round(old * float(factor)))
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    linear = {"rope_type": "linear", "factor": float(factor), "rope_theta": float(rope.get("rope_theta", 10000.0))}
    if "partial_rotary_factor" in rope:  # GLM: the rotated part of a head stays what it was
        linear["partial_rotary_factor"] = rope["partial_rotary_factor"]
    cfg.rope_parameters = linear
    cfg.max_position_embeddings = new
    rotary = model.model.rotary_emb  # the family's own rotary embedding class, rebuilt from the new config
    model.model.rotary_emb = type(rotary)(cfg).to(rotary.inv_freq.device)
    return model


def transformers_pi_refusal(model_type: Optional[str], rope_parameters) -> Optional[str]:
    """Why the reference path (one "linear" rope_parameters dict) cannot write PI for a
    model pirope's integration extends, or None where it can."""
    if model_type == "phi3":
        return "Phi-3's config class accepts no 'linear' rope scaling (pirope writes PI as LongRoPE)"
    if isinstance(rope_parameters, dict) and rope_parameters and all(
            isinstance(v, dict) for v in rope_parameters.values()):  # keyed by layer type
        return "RoPE per layer type (PI extends the full_attention layers only)"
    return None


# What extend_model(impl="auto") runs, as reported in logs and results.json.
PI_BACKEND = "pirope.integrations.transformers.apply_position_interpolation"


def set_window_without_pi(model, new_window: int):
    """Direct fine-tuning baseline: only the advertised window changes (plain RoPE)."""
    model.config.max_position_embeddings = int(new_window)
    return model


def ntk_by_parts_scaling(window: int, factor: float) -> dict:
    """Interpolation of the low frequencies only, as a Hugging Face rope dict.

    Llama 3's rope scaling with its two wavelength bounds set to the old and the new
    window: rotary pairs whose wavelength is below ``window`` (they already went
    through every phase in pretraining) keep their frequency, pairs above
    ``factor * window`` are divided by ``factor`` exactly as PI does, and the pairs in
    between move smoothly from one to the other (NTK-by-parts, as in YaRN and Llama
    3.1). Unlike PI, it leaves the high-frequency pairs that encode local order alone.
    """
    return {"rope_type": "llama3", "factor": float(factor), "original_max_position_embeddings": int(window),
            "high_freq_factor": 1.0, "low_freq_factor": 1.0 / float(factor)}


def extend_model_ntk_by_parts(model, factor: float):
    """Window L -> factor * L with :func:`ntk_by_parts_scaling`, through pirope's ops
    (pirope.integrations.transformers.patch_rope, fused attention where exact, like the
    PI arm); the config keeps the scaling, so the saved model loads with plain
    transformers. Returns the model (modified in place)."""
    from pirope.integrations.transformers import patch_rope

    window = int(model.config.get_text_config().max_position_embeddings)
    patch_rope(model, ntk_by_parts_scaling(window, factor), attention="fused")  # as apply_position_interpolation
    set_patched_window(model, int(round(window * factor)))
    return model


def set_patched_window(model, new_window: int):
    """The new window in the config and in the patched rotary embeddings, as
    apply_position_interpolation sets it (their tables do not depend on it for these scalings)."""
    from pirope.integrations.transformers import PiropeLayerTypeRotaryEmbedding, PiropeRotaryEmbedding

    model.config.get_text_config().max_position_embeddings = int(new_window)
    for module in model.modules():
        if isinstance(module, (PiropeRotaryEmbedding, PiropeLayerTypeRotaryEmbedding)):
            module.max_position_embeddings = int(new_window)


OWN_SCALINGS = ("yarn", "llama3")  # what --scaling own extends: a factor over an original window


def extend_model_own_scaling(model, factor: float):
    """Window L -> factor * L for a checkpoint whose RoPE is already scaled (Llama 3.x's
    "llama3", YaRN): its own rope_parameters with their factor times ``factor`` (the same
    original window, so the same pairs stay unscaled), through pirope's ops
    (pirope.integrations.transformers.patch_rope, fused attention where exact). The saved
    config holds that scaling and loads with plain transformers. Returns the model
    (modified in place)."""
    from pirope.integrations.transformers import patch_rope

    text = model.config.get_text_config()  # (a multimodal model's text config holds the RoPE and the window)
    params = dict(text.rope_parameters)
    if params.get("rope_type") not in OWN_SCALINGS or not isinstance(params.get("factor"), numbers.Real):
        raise ValueError(f"extends a rope_type {' or '.join(map(repr, OWN_SCALINGS))} with a factor; this model "
                         f"has rope_parameters {params!r}")
    new = int(round(text.max_position_embeddings * factor))
    scaled = {**params, "factor": float(params["factor"]) * float(factor)}
    if "max_position_embeddings" in scaled:  # (Ministral 3's attention-temperature keys carry the window too)
        scaled["max_position_embeddings"] = new
    patch_rope(model, scaled, attention="fused")
    set_patched_window(model, new)
    return model


def scale_pairs(model, factor: float, pairs) -> "torch.nn.Module":
    """Diagnostic: divide the frequency of the given rotary pairs (indices into
    inv_freq, 0 = highest frequency) of a plain-RoPE transformers LLaMA by ``factor``,
    leaving the others as pretrained. ``pairs = all`` is PI."""
    rot = model.base_model.rotary_emb
    inv = rot.inv_freq.clone()
    idx = torch.as_tensor(list(pairs), dtype=torch.long)
    inv[idx] = inv[idx] / factor
    rot.inv_freq.copy_(inv)
    rot.original_inv_freq = inv.clone()
    return model


# ----------------------------------------------------------------------------------
# Training (single process or FSDP2 under torchrun)
# ----------------------------------------------------------------------------------
def dist_info():
    """(world size, rank) as torchrun sets them (before the process group exists)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return ws, rank


def group_info():
    """(world size, rank) of the initialised process group; (1, 0) without one."""
    import torch.distributed as dist

    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def warmup_lambda(warmup_steps: int, warmup_start: float) -> Callable[[int], float]:
    """Paper: linear warm-up over warmup_steps from warmup_start * lr, then constant."""
    def f(step):
        if warmup_steps <= 0 or step >= warmup_steps:
            return 1.0
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    return f


def cosine_lambda(warmup_steps: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        p = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random windows of `seq_len` tokens of `data` (needs data.numel() >= seq_len).
    Starts are drawn from 0 .. data.numel() - seq_len - 1 (just 0 when the data is
    exactly seq_len long): the last start stays out so that the draws, and with them
    the committed demo results (README), stay those of the runs that produced them."""
    if data.numel() < seq_len:
        raise ValueError(f"data has {data.numel()} tokens, fewer than the sequence length {seq_len}")
    starts = torch.randint(0, max(data.numel() - seq_len, 1), (batch,), generator=gen)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()]).long()


def train(model, data, *, steps: int, seq_len: int, batch_size: int, lr: float,
          lr_lambda: Callable[[int], float], betas=(0.9, 0.95), weight_decay: float = 0.0,
          grad_clip: float = 1.0, grad_accum: int = 1, seed: int = 0, device="cpu",
          autocast_dtype=None, callback=None, desc="train", progress=True,
          resume: Optional["ResumePoint"] = None, decay_matrices_only: bool = False,
          loss_chunk: Optional[int] = 0) -> List[float]:
    """Next-token prediction on random windows of `data`; returns the loss per step.

    `data` is a 1-D token tensor (random windows are drawn from it) or a callable
    ``data(batch_size, seq_len + 1, generator) -> (batch_size, seq_len + 1)`` tensor.

    batch_size is the global batch (per step, summed over ranks and accumulation);
    under torch.distributed every rank draws the same global batch and takes its
    share, so the result matches a single-process run.

    resume: where the run is saved every resume.every steps and, with resume.load set,
    continued from (the losses returned include the steps done before).
    decay_matrices_only: weight decay on the weight matrices (and embeddings) only, not on
    norms' scales and biases (as transformers' Trainer does); else on every parameter.
    loss_chunk: tokens per chunk of the loss (pirope.training.causal_lm_loss's chunk_tokens):
    0 (the default, the demo's) the whole logits at once; None causal_lm_loss's default
    (what fine-tuning a checkpoint passes unless --loss-chunk says otherwise).
    """
    import torch.distributed as dist

    ws, rank = group_info()
    if batch_size % (ws * grad_accum):
        raise ValueError(f"batch size {batch_size} must be divisible by world size x grad accum = {ws * grad_accum}")
    micro = batch_size // (ws * grad_accum)
    params = list(model.parameters())
    if decay_matrices_only:
        groups = [{"params": [p for p in params if p.dim() >= 2]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        params = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    losses: List[float] = []
    start = 0
    if resume is not None and resume.load:
        start, losses = resume.restore(model, opt, sched, gen, steps)
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not progress or rank != 0,
               dynamic_ncols=True)
    for step in bar:
        batch = (data(batch_size, seq_len + 1, gen) if callable(data)
                 else sample_batch(data, batch_size, seq_len + 1, gen))
        batch = batch[rank * micro * grad_accum : (rank + 1) * micro * grad_accum]
        total = torch.zeros((), dtype=torch.float64)
        for a in range(grad_accum):
            x = batch[a * micro : (a + 1) * micro].to(device)
            ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
            with ctx:
                loss = causal_lm_loss(model, x[:, :-1], x[:, 1:], chunk_tokens=loss_chunk)
            (loss / grad_accum).backward()
            total += loss.detach().double().cpu() / grad_accum
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        step_lr = sched.get_last_lr()[0]  # the lr this step uses (logged below)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ws > 1:
            t = total.to(device=device, dtype=torch.float32)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            total = t.double().cpu() / ws
        losses.append(float(total))
        if progress and rank == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{step_lr:.2e}")
        elif rank == 0 and ((step + 1) % max(1, steps // 10) == 0 or step + 1 == steps):
            # no bar: a plain line every tenth of the run, so a long quiet run still shows it is alive
            print(f"[{desc}] step {step + 1}/{steps} loss {losses[-1]:.4f} lr {step_lr:.2e}",
                  flush=True)
        if callback is not None:
            callback(step + 1, model)
        if resume is not None and resume.every and ((step + 1) % resume.every == 0 or step + 1 == steps):
            resume.save(step + 1, model, opt, sched, gen, losses)
    model.eval()
    return losses


def save_synced(obj, path: str):
    """torch.save, on disk before it returns (a rename after it must not publish a file a
    power cut would truncate)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def sync_dir(path: str):
    """The directory's entries (renames) on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """This process's torch random state: CPU, and its current GPU's once CUDA is in use."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def single_process_checkpoint_quiet():
    """torch.distributed.checkpoint warns at every save and load outside torchrun that it
    assumes a single process: what a single-process run is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class ResumePoint:
    """A fine-tuning run's state, saved every `every` steps into `path` (--out/training_state)
    so that --resume continues the run as if it had not stopped: float32 weights and
    AdamW's moments (torch.distributed.checkpoint: each rank writes its own shards, and a
    run may resume with another number of processes), the step, the losses so far, the
    learning-rate schedule, and the random state of the data sampler. 12 bytes per
    parameter (84 GB for a 7B model). Only the latest state is kept: written beside it,
    then swapped in by renames, so that a run killed while saving leaves the previous one.
    Each rank's torch random state (CPU and its GPU: dropout, in the families that have it)
    is restored when the process count is the same. Across nodes, --out must be on a file
    system every rank sees (rank 0 does the renames).

    settings: what makes another run a continuation of this one (the model, the new
    window, the data, the optimiser's settings, ...); restore refuses a state saved with
    other settings, naming them. `fail(msg)` must not return."""

    STATE_FILE = "trainer_state.pt"

    def __init__(self, path: str, every: int, load: bool, settings: dict, fail):
        self.path, self.every, self.load, self.settings, self.fail = path, every, load, settings, fail
        self.resumed_from = 0  # the step restore continued from

    def _barrier(self):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def save(self, step, model, opt, sched, gen, losses):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        ws, rank = group_info()
        tmp, old = self.path + ".tmp", self.path + ".old"
        if rank == 0 and os.path.exists(tmp):  # a save that was cut short
            shutil.rmtree(tmp)
        self._barrier()
        model_sd, optim_sd = get_state_dict(model, opt)
        with single_process_checkpoint_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        save_synced(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        self._barrier()
        if rank == 0:
            save_synced({"step": step, "losses": list(losses), "generator": gen.get_state(),
                         "scheduler": sched.state_dict(), "settings": self.settings, "world_size": ws,
                         "save_every": self.every}, os.path.join(tmp, self.STATE_FILE))
            if os.path.exists(self.path):
                if os.path.exists(old):
                    shutil.rmtree(old)
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            sync_dir(os.path.dirname(os.path.abspath(self.path)))
        self._barrier()
        if rank == 0:  # (not between barriers: 84 GB take a while on a network file system)
            shutil.rmtree(old, ignore_errors=True)

    def find(self) -> Optional[str]:
        """The saved state: path, or path.old when a save was cut between its renames."""
        for p in (self.path, self.path + ".old"):
            if os.path.isfile(os.path.join(p, self.STATE_FILE)):
                return p
        return None

    def check(self, steps: int) -> Optional[dict]:
        """Refuses (fail) a saved state that this run cannot continue, or would overwrite (a
        run without --resume); called before the model loads, so that a wrong command costs
        seconds, not the loading of a 7B model. Returns the saved state's trainer state, or
        None when there is none."""
        path = self.find()
        if path is None:
            return None
        meta = torch.load(os.path.join(path, self.STATE_FILE), weights_only=True)
        if not self.load:
            self.fail(f"--save-every: {path} holds the training state of a run at step {meta['step']}; "
                      "add --resume to continue it, or give another --out (or delete it) to start anew")
        differ = [f"{k} {meta['settings'].get(k)!r} there, {v!r} here" for k, v in self.settings.items()
                  if meta["settings"].get(k) != v]
        if differ:
            self.fail(f"--resume: the state in {path} was saved by a run with other settings ("
                      + "; ".join(differ) + "): resume with the same ones, or give another --out")
        if meta["step"] >= steps:
            self.fail(f"--resume: the state in {path} is at step {meta['step']} already; give --steps larger "
                      f"than that to train further (this run has --steps {steps})")
        return meta

    def restore(self, model, opt, sched, gen, steps: int):
        """(step, losses) of the saved state, loaded into model, opt, sched and gen;
        (0, []) when there is none yet."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        ws, rank = group_info()
        meta = self.check(steps)
        if meta is None:
            if rank == 0:
                print(f"[finetune] --resume: no saved state in {self.path}: starting at step 0", flush=True)
            return 0, []
        path = self.find()
        model_sd, optim_sd = get_state_dict(model, opt)
        # get_state_dict gave every parameter AdamW state (torch's _init_optim_state); the save
        # has state only for parameters that had a gradient (not a frozen tower, an unrouted
        # expert): load those, and leave the others without state, as the run had them
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        with_state = {name for name in optim_sd["state"] if f"optim.state.{name}.step" in saved}
        optim_sd["state"] = {name: v for name, v in optim_sd["state"].items() if name in with_state}
        state = {"model": model_sd, "optim": optim_sd}
        with single_process_checkpoint_quiet():
            dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"], options=StateDictOptions(strict=False))
        for name, p in model.named_parameters():
            if name not in with_state:
                opt.state.pop(p, None)
        sched.load_state_dict(meta["scheduler"])
        gen.set_state(meta["generator"])
        rng = os.path.join(path, f"rng_rank{rank}.pt")
        if meta["world_size"] == ws:
            set_rng_state(torch.load(rng, weights_only=True))
        if rank == 0:
            print(f"[finetune] --resume: continuing from step {meta['step']} ({path})"
                  + ("" if meta["world_size"] == ws else
                     f"; saved by {meta['world_size']} processes, this run has {ws}: dropout draws anew"),
                  flush=True)
        self.resumed_from = meta["step"]
        return meta["step"], list(meta["losses"])


# ----------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------
DEMO = dict(
    window=128, factor=4, hidden=128, intermediate=384, layers=3, heads=2, seed=0,
    pretrain_steps=3000, pretrain_batch=16, pretrain_lr=2e-3, pretrain_warmup=40,
    ft_steps=200, ft_batch=4, ft_lr=2e-4, ft_warmup=20, log_every=50,
    eval_bytes=6144, stride=32, passkey_trials=10, passkey_intro="",
    train_bytes=None, heldout_every=8, mix=(0.3, 0.2),
)
TINY = dict(
    window=128, factor=4, hidden=32, intermediate=64, layers=1, heads=2, seed=0,
    pretrain_steps=4, pretrain_batch=4, pretrain_lr=2e-3, pretrain_warmup=2,
    ft_steps=4, ft_batch=2, ft_lr=2e-4, ft_warmup=2, log_every=2,
    eval_bytes=1024, stride=64, passkey_trials=2, passkey_intro="",
    train_bytes=200_000, heldout_every=8, mix=(0.3, 0.2),
)


def stdlib_texts(cfg) -> tuple:
    """Train / held-out text from the CPython standard library's top-level .py files.

    Deterministic: files sorted by name; a file is held out when
    crc32(name) % heldout_every == 0 (different files, never a split inside one).
    """
    libdir = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(libdir, "*.py")))
    if not files:
        raise RuntimeError(f"no .py files found in the standard library directory {libdir}")
    train, held = [], []
    for f in files:
        name = os.path.basename(f)
        with open(f, "rb") as fh:
            data = fh.read()
        (held if zlib.crc32(name.encode()) % cfg["heldout_every"] == 0 else train).append(data)
    train_b = b"\n\n".join(train)
    held_b = b"\n\n".join(held)
    if cfg.get("train_bytes"):
        train_b = train_b[: cfg["train_bytes"]]
    return (torch.frombuffer(bytearray(train_b), dtype=torch.uint8).long(),
            torch.frombuffer(bytearray(held_b[: cfg["eval_bytes"]]), dtype=torch.uint8).long(),
            {"stdlib_dir": libdir, "n_files": len(files), "n_train_files": len(train),
             "n_heldout_files": len(held), "train_bytes": len(train_b),
             "eval_bytes": min(len(held_b), cfg["eval_bytes"])})


def mixed_batch_fn(text_ids: torch.Tensor, cfg) -> Callable:
    """The demo's training data: a mix of stdlib text and generated documents with
    long-range dependencies, so that a small model can learn to use its window.

    Each sequence is, with probabilities cfg["mix"] = (passkey, copy, rest text):
    * passkey: the paper's passkey prompt (pirope.eval.passkey_prompt, the demo's
      intro, a random 5-digit key at a random depth, a random length from the
      shortest prompt up to the sequence length) followed by the answer " KEY." and
      then stdlib text; it starts at position 0, as the evaluation prompts do;
    * copy: a stdlib window in which a random string of 8-32 letters/digits appears
      twice, at random positions (learning to copy = induction);
    * text: a random stdlib window.
    Deterministic: everything is drawn from the training generator.
    """
    import random

    from pirope.eval import passkey_prompt

    p_pk, p_copy = cfg["mix"][0], cfg["mix"][1]
    intro = cfg["passkey_intro"]
    plen = []  # prompt length (bytes) with n filler sentences (independent of key and depth)
    alphabet = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]

    def fn(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = sample_batch(text_ids, batch, n, gen)
        for b in range(batch):
            u = rng.random()
            if u < p_pk:
                while not plen or plen[-1] + 7 <= n:
                    plen.append(len(passkey_prompt(len(plen), 0, "00000", intro=intro)))
                fits = [k for k, length in enumerate(plen) if length + 7 <= n]
                n_fill = rng.choice(fits)
                key = str(rng.randint(10000, 99999))
                doc = passkey_prompt(n_fill, rng.randint(0, n_fill), key, intro=intro) + f" {key}.\n\n"
                ids = torch.tensor(byte_encode(doc)[:n], dtype=torch.long)
                out[b, : ids.numel()] = ids
                rest = n - ids.numel()
                if rest > 0:
                    out[b, ids.numel():] = sample_batch(text_ids, 1, rest, gen)[0]
            elif u < p_pk + p_copy:
                m = rng.randint(8, min(32, n // 2))
                s = torch.tensor([rng.choice(alphabet) for _ in range(m)], dtype=torch.long)
                p1 = rng.randint(0, n - 2 * m)
                p2 = rng.randint(p1 + m, n - m)
                out[b, p1 : p1 + m] = s
                out[b, p2 : p2 + m] = s
        return out

    return fn


def build_demo_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg["seed"])
    conf = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
        max_position_embeddings=cfg["window"], bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(conf).float()


def _load_cached(path, cfg):
    from safetensors import SafetensorError
    from transformers import LlamaForCausalLM

    meta = os.path.join(path, "demo_config.json")
    if not os.path.exists(meta):
        return None, None
    try:
        with open(meta) as f:
            saved = json.load(f)
        if saved.get("cfg") != json.loads(json.dumps(cfg)):  # tuples are lists in JSON
            return None, None
        return LlamaForCausalLM.from_pretrained(path).float().eval(), saved.get("losses", [])
    except (OSError, ValueError, json.JSONDecodeError, SafetensorError):  # unreadable / corrupt: a cache miss
        return None, None


def copy_check(model, seed: int = 0, n: int = 8, length: int = 30) -> dict:
    """Does the model copy? Mean NLL of a random lowercase string and of its exact
    repetition right after it. An induction-capable model (what passkey retrieval
    needs) finds the second copy much easier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(97, 123, (n, length), generator=g)
    ids = torch.cat([x, x], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return {"nll_first_copy": float(nll[:, : length - 1].mean()), "nll_second_copy": float(nll[:, length:].mean())}


def pair_ablation(fresh, factor: float, eval_ids, window: int, stride: int, lengths, trials: int, seed: int,
                  pk_kwargs: dict, progress: bool) -> List[dict]:
    """Which rotary pairs does PI break? Zero-shot, inside the pretraining window:
    perplexity at ``window`` and passkey at ``lengths`` when PI's ``factor`` is applied
    to all pairs, to all but the k highest-frequency ones, or only to those k."""
    base_inv = fresh().base_model.rotary_emb.inv_freq.clone()
    n = base_inv.numel()
    rows = []
    cases = [("all pairs (PI)", range(n))]
    cases += [(f"all but the {k} highest-frequency", range(k, n)) for k in (2, 4, 8, 16) if k < n]
    cases += [(f"only the {k} highest-frequency", range(k)) for k in (2, 8) if k < n]
    cases += [("none (original)", range(0))]
    for name, pairs in cases:
        m = scale_pairs(fresh(), factor, pairs)
        ppl = sliding_window_perplexity(m, eval_ids, window, stride, batch_size=8, progress=False)
        pk = passkey_retrieval(m, byte_encode, byte_decode, lengths, trials=trials, seed=seed,
                               max_new_tokens=7, progress=False, **pk_kwargs)
        rows.append({"scaled": name, "pairs": list(pairs),
                     "shortest_scaled_wavelength": 2 * math.pi / float(base_inv[pairs[0]]) if len(pairs) else None,
                     "ppl": ppl, "passkey": {str(k): v for k, v in pk["success"].items()},
                     "sample": pk["samples"][0]["output"]})
        if progress:
            print(f"[ablation] {name}: ppl {ppl:.3f}, passkey {pk['success']}", flush=True)
    return rows


def format_ablation_table(rows: List[dict], lengths, window: int) -> str:
    lines = ["| pairs divided by the factor | shortest wavelength scaled (bytes) | "
             f"ppl at {window} | " + " | ".join(f"passkey {k}" for k in lengths) + " | first answer |",
             "|" + "---|" * (len(lengths) + 4)]
    for r in rows:
        wl = "-" if r["shortest_scaled_wavelength"] is None else f"{r['shortest_scaled_wavelength']:.1f}"
        lines.append(f"| {r['scaled']} | {wl} | {r['ppl']:.3f} | "
                     + " | ".join(f"{r['passkey'][str(k)]:.1f}" for k in lengths) + f" | `{r['sample'].strip()}` |")
    return "\n".join(lines)


def _fmt(x):
    if x is None:
        return "-"
    if x >= 1000:
        return ">1000" if x < float("inf") else "inf"
    return f"{x:.3f}"


def format_table(rows: Dict[str, dict], windows: List[int]) -> str:
    head = "| model | " + " | ".join(str(w) for w in windows) + " | passkey k_max |"
    lines = [head, "|" + "---|" * (len(windows) + 2)]
    for name, r in rows.items():
        cells = [_fmt(r["ppl"][str(w)]) for w in windows]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['passkey']['k_max']} |")
    return "\n".join(lines)


def format_passkey_table(rows: Dict[str, dict], lengths: List[int]) -> str:
    lines = ["| model | " + " | ".join(str(k) for k in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['passkey']['success'][str(k)]:.1f}" for k in lengths) + " |")
    return "\n".join(lines)


def format_progress_table(log: Dict[str, Dict[str, float]], title: str) -> str:
    steps = sorted({int(s) for w in log.values() for s in w})
    lines = [f"| {title} | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|" + "---|" * (len(steps) + 1)]
    for w, d in log.items():
        lines.append(f"| window {w} | " + " | ".join(_fmt(d.get(str(s))) for s in steps) + " |")
    return "\n".join(lines)


def auto_threads() -> int:
    """2 threads (at most), 1 when the load average says the cores are already busy:
    on an oversubscribed machine 2 threads run ~5x slower than 1 (measured)."""
    n = min(2, os.cpu_count() or 1)
    try:
        if os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5:
            n = 1
    except OSError:
        pass
    return n


def run_demo(args) -> dict:
    t_start = time.time()
    cfg = dict(TINY if args.tiny else DEMO, seed=args.seed)
    torch.set_num_threads(args.threads or auto_threads())
    out = args.out
    progress = not args.no_progress
    L, F = cfg["window"], cfg["factor"]
    L4 = L * F
    windows = [L, 2 * L, L4]
    print(f"[pirope demo] config={'tiny' if args.tiny else 'demo'} window L={L} -> {L4} (factor {F}); "
          f"PI backend: {PI_BACKEND}; threads={torch.get_num_threads()}", flush=True)
    train_ids, eval_ids, data_info = stdlib_texts(cfg)
    train_data = mixed_batch_fn(train_ids, cfg)
    data_info["mix"] = {"passkey documents": cfg["mix"][0], "copy segments": cfg["mix"][1],
                        "stdlib text": round(1 - cfg["mix"][0] - cfg["mix"][1], 6)}
    print(f"[data] {data_info}", flush=True)
    if eval_ids.numel() < L4:
        raise SystemExit(f"error: held-out text has {eval_ids.numel()} bytes, need at least {L4}")

    # ---- pretraining at window L (cached) ----
    pre_dir = os.path.join(out, "pretrained")
    model, pre_losses = (None, None) if args.no_cache else _load_cached(pre_dir, cfg)
    t0 = time.time()
    if model is None:
        model = build_demo_model(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[pretrain] {n_params / 1e6:.2f}M params, {cfg['pretrain_steps']} steps x "
              f"{cfg['pretrain_batch']} x {L} bytes", flush=True)
        pre_losses = train(
            model, train_data, steps=cfg["pretrain_steps"], seq_len=L, batch_size=cfg["pretrain_batch"],
            lr=cfg["pretrain_lr"], lr_lambda=cosine_lambda(cfg["pretrain_warmup"], cfg["pretrain_steps"]),
            weight_decay=0.1, seed=cfg["seed"], desc="pretrain", progress=progress)
        model.save_pretrained(pre_dir)
        with open(os.path.join(pre_dir, "demo_config.json"), "w") as f:
            json.dump({"cfg": cfg, "losses": pre_losses}, f)
        pretrain_cached = False
    else:
        print(f"[pretrain] loaded cached model from {pre_dir}", flush=True)
        pretrain_cached = True
    t_pre = time.time() - t0
    base_state = copy.deepcopy(model.state_dict())

    intro = cfg["passkey_intro"]
    pk_kwargs = {} if intro is None else {"intro": intro}
    from pirope.eval import passkey_prompt

    shortest = len(byte_encode(passkey_prompt(0, 0, "00000", **pk_kwargs)))
    passkey_lengths = [k for k in range(L // 4, L4 + 1, L // 4) if k >= shortest]

    def evaluate(name, m):
        t = time.time()
        ppl = {str(w): sliding_window_perplexity(m, eval_ids, w, cfg["stride"], batch_size=8,
                                                progress=progress) for w in windows}
        pk = passkey_retrieval(m, byte_encode, byte_decode, passkey_lengths, trials=cfg["passkey_trials"],
                               seed=cfg["seed"], max_new_tokens=7, progress=progress, **pk_kwargs)
        pk = {k: v for k, v in pk.items()}
        pk["success"] = {str(k): v for k, v in pk["success"].items()}
        cc = copy_check(m, cfg["seed"])
        print(f"[eval] {name}: copy check NLL first/second copy of a random string "
              f"{cc['nll_first_copy']:.2f}/{cc['nll_second_copy']:.2f}", flush=True)
        print(f"[eval] {name}: ppl " + ", ".join(f"{w}: {_fmt(v)}" for w, v in ppl.items())
              + f"; passkey success {pk['success']} k_max={pk['k_max']} ({time.time() - t:.0f}s)", flush=True)
        return {"ppl": ppl, "passkey": pk, "copy_check": cc}

    def fresh():
        m = build_demo_model(cfg)
        m.load_state_dict(base_state)
        return m.eval()

    def ppl_logger(log):
        def cb(step, m):
            if step % cfg["log_every"] == 0 and step < cfg["ft_steps"]:
                for w in (L4,):
                    log[str(w)][str(step)] = sliding_window_perplexity(
                        m, eval_ids, w, cfg["stride"], batch_size=8, progress=False)
                m.train()
        return cb

    results: Dict[str, dict] = {}
    ft_logs: Dict[str, dict] = {}
    losses: Dict[str, list] = {"pretrain": pre_losses}
    ft_kwargs = dict(steps=cfg["ft_steps"], seq_len=L4, batch_size=cfg["ft_batch"], lr=cfg["ft_lr"],
                     lr_lambda=warmup_lambda(cfg["ft_warmup"], 0.1), betas=(0.9, 0.95), weight_decay=0.0,
                     seed=cfg["seed"] + 1, progress=progress)
    t0 = time.time()
    results["original (extrapolation)"] = evaluate("original", fresh())

    # ---- direct fine-tuning at 4L, plain RoPE ----
    m = set_window_without_pi(fresh(), L4)
    log = {str(L4): {}}
    losses["direct fine-tuning"] = train(m, train_data, callback=ppl_logger(log), desc="FT direct", **ft_kwargs)
    ft_logs["direct fine-tuning"] = log
    results[f"direct FT to {L4} ({cfg['ft_steps']} steps)"] = r_ft = evaluate("direct FT", m)
    m.save_pretrained(os.path.join(out, "direct_ft"))

    # ---- PI ----
    m = extend_model(fresh(), F)
    results[f"PI to {L4}, no fine-tuning"] = r_pi0 = evaluate("PI zero-shot", m)
    log = {str(L4): {}}
    losses["PI fine-tuning"] = train(m, train_data, callback=ppl_logger(log), desc="FT PI", **ft_kwargs)
    ft_logs["PI fine-tuning"] = log
    results[f"PI to {L4} ({cfg['ft_steps']} steps)"] = r_pi = evaluate("PI fine-tuned", m)
    m.save_pretrained(os.path.join(out, "pi_ft"))

    # ---- NTK-by-parts: interpolate only the pairs slower than the window (control) ----
    m = extend_model_ntk_by_parts(fresh(), F)
    results[f"NTK-by-parts to {L4}, no fine-tuning"] = r_nb0 = evaluate("NTK-by-parts zero-shot", m)
    log = {str(L4): {}}
    losses["NTK-by-parts fine-tuning"] = train(m, train_data, callback=ppl_logger(log), desc="FT NTK-by-parts",
                                               **ft_kwargs)
    ft_logs["NTK-by-parts fine-tuning"] = log
    results[f"NTK-by-parts to {L4} ({cfg['ft_steps']} steps)"] = r_nb = evaluate("NTK-by-parts fine-tuned", m)
    m.save_pretrained(os.path.join(out, "ntk_by_parts_ft"))

    # ---- which rotary pairs PI breaks (zero-shot, inside L) ----
    ablation_lengths = [k for k in passkey_lengths if k <= L]
    ablation = pair_ablation(fresh, F, eval_ids, L, cfg["stride"], ablation_lengths, cfg["passkey_trials"],
                             cfg["seed"], pk_kwargs, progress)
    t_ft_eval = time.time() - t0

    r_orig = results["original (extrapolation)"]
    for name, start, end in (("direct fine-tuning", r_orig, r_ft), ("PI fine-tuning", r_pi0, r_pi),
                             ("NTK-by-parts fine-tuning", r_nb0, r_nb)):
        for w in (str(L4),):
            ft_logs[name][w]["0"] = start["ppl"][w]
            ft_logs[name][w][str(cfg["ft_steps"])] = end["ppl"][w]

    wall = time.time() - t_start
    table = format_table(results, windows)
    print(f"\nSliding-window perplexity (bytes, stride {cfg['stride']}, {data_info['eval_bytes']} held-out "
          f"bytes) and passkey k_max (lengths {passkey_lengths}, {cfg['passkey_trials']} trials):\n")
    print(table)
    pk_table = format_passkey_table(results, passkey_lengths)
    print(f"\nPasskey success rate per prompt length (bytes; {cfg['passkey_trials']} trials each; "
          f"trained window {L}):\n")
    print(pk_table)
    prog = {name: format_progress_table(log, f"{name}: perplexity") for name, log in ft_logs.items()}
    for name, t in prog.items():
        print("\n" + t)
    ablation_table = format_ablation_table(ablation, ablation_lengths, L)
    print(f"\nWhich rotary pairs PI breaks: zero-shot, PI's factor {F} applied to some pairs only "
          f"(perplexity at {L}, passkey inside L):\n")
    print(ablation_table)
    print(f"\nwall time {wall:.0f}s (pretraining {t_pre:.0f}s{' cached' if pretrain_cached else ''}, "
          f"fine-tuning + evaluation {t_ft_eval:.0f}s)")
    summary = {
        "config": cfg, "data": data_info, "windows": windows, "stride": cfg["stride"],
        "passkey_lengths": passkey_lengths, "pi_backend": PI_BACKEND, "results": results,
        "finetune_perplexity_log": ft_logs, "losses": losses, "table": table,
        "passkey_table": pk_table, "progress_tables": prog, "pair_ablation": ablation,
        "pair_ablation_table": ablation_table, "ntk_by_parts_scaling": ntk_by_parts_scaling(L, F),
        "wall_time_s": wall, "pretrain_time_s": t_pre,
        "pretrain_cached": pretrain_cached, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    png = plot_demo(summary, os.path.join(out, "results.png"))
    print(f"wrote {os.path.join(out, 'results.json')} and {png}")
    return summary


def plot_demo(summary: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ablation = summary.get("pair_ablation") or []
    if ablation:
        fig, grid = plt.subplots(2, 2, figsize=(14, 9))
        axes = grid.ravel()
    else:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for name, r in summary["results"].items():
        ws = summary["windows"]
        ax.plot(ws, [r["ppl"][str(w)] for w in ws], marker="o", label=f"{name} (k_max {r['passkey']['k_max']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(summary["windows"], [str(w) for w in summary["windows"]])
    ax.set_xlabel("evaluation window (bytes)")
    ax.set_ylabel("sliding-window perplexity")
    ax.set_title("perplexity vs window")
    ax.legend(fontsize=7)
    ax = axes[1]
    for name in (k for k in summary["losses"] if k != "pretrain"):
        ax.plot(range(1, len(summary["losses"][name]) + 1), summary["losses"][name], label=name, alpha=0.8)
    ax.set_xlabel("fine-tuning step (window %d)" % summary["windows"][-1])
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title("fine-tuning loss")
    ax.legend()
    ax = axes[2]
    pl = summary["losses"]["pretrain"]
    if pl:
        ax.plot(range(1, len(pl) + 1), pl)
    ax.set_xlabel("pretraining step (window %d)" % summary["windows"][0])
    ax.set_ylabel("training loss")
    ax.set_title("pretraining loss")
    if ablation:  # which rotary pairs PI breaks: perplexity at L and passkey inside L
        ax = axes[3]
        names = [r["scaled"] for r in ablation]
        y = list(range(len(names)))[::-1]
        ax.barh(y, [r["ppl"] for r in ablation], color="tab:gray")
        for yi, r in zip(y, ablation):
            pk = sum(r["passkey"].values()) / max(1, len(r["passkey"]))
            ax.text(r["ppl"], yi, f"  passkey {pk:.0%} (inside L)", va="center", fontsize=8,
                    color="tab:green" if pk > 0 else "tab:red")
        ax.set_yticks(y, names, fontsize=8)
        ax.set_xlabel("perplexity at window %d (zero-shot)" % summary["windows"][0])
        ax.set_xlim(0, 1.45 * max(r["ppl"] for r in ablation))
        ax.set_title("PI's factor on some rotary pairs only")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------
# Fine-tuning a real checkpoint
# ----------------------------------------------------------------------------------
def read_text_data(path: str) -> bytes:
    """A text file, or the text files under a directory (read_text_documents) joined by
    blank lines."""
    return b"\n\n".join(read_text_documents(path))


def read_text_documents(path: str) -> List[bytes]:
    """A text file (one document), or the text files under a directory, sorted by path.
    Under a directory, hidden files and folders, ``__pycache__`` and files that are not
    UTF-8 text (compiled bytecode, images, archives) are left out: a source tree's ``.pyc``
    files would otherwise be most of the bytes."""
    if not os.path.isdir(path):
        with open(path, "rb") as fh:
            return [fh.read()]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        files += [os.path.join(root, f) for f in names if not f.startswith(".")]
    parts = []
    for f in sorted(files):
        with open(f, "rb") as fh:
            data = fh.read()
        if data and b"\0" not in data and is_utf8(data):
            parts.append(data)
    return parts


def document_markers(tok) -> tuple:
    """(ids before, ids after) each document: the special tokens the tokenizer adds to a text
    (Llama's and Mistral's BOS, Gemma's), as transformers' run_clm tokenizes each document;
    for one that adds none (Qwen, GPT-NeoX, GPT-2), its EOS after each document, as their
    pretraining separated documents; nothing for one with neither."""
    full = list(tok("pass key")["input_ids"])
    bare = list(tok("pass key", add_special_tokens=False)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            before, after = full[:i], full[i + len(bare):]
            if before or after:
                return before, after
            break
    return [], ([tok.eos_token_id] if getattr(tok, "eos_token_id", None) is not None else [])


def encode_documents(docs: List[bytes], encode, before=(), after=(), limit: Optional[int] = None) -> torch.Tensor:
    """The documents' token ids (encode_data each), each between the ids `before` and `after`,
    one after the other: a training window that spans two documents sees where one ends.
    ``limit``: the first ``limit`` ids only (the documents after them are not tokenized)."""
    parts, count = [], 0
    for doc in docs:
        if limit is not None and count >= limit:
            break
        left = None if limit is None else limit - count
        parts += [torch.tensor(list(before), dtype=torch.long), encode_data(doc, encode, limit=left),
                  torch.tensor(list(after), dtype=torch.long)]
        count += sum(p.numel() for p in parts[-3:])
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))[:limit]


def checkpoint_dtype(config) -> torch.dtype:
    """The floating-point dtype a checkpoint's config says its weights have (float32 if none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def encode_data(text: bytes, encode=None, chunk: int = 1 << 20, limit: Optional[int] = None) -> torch.Tensor:
    """``text`` as a 1-D int64 tensor of token ids: its bytes without ``encode``, else ``encode``
    of its UTF-8 text in pieces of about ``chunk`` bytes cut after a newline, so that the
    tokenizer's Python lists (tens of bytes per token) never hold the whole corpus.
    ``limit``: the first ``limit`` ids only (the pieces after them are not tokenized)."""
    if encode is None:
        return torch.tensor(bytearray(text[:limit]), dtype=torch.uint8).long()
    parts, begin, count = [], 0, 0
    while begin < len(text) and (limit is None or count < limit):
        end = min(begin + chunk, len(text))
        if end < len(text):
            cut = text.rfind(b"\n", begin, end)
            if cut >= begin:
                end = cut + 1
            while end > begin + 1 and text[end] & 0xC0 == 0x80:  # not inside a UTF-8 character
                end -= 1
        parts.append(torch.tensor(encode(text[begin:end].decode("utf-8", "replace")), dtype=torch.long))
        count += parts[-1].numel()
        begin = end
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))[:limit]


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_text_config(model_dir: str, fail):
    """The checkpoint's config as transformers reads it (config.json only, no weights; legacy
    rope_scaling keys normalised into rope_parameters), and its text config: a multimodal
    model's language model's, which holds the RoPE and the window; the config itself
    otherwise. `fail(msg)` must not return."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - whatever transformers refuses in it, said as a usage error
        fail(f"--model {model_dir!r}: transformers cannot read its config.json ({type(e).__name__}: {e})")
    return config, config.get_text_config()


def check_scaling(config, text, model_dir: str, scaling: str, pi_impl: str, fail):
    """The checkpoint (``config`` and its text config ``text``, see read_text_config) against
    what --scaling (and --pi-impl) extend, before any heavy work; `fail(msg)` must not return."""
    from pirope.integrations.transformers import SUPPORTED_MODEL_TYPES

    model_type = text.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        fail(f"--model {model_dir!r} is a {model_type!r} model; this example extends the architectures "
             f"pirope.integrations.transformers supports (model_type one of {', '.join(SUPPORTED_MODEL_TYPES)})")
    rope = getattr(text, "rope_parameters", None) or {}
    refusal = transformers_pi_refusal(model_type, rope)
    if pi_impl == "transformers" and scaling != "pi":
        fail(f"--pi-impl transformers is a Position Interpolation implementation (--scaling pi), not for "
             f"--scaling {scaling}")
    if pi_impl == "transformers" and text is not config:
        refusal = f"its RoPE is in a multimodal model's text config ({config.model_type!r})"
    if pi_impl == "transformers" and refusal is not None:
        fail(f"--pi-impl transformers cannot extend a {model_type!r} model: {refusal}; use --pi-impl pirope")
    rope_type = rope.get("rope_type", "default")
    by_layer_type = bool(rope) and all(isinstance(v, dict) for v in rope.values())
    if scaling != "pi" and by_layer_type:
        fail(f"--scaling {scaling}: --model {model_dir!r} has RoPE per layer type; this example extends "
             "those by --scaling pi (the full_attention layers)")
    if scaling == "own":
        if rope_type not in OWN_SCALINGS or not isinstance(rope.get("factor"), numbers.Real):
            fail(f"--scaling own extends a checkpoint's own {' or '.join(map(repr, OWN_SCALINGS))} scaling (its "
                 f"factor times F); --model {model_dir!r} has rope_parameters {rope!r}")
    elif rope_type not in ("default", None):
        hint = "; extend it by its own scaling with --scaling own" if rope_type in OWN_SCALINGS else ""
        fail(f"--model {model_dir!r} already uses rope scaling {rope_type!r}; --scaling {scaling} extends "
             f"plain-RoPE models{hint}")


def extend_checkpoint(model, scaling: str, factor: float, *, max_position_embeddings: Optional[int] = None,
                      impl: str = "auto", fail=None):
    """The model's window times ``factor`` (or ``max_position_embeddings`` exactly, for PI) by
    ``scaling``: "pi" (extend_model), "ntk-by-parts" (extend_model_ntk_by_parts) or "own"
    (extend_model_own_scaling). A refusal only the loaded model can give (a config class's)
    goes to ``fail(msg)`` when given. Returns the model (modified in place)."""
    try:
        if scaling == "ntk-by-parts":
            return extend_model_ntk_by_parts(model, factor)
        if scaling == "own":
            return extend_model_own_scaling(model, factor)
        if max_position_embeddings is not None:
            return extend_model(model, max_position_embeddings=max_position_embeddings, impl=impl)
        return extend_model(model, factor, impl=impl)
    except (ValueError, TypeError) as e:
        if fail is None:
            raise
        fail(f"--scaling {scaling}: {e}")


def validate_finetune_args(args, fail) -> dict:
    """Every check that needs no heavy work; `fail(msg)` must not return."""
    if args.factor is None and args.max_position_embeddings is None:
        fail("give --factor F or --max-position-embeddings N (the new context window)")
    if args.data is None:
        fail("--data PATH is required with --model (a text file or a directory of text files)")
    if args.factor is not None and not (args.factor >= 1.0 and math.isfinite(args.factor)):
        fail(f"--factor must be >= 1 (the window grows by this factor), got {args.factor}")
    check_model_dir(args.model, "--model", fail)
    config, text = read_text_config(args.model, fail)
    check_scaling(config, text, args.model, args.scaling, args.pi_impl, fail)
    old = getattr(text, "max_position_embeddings", None)
    if not isinstance(old, int) or old < 1:
        fail(f"--model {args.model!r}: config.json has no valid max_position_embeddings")
    if args.max_position_embeddings is not None:
        new = int(args.max_position_embeddings)
        factor = new / old
        if args.factor is not None and abs(args.factor * old - new) > 0.5:
            fail(f"--factor {args.factor} and --max-position-embeddings {new} disagree (model window {old})")
    else:
        factor = float(args.factor)
        new = int(round(old * factor))
    if new <= old:
        fail(f"the new window ({new}) must be larger than the model's own window ({old}); "
             "use --factor > 1 or a larger --max-position-embeddings")
    check_numeric_args(args, fail)
    ws, _ = dist_info()
    if args.grad_accum is None:  # one sequence per process and micro-step
        if args.batch_size % ws:
            fail(f"--batch-size {args.batch_size} must be divisible by the world size {ws}")
        args.grad_accum = args.batch_size // ws
    if args.batch_size % (ws * args.grad_accum):
        fail(f"--batch-size {args.batch_size} must be divisible by world size x --grad-accum = "
             f"{ws * args.grad_accum}")
    if not os.path.exists(args.data):
        fail(f"--data {args.data!r} does not exist")
    size = (sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.data) for f in fs)
            if os.path.isdir(args.data) else os.path.getsize(args.data))
    if size == 0:
        fail(f"--data {args.data!r} is empty")
    if size < new + 1:  # a token is at least one byte (byte-level / byte-fallback tokenizers)
        fail(f"--data has {size} bytes, fewer than the new window + 1 ({new + 1} tokens needed)")
    check_out_writable(args.out, fail)
    return {"config": text, "old_window": old, "new_window": new, "factor": factor, "data_bytes": size}


def check_numeric_args(args, fail):
    """The numeric flags' ranges (a flag left at None is not checked); `fail(msg)` must not return."""
    def check(name, ok, need):
        v = getattr(args, name, None)
        if v is not None and not ok(v):
            fail(f"--{name.replace('_', '-')} must be {need}, got {v}")

    for name in ("steps", "batch_size", "grad_accum", "threads"):
        check(name, lambda v: v >= 1, ">= 1")
    check("warmup_steps", lambda v: v >= 0, ">= 0")
    check("save_every", lambda v: v >= 0, ">= 0 (0: no saved training state)")
    check("loss_chunk", lambda v: v >= 0, ">= 0 (0: the whole logits at once)")
    check("lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
    check("warmup_start", lambda v: 0 <= v <= 1, "in [0, 1] (the warm-up starts at this fraction of --lr)")
    for name in ("beta1", "beta2"):
        check(name, lambda v: 0 <= v < 1, "in [0, 1)")
    check("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    check("grad_clip", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: off)")


def check_model_dir(path: str, flag: str, fail):
    """`path` must be a local Hugging Face checkpoint directory (nothing is ever loaded
    from the hub): a directory with a config.json. Returns the config.json path."""
    if not os.path.isdir(path):
        fail(f"{flag} {path!r} is not a directory (expected a local Hugging Face checkpoint directory)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        fail(f"{flag} {path!r} has no config.json: not a Hugging Face checkpoint")
    return cfg_path


def check_device(spec: str, flag: str, fail, local_rank: int = 0) -> torch.device:
    """``spec`` as a device this machine can hold tensors on: "auto" is cuda (cuda:LOCAL_RANK)
    where available, else cpu, and "cuda" is cuda:LOCAL_RANK; a device torch cannot place a
    tensor on here (cuda on a CPU
    machine, a misspelt name) or meta (no data) is a usage error, not a traceback."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
        if device.type == "cuda" and device.index is None:
            # this process's GPU (torch.cuda.set_device needs an index)
            device = torch.device("cuda", local_rank)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        fail(f"{flag} {spec!r} is not usable here: {str(e).splitlines()[0]}")
    if device.type == "meta":
        fail(f"{flag} {spec!r} holds no data: use cpu or cuda")
    return device


def check_out_writable(out: str, fail):
    """--out must be (or be creatable as) a writable directory; creates nothing."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--out {out!r} is not writable (it exists and is not a directory)")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        fail(f"--out {out!r} is not writable ({probe!r} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(f"--out {out!r} is not writable (no write permission on {probe!r})")


# what a Hugging Face tokenizer is saved as (any of them: AutoTokenizer reads the rest)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "tekken.json")


def load_tokenizer(model_dir: str, vocab_size: int, fail):
    """(encode, decode, tokenizer-or-None): the model's tokenizer; bytes for a model without
    tokenizer files whose vocabulary is byte-level (256 bytes and at most 256 specials, as
    the demo's 260). A tokenizer that does not load, or no tokenizer for any other
    vocabulary, is a usage error (bytes read as a 32k vocabulary's ids give numbers, not
    results). `fail(msg)` must not return."""
    if any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception as e:  # noqa: BLE001 - whatever transformers refuses, said as a usage error
            fail(f"--model {model_dir!r}: its tokenizer does not load ({type(e).__name__}: "
                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})")
        if not tok("pass key", add_special_tokens=False)["input_ids"]:
            fail(f"--model {model_dir!r}: its tokenizer encodes nothing")
        return (lambda t: tok(t, add_special_tokens=False)["input_ids"]), tok.decode, tok
    if 256 <= vocab_size <= 512:
        print(f"--model {model_dir!r} has no tokenizer files: its text is read as UTF-8 bytes (ids 0-255), "
              "as for the demo's byte-level models", file=sys.stderr, flush=True)
        return byte_encode, byte_decode, None
    fail(f"--model {model_dir!r} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...) and its vocabulary "
         f"of {vocab_size} ids is not byte-level: save the tokenizer it was trained with into it "
         "(tokenizer.save_pretrained(DIR))")


def load_for_training(args, factor: float, window: int, device: torch.device, fail):
    """The float32 model of --model, extended to `window` by --scaling, with gradient
    checkpointing unless turned off; on `device`, or under torch.distributed sharded by
    FSDP2 (each layer, then the rest), every rank holding its shards and whole buffers."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    ws, rank = group_info()
    if ws > 1 and rank != 0:
        # built without memory (meta tensors): rank 0 alone reads the checkpoint, and each rank
        # receives its shards once the model is sharded (below). Every rank holding the whole
        # float32 model in host RAM would need 8 x 260 GB for a 65B model on 8 GPUs.
        from transformers import AutoConfig

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # exactly one of factor / window, as the user gave it: every --pi-impl applies the
    # same factor and window, the ones validate_finetune_args computed (logged and saved)
    extend_checkpoint(model, args.scaling, factor, impl=args.pi_impl, fail=fail,
                      max_position_embeddings=window if args.max_position_embeddings is not None else None)
    assert model.config.get_text_config().max_position_embeddings == window, (model.config, window)
    model.config.use_cache = False
    if not args.no_gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ws == 1:
        model.to(device)
    else:
        # fully_shard moves each rank's shards to the device itself: moving first would put
        # the whole float32 model on every GPU (28 GB for 7B, 132 GB for 33B)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        full = model.state_dict() if rank == 0 else {}
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        if rank != 0:
            model.to_empty(device=device)  # this rank's shards and buffers, filled from rank 0 below
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        for module in model.modules():  # buffers (RoPE's inv_freq, ...) are not sharded: rank 0's, whole
            for name, buf in module._buffers.items():
                if buf is not None:
                    buf = buf.to(device)
                    dist.broadcast(buf, src=0)
                    module._buffers[name] = buf
    return model


def run_settings(args, info, ids: torch.Tensor) -> dict:
    """What makes another run a continuation of this one (ResumePoint.settings), keyed by
    the flags that set them. Not in it: --steps (a run may be continued for more steps),
    --grad-accum, --device, --autocast, the number of processes, --threads."""
    # the file's bytes, not transformers' reading of it (which another transformers may change)
    with open(os.path.join(args.model, "config.json"), "rb") as f:
        digest = zlib.crc32(f.read())
    return {"--model (its config.json, crc32)": f"{digest:08x}", "--factor": info["factor"],
            "--max-position-embeddings": info["new_window"], "--scaling": args.scaling, "--pi-impl": args.pi_impl,
            "--data (tokens, crc32)": f"{ids.numel()}, {zlib.crc32(ids.numpy().tobytes()):08x}",
            **{"--" + k.replace("_", "-"): getattr(args, k)
               for k in ("batch_size", "seed", "lr", "warmup_steps", "warmup_start", "beta1", "beta2",
                         "weight_decay", "grad_clip")}}


def run_finetune(args, fail) -> dict:
    info = validate_finetune_args(args, fail)
    ws, rank = dist_info()
    vocab = int(getattr(info["config"], "vocab_size", 0) or 0)
    encode, decode, tok = load_tokenizer(args.model, vocab, fail)
    window = info["new_window"]
    if tok is None:  # bytes (a byte-level model without a tokenizer, as the demo's)
        text = read_text_data(args.data)
        if len(text) < window + 1:
            fail(f"--data has {len(text)} bytes, fewer than the new window + 1 ({window + 1})")
        ids = encode_data(text)
    else:
        before, after = document_markers(tok)
        ids = encode_documents(read_text_documents(args.data), encode, before, after)
        if rank == 0:
            print(f"[finetune] documents marked by {tok.convert_ids_to_tokens(before)} before and "
                  f"{tok.convert_ids_to_tokens(after)} after", flush=True)
    if ids.numel() < window + 1:
        fail(f"--data has {ids.numel()} tokens, fewer than the new window + 1 ({window + 1})")
    if vocab and int(ids.max()) >= vocab:
        fail(f"--data's tokens reach id {int(ids.max())}, outside the model's vocabulary of {vocab} ids "
             "(a tokenizer of another model?)")

    resume = None
    if args.save_every or args.resume:
        resume = ResumePoint(os.path.join(args.out, "training_state"), args.save_every, args.resume,
                             run_settings(args, info, ids), fail)
        saved = resume.check(args.steps)
        if saved is not None and not args.save_every:  # a continued run goes on saving as it did
            resume.every = int(saved.get("save_every", 0))

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    if ws > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    device = check_device(args.device, "--device", fail, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.autocast == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        bf16 = args.autocast == "bf16"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_for_training(args, info["factor"], window, device, fail)
    if rank == 0:
        extension = {"pi": f"PI: {PI_BACKEND if args.pi_impl != 'transformers' else 'transformers'}",
                     "ntk-by-parts": "NTK-by-parts", "own": "its own scaling"}[args.scaling]
        extension += f" (rope_parameters {model.config.rope_parameters})"
        print(f"[finetune] {args.model}: window {info['old_window']} -> {window} (factor {info['factor']:g}); "
              f"{ids.numel()} tokens of data; {args.steps} steps, global batch {args.batch_size}, lr {args.lr}; "
              f"world size {ws}; device {device}; bf16 autocast {bf16}; {extension}",
              flush=True)
    t0 = time.time()
    losses = train(model, ids, steps=args.steps, seq_len=window, batch_size=args.batch_size, lr=args.lr,
                   lr_lambda=warmup_lambda(args.warmup_steps, args.warmup_start), betas=(args.beta1, args.beta2),
                   weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_accum=args.grad_accum,
                   seed=args.seed, device=device, autocast_dtype=torch.bfloat16 if bf16 else None,
                   desc="fine-tune", progress=not args.no_progress, resume=resume, decay_matrices_only=True,
                   loss_chunk=args.loss_chunk)
    train_time = time.time() - t0
    # training tokens this process's run went through (all ranks; a resumed run: its own steps)
    done_steps = args.steps - (resume.resumed_from if resume is not None else 0)
    tokens_per_s = done_steps * args.batch_size * window / max(train_time, 1e-9)
    if ws > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = None
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        model.config.use_cache = True
        # saved in the checkpoint's own dtype (trained in float32 master weights): a bfloat16
        # checkpoint stays bfloat16, not twice its size
        dtype = checkpoint_dtype(info["config"])
        save_model = model
        if ws > 1:  # save from a plain (unsharded) copy of the model
            save_model = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
            save_model.load_state_dict(state)
        else:
            save_model.to(dtype)
        save_model.save_pretrained(args.out, state_dict=None)
        if tok is not None:
            tok.save_pretrained(args.out)
        log = {"losses": losses, "world_size": ws, "steps": args.steps, "train_time_s": train_time,
               "tokens_per_s": tokens_per_s,
               "resumed_from_step": resume.resumed_from if resume is not None else 0,
               "old_window": info["old_window"], "new_window": window, "factor": info["factor"], "bf16": bf16,
               "scaling": args.scaling, "rope_parameters": model.config.rope_parameters}
        with open(os.path.join(args.out, "train_log.json"), "w") as f:
            json.dump(log, f, indent=1)
        print(f"[finetune] done in {train_time:.0f}s ({tokens_per_s:.0f} tokens/s), final loss {losses[-1]:.4f}; "
              f"saved to {args.out}", flush=True)
    if ws > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"model": model, "losses": losses, "out": args.out, **info}


# ----------------------------------------------------------------------------------
# Defaults of the fine-tuning flags (the paper's recipe); the demo has its own settings.
# grad_accum None: batch_size / world size micro-steps of one sequence each (the paper's 64 x 8192
# tokens ran 1-2 sequences per GPU; the whole global batch in one forward needs ~100 GB for logits alone)
FINETUNE_DEFAULTS = dict(steps=1000, batch_size=64, grad_accum=None, lr=2e-5, warmup_steps=20, warmup_start=0.1,
                         beta1=0.9, beta2=0.95, weight_decay=0.0, grad_clip=1.0, device="auto", autocast="auto",
                         pi_impl="auto", scaling="pi", save_every=0)
# Flags that only fine-tuning a checkpoint uses (argparse dests): rejected without --model.
FINETUNE_ONLY = ("data", "factor", "max_position_embeddings", *FINETUNE_DEFAULTS, "no_gradient_checkpointing",
                 "resume", "loss_chunk")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=None, help="output directory (demo: examples/runs/demo)")
    p.add_argument("--tiny", action="store_true", default=None,  # None: not given (main reads the env then)
                   help="demo: tiny configuration that runs every code path in seconds (env PIROPE_EXAMPLES_TINY=1)")
    p.add_argument("--no-cache", action="store_true", help="demo: pretrain even if a cached model exists")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, >= 1 (demo default: 2, or 1 when the machine is already busy; "
                        "with --model: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed (demo: model init, data and evaluation; another seed pretrains anew)")
    g = p.add_argument_group("fine-tuning a real checkpoint (paper's recipe as defaults; they need --model)")
    d = FINETUNE_DEFAULTS  # the defaults are applied in main (None here: a flag the user gave is not None)
    g.add_argument("--model", help="Hugging Face checkpoint directory (LLaMA or another architecture "
                                   "pirope.integrations.transformers supports)")
    g.add_argument("--data", help="training text: a file or a directory of text files")
    g.add_argument("--factor", type=float, help="new window = factor x the model's window")
    g.add_argument("--max-position-embeddings", type=int, help="the new window (instead of --factor)")
    g.add_argument("--steps", type=int, help=f"default {d['steps']}")
    g.add_argument("--batch-size", type=int, help=f"global batch (sequences per step; default {d['batch_size']})")
    g.add_argument("--grad-accum", type=int, help="gradient accumulation micro-steps per optimizer step (default: "
                   "global batch / world size, one sequence per process and micro-step; fewer, larger "
                   "micro-batches are faster where memory allows)")
    g.add_argument("--lr", type=float, help=f"default {d['lr']}")
    g.add_argument("--warmup-steps", type=int, help=f"default {d['warmup_steps']}")
    g.add_argument("--warmup-start", type=float,
                   help=f"warm-up starts at this fraction of --lr, in [0, 1] (default {d['warmup_start']})")
    g.add_argument("--beta1", type=float, help=f"default {d['beta1']}")
    g.add_argument("--beta2", type=float, help=f"default {d['beta2']}")
    g.add_argument("--weight-decay", type=float,
                   help=f"AdamW's, on weight matrices and embeddings (not norms, biases); default {d['weight_decay']}")
    g.add_argument("--grad-clip", type=float, help=f"max grad norm (0: off; default {d['grad_clip']})")
    g.add_argument("--device", help="auto (cuda:LOCAL_RANK if available, else cpu; the default), cpu, cuda")
    g.add_argument("--autocast", choices=["auto", "bf16", "none"],
                   help="auto (the default): bf16 autocast on CUDA GPUs that support it")
    g.add_argument("--no-gradient-checkpointing", action="store_true")
    g.add_argument("--loss-chunk", type=int,
                   help="tokens per chunk of the loss: the logits (and their gradient) of that many tokens at a "
                        "time (default: 2**26 / vocabulary size, 523 for a 128k vocabulary; 0: the whole "
                        "(tokens x vocabulary) logits at once, as transformers does)")
    g.add_argument("--scaling", choices=["pi", "ntk-by-parts", "own"],
                   help="how the window grows: pi (Position Interpolation, the default), ntk-by-parts (only "
                        "the rotary pairs slower than the window interpolated), own (a Llama 3.x or YaRN "
                        "checkpoint: its own scaling with a factor F times larger)")
    g.add_argument("--pi-impl", choices=["auto", "pirope", "transformers"],
                   help="PI implementation: pirope's integration (auto, the default, or pirope), or "
                        "transformers' linear scaling")
    g.add_argument("--save-every", type=int,
                   help="save the training state (weights, optimiser, step, data order) into OUT/training_state "
                        "every N steps and at the end, for --resume; 12 bytes per parameter (default 0: never)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/training_state (the same command and settings; --steps may grow); "
                        "starts at step 0 when there is none yet")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_numeric_args(args, parser.error)
    demo_only = [flag for flag, given in (("--tiny", args.tiny), ("--no-cache", args.no_cache)) if given]
    if args.tiny is None:
        args.tiny = os.environ.get("PIROPE_EXAMPLES_TINY", "") not in ("", "0")
    if args.model is not None and demo_only:
        parser.error(f"{' / '.join(demo_only)}: demo options, not used when fine-tuning a checkpoint (--model)")
    if args.model is None:
        given = ["--" + name.replace("_", "-") for name in FINETUNE_ONLY if getattr(args, name) not in (None, False)]
        if given:
            parser.error(f"{' / '.join(given)} need --model DIR (fine-tuning a checkpoint; the demo without "
                         "--model uses its built-in settings)")
        if dist_info()[0] > 1:
            parser.error("the demo runs in a single process; use torchrun only with --model")
        args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "demo")
        check_out_writable(args.out, parser.error)
        os.makedirs(args.out, exist_ok=True)
        return run_demo(args)
    if args.out is None:
        parser.error("--out DIR is required with --model (where the fine-tuned checkpoint is saved)")
    for name, value in FINETUNE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return run_finetune(args, parser.error)


if __name__ == "__main__":
    main()
