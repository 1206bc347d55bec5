#!/usr/bin/env python
"""Evaluate a Hugging Face causal LM the way the Position Interpolation paper does.

* sliding-window perplexity (pirope.eval.sliding_window_perplexity) on a text file or
  a directory of text files, at one or more windows;
* passkey retrieval (pirope.eval.passkey_retrieval) with its effective window k_max.

    python examples/evaluate.py --model examples/runs/demo/pi_ft \\
        --data /usr/lib/python3.11/json --windows 256 512 1024 --stride 32 \\
        --passkey-lengths 256 512 768 1024 --passkey-trials 10

Tokenises with the model's tokenizer (an error if it does not load); a model without
tokenizer files and with a byte-level vocabulary (the demo's) reads its text as bytes. ``--factor F`` evaluates the model extended
zero-shot, as the paper's "no fine-tuning" rows: its window times F by ``--scaling`` (pi,
the default; ntk-by-parts; own: a Llama 3.x or YaRN checkpoint's own scaling), through
pirope's integration, as examples/finetune_pi.py extends before fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_pi import (check_device, check_model_dir, check_scaling, document_markers,  # noqa: E402
                         encode_data, encode_documents, extend_checkpoint, load_tokenizer, read_text_config,
                         read_text_data, read_text_documents)

from pirope.eval import passkey_min_length, passkey_retrieval, sliding_window_perplexity  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face causal LM directory")
    p.add_argument("--data", help="text file or directory for perplexity (omit to skip perplexity)")
    p.add_argument("--windows", type=int, nargs="+", help="evaluation windows (default: the model's window)")
    p.add_argument("--stride", type=int, default=256, help="sliding-window stride (paper: 256)")
    p.add_argument("--factor", type=float, default=None,
                   help="evaluate the model extended zero-shot to F x its window (omit: the model as saved)")
    p.add_argument("--scaling", choices=["pi", "ntk-by-parts", "own"], default=None,
                   help="with --factor: how the window grows (as examples/finetune_pi.py; default pi)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens of --data")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--passkey-lengths", type=int, nargs="*", default=None,
                   help="passkey prompt lengths in tokens (default: 8 spread over the window, from the "
                        "shortest prompt where the window is short; the flag alone: skip)")
    p.add_argument("--no-passkey", action="store_true")
    p.add_argument("--passkey-trials", type=int, default=10)
    p.add_argument("--passkey-intro", default=None, help="replace the paper's intro sentence (e.g. '' for short windows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_model_dir(args.model, "--model", p.error)
    if args.scaling is not None and args.factor is None:
        p.error("--scaling needs --factor F (the zero-shot extension to evaluate)")
    if args.factor is not None and not (math.isfinite(args.factor) and args.factor > 1.0):
        p.error(f"--factor must be > 1 (the window grows by this factor), got {args.factor}")
    if args.data is not None and not os.path.exists(args.data):
        p.error(f"--data {args.data!r} does not exist")
    if args.stride < 1:
        p.error(f"--stride must be >= 1, got {args.stride}")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.passkey_trials < 1:
        p.error(f"--passkey-trials must be >= 1, got {args.passkey_trials}")
    if args.passkey_lengths and min(args.passkey_lengths) < 1:
        p.error(f"--passkey-lengths must be >= 1, got {min(args.passkey_lengths)}")
    if args.json is not None and (os.path.isdir(args.json) or args.json.endswith(os.sep)):
        p.error(f"--json {args.json!r} is a directory: name the file to write")
    if args.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json!r}: its directory does not exist")
    device = check_device(args.device, "--device", p.error)
    from transformers import AutoModelForCausalLM

    conf, text = read_text_config(args.model, p.error)  # (text: a multimodal model's language model's)
    window = int(getattr(text, "max_position_embeddings", None) or 2048)
    if args.factor is not None:
        args.scaling = args.scaling or "pi"
        check_scaling(conf, text, args.model, args.scaling, "auto", p.error)
        window = int(round(window * args.factor))  # what the extension below sets
    windows = args.windows or [window]
    if args.data is not None and (min(windows) < 2 or args.stride > min(windows)):  # (perplexity only)
        p.error(f"--windows must be >= 2 and >= --stride ({args.stride}), got {windows}")
    encode, decode, tok = load_tokenizer(args.model, int(getattr(text, "vocab_size", 0) or 0), p.error)
    run_passkey = not args.no_passkey and args.passkey_lengths != []
    if run_passkey:  # checked before any perplexity is computed
        prefix = [tok.bos_token_id] if tok is not None and tok.bos_token_id is not None else []
        kw = {} if args.passkey_intro is None else {"intro": args.passkey_intro}
        shortest = passkey_min_length(encode, prefix_ids=prefix, **kw)
        lengths = args.passkey_lengths or [window * i // 8 for i in range(1, 9)]
        if not args.passkey_lengths and min(lengths) < shortest <= window:
            # a short window: 8 lengths from the shortest prompt to the window instead
            lengths = sorted({shortest + (window - shortest) * i // 7 for i in range(8)})
        if min(lengths) < shortest:
            given = "--passkey-lengths" if args.passkey_lengths else f"--passkey-lengths (default {lengths})"
            p.error(f"{given}: {min(lengths)} is shorter than the passkey prompt without filler ({shortest} "
                    "tokens); use longer lengths, or a shorter --passkey-intro")
    ids = None
    if args.data is not None:
        # in ~1 MB pieces cut after a newline, as for fine-tuning (a held-out set of any size
        # fits in memory; a piece's first word may tokenize as after a space: one id in ~250k),
        # each file a document marked as fine-tuning marks them, and only as many as
        # --max-tokens asks for
        if tok is None:
            ids = encode_data(read_text_data(args.data), limit=args.max_tokens)
        else:
            ids = encode_documents(read_text_documents(args.data), encode, *document_markers(tok),
                                   limit=args.max_tokens)
        if ids.numel() < max(windows):
            p.error(f"--data has {ids.numel()} tokens, fewer than the largest window {max(windows)}")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    if args.factor is not None:
        extend_checkpoint(model, args.scaling, args.factor, fail=p.error)
    model = model.to(device).eval()
    progress = not args.no_progress
    results = {"model": args.model, "window": window,
               "rope_parameters": getattr(model.config.get_text_config(), "rope_parameters", None)}
    if args.factor is not None:
        results["extension"] = {"factor": args.factor, "scaling": args.scaling}
    if ids is not None:
        results["perplexity"] = {}
        for w in windows:
            ppl = sliding_window_perplexity(model, ids, w, args.stride, batch_size=args.batch_size, progress=progress)
            results["perplexity"][str(w)] = ppl
            print(f"perplexity window {w} stride {args.stride} ({ids.numel()} tokens): {ppl:.4f}", flush=True)
    if run_passkey:
        try:
            pk = passkey_retrieval(model, encode, decode, lengths, trials=args.passkey_trials, seed=args.seed,
                                   prefix_ids=prefix, progress=progress, **kw)
        except ValueError as e:
            p.error(str(e))
        pk["success"] = {str(k): v for k, v in pk["success"].items()}
        results["passkey"] = pk
        print("passkey success: " + ", ".join(f"{k}: {v:.0%}" for k, v in pk["success"].items())
              + f"; k_max = {pk['k_max']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
