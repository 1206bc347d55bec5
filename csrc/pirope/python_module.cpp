// The pybind11 module pirope._C. Importing it loads the library, which registers
// every op under torch.ops.pirope; the module itself reports how it was built so
// Python can refuse to run against a different torch than it was compiled for.
#include <torch/extension.h>

#include "cpu/bf16_gemm.h"
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
        return d;
      },
      "How this extension was built: torch version, CUDA on/off, CUDA version and "
      "architectures, CPU vector ISA.");
  m.def("cpu_bf16_dot", &pirope::cpu::bf16::enabled,
        "Whether bfloat16 rope_attention on CPU multiplies with AVX512-BF16 now (the CPU "
        "has it and PIROPE_CPU_BF16_DOT is not 0).");
}
