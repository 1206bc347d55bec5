"""Build facts and the import-time check against the torch pirope was built with."""

import os
import subprocess
import sys

import pytest
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


def source_checkout():
    """The source tree these tests run from (setup.py beside tests/), or the test skips."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "setup.py")):
        pytest.skip("needs the source checkout")
    return root


def test_build_outside_the_installed_torch_says_what_to_do(tmp_path):
    # pip's default isolated build has no torch: say --no-build-isolation, not just
    # "No module named 'torch'"
    root = source_checkout()
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")")
    r = subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0 and "pip install --no-build-isolation" in r.stderr, r.stderr[-1000:]


@pytest.mark.parametrize("level", ["fast", "-O2", "4"])
def test_a_bad_optimisation_level_is_refused_by_name(level):
    root = source_checkout()
    r = subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PIROPE_OPT_LEVEL": level})
    assert r.returncode != 0 and "PIROPE_OPT_LEVEL must be 0, 1, 2, 3, s or g" in r.stderr, r.stderr[-1000:]
    assert repr(level) in r.stderr


def test_import_of_an_unbuilt_checkout_says_to_build(tmp_path):
    # a source tree whose extension was never compiled: say so, not "another torch"
    import shutil
    pkg = os.path.join(os.path.dirname(pirope.__file__))
    shutil.copytree(pkg, tmp_path / "pirope", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    r = subprocess.run([sys.executable, "-c", "import pirope"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0
    assert "pirope._C is not built" in r.stderr and "build_ext --inplace" in r.stderr


def test_import_of_an_unbuilt_checkout_shadowing_a_built_install_says_so(tmp_path):
    # PYTHONPATH=python after pip install: the checkout (no _C) hides the installed package
    import shutil
    pkg = os.path.join(os.path.dirname(pirope.__file__))
    shutil.copytree(pkg, tmp_path / "checkout" / "pirope", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    installed = tmp_path / "site" / "pirope"
    installed.mkdir(parents=True)
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")  # found, never loaded
    path = os.pathsep.join([str(tmp_path / "checkout"), str(tmp_path / "site")])
    r = subprocess.run([sys.executable, "-c", "import pirope"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": path})
    assert r.returncode != 0
    assert f"a built pirope is installed at {installed}" in r.stderr, r.stderr[-2000:]
    assert "PYTHONPATH" in r.stderr and "build_ext --inplace" in r.stderr


def test_sdist_carries_every_source_header_and_cmake_file(tmp_path):
    # setuptools alone leaves headers (.h, .cuh) and CMakeLists.txt out: MANIFEST.in
    import tarfile
    root = source_checkout()
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (sdist,) = tmp_path.glob("pirope-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {"CMakeLists.txt", "pyproject.toml", "setup.py", "README.md", "python/pirope/py.typed"}
    for top in ("csrc", "tests/cpp", "python/pirope", "cmake"):
        for d, _, files in os.walk(os.path.join(root, top)):
            wanted |= {os.path.relpath(os.path.join(d, f), root) for f in files
                       if f.endswith((".h", ".cuh", ".cpp", ".cu", ".py", ".cmake", ".in"))
                       or f == "CMakeLists.txt"}
    assert not wanted - names, sorted(wanted - names)
