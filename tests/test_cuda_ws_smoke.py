"""The diagnostics of tests/cuda_ws_smoke.py (run by benchmarks/gpu_check.sh on a GPU): when
a warp-specialised kernel disagrees with the other Hopper kernels, the report must name the
tile, head, panel and batch the wrong entries lie in. Checked here on CPU tensors."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import cuda_ws_smoke as smoke  # noqa: E402


def test_spans_compresses_runs():
    assert smoke.spans([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert smoke.spans([3]) == "3"


def test_locate_names_the_tile_head_panel_and_batch_of_a_fault():
    ref = torch.randn(2, 1000, 8, 128)
    got = ref.clone()
    got[1, 130:190, 3, 40:50] += 1.0  # one head, rows of tiles 2, one 32-column panel
    report = smoke.locate("dq", got, ref, smoke.DIMS_BSHD)
    assert report.startswith(f"dq: {60 * 10} of {ref.numel()} entries off (0 NaN)"), report
    assert "batch 1 of 2" in report and "rows/64 2 of 16" in report, report
    assert "head 3 of 8" in report and "cols/32 1 of 4" in report, report


def test_locate_counts_nan_and_reads_lse_layout():
    ref = torch.randn(2, 8, 1000)
    got = ref.clone()
    got[0, 5, 960:] = float("nan")  # the sequence tail of one head: the last 64-row tile
    report = smoke.locate("lse", got, ref, smoke.DIMS_LSE)
    assert report.startswith("lse: 40 of 16000 entries off (40 NaN)"), report
    assert "batch 0 of 2, head 5 of 8, rows/64 15 of 16" in report, report


def test_locate_reports_agreement():
    ref = torch.randn(1, 65, 2, 64, dtype=torch.bfloat16)
    assert smoke.locate("out", ref.clone(), ref, smoke.DIMS_BSHD) == "out: no entry off"


def test_verdict_lets_gpu_check_fall_back_only_when_the_tma_dq_path_alone_fails():
    ok, bad = smoke.LIMIT / 2, smoke.LIMIT * 2
    assert smoke.verdict({"-": ok}) == 0
    assert smoke.verdict({"tma": ok, "atomic": ok, "deterministic": ok}) == 0
    assert smoke.verdict({"tma": bad, "atomic": ok, "deterministic": ok}) == 2
    assert smoke.verdict({"tma": float("nan"), "atomic": ok, "deterministic": ok}) == 2
    assert smoke.verdict({"tma": bad, "atomic": bad, "deterministic": ok}) == 1
    assert smoke.verdict({"tma": ok, "atomic": ok, "deterministic": bad}) == 1
    assert smoke.verdict({"-": bad}) == 1


def test_wrong_kernels_catches_a_silent_fallback_to_the_wgmma_kernel():
    ws_fwd = "void pirope::cuda::rope_attention_fwd_sm90_ws_kernel<__nv_bfloat16, 128>(CUtensorMap, ...)"
    fwd = "void pirope::cuda::rope_attention_fwd_sm90_kernel<__nv_bfloat16, 128>(pirope::AttentionParams)"
    rotate = "void pirope::cuda::rotate_rows_kernel<__nv_bfloat16>(...)"
    assert smoke.wrong_kernels("fwd", {ws_fwd, rotate}, {fwd, rotate}) is None
    fallback = smoke.wrong_kernels("fwd", {fwd, rotate}, {fwd, rotate})  # TMA encode failed: same kernel twice
    assert fallback is not None and "ws_fwd run" in fallback and "reference" not in fallback
    assert "reference run" in smoke.wrong_kernels("fwd", {ws_fwd}, {ws_fwd})
    assert smoke.wrong_kernels("fwd", {ws_fwd}, set()) is not None  # nothing ran (not a Hopper build)


def test_wrong_kernels_tells_the_backward_kernels_from_the_forward_ones():
    # the backward runs its forward on the wgmma kernel in both runs: only dkdv decides
    fwd = "rope_attention_fwd_sm90_kernel<T, 64>"
    ws_dkdv = "rope_attention_bwd_dkdv_sm90_ws_kernel<T, 64, true, true>"
    dkdv = "rope_attention_bwd_dkdv_sm90_kernel<T, 64>"
    assert smoke.wrong_kernels("bwd", {fwd, ws_dkdv}, {fwd, dkdv}) is None
    assert smoke.wrong_kernels("bwd", {fwd, dkdv}, {fwd, dkdv}) is not None
    assert smoke.wrong_kernels("bwd", {fwd, ws_dkdv, dkdv}, {fwd, dkdv}) is not None  # both: which one was measured?
