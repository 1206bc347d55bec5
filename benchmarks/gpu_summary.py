"""The short table gpu_check.sh prints last (and writes to $OUT/summary.md): from the
benchmark JSON files under a folder, the figures issue 6's target is about -- fused and
warp-specialised ("ws") attention against the best SDPA backend, and the decoder-layer
step against transformers -- one line per measured configuration. Missing files are
skipped (a step that did not run), so it works on whatever a short lease left.

    python benchmarks/gpu_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys


def _load(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # a step killed while writing
        print(f"({name}: unreadable: {e})")
        return None
    return data["rows"] if isinstance(data, dict) else data


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def attention_lines(rows) -> list[str]:
    out = ["| dtype | heads | seqlen | causal | mode | fused ms | ws ms | best SDPA | its ms | fused/best | ws/best "
           "| err vs best |", "|" + "---|" * 12]
    for r in rows:
        best = r.get("best_sdpa")
        out.append(f"| {r['dtype']} | {r['heads']} | {r['seqlen']} | {r['causal']} | {r['mode']} "
                   f"| {_num(r.get('fused_ms'), '.3f')} | {_num(r.get('fused_ws_ms'), '.3f')} | {best or '-'} "
                   f"| {_num(r.get(f'{best}_ms') if best else None, '.3f')} "
                   f"| {_num(r.get('ratio_vs_best_sdpa'), '.2f')} | {_num(r.get('ratio_ws_vs_best_sdpa'), '.2f')} "
                   f"| {_num(r.get('err_vs_best'), '.1e')} |")
    return out


def decoder_lines(rows) -> list[str]:
    out = ["| seqlen | variant | ms | tokens/s | peak MiB | vs transformers |", "|" + "---|" * 6]
    for r in rows:
        out.append(f"| {r.get('seqlen')} | {r.get('variant')} | {_num(r.get('ms'), '.2f')} "
                   f"| {_num(r.get('tokens_per_s'), '.0f')} | {_num(r.get('peak_MiB'), '.0f')} "
                   f"| {_num(r.get('speedup_vs_hf'), '.2f')} |")
    return out


def loss_lines(rows) -> list[str]:
    keys = ("seqlen", "transformers ms", "transformers MiB", "pirope ms", "pirope MiB", "x", "memory /",
            "loss diff", "grad diff")
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows)]


def summary(folder: str) -> str:
    parts = []
    for name, title, lines in (
            ("bench_attention_gpu.json", "Attention (ratios: best SDPA time / ours; target fwd+bwd >= 0.8)",
             attention_lines),
            ("bench_attention_gpu_mma.json", "Attention, mma.sync kernels (PIROPE_ATTENTION_SM90=0)",
             attention_lines),
            ("bench_decoder_layer.json", "Decoder layer (target >= 1.0 vs transformers)", decoder_lines),
            ("bench_decoder_layer_ws.json", "Decoder layer, warp-specialised kernels", decoder_lines),
            ("bench_loss.json", "Loss of one sequence, Llama 3 8B's output projection (bf16 autocast)",
             loss_lines)):
        rows = _load(folder, name)
        if rows:
            parts += [f"### {title}", "", *lines(rows), ""]
    return "\n".join(parts) if parts else "(no benchmark results under this folder)"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python benchmarks/gpu_summary.py OUT_DIR (a folder gpu_check.sh wrote)")
    print(summary(sys.argv[1]))
