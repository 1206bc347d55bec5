// The launchers of the CUDA rope_attention kernels, one explicit instantiation per
// (dtype, head dim) and per file (rope_attention_{fwd,bwd}_<dtype>_hd<kD>.cu), so the
// kernels compile in parallel; rope_attention_kernel.cu and
// rope_attention_backward_kernel.cu dispatch to them.
#pragma once

#include <cuda_runtime.h>

#include "../attention_params.h"

namespace pirope::cuda {

// Whether this call runs on the Hopper kernels (wgmma.cuh): the build has sm_90a code
// (TORCH_CUDA_ARCH_LIST with 9.0a), the current device is sm_90, k (and, for the
// backward, q) is pre-rotated, and PIROPE_ATTENTION_SM90 is not "0". Otherwise the
// mma.sync kernels run. Defined in rope_attention_kernel.cu.
bool use_sm90_kernels(const AttentionParams& p, bool backward);

template <typename T, int kD>
void launch_rope_attention_fwd(const AttentionParams& p, cudaStream_t stream);

// float32 scratch the backward needs: d (batch, heads_q, seqlen) = rowsum(dO * O) and,
// unless p.deterministic, dq_accum (batch, seqlen, heads_q, kD) zero-initialised.
struct BackwardScratch {
  float* d = nullptr;
  float* dq_accum = nullptr;
};

template <typename T, int kD>
void launch_rope_attention_bwd(const AttentionParams& p, const BackwardScratch& scratch,
                               cudaStream_t stream);

}  // namespace pirope::cuda
