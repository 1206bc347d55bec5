// Host-side helpers shared by the CUDA forward (rope_attention_kernel.cu) and backward
// (rope_attention_backward_kernel.cu) dispatchers of rope_attention.
#pragma once

#include <ATen/ATen.h>

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
// instead of rotating every k tile once per query block. Used when seqlen is above one
// key tile unless PIROPE_ATTENTION_K_PREPASS=0 (=1 forces it); returns the buffer
// (keep it alive until the kernels have run), or an undefined tensor.
at::Tensor maybe_prerotate_k(AttentionParams& p, at::ScalarType dtype, at::ScalarType table_dtype,
                             c10::Device device);

}  // namespace pirope::cuda
