// The pybind11 module pirope._C. Importing it loads the library, which registers
// every op under torch.ops.pirope; the module itself reports how it was built so
// Python can refuse to run against a different torch than it was compiled for.
#include <torch/csrc/utils/pybind.h>

#include "apply_rope.h"
#include "cpu/avx512_gemm.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pirope C++/CUDA kernels (ops live under torch.ops.pirope)";
  m.def(
      "build_info",
      [] {
        const pirope::BuildInfo b = pirope::build_info();
        pybind11::dict d;
        d["torch_version"] = b.torch_version;
        d["with_cuda"] = b.with_cuda;
        d["cuda_version"] = b.cuda_version;
        d["cuda_archs"] = b.cuda_archs;
        d["cpu_capability"] = b.cpu_capability;
        d["openmp"] = b.openmp;
        return d;
      },
      "How this extension was built: torch version, CUDA on/off, CUDA version and "
      "architectures, CPU vector ISA, OpenMP (CPU kernels multi-threaded).");
  m.def(
      "check_rope_inplace",
      [](const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
         const at::Tensor& sin, const std::optional<at::Tensor>& position_ids) {
        if (k.has_value())
          pirope::check_inplace_targets("apply_rope_qk", "q", q, "k", &*k, cos, sin, position_ids);
        else
          pirope::check_inplace_targets("apply_rope", "x", q, "", nullptr, cos, sin, position_ids);
      },
      pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("cos"), pybind11::arg("sin"),
      pybind11::arg("position_ids") = pybind11::none(),
      "Raises RuntimeError unless q and k (or, with k None, x = q) can be rotated in place "
      "(no element shared within or between them, none with cos, sin or position_ids), as "
      "apply_rope_qk(..., inplace=True) (apply_rope) requires.");
  m.def(
      "cpu_gemm",
      [] {
        namespace avx = pirope::cpu::avx512;
        const std::string packed = avx::portable() ? "portable" : "avx512";
        const std::string f32 = avx::enabled<float>() ? packed : "blas";
        pybind11::dict d;
        d["float64"] = "blas";
        d["float32"] = f32;
        d["float16"] = f32;
        d["bfloat16"] = avx::enabled<c10::BFloat16>() ? packed + "_bf16" : f32;
        return d;
      },
      "The tile products rope_attention on CPU uses now, per input dtype: 'avx512_bf16' "
      "(bfloat16 operands), 'avx512' (float32 operands) or 'blas' (torch's BLAS). "
      "PIROPE_CPU_GEMM=blas or =avx512 rules out the faster ones; =portable runs the "
      "AVX512 paths in plain C++ ('portable', 'portable_bf16'), on any CPU.");
}
