// Every schema of the pirope library, declared once. Kernels are registered per
// dispatch key in cpu/*.cpp and cuda/*.cu; fake kernels and autograd in Python
// (python/pirope/_fake, python/pirope/_autograd).
#include <torch/library.h>

#include "ops.h"

#ifndef PIROPE_TORCH_VERSION
#define PIROPE_TORCH_VERSION "unknown"
#endif
#ifndef PIROPE_CUDA_VERSION
#define PIROPE_CUDA_VERSION ""
#endif
#ifndef PIROPE_CUDA_ARCHS
#define PIROPE_CUDA_ARCHS ""
#endif
#if defined(CPU_CAPABILITY_AVX512)
#define PIROPE_CPU_CAPABILITY "AVX512"
#elif defined(CPU_CAPABILITY_AVX2)
#define PIROPE_CPU_CAPABILITY "AVX2"
#else
#define PIROPE_CPU_CAPABILITY "DEFAULT"
#endif

TORCH_LIBRARY(pirope, m) {
  // Rotary embedding. Backward ops rotate by the negative angle. Trailing
  // underscore: in place (annotated as mutating q/k).
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin, Tensor? position_ids, "
        "bool interleaved) -> Tensor");
  m.def("apply_rope_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor? position_ids, "
        "bool interleaved) -> ()");
  m.def("apply_rope_backward(Tensor grad, Tensor cos, Tensor sin, "
        "Tensor? position_ids, bool interleaved) -> Tensor");
  m.def("apply_rope_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, "
        "Tensor? position_ids, bool interleaved) -> (Tensor, Tensor)");
  m.def("apply_rope_qk_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, "
        "Tensor? position_ids, bool interleaved) -> ()");
  m.def("apply_rope_qk_backward(Tensor grad_q, Tensor grad_k, Tensor cos, "
        "Tensor sin, Tensor? position_ids, bool interleaved) -> (Tensor, Tensor)");

  // Fused RoPE attention. Returns the output and the log-sum-exp of each query row
  // (batch, nheads_q, seqlen) in float32 (float64 for float64 input, so that float64
  // gradients stay exact), which the backward reuses. `deterministic` only matters to
  // the backward (the forward takes it so that autograd can pass it on).
  m.def("rope_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, "
        "Tensor? position_ids, bool causal, float softmax_scale, bool interleaved, "
        "bool deterministic=False) -> (Tensor, Tensor)");
  m.def("rope_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor out, Tensor lse, Tensor cos, Tensor sin, Tensor? position_ids, "
        "bool causal, float softmax_scale, bool interleaved, bool deterministic=False) "
        "-> (Tensor, Tensor, Tensor)");
}

namespace pirope {
BuildInfo build_info() {
#ifdef PIROPE_WITH_CUDA
  constexpr bool with_cuda = true;
#else
  constexpr bool with_cuda = false;
#endif
#ifdef _OPENMP
  constexpr bool openmp = true;
#else
  constexpr bool openmp = false;
#endif
  return {PIROPE_TORCH_VERSION, with_cuda, PIROPE_CUDA_VERSION, PIROPE_CUDA_ARCHS,
          PIROPE_CPU_CAPABILITY, openmp};
}
}  // namespace pirope
