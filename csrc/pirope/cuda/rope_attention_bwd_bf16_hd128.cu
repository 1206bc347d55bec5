// One instantiation of the CUDA rope_attention backward (see rope_attention_bwd.cuh).
#include "rope_attention_bwd.cuh"

namespace pirope::cuda {
template void launch_rope_attention_bwd<at::BFloat16, 128>(const AttentionParams&, const BackwardScratch&,
                                                    cudaStream_t);
}  // namespace pirope::cuda
