// CUDA forward of rope_attention: FlashAttention-2-style tiled attention on tensor
// cores with the rotary embedding applied to q and k tiles as they are loaded into
// shared memory (k is rotated by a pre-pass instead when p.k_prerotated).
//
// Block = 4 warps = 64 query rows of one (batch, q-head); each warp owns 16 rows.
// For every 64-key tile: S = Q K^T (fp32 accumulators), online softmax in the log2
// domain, O += P V with P re-packed from the S accumulators as the A operand.
// Instantiated once per (dtype, head dim) in rope_attention_fwd_*.cu; dispatched by
// rope_attention_kernel.cu.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "rope_attention_launch.h"

#include "../attention_params.h"
#include "attention_mma.cuh"

namespace pirope::cuda {

namespace fwd {
constexpr int kBlockM = 64;  // query rows per block (16 per warp)
constexpr int kBlockN = 64;  // keys per tile
constexpr int kThreads = 128;
}  // namespace fwd

template <typename T, int kD>
__global__ void __launch_bounds__(fwd::kThreads, 3) rope_attention_fwd_kernel(const AttentionParams p) {
  using namespace attn;
  using namespace fwd;
  constexpr int kLd = kD + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + kBlockM * kLd;
  T* v_s = k_s + kBlockN * kLd;

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t hq = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = hq / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;  // mma fragment coordinates
  const float scale_log2 = static_cast<float>(p.softmax_scale) * 1.4426950408889634f;

  load_tile<T, kD, kBlockM, kThreads>(q_s, p.q, p, b, hq, m0, true);

  float o[kD / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int64_t rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  // Pipeline (one buffer each for K and V): V(t) is copied with cp.async while S(t) and
  // the softmax are computed; when k is pre-rotated, K(t+1) likewise during P V(t).
  // Otherwise K(t) is rotated on the way in, through registers.
  const int64_t n_end = p.causal ? std::min<int64_t>(p.seqlen, m0 + kBlockM) : p.seqlen;
  if (p.k_prerotated) {
    copy_tile_async<T, kD, kBlockN, kThreads>(k_s, p.k, p, b, hk, 0);
    cp_async_commit();
  }
  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    __syncthreads();  // every warp is done with V(t-1)
    copy_tile_async<T, kD, kBlockN, kThreads>(v_s, p.v, p, b, hk, n0);
    cp_async_commit();
    if (!p.k_prerotated) load_tile<T, kD, kBlockN, kThreads>(k_s, p.k, p, b, hk, n0, true);
    cp_async_wait<1>();  // K(t) has landed (V(t) may still be in flight)
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys (8 n-tiles of 8 keys).
    float s[kBlockN / 8][4];
    zero(s);
    gemm_nt<T, kBlockN / 8, kD>(s, q_s, kLd, warp * 16, k_s, kLd);

    // Scale into the log2 domain, mask (only tiles that cross the diagonal or the end
    // need it), and update the running max / sum per row.
    const bool full_tile = n0 + kBlockN <= p.seqlen && !(p.causal && n0 + kBlockN - 1 > m0);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = static_cast<int>(n0 - m0) + 8 * j + 2 * tq + (e & 1);  // relative to m0
        const int row = warp * 16 + g + 8 * (e >> 1);
        const bool masked = !full_tile && (n0 + 8 * j + 2 * tq + (e & 1) >= p.seqlen || (p.causal && key > row));
        s[j][e] = masked ? -INFINITY : s[j][e] * scale_log2;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
      }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 threads of a quad share a row
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      // A row with no visible key yet keeps max -inf: use 0 so exp2 gives 0, not NaN.
      const float safe = new_max == -INFINITY ? 0.f : new_max;
      corr[r] = exp2f(row_max[r] - safe);
      row_max[r] = new_max;
      row_sum[r] *= corr[r];
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - safe);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - safe);
        row_sum[r] += s[j][2 * r] + s[j][2 * r + 1];
      }
    }
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      o[j][0] *= corr[0];
      o[j][1] *= corr[0];
      o[j][2] *= corr[1];
      o[j][3] *= corr[1];
    }

    cp_async_wait<0>();  // V(t) has landed
    __syncthreads();     // ... for every warp; and every warp is done with K(t)
    if (p.k_prerotated && n0 + kBlockN < n_end) {
      copy_tile_async<T, kD, kBlockN, kThreads>(k_s, p.k, p, b, hk, n0 + kBlockN);
      cp_async_commit();
    }

    // O += P V: the S accumulators of n-tiles 2m, 2m+1 are the A operand of key chunk
    // m (16 keys); V (row-major keys x dims) gives B through ldmatrix.trans.
    gemm_acc_nn<T, kD / 8, kBlockN>(o, s, v_s, kLd);
  }

  // Epilogue: normalise, write O and the natural-log log-sum-exp of each row.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      o[j][2 * r] *= inv;
      o[j][2 * r + 1] *= inv;
    }
    if (tq == 0 && rows[r] < p.seqlen) {
      float* lse = static_cast<float*>(p.lse) + (b * p.heads_q + hq) * p.seqlen + rows[r];
      *lse = (row_max[r] + log2f(row_sum[r])) * 0.6931471805599453f;
    }
  }
  __syncthreads();  // every warp is done with the q/k/v tiles: reuse their smem
  float* tile = reinterpret_cast<float*>(smem_raw);
  acc_to_smem<kD>(tile, o, warp * 16);
  __syncthreads();
  store_tile<T, kD, kBlockM, kThreads>(tile, p.out, p, b, hq, m0, false, 1.f);
}

// Explicitly instantiated once per (dtype, head dim) in rope_attention_fwd_<dtype>_hd<kD>.cu.
template <typename T, int kD>
void launch_rope_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(fwd::kBlockM + 2 * fwd::kBlockN) * (kD + attn::kPad) * sizeof(T);
  auto kernel = rope_attention_fwd_kernel<T, kD>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((p.seqlen + fwd::kBlockM - 1) / fwd::kBlockM),
                  static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  kernel<<<grid, fwd::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pirope::cuda
