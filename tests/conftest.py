import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# CUDA tests need a GPU and a pirope built with its CUDA kernels: on a GPU machine with a
# CPU-only build (PIROPE_FORCE_CUDA=0, or no nvcc) they are skipped, not failed by the
# "built without CUDA kernels" error that tests/test_build.py checks.
def cuda_ready() -> bool:
    import pirope  # noqa: PLC0415
    return torch.cuda.is_available() and pirope.build_info()["with_cuda"]


CUDA_SKIP_REASON = "needs a CUDA GPU and a pirope build with CUDA kernels"
DEVICES = ["cpu"] + (["cuda"] if cuda_ready() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_report_header(config):
    import pirope
    return f"pirope build: {pirope.build_info()}; devices: {DEVICES}"
