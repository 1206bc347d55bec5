"""A first, bounded run of the warp-specialised Hopper kernels (PIROPE_ATTENTION_SM90=ws)
for benchmarks/gpu_check.sh: a few forward + backward calls against the other Hopper
kernels, in a process the caller can kill on a timeout, so that a hang (a wrong
mbarrier phase never completes) costs seconds of a GPU lease instead of the whole test
step. Exit 0 when every output agrees; the tests (tests/test_rope_attention_cuda.py)
check both against float64. Not a pytest module.

    python tests/cuda_ws_smoke.py
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
    grads = torch.ops.pirope.rope_attention_backward(grad, q, k, v, out, lse, cos, sin, None, causal, d ** -0.5,
                                                     False, deterministic)
    torch.cuda.synchronize()
    return (out, *grads)


def main():
    worst = 0.0
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 64)):
        for causal in (True, False):
            for deterministic in (False, True):
                q = torch.randn(2, 1000, 8, d, device="cuda", dtype=dtype)
                k, v = (torch.randn(2, 1000, 2, d, device="cuda", dtype=dtype) for _ in range(2))
                grad = torch.randn_like(q)
                got = run("ws", q, k, v, grad, causal, deterministic)
                ref = run("1", q, k, v, grad, causal, deterministic)
                for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
                    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
                    worst = max(worst, err if err == err else float("inf"))  # NaN counts as a failure
                    print(f"{str(dtype):15} hd {d:3} causal {causal!s:5} det {deterministic!s:5} {name:3} "
                          f"rel diff {err:.1e}", flush=True)
    print(f"cuda_ws_smoke: worst rel diff {worst:.1e}")
    return 0 if worst < 5e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
