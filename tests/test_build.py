"""Build facts and the import-time check against the torch pirope was built with."""

import subprocess
import sys

import torch

import pirope


def test_build_info_reports_the_build():
    info = pirope.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["with_cuda"], bool)
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
    if info["with_cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]
    assert hasattr(torch.ops.pirope, "apply_rope_qk")


def test_cpu_kernels_are_built_multithreaded():
    # at::parallel_for only runs in parallel in code compiled with torch's backend:
    # without -fopenmp every CPU kernel silently ran on one thread.
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        assert pirope.build_info()["openmp"] is True


def test_import_with_another_torch_fails_with_rebuild_instructions():
    code = "import torch; torch.__version__ = '0.0.0+other'; import pirope"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "built against torch" in r.stderr and "pip install --no-build-isolation" in r.stderr


def test_cuda_tensors_without_cuda_build_give_a_clear_error(monkeypatch):
    import pytest

    from pirope import _extension

    monkeypatch.setitem(_extension.BUILD_INFO, "with_cuda", False)
    with pytest.raises(RuntimeError, match="apply_rope: got CUDA tensors but pirope was built without CUDA"):
        _extension.require_cuda_build(torch.device("cuda"), "apply_rope")
    _extension.require_cuda_build(torch.device("cpu"), "apply_rope")  # CPU is always fine


def test_error_messages_that_format_numbers_do_not_crash():
    # One toolchain (a standalone CPython whose g++ has only a static libstdc++) linked a
    # private copy of libstdc++ into the extension: the first error message formatting
    # an integer (a shape) then crashed the process. setup.py links the shared one; a
    # subprocess so that a crash fails this test instead of ending the session.
    code = ("import torch, pirope\n"
            "cos, sin = torch.ones(8, 32), torch.zeros(8, 32)\n"
            "try:\n"
            "    pirope.apply_rope(torch.zeros(16, 64), cos, sin)\n"
            "except RuntimeError as e:\n"
            "    print('raised:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "raised:" in r.stdout and "got shape [16, 64]" in r.stdout
