#!/usr/bin/env python
"""Why Position Interpolation is stable: the paper's Theorem 2.1, numerically.

The RoPE attention score between a query at position m and a key at position n
depends only on s = m - n:

    a(s) = Re[ sum_{j=0}^{d/2-1} h_j exp(i s theta_j) ],   theta_j = base^(-2j/d),

with h_j = q_j * conj(k_j) (pair j of q and k as complex numbers, d = head dim).

* Interpolation bound (Theorem 2.1): between two neighbouring integer positions the
  score differs from the straight line through them by at most
      d * max|h_j| * (s - s1)(s2 - s) / (8 ln base)  <=  d * max|h_j| / (32 ln base)
  (32 ln 10000 = 294.73), so interpolated (fractional) positions give well-behaved
  scores.
* Extrapolation bound: |a(s)| <= max_j|h_j - h_{j+1}| * B(s) <= 2 max|h_j| B(s),
  B(s) = sum_k |A_{k+1}(s)|, A_k(s) = sum_{j<k} exp(i s theta_j); B(s) is of order d,
  so the bound is ~2 * 294.73 = 589 ("~600x") times looser than interpolation's.

The script (1) prints those numbers, (2) reproduces the paper's Figure 2: h fitted by
least squares so that a(s) matches random values in [-1, 1] at integer s in [0, L)
(d = 128, L = 2048 by default) stays within a few units at fractional positions inside
[0, L) but reaches values in the thousands beyond L, (3) checks the interpolation bound
for random h, and (4) with --checkpoint DIR does the same for h from the q/k of a
trained model (e.g. examples/runs/demo/pretrained). Writes a PNG (--out).

    python examples/attention_score_bound.py [--checkpoint DIR] [--out PNG]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

DTYPE = torch.float64


def thetas(d: int, base: float) -> torch.Tensor:
    return base ** (-torch.arange(0, d // 2, dtype=DTYPE) * 2.0 / d)


def score(h: torch.Tensor, s: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    """a(s) = Re[sum_j h_j exp(i s theta_j)] for complex h (d/2,), positions s (n,)."""
    ang = s.to(DTYPE)[:, None] * th[None, :]
    return ang.cos() @ h.real.to(DTYPE) - ang.sin() @ h.imag.to(DTYPE)


def B(s: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    """B(s) = sum_{k=0}^{d/2-1} |A_{k+1}(s)|, A_k(s) = sum_{j<k} exp(i s theta_j)."""
    ang = s.to(DTYPE)[:, None] * th[None, :]
    A = torch.complex(ang.cos(), ang.sin()).cumsum(dim=1)  # A_{k+1}, k = 0..d/2-1
    return A.abs().sum(dim=1)


def interpolation_bound(d: int, base: float, hmax: float = 1.0) -> float:
    return d * hmax / (32.0 * math.log(base))


def max_interp_error(h, th, lo: int, hi: int, sub: int = 16):
    """max over s in [lo, hi) of |a(s) - linear interpolation of a at floor(s), ceil(s)|."""
    ints = torch.arange(lo, hi + 1, dtype=DTYPE)
    a_int = score(h, ints, th)
    frac = torch.arange(1, sub, dtype=DTYPE) / sub
    s = (ints[:-1, None] + frac[None, :]).reshape(-1)
    a = score(h, s, th)
    lin = (a_int[:-1, None] * (1 - frac) + a_int[1:, None] * frac).reshape(-1)
    return float((a - lin).abs().max())


def fit_h(d: int, L: int, base: float, seed: int, ridge: float = 1e-6) -> torch.Tensor:
    """The paper's Figure 2: h with a(s) ~ random targets in [-1, 1] at s = 0..L-1
    (least squares with a tiny ridge: the lowest frequencies are nearly collinear on
    [0, L), and without it |h| grows to ~1e9)."""
    g = torch.Generator().manual_seed(seed)
    th = thetas(d, base)
    s = torch.arange(L, dtype=DTYPE)
    y = torch.rand(L, generator=g, dtype=DTYPE) * 2 - 1
    ang = s[:, None] * th[None, :]
    X = torch.cat([ang.cos(), -ang.sin()], dim=1)  # a = X @ [Re h, Im h]
    sol = torch.linalg.solve(X.T @ X + ridge * torch.eye(d, dtype=DTYPE), X.T @ y)
    return torch.complex(sol[: d // 2], sol[d // 2 :])


def checkpoint_h(path: str, n_tokens: int = 64, layer: int = 0, head: int = 0):
    """h_j = q_j conj(k_j) from a trained model (half / rotate_half layout), for the
    query at the last token and the key at the first token of some text."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    base = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    window = int(cfg.max_position_embeddings)
    if rope.get("rope_type", "default") == "linear":
        window = int(round(window / float(rope["factor"])))  # the original (pretraining) window
    text = open(os.path.join(os.path.dirname(os.__file__), "os.py"), "rb").read()[:n_tokens]
    ids = torch.tensor([list(text)]) % cfg.vocab_size
    captured = {}
    attn = model.model.layers[layer].self_attn
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))]
    with torch.no_grad():
        model(input_ids=ids)
    for hk in hooks:
        hk.remove()
    q = captured["q"][0, -1].view(-1, hd)[head].double()
    nkv = cfg.num_key_value_heads
    k = captured["k"][0, 0].view(nkv, hd)[head * nkv // cfg.num_attention_heads].double()
    half = hd // 2
    qc = torch.complex(q[:half], q[half:])
    kc = torch.complex(k[:half], k[half:])
    return qc * kc.conj() * hd ** -0.5, hd, base, window


def report(name, h, d, L, base, factor, sub=16):
    th = thetas(d, base)
    hmax = float(h.abs().max())
    inside = score(h, torch.arange(0, L, 1.0 / sub, dtype=DTYPE), th)
    beyond = score(h, torch.arange(L, factor * L, dtype=DTYPE), th)
    err = max_interp_error(h, th, 0, L - 1, sub)
    bound = interpolation_bound(d, base, hmax)
    r = {
        "max|h|": hmax,
        "max|a| at fractional positions in [0, L)": float(inside.abs().max()),
        f"max|a| at extrapolated positions [L, {factor}L)": float(beyond.abs().max()),
        "max interpolation error (measured)": err,
        "interpolation bound d max|h| / (32 ln base)": bound,
        "bound holds": err <= bound + 1e-12,
    }
    r["extrapolated max|a| / interpolation error"] = r[f"max|a| at extrapolated positions [L, {factor}L)"] / max(err, 1e-300)
    print(f"\n[{name}] d={d}, L={L}, base={base:g}")
    for k, v in r.items():
        print(f"  {k:48s} {v:.4g}" if isinstance(v, float) else f"  {k:48s} {v}")
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, default=128, help="d (LLaMA-7B: 4096 / 32 heads = 128)")
    p.add_argument("--window", type=int, default=2048, help="pretraining window L")
    p.add_argument("--base", type=float, default=10000.0)
    p.add_argument("--factor", type=int, default=4, help="how far beyond L to extrapolate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ridge", type=float, default=1e-6, help="ridge of the Figure 2 least-squares fit")
    p.add_argument("--checkpoint", help="also use h from the q/k of this HF LLaMA checkpoint (a local directory)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs",
                                                  "attention_score_bound.png"))
    args = p.parse_args(argv)
    d, L, base = args.head_dim, args.window, args.base
    if d < 2 or d % 2:
        p.error(f"--head-dim must be even and >= 2, got {d}")
    if L < 2 or not args.factor >= 1 or not math.isfinite(base) or base <= 1:
        p.error("--window must be >= 2, --factor >= 1 and --base finite and > 1")
    if not (math.isfinite(args.ridge) and args.ridge >= 0):
        p.error(f"--ridge must be finite and >= 0, got {args.ridge}")
    if args.checkpoint:  # a local directory only: nothing is downloaded from the hub
        here = os.path.dirname(os.path.abspath(__file__))
        if here not in sys.path:
            sys.path.insert(0, here)
        from finetune_pi import check_model_dir

        check_model_dir(args.checkpoint, "--checkpoint", p.error)

    ln = math.log(base)
    print(f"32 ln({base:g}) = {32 * ln:.2f}: interpolation bound = d max|h| / {32 * ln:.2f}")
    for dd in sorted({64, 128, d}):
        print(f"  d = {dd:4d}: d/(32 ln base) = {dd / (32 * ln):.4f} (x max|h_j|)")
    th = thetas(d, base)
    s_ext = torch.arange(L, args.factor * L, dtype=DTYPE)
    b = B(s_ext, th)
    print(f"extrapolation bound 2 max|h| B(s); B(s)/d over s in [L, {args.factor}L): min {float(b.min()) / d:.3f}, "
          f"mean {float(b.mean()) / d:.3f}, max {float(b.max()) / d:.3f}")
    print(f"ratio extrapolation / interpolation bound with B(s) = d: 2 * 32 ln base = {64 * ln:.1f} (paper: ~600x); "
          f"with the measured mean B(s): {2 * float(b.mean()) / (d / (32 * ln)):.1f}x")

    results = {}
    h_fit = fit_h(d, L, base, args.seed, args.ridge)
    results["fitted"] = report("h fitted to random scores in [-1, 1] on [0, L) (paper Fig. 2)", h_fit, d, L, base,
                               args.factor)
    g = torch.Generator().manual_seed(args.seed + 1)
    h_rand = torch.complex(torch.randn(d // 2, generator=g, dtype=DTYPE), torch.randn(d // 2, generator=g, dtype=DTYPE))
    h_rand = h_rand / h_rand.abs().max()
    results["random"] = report("random Gaussian h, max|h| = 1", h_rand, d, L, base, args.factor)
    ck = None
    if args.checkpoint:
        h_ck, dk, bk, Lk = checkpoint_h(args.checkpoint)
        ck = (h_ck, dk, bk, Lk)
        results["checkpoint"] = report(f"h = q conj(k) of {args.checkpoint} (layer 0, head 0)", h_ck, dk, Lk, bk,
                                       args.factor)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 3 + (ck is not None)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4))
    s_all = torch.arange(0, args.factor * L, dtype=DTYPE)
    ax = axes[0]
    ax.plot(s_all, score(h_fit, s_all, th), lw=0.6, color="tab:red")
    ax.axvline(L, color="k", ls="--", lw=0.8)
    ax.set_yscale("symlog")
    ax.set_title(f"fitted a(s): extrapolation beyond L={L}")
    ax.set_xlabel("relative position s")
    ax = axes[1]
    s_f = torch.arange(0, L, 0.25, dtype=DTYPE)
    ax.plot(s_f, score(h_fit, s_f, th), lw=0.6, color="tab:blue", label="fractional positions (PI)")
    s_i = torch.arange(0, L, dtype=DTYPE)
    ax.plot(s_i, score(h_fit, s_i, th), ".", ms=1, color="tab:red", label="integer positions")
    ax.set_title(f"interpolation inside [0, {L})")
    ax.set_xlabel("relative position s")
    ax.legend(fontsize=7)
    ax = axes[2]
    names = list(results)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [results[k]["max interpolation error (measured)"] for k in names], 0.4,
           label="measured max interpolation error")
    ax.bar([i + 0.2 for i in x], [results[k]["interpolation bound d max|h| / (32 ln base)"] for k in names], 0.4,
           label="bound d max|h| / (32 ln base)")
    ax.set_xticks(list(x), names)
    ax.set_yscale("log")
    ax.set_title("Theorem 2.1")
    ax.legend(fontsize=7)
    if ck is not None:
        h_ck, dk, bk, Lk = ck
        thk = thetas(dk, bk)
        ax = axes[3]
        s_e = torch.arange(0, args.factor * Lk, dtype=DTYPE)
        ax.plot(s_e, score(h_ck, s_e, thk), lw=0.8, color="tab:red", label="integer positions (extrapolation)")
        s_pi = torch.arange(0, args.factor * Lk, dtype=DTYPE) / args.factor
        ax.plot(s_pi * args.factor, score(h_ck, s_pi, thk), lw=0.8, color="tab:blue",
                label=f"PI: positions / {args.factor}")
        ax.axvline(Lk, color="k", ls="--", lw=0.8)
        ax.set_title("checkpoint q.k vs distance")
        ax.set_xlabel("token distance")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
