"""Every CUDA kernel of pirope once, on small awkward shapes, for compute-sanitizer
(memcheck / racecheck / synccheck) to watch: one process, so the sanitizer pays torch's
start-up once. Not a pytest module (no assertions of values: the tests do that).

    compute-sanitizer --tool memcheck python tests/cuda_sanitize_cases.py [--quick]
"""

import os
import sys

import torch

import pirope


def tables(rotary_dim, n):
    inv_freq, _ = pirope.rope_frequencies(rotary_dim, scaling={"rope_type": "linear", "factor": 4.0})
    return tuple(t.cuda() for t in pirope.rope_cos_sin(inv_freq, n))


def rotary_cases():
    for dtype in (torch.float32, torch.bfloat16):
        for head_dim, rotary in ((128, 128), (80, 40), (66, 20)):
            cos, sin = tables(rotary, 64)
            for offset in (0, 1):
                buf = torch.randn(2 * 33 * 5 * head_dim + offset, device="cuda", dtype=dtype)
                x = buf[offset:].view(2, 33, 5, head_dim).requires_grad_()
                for interleaved in (False, True):
                    out = pirope.apply_rope(x, cos, sin, interleaved=interleaved)
                    out.sum().backward()
                k = torch.randn(2, 33, 1, head_dim, device="cuda", dtype=dtype)
                pos = torch.randint(0, 64, (2, 33), device="cuda")
                pirope.apply_rope_qk(x.detach().clone(), k, cos, sin, pos, inplace=True)
    cos, sin = tables(64, 16)
    pos = torch.tensor([[0, 1, 99, 3]], device="cuda")
    pirope.apply_rope(torch.randn(1, 4, 3, 64, device="cuda"), cos, sin, pos)


def attention_cases(quick):
    for dtype in (torch.float16,) if quick else (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):
            for seqlen in (70,) if quick else (1, 70, 129):
                for causal in (True, False):
                    q = torch.randn(2, seqlen, 4, head_dim, device="cuda", dtype=dtype)
                    k, v = (torch.randn(2, seqlen, 2, head_dim, device="cuda", dtype=dtype) for _ in range(2))
                    cos, sin = tables(head_dim, seqlen)
                    out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, causal,
                                                               head_dim ** -0.5, False)
                    grad = torch.randn_like(out)
                    for deterministic in (False, True):
                        torch.ops.pirope.rope_attention_backward(grad, q, k, v, out, lse, cos, sin, None,
                                                                 causal, head_dim ** -0.5, False,
                                                                 deterministic)
    q, k, v = (torch.randn(1, 70, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    cos, sin = tables(32, 4096)  # partial rotary, explicit positions incl. one out of range
    pos = torch.randint(0, 4096, (1, 70), device="cuda")
    pos[0, 65] = 5000
    torch.ops.pirope.rope_attention(q, k, v, cos, sin, pos, True, 0.125, True)


if __name__ == "__main__":
    quick = "--quick" in sys.argv  # racecheck is slow: fewer shapes
    if not quick:
        rotary_cases()
    # On sm_90 with a 9.0a build: the wgmma kernels, then the warp-specialised TMA ones
    # (elsewhere both runs take the mma.sync kernels; the pre-pass loop below too).
    ws = os.environ.get("PIROPE_WS_VARIANT", "ws")  # gpu_check.sh: what its bounded runs passed
    for variant in ("1", ws) if ws != "skip" else ("1",):
        os.environ["PIROPE_ATTENTION_SM90"] = variant
        attention_cases(quick)
    os.environ.pop("PIROPE_ATTENTION_SM90")
    for prepass in ("0", "1"):  # q, k rotated on load, and by the pre-pass
        os.environ["PIROPE_ATTENTION_K_PREPASS"] = prepass
        q, k, v = (torch.randn(1, 200, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cos, sin = tables(128, 200)
        out, lse = torch.ops.pirope.rope_attention(q, k, v, cos, sin, None, True, 0.1, False)
        for deterministic in (False, True):
            torch.ops.pirope.rope_attention_backward(torch.randn_like(out), q, k, v, out, lse, cos, sin, None,
                                                     True, 0.1, False, deterministic)
    torch.cuda.synchronize()
    print("cuda_sanitize_cases: done")
