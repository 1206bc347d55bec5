"""A first, bounded run of one warp-specialised Hopper kernel (PIROPE_ATTENTION_SM90=ws_fwd
or ws_bwd) for benchmarks/gpu_check.sh: a few calls against the other Hopper kernels, in a
process the caller kills on a timeout, so that a hang (a wrong mbarrier phase never
completes) costs a minute of a GPU lease instead of the whole test step, and a broken
backward does not take the forward's results with it. Exit 0 when every output agrees;
the tests (tests/test_rope_attention_cuda.py) check both against float64. Not a pytest
module.

    python tests/cuda_ws_smoke.py fwd|bwd
"""

import os
import sys

import torch

import pirope


def run(variant, q, k, v, grad, causal, deterministic):
    os.environ["PIROPE_ATTENTION_SM90"] = variant
    d = q.shape[-1]
    inv_freq, _ = pirope.rope_frequencies(d, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = (t.cuda() for t in pirope.rope_cos_sin(inv_freq, q.shape[1]))
    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal, d ** -0.5, False)
    if grad is None:
        torch.cuda.synchronize()
        return (out, lse)
    grads = torch.ops.pirope.rope_attention_backward(grad, q, k, v, out, lse, cos, sin, None, causal, d ** -0.5,
                                                     False, deterministic)
    torch.cuda.synchronize()
    return (out, *grads)


def main(direction):
    worst = 0.0
    names = ("out", "lse") if direction == "fwd" else ("out", "dq", "dk", "dv")
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 64)):
        for causal in (True, False):
            for deterministic in (False, True) if direction == "bwd" else (False,):
                q = torch.randn(2, 1000, 8, d, device="cuda", dtype=dtype)
                k, v = (torch.randn(2, 1000, 2, d, device="cuda", dtype=dtype) for _ in range(2))
                grad = torch.randn_like(q) if direction == "bwd" else None
                got = run(f"ws_{direction}", q, k, v, grad, causal, deterministic)
                ref = run("1", q, k, v, grad, causal, deterministic)
                for name, a, b in zip(names, got, ref):
                    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
                    worst = max(worst, err if err == err else float("inf"))  # NaN counts as a failure
                    print(f"ws_{direction} {str(dtype):15} hd {d:3} causal {causal!s:5} det {deterministic!s:5} "
                          f"{name:3} rel diff {err:.1e}", flush=True)
    print(f"cuda_ws_smoke {direction}: worst rel diff {worst:.1e}")
    return 0 if worst < 5e-3 else 1


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("fwd", "bwd"):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
