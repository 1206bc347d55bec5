// CUDA backward of rope_attention: scratch buffers, then the kernels of the dtype and
// head dim (rope_attention_bwd.cuh, one instantiation per rope_attention_bwd_*.cu).
// p.deterministic picks the atomic-free dQ kernel (see rope_attention_bwd.cuh). q is
// pre-rotated like k (the dkdv kernel reads every q tile once per key block).
#include "rope_attention_dispatch.h"
#include "rope_attention_launch.h"

namespace pirope::cuda {

void launch_rope_attention_bwd_cuda(const AttentionParams& params, at::ScalarType dtype,
                                    at::ScalarType table_dtype, c10::Device device) {
  dispatch_rope_attention(
      "rope_attention_backward", /*backward=*/true, params, dtype, table_dtype, device,
      [&](auto cfg, const AttentionParams& p, cudaStream_t stream) {
        using C = decltype(cfg);
        const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
        const at::Tensor d = at::empty({p.batch, p.heads_q, p.seqlen}, f32);
        const at::Tensor dq_accum =
            p.deterministic ? at::Tensor() : at::zeros({p.batch, p.seqlen, p.heads_q, C::head_dim}, f32);
        const BackwardScratch scratch{d.data_ptr<float>(),
                                      p.deterministic ? nullptr : dq_accum.data_ptr<float>()};
        launch_rope_attention_bwd<typename C::scalar_t, C::head_dim>(p, scratch, stream);
      });
}

}  // namespace pirope::cuda
