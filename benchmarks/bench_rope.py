"""apply_rope_qk against what users would otherwise run, forward and forward+backward.

    python benchmarks/bench_rope.py                    # default grid on the CPU
    python benchmarks/bench_rope.py --device cuda --batch 1 2 4 --seqlen 2048 4096 8192
    python benchmarks/bench_rope.py --json results.json

Baselines, all on the same q/k bytes (LLaMA-7B heads, head dim 128, PI factor 4):
  hf_eager    Hugging Face's apply_rotary_pos_emb (rotate_half) on (B, H, S, D), with
              the per-token cos/sin that LlamaRotaryEmbedding hands to every layer
  hf_compile  torch.compile of the same function
  copy        q and k copied into preallocated buffers: the memory floor (read + write
              every byte once)
  pirope      pirope.apply_rope_qk on (B, S, H, D) with the shared float32 table
Ratios are baseline time / pirope time (> 1: pirope is faster), except copy, which
reports pirope's time / copy time (1.0 = at the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, device_name, head_dim, heads_pair, machine, median_ms, positive_int,  # noqa: E402
                    print_table, rotate_half)

import pirope  # noqa: E402


def hf_apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def bench_case(device, dtype, batch, seqlen, hq, hk, head_dim, repeat, compiled):
    inv_freq, attn = pirope.rope_frequencies(head_dim, scaling={"rope_type": "linear", "factor": 4.0})
    cos_t, sin_t = pirope.rope_cos_sin(inv_freq, seqlen, attn)
    cos_t, sin_t = cos_t.to(device), sin_t.to(device)
    pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
    # what LlamaRotaryEmbedding returns: (B, S, D) in the activations' dtype
    cos_hf = torch.cat((cos_t, cos_t), -1)[pos].to(dtype)
    sin_hf = torch.cat((sin_t, sin_t), -1)[pos].to(dtype)

    q = torch.randn(batch, seqlen, hq, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen, hk, head_dim, device=device, dtype=dtype)
    q_hf, k_hf = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    gq_hf, gk_hf = gq.transpose(1, 2).contiguous(), gk.transpose(1, 2).contiguous()

    def fwd_bwd(fn, a, b, ga, gb):
        a = a.detach().requires_grad_()
        b = b.detach().requires_grad_()
        oa, ob = fn(a, b)
        torch.autograd.backward((oa, ob), (ga, gb))

    def pirope_fn(a, b):
        return pirope.apply_rope_qk(a, b, cos_t, sin_t)

    def hf_fn(a, b):
        return hf_apply_rotary_pos_emb(a, b, cos_hf, sin_hf)

    # a compile cache of this case's own: dynamo's recompile limit (8) would otherwise turn
    # the later cases' "compiled" baseline into eager (2 entries per case: fwd and fwd+bwd)
    torch._dynamo.reset()
    hf_comp = torch.compile(hf_apply_rotary_pos_emb, dynamic=False) if compiled else None

    def hf_comp_fn(a, b):
        return hf_comp(a, b, cos_hf, sin_hf)

    # the floor: read and write every byte once, into buffers allocated beforehand
    # (a fresh allocation would add page faults that depend on the allocator's mood)
    copy_q, copy_k = torch.empty_like(q), torch.empty_like(k)

    def copy_fn(a, b):
        return copy_q.copy_(a), copy_k.copy_(b)

    impls = {"pirope": (pirope_fn, q, k, gq, gk), "hf_eager": (hf_fn, q_hf, k_hf, gq_hf, gk_hf),
             "copy": (copy_fn, q, k, gq, gk)}
    if compiled:
        impls["hf_compile"] = (hf_comp_fn, q_hf, k_hf, gq_hf, gk_hf)
    # correct first: pirope's rotation against Hugging Face's on the timed inputs
    with torch.no_grad():
        got, want = pirope_fn(q, k), hf_fn(q_hf, k_hf)
        diff = max(((g.float() - w.transpose(1, 2).float()).abs().max() / w.float().abs().max()).item()
                   for g, w in zip(got, want))
    del got, want
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        t = {}
        for name, (fn, a, b, ga, gb) in impls.items():
            if mode == "fwd":
                t[name] = median_ms(lambda: fn(a, b), device, repeat=repeat)
            elif name == "copy":  # backward of a copy is another copy
                t[name] = 2 * t.get(name, median_ms(lambda: fn(a, b), device, repeat=repeat))
            else:
                t[name] = median_ms(lambda: fwd_bwd(fn, a, b, ga, gb), device, repeat=repeat)
        moved = 2 * (q.numel() + k.numel()) * q.element_size() * (1 if mode == "fwd" else 2)
        row = dict(device=device, dtype=str(dtype).replace("torch.", ""), batch=batch, seqlen=seqlen,
                   heads=f"{hq}/{hk}", mode=mode, pirope_ms=round(t["pirope"], 3),
                   hf_eager_ms=round(t["hf_eager"], 3), copy_ms=round(t["copy"], 3),
                   x_vs_hf_eager=round(t["hf_eager"] / t["pirope"], 2),
                   copy_floor_frac=round(t["copy"] / t["pirope"], 2),
                   pirope_GBps=round(moved / t["pirope"] / 1e6, 1), rel_diff_vs_hf=float(f"{diff:.2g}"))
        if compiled:
            row["hf_compile_ms"] = round(t["hf_compile"], 3)
            row["x_vs_hf_compile"] = round(t["hf_compile"] / t["pirope"], 2)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_name)
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=DTYPES)
    p.add_argument("--batch", nargs="+", type=positive_int, default=[1])
    p.add_argument("--seqlen", nargs="+", type=positive_int, default=[2048, 8192])
    p.add_argument("--heads", nargs="+", type=heads_pair, default=["32/32", "32/8"], help="q/kv head counts")
    p.add_argument("--head-dim", type=head_dim, default=128)
    p.add_argument("--repeat", type=positive_int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# bench_rope on {machine()}")
    rows = []
    for dtype in args.dtype:
        for batch in args.batch:
            for seqlen in args.seqlen:
                for heads in args.heads:
                    hq, hk = (int(h) for h in heads.split("/"))
                    rows += bench_case(args.device, getattr(torch, dtype), batch, seqlen, hq, hk,
                                       args.head_dim, args.repeat, not args.no_compile)
    cols = ["device", "dtype", "batch", "seqlen", "heads", "mode", "pirope_ms", "hf_eager_ms"]
    cols += [] if args.no_compile else ["hf_compile_ms"]
    cols += ["copy_ms", "x_vs_hf_eager"] + ([] if args.no_compile else ["x_vs_hf_compile"])
    cols += ["copy_floor_frac", "pirope_GBps", "rel_diff_vs_hf"]
    print_table(rows, cols)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
