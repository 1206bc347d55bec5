// One instantiation of the CUDA rope_attention forward (see rope_attention_fwd.cuh;
// rope_attention_fwd_sm90{,_ws}.cuh for its Hopper kernels).
#include "rope_attention_fwd_sm90_ws.cuh"

namespace pirope::cuda {
template void launch_rope_attention_fwd<at::BFloat16, 128>(const AttentionParams&, cudaStream_t);
}  // namespace pirope::cuda
