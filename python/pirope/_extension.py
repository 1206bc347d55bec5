"""Loads pirope._C (which registers torch.ops.pirope.*) and checks how it was built."""

import torch

_REBUILD = (
    "Rebuild pirope against the installed torch from the source checkout with\n"
    "    pip install --no-build-isolation .\n"
    "(add -e for a development install)."
)


def _built_copies_elsewhere(here: str) -> list[str]:
    """Other pirope packages on sys.path that have their compiled extension."""
    import glob  # noqa: PLC0415
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    found = []
    for entry in sys.path:
        package = os.path.abspath(os.path.join(entry or os.curdir, "pirope"))
        if package != here and package not in found and glob.glob(os.path.join(package, "_C*.so")):
            found.append(package)
    return found


def _load():
    import importlib.util  # noqa: PLC0415
    import os  # noqa: PLC0415
    if importlib.util.find_spec("pirope._C") is None:  # never compiled (e.g. a bare source checkout)
        here = os.path.dirname(os.path.abspath(__file__))
        built = _built_copies_elsewhere(here)
        if built:  # e.g. PYTHONPATH=python after pip install: the checkout shadows the install
            raise ImportError(
                f"pirope's compiled extension pirope._C is not built in {here}, the copy imported, "
                f"while a built pirope is installed at {built[0]}: this copy comes first on sys.path "
                "(PYTHONPATH or the current directory). Run without it (e.g. drop python/ from "
                "PYTHONPATH, or run from another directory), or build this copy in place with "
                "python setup.py build_ext --inplace.")
        raise ImportError(
            f"pirope's compiled extension pirope._C is not built: no pirope/_C*.so next to "
            f"{here}. Build it with\n"
            "    pip install --no-build-isolation .\n"
            "or, to import from this source checkout, python setup.py build_ext --inplace "
            "(then PYTHONPATH=python).")
    try:
        from pirope import _C  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            f"pirope's compiled extension pirope._C could not be loaded ({e}). It is "
            f"built against one torch version; this Python has torch {torch.__version__}. "
            + _REBUILD
        ) from e
    info = dict(_C.build_info())
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"pirope._C was built against torch {info['torch_version']} but torch "
            f"{torch.__version__} is installed; the binary interface differs between "
            "versions. " + _REBUILD
        )
    return _C, info


_C, BUILD_INFO = _load()


def build_info() -> dict:
    """How the extension was built: torch version, CUDA on/off, CUDA version and
    architectures, CPU vector ISA, whether the CPU kernels use OpenMP threads."""
    return dict(BUILD_INFO)


def cpu_gemm() -> dict:
    """The tile products ``rope_attention`` uses on this CPU now, per input dtype name:
    ``"avx512_bf16"`` (bfloat16 operands, AVX512-BF16), ``"avx512"`` (float32 operands,
    AVX512F) or ``"blas"`` (torch's BLAS; always for float64). The environment variable
    ``PIROPE_CPU_GEMM`` (``auto``, ``avx512`` or ``blas``) rules the faster ones out;
    ``portable`` runs the AVX512 paths (their packed operands, backward split over
    threads and bfloat16 rounding) with plain C++ products on any CPU, several times
    slower, for testing: ``"portable"`` and ``"portable_bf16"``."""
    return dict(_C.cpu_gemm())


def require_cuda_build(device: torch.device, op: str) -> None:
    """Clear error for CUDA tensors when the extension was built without CUDA."""
    if device.type == "cuda" and not BUILD_INFO["with_cuda"]:
        raise RuntimeError(
            f"{op}: got CUDA tensors but pirope was built without CUDA kernels. "
            "Install a CUDA build of torch and nvcc, then rebuild with "
            "PIROPE_FORCE_CUDA=1 pip install --no-build-isolation ."
        )
