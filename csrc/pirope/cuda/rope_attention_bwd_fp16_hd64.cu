// One instantiation of the CUDA rope_attention backward (see rope_attention_bwd.cuh;
// rope_attention_bwd_sm90{,_ws}.cuh for its Hopper dkdv kernels).
#include "rope_attention_bwd_sm90_ws.cuh"

namespace pirope::cuda {
template void launch_rope_attention_bwd<at::Half, 64>(const AttentionParams&, const BackwardScratch&,
                                                    cudaStream_t);
}  // namespace pirope::cuda
