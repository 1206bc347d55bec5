"""Build pirope._C against the installed torch.

    pip install --no-build-isolation .        # or -e . for development

Environment:
    PIROPE_FORCE_CUDA=1   build the CUDA kernels even if torch/nvcc detection says no
    PIROPE_FORCE_CUDA=0   CPU-only build even when CUDA is available
    TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0a"; 9.0a adds the Hopper kernels)
    MAX_JOBS              parallel compile jobs (ninja)
    PIROPE_CPU_ISA        "auto" (default: AVX2+FMA when the build machine has them)
                          or "default" (portable build)
    PIROPE_OPT_LEVEL      the host compiler's -O level (default 3; 1 compiles in 30% less
                          time, for development: its float32 results round differently)
    PIROPE_SANITIZE       e.g. "address,undefined": build the C++ code with those
                          sanitizers (see tests/sanitize.sh)
"""

import glob
import os
import shutil
import sys

import setuptools
from setuptools import setup

# pyproject.toml's license is an SPDX string (PEP 639), which older setuptools reject
# with a configuration error that does not say what to do (python -m venv still ships 65).
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"pirope: building needs setuptools >= 77, found {setuptools.__version__}: "
             "pip install -U 'setuptools>=77' (or pip install -r requirements-dev.txt), then rebuild")

try:
    import torch
    from torch.utils import cpp_extension
except ModuleNotFoundError:  # pip's isolated build environment has no torch
    sys.exit("pirope builds against the torch already installed, which this build cannot import "
             f"({sys.executable}). Install torch first, then build without pip's isolated "
             "environment: pip install --no-build-isolation .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    force = os.environ.get("PIROPE_FORCE_CUDA")
    if force is not None and force.strip() != "":
        return force.strip() not in ("0", "false", "False", "no")
    nvcc = find_cuda_home() is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and nvcc


def find_cuda_home():
    """The CUDA toolkit: $CUDA_HOME, $CUDA_PATH or /usr/local/cuda, before torch's
    guess from the nvcc on PATH (which is wrong when nvcc is a wrapper script)."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return cpp_extension.CUDA_HOME


def pip_cuda_includes():
    """Headers of the CUDA libraries that torch's CUDA wheel ships (cuBLAS, cuSPARSE,
    ...), which ATen's CUDA headers include and a minimal toolkit may lack. Added as
    system includes, searched after the toolkit's own."""
    dirs = []
    for path in torch.__path__:
        site = os.path.dirname(path)
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return dirs


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def loaded_libstdcxx():
    """Path of the libstdc++ this process runs on (loaded by torch), or None.

    Linked by path, it binds pirope's C++ runtime calls to the library torch uses. Some
    Python builds' toolchains (seen: a standalone CPython whose g++ lives in /opt/gcc)
    otherwise link a static copy of libstdc++ into the extension; its locale state then
    differs from the shared one, and formatting an integer into an error message (every
    TORCH_CHECK that prints a shape) crashed the process."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


def opt_level() -> str:
    """-O<PIROPE_OPT_LEVEL>, -O3 unless set."""
    level = os.environ.get("PIROPE_OPT_LEVEL", "").strip() or "3"
    if level not in ("0", "1", "2", "3", "s", "g"):
        sys.exit(f"pirope: PIROPE_OPT_LEVEL must be 0, 1, 2, 3, s or g (the N of -ON), got {level!r}")
    return f"-O{level}"


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    with_cuda = want_cuda()
    sources = rel(glob.glob(os.path.join(ROOT, "csrc/pirope/*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc/pirope/cpu/*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc/pirope/autograd/*.cpp")))
    # TORCH_ASSERT_ONLY_METHOD_OPERATORS: the per-operator headers (ATen/ops/*.h) only,
    # never ATen/ATen.h's every op (as in PyTorch itself; a third off each file's compile).
    # -g0: no debug info (Python's CFLAGS add -g: 30% of the C++ compile time, for a
    # release build nobody steps through; the sanitizer build below keeps line tables).
    common = [opt_level(), "-std=c++20", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS",
              f'-DPIROPE_TORCH_VERSION="{torch.__version__}"']
    cxx = common + ["-g0", "-Wno-unknown-pragmas"]
    nvcc = common + ["--use_fast_math", "-lineinfo"]
    isa = os.environ.get("PIROPE_CPU_ISA", "auto")
    if isa == "auto" and cpu_has_avx2():
        # Built from source for this machine, like -march=native but limited to what
        # ATen's AVX2 kernels assume; PIROPE_CPU_ISA=default gives a portable build.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    link = []
    libstdcxx = loaded_libstdcxx() if sys.platform.startswith("linux") else None
    if libstdcxx:
        link.append(libstdcxx)
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is a header template: without -fopenmp its "#pragma omp
        # parallel" compiles to nothing and every CPU kernel runs on one thread.
        # (GCC/Clang on Linux; Apple's clang has no plain -fopenmp.)
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    sanitize = os.environ.get("PIROPE_SANITIZE", "").strip()
    if sanitize:
        flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
        # -O1 and line tables only (-g1): what the sanitizers' docs advise, enough for
        # symbolised reports, and a third of the compile time of -O3 -g (these flags come
        # after the -O level above and Python's -g, so they win).
        cxx += flags + ["-O1", "-g1"]
        link += flags
    if with_cuda:
        cpp_extension.CUDA_HOME = find_cuda_home()
        for inc in pip_cuda_includes():
            nvcc += ["-isystem", inc]
            cxx += ["-isystem", inc]  # cuda/*.cpp: the host-only dispatchers include ATen's CUDA headers
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        # the kernels (.cu) and their host-only dispatchers (.cpp: one host compile instead of
        # nvcc's three passes over torch's headers; see cuda/rope_attention_launch.h)
        sources += rel(glob.glob(os.path.join(ROOT, "csrc/pirope/cuda/*.cu")))
        sources += rel(glob.glob(os.path.join(ROOT, "csrc/pirope/cuda/*.cpp")))
        defs = ["-DPIROPE_WITH_CUDA", f'-DPIROPE_CUDA_VERSION="{torch.version.cuda}"',
                f'-DPIROPE_CUDA_ARCHS="{archs}"']
        if "9.0a" in archs.replace(" ", ";").split(";"):
            defs.append("-DPIROPE_CUDA_SM90A")  # the Hopper (wgmma) attention kernels
        cxx += defs
        nvcc += defs
        ext = cpp_extension.CUDAExtension(
            "pirope._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension("pirope._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    return [ext]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
