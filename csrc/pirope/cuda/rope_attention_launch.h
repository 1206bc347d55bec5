// The launchers of the CUDA rope_attention kernels, one explicit instantiation per
// (dtype, head dim) and per file (rope_attention_{fwd,bwd}_<dtype>_hd<kD>.cu), so the
// kernels compile in parallel; rope_attention_kernel.cpp and
// rope_attention_backward_kernel.cpp dispatch to them. Those two hold no device code and
// are compiled by the host compiler alone (nvcc would parse torch's headers three times,
// for the host and for each architecture): they see the declarations below, not the
// launch helpers of the kernel files (__CUDACC__).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "../attention_params.h"

namespace pirope::cuda {

#ifdef __CUDACC__
// The grid of the attention kernels: ceil(seqlen / rows_per_block) x heads x batch.
inline dim3 attention_grid(const AttentionParams& p, int64_t rows_per_block, int64_t heads) {
  return dim3(static_cast<unsigned>((p.seqlen + rows_per_block - 1) / rows_per_block), static_cast<unsigned>(heads),
              static_cast<unsigned>(p.batch));
}

// kernel<<<grid, threads, smem, stream>>>(args...), with the kernel's dynamic smem limit
// raised to smem first (beyond 48 KB a kernel must opt in); the launch is checked.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, int threads, size_t smem, cudaStream_t stream,
                   const Args&... args) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, threads, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether a warp-specialised kernel has the registers its setmaxnreg split hands out
// (split_regs over all threads): setmaxnreg moves registers between a block's warpgroups
// within what the block was launched with (the kernel's count x threads), so with fewer
// (another ptxas, -maxrregcount) setmaxnreg.inc would wait forever. Its launcher then
// returns false and the caller runs the other Hopper kernel.
template <typename... Params>
bool has_register_budget(void (*kernel)(Params...), int threads, int split_regs) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return attr.numRegs * threads >= split_regs;
}
#endif  // __CUDACC__

// Whether this call runs on the Hopper kernels (wgmma.cuh): the build has sm_90a code
// (TORCH_CUDA_ARCH_LIST with 9.0a), the current device is sm_90, k (and, for the
// backward, q) is pre-rotated, and PIROPE_ATTENTION_SM90 is not "0". Otherwise the
// mma.sync kernels run. Defined in rope_attention_kernel.cpp.
bool use_sm90_kernels(const AttentionParams& p, bool backward);
// Whether the Hopper kernel of this direction is the warp-specialised TMA one
// (rope_attention_{fwd,bwd}_sm90_ws.cuh): PIROPE_ATTENTION_SM90=ws (both directions),
// ws_fwd or ws_bwd (one). Opt-in until verified and timed on an H100/H200; where TMA
// cannot describe the tensors the other Hopper kernel runs.
bool use_sm90_ws_kernels(bool backward);
// How the warp-specialised backward adds dQ into its float32 accumulator:
// PIROPE_WS_DQ unset, empty or "tma" (TMA reductions from smem), "atomic" (float2 atomics
// from every thread, as the other Hopper kernel: for A/B timing, and the fallback if the
// reduction path fails on a GPU); anything else is an error. True for "atomic".
bool ws_dq_atomics();

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
