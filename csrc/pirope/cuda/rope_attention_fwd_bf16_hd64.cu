// One instantiation of the CUDA rope_attention forward (see rope_attention_fwd.cuh;
// rope_attention_fwd_sm90.cuh for its Hopper kernel).
#include "rope_attention_fwd_sm90.cuh"

namespace pirope::cuda {
template void launch_rope_attention_fwd<at::BFloat16, 64>(const AttentionParams&, cudaStream_t);
}  // namespace pirope::cuda
