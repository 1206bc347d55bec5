"""The fine-tuning loss of a long sequence with a large vocabulary: transformers' own
(whole logits) against pirope.training.causal_lm_loss (a chunk of tokens at a time).

    python benchmarks/bench_loss.py                       # CPU: a Llama-3 vocabulary, small hidden size
    python benchmarks/bench_loss.py --device cuda --hidden 4096 --seqlens 8192,16384,32768 \
        --autocast bf16 --json results.json               # Llama 3 8B's output projection

The model is a LlamaForCausalLM with --layers decoder layers (default 1: the loss is what
is measured, not the layers) and Llama 3's 128256-token vocabulary. Each row is one
forward + backward of the loss of one sequence of --seqlens tokens:
  transformers  model(input_ids, labels=input_ids).loss (logits of every token, upcast to
                float32, cross entropy)
  pirope        causal_lm_loss(model, input_ids, targets) with --chunk tokens per chunk
                (default 2**26 / vocabulary)
Times are medians of --repeat runs after a warm-up; "x" is transformers' time / pirope's.
Peak memory is the growth over the model and its gradients during one run: on CUDA
torch.cuda.max_memory_allocated, on CPU the peak resident set size (common.PeakRSS).
"loss diff" and "grad diff" compare pirope's loss and lm_head gradient with transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (PeakRSS, device_name, exec_with_returning_malloc, int_list, machine,  # noqa: E402
                    positive_int, print_table, sync)

from pirope.training import causal_lm_loss, default_loss_chunk  # noqa: E402


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                      max_position_embeddings=max(args.seqlens), attn_implementation="sdpa", use_cache=False)
    with torch.device(device):  # initialised where it runs (1.2B parameters at Llama 3 8B's head)
        return LlamaForCausalLM(cfg).train()


def transformers_loss(model, ids, targets):
    return model(input_ids=ids, labels=ids).loss  # shifts the labels itself: scores ids[:, 1:]


def pirope_loss(chunk):
    return lambda model, ids, targets: causal_lm_loss(model, ids, targets, chunk_tokens=chunk)


def step(model, fn, ids, targets, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(model, ids, targets)
    loss.backward()
    return loss.detach()


def measure(model, fn, ids, targets, args):
    """(median s, peak memory growth in bytes, loss, lm_head's gradient), or None where the
    GPU ran out of memory (transformers' loss at 32k tokens and a 128k vocabulary)."""
    try:
        return _measure(model, fn, ids, targets, args)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return None


def _measure(model, fn, ids, targets, args):
    device = ids.device
    loss = step(model, fn, ids, targets, args.autocast)  # warm-up
    grad = model.lm_head.weight.grad.float().clone()
    times = []
    for _ in range(args.repeat):
        sync(str(device))
        t0 = time.perf_counter()
        step(model, fn, ids, targets, args.autocast)
        sync(str(device))
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)  # measured from no gradients: the run allocates them
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, fn, ids, targets, args.autocast)
        sync(str(device))
        mem = torch.cuda.max_memory_allocated() - base
    else:
        with PeakRSS() as m:
            step(model, fn, ids, targets, args.autocast)
        mem = m.growth
    return statistics.median(times), mem, float(loss), grad


def table_row(row: dict) -> dict:
    """The printed (and saved) row of one sequence length: each method's ms and MiB ("OOM"
    where it ran out of memory), the ratios and pirope's differences from transformers."""
    hf, pi = row["transformers"], row["pirope"]
    out = {"seqlen": row["seqlen"]}
    for name, got in (("transformers", hf), ("pirope", pi)):
        out[f"{name} ms"] = "OOM" if got is None else round(got[0] * 1e3, 1)
        out[f"{name} MiB"] = "OOM" if got is None else round(got[1] / 2**20)
    both = hf is not None and pi is not None
    out["x"] = round(hf[0] / pi[0], 2) if both else "-"
    out["memory /"] = round(hf[1] / max(pi[1], 1), 1) if both else "-"
    out["loss diff"] = f"{abs(pi[2] - hf[2]):.1e}" if both else "-"
    out["grad diff"] = f"{float((pi[3] - hf[3]).norm() / hf[3].norm()):.1e}" if both else "-"
    return out


def main(argv=None):
    if argv is None:
        exec_with_returning_malloc()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seqlens", type=int_list(2), default=[1024, 2048, 4096])
    ap.add_argument("--vocab", type=positive_int, default=128256)
    ap.add_argument("--hidden", type=positive_int, default=256)
    ap.add_argument("--layers", type=positive_int, default=1)
    ap.add_argument("--chunk", type=positive_int, default=None, help="pirope's tokens per chunk")
    ap.add_argument("--autocast", choices=["bf16", "none"], default="none")
    ap.add_argument("--device", default="cpu", type=device_name)
    ap.add_argument("--repeat", type=positive_int, default=2)
    ap.add_argument("--json", default=None, help="write the results to this path")
    args = ap.parse_args(argv)
    args.autocast = args.autocast == "bf16"
    device = torch.device(args.device)
    model = build_model(args, device)
    chunk = args.chunk or default_loss_chunk(args.vocab)
    print(f"# {machine()}; vocab {args.vocab}, hidden {args.hidden}, {args.layers} layer(s), "
          f"bf16 autocast {args.autocast}, pirope chunk {chunk} tokens", flush=True)
    rows = []
    for seqlen in args.seqlens:
        g = torch.Generator().manual_seed(seqlen)
        ids = torch.randint(0, args.vocab, (1, seqlen), generator=g).to(device)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        row = {"seqlen": seqlen}
        for name, fn in (("transformers", transformers_loss), ("pirope", pirope_loss(chunk))):
            got = measure(model, fn, ids, targets, args)
            row[name] = got
            print(f"  seqlen {seqlen}: {name} " + ("out of memory" if got is None else
                  f"{got[0] * 1e3:.0f} ms, {got[1] / 2**20:.0f} MiB"), flush=True)
        rows.append(table_row(row))
        del ids, targets, row
    print_table(rows, list(rows[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "json"},
                       "chunk": chunk, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
