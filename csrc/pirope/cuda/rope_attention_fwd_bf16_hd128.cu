// One instantiation of the CUDA rope_attention forward (see rope_attention_fwd.cuh).
#include "rope_attention_fwd.cuh"

namespace pirope::cuda {
template void launch_rope_attention_fwd<at::BFloat16, 128>(const AttentionParams&, cudaStream_t);
}  // namespace pirope::cuda
