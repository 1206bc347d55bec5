"""One LLaMA-7B-shaped decoder layer, forward + backward: pirope against transformers.

    python benchmarks/bench_decoder_layer.py                          # CUDA, 2k/8k/16k, MHA
    python benchmarks/bench_decoder_layer.py --kv-heads 8 --json dec.json
    python benchmarks/bench_decoder_layer.py --device cpu --seqlens 64,128 --hidden 256 \
        --heads 4 --kv-heads 2 --intermediate 512 --repeat 2       # CPU smoke test
    python benchmarks/bench_decoder_layer.py --device cpu --seqlens 2048 --pack 4 ...  # padding-free
    python benchmarks/bench_decoder_layer.py --device cpu --seqlens 4096 --sliding-window 1024 ...
    python benchmarks/bench_decoder_layer.py --device cpu --gemma4 --hidden 2304 --heads 8 --kv-heads 4 \
        --head-dim 512 --intermediate 9216 ...                     # a Gemma 4 full-attention layer
    python benchmarks/bench_decoder_layer.py --device cpu --softcap 50 --hidden 3584 --heads 16 \
        --kv-heads 8 --head-dim 256 --intermediate 14336 ...           # a Gemma 2 9B layer
    python benchmarks/bench_decoder_layer.py --device cpu --mrope --hidden 3584 --heads 28 --kv-heads 4 \
        --intermediate 18944 ...                                    # a Qwen2-VL 7B layer, an image
    python benchmarks/bench_decoder_layer.py --device cpu --llama4 --hidden 5120 --heads 40 --kv-heads 8 \
        --head-dim 128 --intermediate 16384 ...                      # a Llama 4 Scout rotating layer
    python benchmarks/bench_decoder_layer.py --device cpu --mla --hidden 2048 --heads 16 \
        --intermediate 10944 ...                                     # a DeepSeek-V2-Lite layer (MLA)

The model is a Hugging Face LlamaModel with one decoder layer (random weights, --dtype,
attn_implementation="sdpa"), a 2048-token window extended by Position Interpolation
(rope_parameters {"rope_type": "linear", "factor": --factor}); the final norm is
included, the embedding lookup is not (the step feeds inputs_embeds). One step =
zero_grad, model(inputs_embeds=x, use_cache=False), backward of a fixed random grad.
--pack N packs N equal sequences into each row (padding-free training: position_ids
restarting in each, from which transformers builds its block-diagonal causal mask).
--sliding-window W makes it a MistralModel (LLaMA's layer with a sliding window of W:
transformers builds the sliding-window causal mask). --softcap C makes it a Gemma2Model
(Gemma 2's layer: scores capped to C tanh(s / C), query_pre_attn_scalar = head dim; its
full-attention layer, or with --sliding-window W its sliding one), run with eager attention,
the only one transformers takes for Gemma 2 (it refuses sdpa: SDPA has no soft-cap).
--gemma4 makes it a Gemma4TextModel with one full-attention layer: heads of --head-dim (its
global_head_dim), "proportional" RoPE (theta 1e6, a quarter of the pairs rotating) extended by
PI as {"rope_type": "proportional", "factor": --factor}, q/k/v norms, attention scale 1.
--mrope makes it a Qwen2VLTextModel (Qwen2-VL's language model: Qwen2's layer with q/k/v biases and
multimodal RoPE, sections [P/4, 3P/8, 3P/8] of the P = head-dim / 2 pairs as in Qwen2-VL 7B) fed
(3, batch, seqlen) positions of an image filling the middle half of each sequence (a square grid of
tokens: one temporal position, a height and width position each, text after it continuing from
the image's largest), as transformers' get_rope_index gives them: the sections disagree, so pirope
builds one table row per token.
--llama4 makes it a Llama4TextModel with one rotating layer as in Llama 4 Scout: RoPE as a complex
rotation of pairs (2i, 2i+1), theta 5e5, a weightless RMSNorm of the rotated q and k (so pirope's
"fused" variant rotates and normalizes first, then runs rope_attention with an identity rotation;
on CUDA rotation, then SDPA), chunked attention (8192-token
chunks: one chunk up to 8k) and a dense MLP of --intermediate (Scout's layers are MoE, one 8192
expert and an 8192 shared expert per token: --intermediate 16384 does the same work per token).
--mla makes it a DeepseekV2Model with one layer of DeepSeek-V2-Lite's Multi-head Latent Attention
(--heads heads of 128 features without RoPE and 64 with, q from one q_proj, keys and values from a
latent of 512, values of 128 per head, one rotary key shared by the heads; complex RoPE, i.e. pairs
(2i, 2i+1)) and a dense MLP of --intermediate (DeepSeek-V2-Lite's first layer; --kv-heads and
--head-dim do not apply). pirope's "fused" variant rotates the rotary parts, then on CPU runs
rope_attention with an identity rotation on q and k of 192 features and the values padded to 192.
Variants, all deep copies of one model (same weights, same config):
  hf            transformers as is: its linear-scaled rotary_emb + SDPA
  pirope_sdpa   patch_rope(model, attention="sdpa"): pirope.apply_rope_qk, then the
                model's own attention function (SDPA)
  pirope_fused  patch_rope(model, attention="fused"): pirope.rope_attention (on CUDA its
                fused kernels with PIROPE_CUDA_ATTENTION=1, else apply_rope_qk + SDPA).
Times: median of --repeat steps after 2 warm-ups (CUDA events on GPU). tok/s = batch x
seqlen / time; "x hf" = hf time / variant time (> 1: faster than hf). Peak MiB = growth
of torch.cuda.max_memory_allocated over one step (weights and inputs excluded, weight
grads included; "-" on CPU). "out"/"grad" = max |variant - hf| / max |hf| of the output
and of the q_proj/k_proj weight gradients: a sanity check at the benchmarked shapes. With
random weights the output is mostly the residual stream, so "out" barely sees RoPE (a wrong
PI factor moves it by ~1e-3); "grad" goes through the rotation and does (~1 for factor 4
instead of 8, ~3e-2 for 7.9) against ~1e-2 of bfloat16 rounding.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys

import torch
import transformers
from transformers import (DeepseekV2Config, DeepseekV2Model, Gemma2Config, Gemma2Model, Gemma4TextConfig,
                          Gemma4TextModel, LlamaConfig, LlamaModel, Llama4TextConfig, Llama4TextModel, MistralConfig,
                          MistralModel, Qwen2VLTextConfig)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, choice_list, device_name, int_list, machine, median_ms, positive_float,  # noqa: E402
                    positive_int)

import pirope  # noqa: E402
from pirope.integrations.transformers import patch_rope  # noqa: E402

VARIANTS = ("hf", "pirope_sdpa", "pirope_fused")


def build_model(args, device, dtype):
    """A 1-layer LlamaModel (MistralModel with --sliding-window, Gemma2Model with --softcap,
    Gemma4TextModel with --gemma4, Llama4TextModel with --llama4, DeepseekV2Model with --mla) extended from
    --window to --window x --factor by PI, on device."""
    hd = args.head_dim
    config_cls, model_cls = (MistralConfig, MistralModel) if args.sliding_window else (LlamaConfig, LlamaModel)
    windowed = {"sliding_window": args.sliding_window} if args.sliding_window else {}
    rope = {"rope_type": "linear", "factor": args.factor, "rope_theta": 10000.0}
    attn_implementation = "sdpa"
    if args.gemma4:  # its full-attention layer: heads of --head-dim, "proportional" RoPE extended by PI
        config_cls, model_cls = Gemma4TextConfig, Gemma4TextModel
        windowed = dict(layer_types=["full_attention"], global_head_dim=hd, hidden_size_per_layer_input=0)
        rope = {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1000000.0, "factor": args.factor},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    if args.mrope:  # Qwen2-VL's language model: Qwen2's layer, multimodal RoPE sections
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

        config_cls, model_cls = Qwen2VLTextConfig, Qwen2VLTextModel
        pairs = hd // 2
        rope["mrope_section"] = [pairs // 4, 3 * pairs // 8, pairs - pairs // 4 - 3 * pairs // 8]
    if args.llama4:  # Scout's rotating layer (q/k norms after RoPE, chunks), a dense MLP
        config_cls, model_cls = Llama4TextConfig, Llama4TextModel
        rope["rope_theta"] = 500000.0
        windowed = dict(no_rope_layers=[1], use_qk_norm=True, attention_chunk_size=8192, moe_layers=[],
                        intermediate_size_mlp=args.intermediate)
    if args.mla:  # DeepSeek-V2-Lite's attention (its dims), a dense MLP (its first layer)
        config_cls, model_cls = DeepseekV2Config, DeepseekV2Model
        windowed = dict(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, first_k_dense_replace=1)
        hd = 64  # (its config's head_dim: the rotary part, the table's width)
    if args.softcap:
        config_cls, model_cls, attn_implementation = Gemma2Config, Gemma2Model, "eager"
        windowed = dict(attn_logit_softcapping=args.softcap, query_pre_attn_scalar=hd,
                        layer_types=["sliding_attention" if args.sliding_window else "full_attention"],
                        **windowed)
    config = config_cls(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=hd,
        vocab_size=32,  # the embedding is never used (inputs_embeds); keep it small
        max_position_embeddings=int(args.window * args.factor),
        rope_parameters=rope, attn_implementation=attn_implementation, **windowed)
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device (fast for 7B shapes)
        model = model_cls(config)
    return model.to(dtype).train()


def image_positions(batch: int, seqlen: int) -> torch.Tensor:
    """(3, batch, seqlen) multimodal RoPE positions of text, a square image of about seqlen / 2
    tokens from seqlen / 4, then text, as transformers' get_rope_index lays them out."""
    side = max(1, int((seqlen // 2) ** 0.5))
    start, n = seqlen // 4, side * side
    pos = torch.arange(seqlen).repeat(3, 1)
    grid = torch.arange(n)
    pos[:, start:start + n] = torch.stack([torch.zeros_like(grid), grid // side, grid % side]) + start
    pos[:, start + n:] = torch.arange(seqlen - start - n) + start + side  # text after the image
    return pos[:, None].expand(3, batch, seqlen).contiguous()


def make_variant(base, name):
    model = copy.deepcopy(base)
    if name != "hf":  # keeps config.rope_parameters: same linear scaling, routed through pirope
        patch_rope(model, attention=name.removeprefix("pirope_"))
    return model


def rel_diff(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_variant(base, name, x, grad, repeat, device, ref, position_ids=None):
    """Time one variant; fills ref (output, grads) when it is hf, else compares to it."""
    model = make_variant(base, name)
    attn = model.layers[0].self_attn
    # (MLA: its key's rotary part comes from kv_a_proj_with_mqa)
    weights = (attn.q_proj.weight, getattr(attn, "kv_a_proj_with_mqa", getattr(attn, "k_proj", None)).weight)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(inputs_embeds=x, position_ids=position_ids, use_cache=False).last_hidden_state
        out.backward(grad)
        return out

    out = step().detach()  # correctness check (also a first warm-up)
    grads = [w.grad.detach().clone() for w in weights]
    row = {}
    if name == "hf":
        ref["out"], ref["grads"] = out, grads
    elif ref:
        row["diff_out"] = rel_diff(out, ref["out"])
        row["diff_grad"] = max(rel_diff(g, r) for g, r in zip(grads, ref["grads"]))
    del out, grads
    row["ms"] = median_ms(step, device.type, warmup=2, repeat=repeat)
    if device.type == "cuda":  # one more step for the peak memory; old grads freed first
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_MiB"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    return row


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="2048,8192,16384", type=int_list(1))
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--hidden", type=positive_int, default=4096)
    ap.add_argument("--heads", type=positive_int, default=32)
    ap.add_argument("--kv-heads", type=positive_int, default=None, help="default: --heads (MHA); 8 for GQA")
    ap.add_argument("--head-dim", type=positive_int, default=None,
                    help="default: --hidden / --heads (Gemma 2 9B: 256)")
    ap.add_argument("--intermediate", type=positive_int, default=11008)
    ap.add_argument("--window", type=positive_int, default=2048, help="the pretrained context window")
    ap.add_argument("--factor", type=positive_float, default=8.0, help="PI factor (default: 2k -> 16k)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_name)
    ap.add_argument("--repeat", type=positive_int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS), type=choice_list(VARIANTS))
    ap.add_argument("--pack", type=positive_int, default=1,
                    help="sequences packed into each row (positions restarting; default 1: none)")
    ap.add_argument("--sliding-window", type=positive_int, default=None,
                    help="a Mistral layer (with --softcap: Gemma 2's sliding layer) attending within this "
                         "many tokens (default: none, LLaMA)")
    ap.add_argument("--softcap", type=positive_float, default=None,
                    help="a Gemma 2 layer capping its scores to C tanh(s / C) (Gemma 2: 50)")
    ap.add_argument("--gemma4", action="store_true",
                    help="a Gemma 4 full-attention layer (proportional RoPE on a quarter of the pairs, q/k/v "
                         "norms, scale 1; --head-dim is its global head size, 512 in Gemma 4)")
    ap.add_argument("--mrope", action="store_true",
                    help="a Qwen2-VL language-model layer (multimodal RoPE) on the positions of an image")
    ap.add_argument("--llama4", action="store_true",
                    help="a Llama 4 Scout rotating layer (complex RoPE, q/k norms after it, chunked attention)")
    ap.add_argument("--mla", action="store_true",
                    help="a DeepSeek-V2-Lite layer (Multi-head Latent Attention, complex RoPE, a dense MLP)")
    ap.add_argument("--json", default=None, help="write the rows to this path")
    args = ap.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or args.hidden // args.heads
    if args.mla:  # its q and k heads: 128 features without RoPE, 64 with (values: 128)
        args.head_dim = 192
    if args.gemma4 and (args.softcap or args.sliding_window or args.pack > 1):
        ap.error("--gemma4 benchmarks Gemma 4's full-attention layer alone: no --softcap, --sliding-window or --pack")
    if args.mrope and (args.gemma4 or args.softcap or args.sliding_window or args.pack > 1):
        ap.error("--mrope benchmarks Qwen2-VL's layer alone: no --gemma4, --softcap, --sliding-window or --pack")
    if args.llama4 and (args.mrope or args.gemma4 or args.softcap or args.sliding_window or args.pack > 1):
        ap.error("--llama4 benchmarks Llama 4's layer alone: no --mrope, --gemma4, --softcap, --sliding-window or "
                 "--pack")
    if args.mla and (args.llama4 or args.mrope or args.gemma4 or args.softcap or args.sliding_window
                     or args.kv_heads != args.heads):
        ap.error("--mla benchmarks DeepSeek-V2-Lite's layer alone: no --llama4, --mrope, --gemma4, --softcap, "
                 "--sliding-window or --kv-heads")
    if args.heads % args.kv_heads:
        ap.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.head_dim % 2:
        ap.error(f"the head dimension must be even for RoPE, got {args.head_dim} (--hidden / --heads or --head-dim)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    variants = args.variants

    print(f"{machine()}, transformers {transformers.__version__}, pirope {pirope.__version__}")
    print(f"device {device}, {args.dtype}, batch {args.batch}, hidden {args.hidden}, heads "
          f"{args.heads}/{args.kv_heads} x {args.head_dim}, intermediate {args.intermediate}, "
          f"window {args.window} x PI factor {args.factor:g}, repeat {args.repeat}"
          + (f", {args.pack} packed sequences per row" if args.pack > 1 else "")
          + (f", Gemma 2 soft-cap {args.softcap:g} (eager)" if args.softcap else "")
          + (", Gemma 4 full-attention layer (proportional RoPE)" if args.gemma4 else "")
          + (", Qwen2-VL layer (multimodal RoPE), an image in each sequence" if args.mrope else "")
          + (", Llama 4 Scout layer (q/k norms after RoPE, 8192-token chunks)" if args.llama4 else "")
          + (", DeepSeek-V2-Lite layer (MLA: q/k 128 + 64 rotary, v 128, latent 512)" if args.mla else "")
          + (f", sliding window {args.sliding_window} ({'Gemma 2' if args.softcap else 'Mistral'})"
             if args.sliding_window else "")
          + (f", PIROPE_CUDA_ATTENTION={os.environ.get('PIROPE_CUDA_ATTENTION', '0 (default)')}"
             if device.type == "cuda" else ""))
    hdr = (f"{'seqlen':>6} {'variant':12} {'ms':>9} {'tok/s':>9} {'peak MiB':>9} {'x hf':>6} "
           f"{'out':>8} {'grad':>8}")
    print(hdr)
    print("-" * len(hdr))
    base = build_model(args, device, dtype)
    rows = []
    for s in args.seqlens:
        gen = torch.Generator(device=device).manual_seed(s)
        x = torch.randn(args.batch, s, args.hidden, device=device, dtype=dtype, generator=gen)
        grad = torch.randn(args.batch, s, args.hidden, device=device, dtype=dtype, generator=gen)
        pos = None
        if args.pack > 1:  # N sequences per row, as even as the length allows
            bounds = [s * i // args.pack for i in range(args.pack + 1)]
            pos = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])]).to(device)[None]
        if args.mrope:
            pos = image_positions(args.batch, s).to(device)
        ref, hf_ms = {}, None
        for name in variants:
            row = dict(seqlen=s, variant=name, batch=args.batch, hidden=args.hidden, heads=args.heads,
                       kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate=args.intermediate,
                       factor=args.factor,
                       dtype=args.dtype, device=str(device), pack=args.pack, sliding_window=args.sliding_window,
                       softcap=args.softcap, gemma4=args.gemma4, mrope=args.mrope, llama4=args.llama4,
                       mla=args.mla)
            try:
                row.update(run_variant(base, name, x, grad, args.repeat, device, ref, pos))
            except RuntimeError as e:  # OOM or an unsupported call: note it, go on
                row["error"] = str(e).splitlines()[0][:200]
                print(f"{s:6d} {name:12} failed: {row['error']}", flush=True)
            free(device)
            rows.append(row)
            if "ms" not in row:
                continue
            hf_ms = row["ms"] if name == "hf" else hf_ms
            row["tokens_per_s"] = args.batch * s / (row["ms"] / 1e3)
            row["speedup_vs_hf"] = hf_ms / row["ms"] if hf_ms else None
            f = lambda key, fmt: format(row[key], fmt) if row.get(key) is not None else "-"  # noqa: E731
            print(f"{s:6d} {name:12} {row['ms']:9.2f} {row['tokens_per_s']:9.0f} {f('peak_MiB', '.0f'):>9} "
                  f"{f('speedup_vs_hf', '.2f'):>6} {f('diff_out', '.1e'):>8} {f('diff_grad', '.1e'):>8}",
                  flush=True)
        del x, grad, ref
        free(device)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
