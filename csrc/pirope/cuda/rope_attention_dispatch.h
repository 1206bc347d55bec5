// Host-side helpers shared by the CUDA forward (rope_attention_kernel.cpp) and backward
// (rope_attention_backward_kernel.cpp) dispatchers of rope_attention.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include "../attention_params.h"
#include "../rope_params.h"

namespace pirope::cuda {

// Defined in apply_rope_kernel.cu.
void launch_rope_cuda(const RopeParams& p, at::ScalarType x_dtype, at::ScalarType table_dtype,
                      c10::Device device);

// Throws unless the tensor-core kernels take this call: float16/bfloat16, float32
// tables, head dim 64 or 128, 16-byte aligned rows, rotary_dim a multiple of 16 (8
// interleaved). `op` names the op in the message.
void check_supported(const char* op, const AttentionParams& p, at::ScalarType dtype,
                     at::ScalarType table_dtype);

// Rotates k once into a fresh (batch, seqlen, heads_kv, head_dim) buffer and points
// p.k at it (p.k_prerotated), so the attention kernels load k tiles as plain copies
// instead of rotating every k tile once per query block; with `with_q` (the backward,
// whose dkdv kernel reads every q tile once per key block) q likewise (p.q_prerotated).
// Used when seqlen is above one key tile unless PIROPE_ATTENTION_K_PREPASS=0 (=1
// forces it); returns the buffers (keep them alive until the kernels have run), or
// undefined tensors.
struct PrerotatedQK {
  at::Tensor q, k;
};
PrerotatedQK maybe_prerotate(AttentionParams& p, bool with_q, at::ScalarType dtype, at::ScalarType table_dtype,
                             c10::Device device);

// A (dtype, head dim) pair of the kernels, passed by value to pick an instantiation.
template <typename T, int kD>
struct KernelConfig {
  using scalar_t = T;
  static constexpr int head_dim = kD;
};

// The preamble both directions share, then the (dtype, head dim) switch: checks the
// call (check_supported), sets the device, pre-rotates k, and q for the backward
// (maybe_prerotate), and calls
// launch(KernelConfig<T, kD>{}, p, stream) with T at::Half or at::BFloat16 and kD 64 or
// 128, on the current stream; the pre-rotated copies live until launch returns.
template <typename Launch>
void dispatch_rope_attention(const char* op, bool backward, const AttentionParams& params, at::ScalarType dtype,
                             at::ScalarType table_dtype, c10::Device device, Launch&& launch) {
  check_supported(op, params, dtype, table_dtype);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  AttentionParams p = params;
  const PrerotatedQK rotated = maybe_prerotate(p, backward, dtype, table_dtype, device);
  const auto with_dim = [&](auto dtype_tag) {
    using T = decltype(dtype_tag);
    p.head_dim == 64 ? launch(KernelConfig<T, 64>{}, p, stream)
                     : launch(KernelConfig<T, 128>{}, p, stream);
  };
  dtype == at::kHalf ? with_dim(at::Half{}) : with_dim(at::BFloat16{});
}

}  // namespace pirope::cuda
