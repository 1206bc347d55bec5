"""Where the time of one fused rope_attention forward + backward goes, kernel by kernel
(torch.profiler's CUDA times, averaged over --iters steps), atomic and deterministic
backward side by side. The counterpart of bench_attention_gpu.py for deciding what to
speed up next.

    python benchmarks/profile_attention_gpu.py --seqlen 16384 --heads 32/8
    ncu --kernel-name regex:dkdv --launch-count 1 python benchmarks/profile_attention_gpu.py --plain
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import head_dim, heads_pair, positive_int, require_cuda  # noqa: E402

import pirope  # noqa: E402


def short(name: str) -> str:
    """A kernel's name without template arguments and namespaces."""
    plain = name.replace("(anonymous namespace)", "anon").removeprefix("void ")
    base = re.sub(r"<.*", "", plain.split("(")[0]).split("::")[-1].strip()
    return (base or name)[:60]


def main():
    os.environ["PIROPE_CUDA_ATTENTION"] = "1"  # the fused kernels are opt-in
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=positive_int, default=16384)
    ap.add_argument("--tokens", type=positive_int, default=16384, help="batch x seqlen")
    ap.add_argument("--heads", default="32/8", type=heads_pair)
    ap.add_argument("--headdim", type=head_dim, default=128)
    ap.add_argument("--causal", type=int, default=1, choices=(0, 1))
    ap.add_argument("--iters", type=positive_int, default=5)
    ap.add_argument("--plain", action="store_true",
                    help="one step per mode, no torch.profiler (to run under ncu or nsys)")
    args = ap.parse_args()
    require_cuda(ap)
    hq, hkv = map(int, args.heads.split("/"))
    batch, s, d = max(1, args.tokens // args.seqlen), args.seqlen, args.headdim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for h in (hq, hkv, hkv))
    grad = torch.randn(batch, s, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    inv_freq, _ = pirope.rope_frequencies(d, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = (t.cuda() for t in pirope.rope_cos_sin(inv_freq, s))
    print(f"{torch.cuda.get_device_name()}, batch {batch} x seqlen {s}, heads {hq}/{hkv} x {d}, "
          f"causal {bool(args.causal)}, bfloat16; CUDA ms per forward + backward step")
    for deterministic in (False, True):
        def step():
            out = pirope.rope_attention(q, k, v, cos, sin, causal=bool(args.causal), deterministic=deterministic)
            # into fresh gradients: accumulating into the last step's would add kernels of its own
            torch.autograd.grad(out, (q, k, v), grad)

        if args.plain:
            step()
            torch.cuda.synchronize()
            continue
        for _ in range(2):  # warm-up
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
        times = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[short(e.name)] += e.device_time / 1e3 / args.iters
        total = sum(times.values())
        print(f"\ndeterministic={deterministic}: {total:.3f} ms")
        for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
