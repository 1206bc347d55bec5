// CUDA backward of rope_attention: scratch buffers, then the kernels of the dtype and
// head dim (rope_attention_bwd.cuh, one instantiation per rope_attention_bwd_*.cu).
// p.deterministic picks the atomic-free dQ kernel (see rope_attention_bwd.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "rope_attention_dispatch.h"
#include "rope_attention_launch.h"

namespace pirope::cuda {

void launch_rope_attention_bwd_cuda(const AttentionParams& params, at::ScalarType dtype,
                                    at::ScalarType table_dtype, c10::Device device) {
  check_supported("rope_attention_backward", params, dtype, table_dtype);
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  AttentionParams p = params;
  const at::Tensor k_rot = maybe_prerotate_k(p, dtype, table_dtype, device);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  const at::Tensor d = at::empty({p.batch, p.heads_q, p.seqlen}, f32);
  at::Tensor dq_accum;
  if (!p.deterministic) dq_accum = at::zeros({p.batch, p.seqlen, p.heads_q, p.head_dim}, f32);
  const BackwardScratch scratch{d.data_ptr<float>(),
                                p.deterministic ? nullptr : dq_accum.data_ptr<float>()};
  if (dtype == at::kHalf) {
    p.head_dim == 64 ? launch_rope_attention_bwd<at::Half, 64>(p, scratch, stream)
                     : launch_rope_attention_bwd<at::Half, 128>(p, scratch, stream);
  } else {
    p.head_dim == 64 ? launch_rope_attention_bwd<at::BFloat16, 64>(p, scratch, stream)
                     : launch_rope_attention_bwd<at::BFloat16, 128>(p, scratch, stream);
  }
}

}  // namespace pirope::cuda
