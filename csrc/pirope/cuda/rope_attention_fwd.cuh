// CUDA forward of rope_attention: FlashAttention-2-style tiled attention on tensor
// cores with the rotary embedding applied to q and k tiles as they are loaded into
// shared memory (k is rotated by a pre-pass instead when p.k_prerotated).
//
// Block = 4 warps = 128 query rows of one (batch, q-head); each warp owns 32 rows (two
// 16-row mma tiles, so every K and V fragment read from smem feeds two products, and
// K/V tiles stream from L2 once per 128 queries). For every 64-key tile: S = Q K^T
// (fp32 accumulators), online softmax in the log2 domain, O += P V with P re-packed
// from the S accumulators as the A operand. (The 64-row, one-tile-per-warp version
// ran at 0.30x of cuDNN at 16k tokens, this one at 0.42x: benchmarks/results/H100.md.)
// Instantiated once per (dtype, head dim) in rope_attention_fwd_*.cu; dispatched by
// rope_attention_kernel.cpp. On sm_90 (use_sm90_kernels) the wgmma version runs instead:
// rope_attention_fwd_sm90.cuh.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "rope_attention_launch.h"

#include "../attention_params.h"
#include "attention_mma.cuh"

namespace pirope::cuda {

namespace fwd {
constexpr int kRowTiles = 2;  // 16-row mma tiles per warp (each K/V fragment feeds both)
constexpr int kWarps = 4;
constexpr int kBlockM = 16 * kRowTiles * kWarps;  // query rows per block: 128
constexpr int kBlockN = 64;                       // keys per tile
constexpr int kThreads = 32 * kWarps;
}  // namespace fwd

template <typename T, int kD>
__global__ void __launch_bounds__(fwd::kThreads, 2) rope_attention_fwd_kernel(const AttentionParams p) {
  using namespace attn;
  using namespace fwd;
  constexpr int kLd = kD + kPad;
  constexpr int MT = kRowTiles;
  static_assert(kBlockM * (kD + 4) * sizeof(float) <= (kBlockM + 2 * kBlockN) * kLd * sizeof(T),
                "the float32 epilogue tile reuses the q/k/v tiles' smem");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + kBlockM * kLd;
  T* v_s = k_s + kBlockN * kLd;

  // Causal: the last query blocks have the most keys; launch them first (shorter tail).
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int64_t hq = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = hq / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;  // mma fragment coordinates
  const int w0 = warp * 16 * MT;          // this warp's first row in the block
  const float scale_log2 = static_cast<float>(p.softmax_scale) * 1.4426950408889634f;

  load_tile<T, kD, kBlockM, kThreads>(q_s, p.q, p, b, hq, m0, true);

  // Row tile m, half r (rows g and g + 8 of the tile) of this warp: index [m][r].
  float o[MT][kD / 8][4];
  zero(o);
  float row_max[MT][2], row_sum[MT][2];  // row_max: raw scores (not yet scaled)
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    row_max[m][0] = row_max[m][1] = -INFINITY;
    row_sum[m][0] = row_sum[m][1] = 0.f;
  }

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

    // S = Q K^T for this warp's MT x 16 rows x 64 keys (8 n-tiles of 8 keys).
    float s[MT][kBlockN / 8][4];
    zero(s);
    gemm_nt<T, MT, kBlockN / 8, kD>(s, q_s, kLd, w0, k_s, kLd);

    // Mask (only tiles that cross the diagonal or the sequence end need it), then the
    // online softmax per row on the raw scores: P = exp2(S * scale_log2 - max * scale_log2),
    // one FFMA per element.
    if (p.causal ? n0 + kBlockN - 1 > m0 || n0 + kBlockN > p.seqlen : n0 + kBlockN > p.seqlen) {
      const int key_end = static_cast<int>(std::min<int64_t>(p.seqlen - n0, kBlockN));
      const int diag = static_cast<int>(m0 - n0);  // block row r sees tile keys c <= r + diag
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = 8 * j + 2 * tq + (e & 1), r = w0 + 16 * m + g + 8 * (e >> 1);
            if (c >= key_end || (p.causal && c > r + diag)) s[m][j][e] = -INFINITY;
          }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {  // rows g (r = 0) and g + 8 (r = 1) of row tile m
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) tile_max = fmaxf(tile_max, fmaxf(s[m][j][2 * r], s[m][j][2 * r + 1]));
        // The 4 threads of a quad share a row.
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
        const float new_max = fmaxf(row_max[m][r], tile_max);
        // A row with no visible key yet keeps max -inf: use 0 so exp2 gives 0, not NaN.
        const float safe = new_max == -INFINITY ? 0.f : new_max * scale_log2;
        const float corr = exp2f(fmaf(row_max[m][r], scale_log2, -safe));
        row_max[m][r] = new_max;
        row_sum[m][r] *= corr;
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          s[m][j][2 * r] = exp2f(fmaf(s[m][j][2 * r], scale_log2, -safe));
          s[m][j][2 * r + 1] = exp2f(fmaf(s[m][j][2 * r + 1], scale_log2, -safe));
          row_sum[m][r] += s[m][j][2 * r] + s[m][j][2 * r + 1];
        }
#pragma unroll
        for (int j = 0; j < kD / 8; ++j) {
          o[m][j][2 * r] *= corr;
          o[m][j][2 * r + 1] *= corr;
        }
      }
    }

    cp_async_wait<0>();  // V(t) has landed
    __syncthreads();     // ... for every warp; and every warp is done with K(t)
    if (p.k_prerotated && n0 + kBlockN < n_end) {
      copy_tile_async<T, kD, kBlockN, kThreads>(k_s, p.k, p, b, hk, n0 + kBlockN);
      cp_async_commit();
    }

    // O += P V: the S accumulators of n-tiles 2k, 2k+1 are the A operand of key chunk
    // k (16 keys); V (row-major keys x dims) gives B through ldmatrix.trans.
    gemm_acc_nn<T, MT, kD / 8, kBlockN>(o, s, v_s, kLd);
  }

  // Epilogue: normalise, write O and the natural-log log-sum-exp of each row.
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[m][r];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
      for (int j = 0; j < kD / 8; ++j) {
        o[m][j][2 * r] *= inv;
        o[m][j][2 * r + 1] *= inv;
      }
      const int64_t row = m0 + w0 + 16 * m + g + 8 * r;
      if (tq == 0 && row < p.seqlen) {
        float* lse = static_cast<float*>(p.lse) + (b * p.heads_q + hq) * p.seqlen + row;
        *lse = (row_max[m][r] * scale_log2 + log2f(sum)) * 0.6931471805599453f;
      }
    }
  }
  __syncthreads();  // every warp is done with the q/k/v tiles: reuse their smem
  float* tile = reinterpret_cast<float*>(smem_raw);
  acc_to_smem<kD>(tile, o, w0);
  __syncthreads();
  store_tile<T, kD, kBlockM, kThreads>(tile, p.out, p, b, hq, m0, false, 1.f);
}

// The Hopper kernels, rope_attention_fwd_sm90.cuh and rope_attention_fwd_sm90_ws.cuh
// (included by the same .cu files); the warp-specialised one returns false when it
// cannot take the call.
template <typename T, int kD>
void launch_rope_attention_fwd_sm90(const AttentionParams& p, cudaStream_t stream);
template <typename T, int kD>
bool launch_rope_attention_fwd_sm90_ws(const AttentionParams& p, cudaStream_t stream);

// Explicitly instantiated once per (dtype, head dim) in rope_attention_fwd_<dtype>_hd<kD>.cu.
template <typename T, int kD>
void launch_rope_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  if (use_sm90_kernels(p, /*backward=*/false)) {
    if (!use_sm90_ws_kernels(/*backward=*/false) || !launch_rope_attention_fwd_sm90_ws<T, kD>(p, stream))
      launch_rope_attention_fwd_sm90<T, kD>(p, stream);
    return;
  }
  const size_t smem = static_cast<size_t>(fwd::kBlockM + 2 * fwd::kBlockN) * (kD + attn::kPad) * sizeof(T);
  launch_kernel(rope_attention_fwd_kernel<T, kD>, attention_grid(p, fwd::kBlockM, p.heads_q), fwd::kThreads, smem,
                stream, p);
}

}  // namespace pirope::cuda
