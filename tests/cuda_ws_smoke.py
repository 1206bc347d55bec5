"""A first, bounded run of one warp-specialised Hopper kernel (PIROPE_ATTENTION_SM90=ws_fwd
or ws_bwd) for benchmarks/gpu_check.sh: a few calls against the other Hopper kernels, in a
process the caller kills on a timeout, so that a hang (a wrong mbarrier phase never
completes) costs a minute of a GPU lease instead of the whole test step, and a broken
backward does not take the forward's results with it. Exit 0 when every output agrees;
the tests (tests/test_rope_attention_cuda.py) check both against float64. The backward runs
each dQ path (PIROPE_WS_DQ=tma, atomic; the deterministic mode) and exits 2 when only the
TMA-reduction one fails. torch.profiler checks that each run took the kernel it is meant to
measure: the launcher falls back silently to the wgmma kernel when a TMA descriptor cannot be
encoded, and the comparison would then pass by comparing that kernel with itself. Not a
pytest module.

    python tests/cuda_ws_smoke.py fwd|bwd
"""

import os
import sys

import torch

import pirope

LIMIT = 5e-3  # relative difference from the other Hopper kernels (same math, same tile order)

# The kernel each direction's variants must launch (names in rope_attention_*_sm90*.cuh).
KERNELS = {"fwd": "rope_attention_fwd_sm90", "bwd": "rope_attention_bwd_dkdv_sm90"}


def launched(fn):
    """fn()'s result and the names of the CUDA kernels it launched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    return result, {e.key for e in prof.key_averages()}


def wrong_kernels(direction, ws_names, ref_names):
    """Why the two runs did not take the kernels they are compared as (None when they did):
    the ws run must launch the warp-specialised kernel and not the wgmma one; the
    reference run the wgmma kernel and not the warp-specialised one."""
    ws, plain = KERNELS[direction] + "_ws_kernel", KERNELS[direction] + "_kernel"
    has = lambda names, kernel: any(kernel in n for n in names)  # noqa: E731 - demangled names hold it
    problems = []
    if not has(ws_names, ws) or has(ws_names, plain):
        problems.append(f"ws_{direction} run launched {sorted(ws_names)}, not {ws} alone (a silent fallback?)")
    if not has(ref_names, plain) or has(ref_names, ws):
        problems.append(f"reference run launched {sorted(ref_names)}, not {plain} alone")
    return "; ".join(problems) or None


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


# Dimensions of the compared tensors: (name, group) per dim, so that a mismatch is named by
# the 64-row tile, the head and the 32-column panel (one TMA box of float32, half of one of
# 2-byte elements) it lies in.
DIMS_BSHD = (("batch", 1), ("rows/64", 64), ("head", 1), ("cols/32", 32))
DIMS_LSE = (("batch", 1), ("head", 1), ("rows/64", 64))


def spans(indices):
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def locate(name, got, ref, dims):
    """For a failed comparison: which tiles, heads, panels and batches hold entries of got
    that are NaN or off by more than 2% of ref's mean magnitude, so that the GPU run that
    finds a fault also shows where it is (a whole head: TMA coordinates; one panel in
    every tile: a swizzle or box; the last tile only: the sequence tail)."""
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    bad = ~((got - ref).abs() <= 0.02 * ref.abs().mean() + 1e-3)  # NaN compares false: bad
    if not bad.any():
        return f"{name}: no entry off"
    where = []
    for axis, (label, group) in enumerate(dims):
        hit = bad.movedim(axis, 0).reshape(bad.shape[axis], -1).any(dim=1)
        blocks = sorted({i // group for i in torch.nonzero(hit).flatten().tolist()})
        where.append(f"{label} {spans(blocks)} of {-(-bad.shape[axis] // group)}")
    return (f"{name}: {int(bad.sum())} of {bad.numel()} entries off ({int(torch.isnan(got).sum())} NaN) in "
            + ", ".join(where))


def main(direction):
    """0: every output agrees; 2 (backward only): all but the TMA-reduction dQ path agree,
    so the caller may go on with PIROPE_WS_DQ=atomic; 1: anything else."""
    worst = {}  # per dQ path: "tma" (the default), "atomic", "deterministic"; "-" forward
    names = ("out", "lse") if direction == "fwd" else ("out", "dq", "dk", "dv")
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 64)):
        for causal in (True, False):
            for dq in ("tma", "atomic", "deterministic") if direction == "bwd" else ("-",):
                os.environ["PIROPE_WS_DQ"] = dq if dq in ("tma", "atomic") else ""
                deterministic = dq == "deterministic"
                q = torch.randn(2, 1000, 8, d, device="cuda", dtype=dtype)
                k, v = (torch.randn(2, 1000, 2, d, device="cuda", dtype=dtype) for _ in range(2))
                grad = torch.randn_like(q) if direction == "bwd" else None
                got, ws_names = launched(lambda: run(f"ws_{direction}", q, k, v, grad, causal, deterministic))
                ref, ref_names = launched(lambda: run("1", q, k, v, grad, causal, deterministic))
                why = wrong_kernels(direction, ws_names, ref_names)
                if why is not None:
                    print(f"ws_{direction} {str(dtype):15} hd {d:3} causal {causal!s:5} dq {dq:13} WRONG KERNEL: {why}",
                          flush=True)
                    worst[dq] = float("inf")
                for name, a, b in zip(names, got, ref):
                    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
                    err = err if err == err else float("inf")  # NaN counts as a failure
                    worst[dq] = max(worst.get(dq, 0.0), err)
                    print(f"ws_{direction} {str(dtype):15} hd {d:3} causal {causal!s:5} dq {dq:13} "
                          f"{name:3} rel diff {err:.1e}", flush=True)
                    if not err < LIMIT:
                        print("  " + locate(name, a, b, DIMS_LSE if name == "lse" else DIMS_BSHD), flush=True)
    print(f"cuda_ws_smoke {direction}: worst rel diff " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return verdict(worst)


def verdict(worst):
    """The exit code of main from the worst relative difference of each dQ path."""
    failed = {k for k, v in worst.items() if not v < LIMIT}  # NaN fails
    if not failed:
        return 0
    if failed == {"tma"} and "atomic" in worst:
        print("cuda_ws_smoke bwd: only the TMA-reduction dQ path failed; PIROPE_WS_DQ=atomic passed")
        return 2
    return 1


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("fwd", "bwd"):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
