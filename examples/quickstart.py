"""Position Interpolation on LLaMA-7B-shaped queries and keys, in a few lines.

    python examples/quickstart.py [--seqlen 8192] [--device cuda]

A LLaMA-7B layer has 32 query heads and (LLaMA-2 70B style GQA: 8) key heads of dim
128. We extend a 2k model to 8k with PI (positions divided by 4), rotate q and k with
pirope's fused op, check the result against a float64 reference, and time it against
the Hugging Face eager path (rotate_half) that LLaMA code runs today.
"""

import argparse
import time

import torch

import pirope


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


PRETRAINED_WINDOW = 2048  # LLaMA's; PI's factor is seqlen / PRETRAINED_WINDOW


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=8192,
                   help=f"extended window, >= {PRETRAINED_WINDOW} (the 2k model's window; PI factor = seqlen / 2048)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dev, seqlen = args.device, args.seqlen
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:  # no such device here (e.g. --device cuda on a CPU machine)
        p.error(f"--device {dev!r} is not usable here: {str(e).splitlines()[0]}")
    if seqlen < PRETRAINED_WINDOW:
        p.error(f"--seqlen must be >= {PRETRAINED_WINDOW} (Position Interpolation extends the pretrained "
                f"{PRETRAINED_WINDOW}-token window), got {seqlen}")
    torch.manual_seed(0)

    # 1. The PI frequency table: a model pretrained at 2048 tokens, extended 4x to 8192.
    inv_freq, attn_factor = pirope.rope_frequencies(
        128, scaling={"rope_type": "linear", "factor": seqlen / PRETRAINED_WINDOW})
    cos, sin = pirope.rope_cos_sin(inv_freq, seqlen, attn_factor)  # float32 (seqlen, 64)
    cos, sin = cos.to(dev), sin.to(dev)

    # 2. Rotate LLaMA-7B-shaped q (32 heads) and GQA k (8 heads) in one fused call.
    q = torch.randn(1, seqlen, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, seqlen, 8, 128, device=dev, dtype=torch.bfloat16)
    q_rot, k_rot = pirope.apply_rope_qk(q, k, cos, sin)

    # 3. Check against float64 math: angle(m, i) = (m / factor) * theta_i.
    theta = 10000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ang = (torch.arange(seqlen, dtype=torch.float64) / (seqlen / PRETRAINED_WINDOW))[:, None] * theta
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = q.double().cpu()[..., :64], q.double().cpu()[..., 64:]
    ref = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    err = (q_rot.double().cpu() - ref).abs().max().item()
    print(f"max |pirope - float64 reference| = {err:.2e} (bfloat16 rounding: ~{2**-8:.1e} x |value|)")
    assert err < 0.05, "apply_rope_qk disagrees with the float64 reference"

    # 4. Time it against Hugging Face's eager path on the same bytes.
    cos_hf = torch.cat((cos, cos), -1)[None].to(q.dtype).unsqueeze(1)  # (1, 1, S, 128)
    sin_hf = torch.cat((sin, sin), -1)[None].to(q.dtype).unsqueeze(1)
    q_hf, k_hf = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()

    def hf():
        return q_hf * cos_hf + rotate_half(q_hf) * sin_hf, k_hf * cos_hf + rotate_half(k_hf) * sin_hf

    def ours():
        return pirope.apply_rope_qk(q, k, cos, sin)

    def timed(fn, n=10):
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e3

    t_hf, t_ours = timed(hf), timed(ours)
    print(f"seqlen {seqlen}, q 32x128, k 8x128, bfloat16 on {dev}: "
          f"Hugging Face eager {t_hf:.2f} ms, pirope {t_ours:.2f} ms ({t_hf / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
