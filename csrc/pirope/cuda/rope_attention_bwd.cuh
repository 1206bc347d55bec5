// CUDA backward of rope_attention (FlashAttention-2 style), with the rotary embedding
// fused: q and k tiles are rotated as they are loaded, dq and dk are accumulated in
// the rotated basis and rotated back (by -angle) once, in the epilogue.
//
// With S = scale * rot(q) rot(k)^T, P = softmax(S) (recomputed from the saved lse),
// dP = dO V^T, D = rowsum(dO * O) and dS = P * (dP - D):
//   dV = P^T dO,   dK = scale * rot^-1(dS^T Q),   dQ = scale * rot^-1(dS K).
// Kernels:
//   1. dot_do_o: D for every query row.
//   2. dkdv: one block per 64 keys of one (batch, kv head); 4 warps x 16 keys keep dK
//      and dV in registers while looping over every query head of the GQA group and
//      every 64-query block (causal: only blocks at or after the keys). Without
//      p.deterministic it also adds each block's dQ contribution into a float32
//      buffer with atomicAdd (fast; the summation order, hence the last bits, varies).
//   3a. dq_convert (atomic mode): dQ = scale * rot^-1(dq_accum), cast.
//   3b. dq (deterministic mode): one block per 64 queries recomputes S and dP over the
//      key blocks and accumulates dQ in registers: no atomics, bit-identical results,
//      7 tile products per (query block, key block) instead of 5 (S and dP are
//      computed twice): +40% tensor-core work (a FLOP count; not yet timed).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "../attention_params.h"
#include "attention_mma.cuh"
#include "rope_attention_launch.h"

namespace pirope::cuda {

namespace bwd {
constexpr int kBlockN = 64;  // keys per dkdv block (16 per warp); keys per tile of the dq kernel
constexpr int kBlockM = 64;  // queries per tile of the dkdv kernel; per dq block (16 per warp)
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
}  // namespace bwd

// D[b, h, s] = sum_d dO[b, s, h, d] * O[b, s, h, d] in float32; one warp per row.
template <typename T, int kD>
__global__ void __launch_bounds__(bwd::kThreads) rope_attention_bwd_dot_do_o_kernel(const AttentionParams p,
                                                                                   float* d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (bwd::kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * p.seqlen * p.heads_q) return;
  const int64_t h = row % p.heads_q, s = (row / p.heads_q) % p.seqlen, b = row / (p.heads_q * p.seqlen);
  const T* o = static_cast<const T*>(p.out.ptr) + b * p.out.stride_b + s * p.out.stride_s + h * p.out.stride_h;
  const T* g = static_cast<const T*>(p.grad_out.ptr) + b * p.grad_out.stride_b + s * p.grad_out.stride_s +
               h * p.grad_out.stride_h;
  float acc = 0.f;
#pragma unroll
  for (int e = lane; e < kD; e += 32) acc += static_cast<float>(o[e]) * static_cast<float>(g[e]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffff, acc, off);
  if (lane == 0) d[(b * p.heads_q + h) * p.seqlen + s] = acc;
}

// Loads the log2-domain lse and D of query rows [m0, m0 + kBlockM) of head hq.
__device__ __forceinline__ void load_row_stats(float* lse_s, float* d_s, const AttentionParams& p,
                                               const float* d, int64_t b, int64_t hq, int64_t m0) {
  for (int i = threadIdx.x; i < bwd::kBlockM; i += bwd::kThreads) {
    const int64_t s = m0 + i;
    const int64_t off = (b * p.heads_q + hq) * p.seqlen + s;
    lse_s[i] = s < p.seqlen ? static_cast<const float*>(p.lse)[off] * bwd::kLog2e : INFINITY;
    d_s[i] = s < p.seqlen ? d[off] : 0.f;
  }
}

template <typename T, int kD, bool kAtomicDq>
__global__ void __launch_bounds__(bwd::kThreads) rope_attention_bwd_dkdv_kernel(const AttentionParams p,
                                                                                const BackwardScratch sc) {
  using namespace attn;
  using namespace bwd;
  constexpr int kLd = kD + kPad;
  constexpr int kLdS = kBlockN + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + kBlockN * kLd;
  T* q_s = v_s + kBlockN * kLd;
  T* do_s = q_s + kBlockM * kLd;
  float* lse_s = reinterpret_cast<float*>(do_s + kBlockM * kLd);
  float* d_s = lse_s + kBlockM;
  T* ds_s = reinterpret_cast<T*>(d_s + kBlockM);  // dS as [query][key], atomic mode only

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int64_t hk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t group = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const float scale_log2 = static_cast<float>(p.softmax_scale) * kLog2e;
  const int64_t keys[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};
  static_assert(64 * (kD + 4) * sizeof(float) <= (2 * kBlockN + 2 * kBlockM) * kLd * sizeof(T),
                "the float32 epilogue tile reuses the q/k/v/dO tiles' smem");

  load_tile<T, kD, kBlockN, kThreads>(k_s, p.k, p, b, hk, n0, !p.k_prerotated);
  load_tile<T, kD, kBlockN, kThreads>(v_s, p.v, p, b, hk, n0, false);

  float dk[kD / 8][4], dv[kD / 8][4];
  zero(dk);
  zero(dv);

  const int64_t m_begin = p.causal ? n0 : 0;  // causal: queries before the keys see none of them
  for (int64_t hq = hk * group; hq < (hk + 1) * group; ++hq) {
    for (int64_t m0 = m_begin; m0 < p.seqlen; m0 += kBlockM) {
      __syncthreads();  // previous q / dO / dS tiles consumed (and k, v loaded)
      load_tile<T, kD, kBlockM, kThreads>(q_s, p.q, p, b, hq, m0, true);
      load_tile<T, kD, kBlockM, kThreads>(do_s, p.grad_out, p, b, hq, m0, false);
      load_row_stats(lse_s, d_s, p, sc.d, b, hq, m0);
      __syncthreads();

      // S^T = K Q^T for this warp's 16 keys x 64 queries.
      float pt[kBlockM / 8][4];
      zero(pt);
      gemm_nt<T, kBlockM / 8, kD>(pt, k_s, kLd, warp * 16, q_s, kLd);
      // P^T from the saved lse; masked entries (causal, padding) are exactly 0. Only
      // tiles that cross the diagonal or the sequence end need the mask.
      const bool full_tile = m0 + kBlockM <= p.seqlen && n0 + kBlockN <= p.seqlen &&
                             !(p.causal && n0 + kBlockN - 1 > m0);
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = 8 * j + 2 * tq + (e & 1);
          const int64_t query = m0 + qi, key = keys[e >> 1];
          const bool valid = full_tile || (key < p.seqlen && query < p.seqlen && (!p.causal || key <= query));
          pt[j][e] = valid ? exp2f(pt[j][e] * scale_log2 - lse_s[qi]) : 0.f;
        }
      }
      // dV += P^T dO.
      gemm_acc_nn<T, kD / 8, kBlockM>(dv, pt, do_s, kLd);
      // dP^T = V dO^T, then dS^T = P^T * (dP^T - D), in place.
      float dst[kBlockM / 8][4];
      zero(dst);
      gemm_nt<T, kBlockM / 8, kD>(dst, v_s, kLd, warp * 16, do_s, kLd);
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[j][e] = pt[j][e] * (dst[j][e] - d_s[8 * j + 2 * tq + (e & 1)]);
      // dK += dS^T Q (rotated basis; scale and un-rotation in the epilogue).
      gemm_acc_nn<T, kD / 8, kBlockM>(dk, dst, q_s, kLd);
      if constexpr (kAtomicDq) {
        // dQ (64 queries x kD) += dS K: dS goes through smem transposed to [query][key];
        // warp w then owns queries 16w..16w+15, in 64-column passes to bound registers.
#pragma unroll
        for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            ds_s[(8 * j + 2 * tq + (e & 1)) * kLdS + warp * 16 + g + 8 * (e >> 1)] = static_cast<T>(dst[j][e]);
        __syncthreads();
        const int64_t rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
#pragma unroll
        for (int c0 = 0; c0 < kD; c0 += 64) {
          float dq[8][4];
          zero(dq);
          gemm_nn<T, 8, kBlockN>(dq, ds_s, kLdS, warp * 16, k_s, kLd, c0);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (rows[r] >= p.seqlen) continue;
            float* dst_row = sc.dq_accum + ((b * p.seqlen + rows[r]) * p.heads_q + hq) * kD + c0;
#pragma unroll
            for (int jd = 0; jd < 8; ++jd) {
              atomicAdd(dst_row + 8 * jd + 2 * tq, dq[jd][2 * r]);
              atomicAdd(dst_row + 8 * jd + 2 * tq + 1, dq[jd][2 * r + 1]);
            }
          }
        }
      }
    }
  }

  // Epilogue through smem (the tiles are free now): dK scaled and rotated back, dV.
  float* tile = reinterpret_cast<float*>(smem_raw);
  __syncthreads();
  acc_to_smem<kD>(tile, dk, warp * 16);
  __syncthreads();
  store_tile<T, kD, kBlockN, kThreads>(tile, p.dk, p, b, hk, n0, true, static_cast<float>(p.softmax_scale));
  __syncthreads();
  acc_to_smem<kD>(tile, dv, warp * 16);
  __syncthreads();
  store_tile<T, kD, kBlockN, kThreads>(tile, p.dv, p, b, hk, n0, false, 1.f);
}

// Deterministic dQ: one block per 64 queries of one (batch, q head).
template <typename T, int kD>
__global__ void __launch_bounds__(bwd::kThreads) rope_attention_bwd_dq_kernel(const AttentionParams p,
                                                                              const BackwardScratch sc) {
  using namespace attn;
  using namespace bwd;
  constexpr int kLd = kD + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* do_s = q_s + kBlockM * kLd;
  T* k_s = do_s + kBlockM * kLd;
  T* v_s = k_s + kBlockN * kLd;
  float* lse_s = reinterpret_cast<float*>(v_s + kBlockN * kLd);
  float* d_s = lse_s + kBlockM;

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t hq = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = hq / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const float scale_log2 = static_cast<float>(p.softmax_scale) * kLog2e;
  const int64_t rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  load_tile<T, kD, kBlockM, kThreads>(q_s, p.q, p, b, hq, m0, true);
  load_tile<T, kD, kBlockM, kThreads>(do_s, p.grad_out, p, b, hq, m0, false);
  load_row_stats(lse_s, d_s, p, sc.d, b, hq, m0);
  __syncthreads();
  const float lse_r[2] = {lse_s[warp * 16 + g], lse_s[warp * 16 + g + 8]};
  const float d_r[2] = {d_s[warp * 16 + g], d_s[warp * 16 + g + 8]};

  float dq[kD / 8][4];
  zero(dq);

  const int64_t n_end = p.causal ? std::min<int64_t>(p.seqlen, m0 + kBlockM) : p.seqlen;
  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    __syncthreads();
    load_tile<T, kD, kBlockN, kThreads>(k_s, p.k, p, b, hk, n0, !p.k_prerotated);
    load_tile<T, kD, kBlockN, kThreads>(v_s, p.v, p, b, hk, n0, false);
    __syncthreads();
    // S = Q K^T and dP = dO V^T for this warp's 16 queries x 64 keys.
    float s[kBlockN / 8][4], dp[kBlockN / 8][4];
    zero(s);
    zero(dp);
    gemm_nt<T, kBlockN / 8, kD>(s, q_s, kLd, warp * 16, k_s, kLd);
    gemm_nt<T, kBlockN / 8, kD>(dp, do_s, kLd, warp * 16, v_s, kLd);
    // dS = P * (dP - D), P recomputed from lse; masked entries exactly 0 (only tiles
    // crossing the diagonal or the sequence end need the mask).
    const bool full_tile = m0 + kBlockM <= p.seqlen && n0 + kBlockN <= p.seqlen &&
                           !(p.causal && n0 + kBlockN - 1 > m0);
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = n0 + 8 * j + 2 * tq + (e & 1), row = rows[e >> 1];
        const bool valid = full_tile || (key < p.seqlen && row < p.seqlen && (!p.causal || key <= row));
        const float pr = valid ? exp2f(s[j][e] * scale_log2 - lse_r[e >> 1]) : 0.f;
        s[j][e] = pr * (dp[j][e] - d_r[e >> 1]);
      }
    }
    // dQ += dS K (rotated basis).
    gemm_acc_nn<T, kD / 8, kBlockN>(dq, s, k_s, kLd);
  }
  float* tile = reinterpret_cast<float*>(smem_raw);
  __syncthreads();
  acc_to_smem<kD>(tile, dq, warp * 16);
  __syncthreads();
  store_tile<T, kD, kBlockM, kThreads>(tile, p.dq, p, b, hq, m0, true, static_cast<float>(p.softmax_scale));
}

// Atomic mode: dq = scale * rot^-1(dq_accum), one thread per element (its rotary
// partner is read too; both come from L1/L2).
template <typename T, int kD>
__global__ void __launch_bounds__(256) rope_attention_bwd_dq_convert_kernel(const AttentionParams p,
                                                                            const BackwardScratch sc) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (idx >= p.batch * p.seqlen * p.heads_q * kD) return;
  const int i = static_cast<int>(idx % kD);
  const int64_t row = idx / kD;  // (b * seqlen + s) * heads_q + h
  const int64_t h = row % p.heads_q, s = (row / p.heads_q) % p.seqlen, b = row / (p.heads_q * p.seqlen);
  const float* acc = sc.dq_accum + row * kD;
  const RopeParams& rp = p.rope;
  float v = acc[i];
  if (i < rp.rotary_dim) {
    const int64_t half = rp.rotary_dim / 2;
    const bool first = rp.interleaved ? i % 2 == 0 : i < half;
    const int pair = static_cast<int>(rp.interleaved ? i / 2 : (first ? i : i - half));
    const int partner = rp.interleaved ? (i ^ 1) : static_cast<int>(first ? i + half : i - half);
    const int64_t pos = token_position(rp, b, s);
    const float c = static_cast<const float*>(rp.cos)[(pos < 0 ? 0 : pos) * rp.table_stride + pair];
    const float sn = static_cast<const float*>(rp.sin)[(pos < 0 ? 0 : pos) * rp.table_stride + pair];
    float o1, o2;
    const float x1 = first ? v : acc[partner], x2 = first ? acc[partner] : v;
    rotate_pair<float>(x1, x2, c, -sn, o1, o2);
    v = pos < 0 ? NAN : (first ? o1 : o2);
  }
  T* dst = static_cast<T*>(p.dq.ptr) + b * p.dq.stride_b + s * p.dq.stride_s + h * p.dq.stride_h;
  dst[i] = static_cast<T>(v * static_cast<float>(p.softmax_scale));
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t smem) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

// Explicitly instantiated once per (dtype, head dim) in rope_attention_bwd_<dtype>_hd<kD>.cu.
template <typename T, int kD>
void launch_rope_attention_bwd(const AttentionParams& p, const BackwardScratch& sc, cudaStream_t stream) {
  using namespace bwd;
  constexpr int kLd = kD + attn::kPad;
  const auto ublocks = [](int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); };

  const int64_t rows = p.batch * p.seqlen * p.heads_q;
  rope_attention_bwd_dot_do_o_kernel<T, kD><<<ublocks(rows, kThreads / 32), kThreads, 0, stream>>>(p, sc.d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const dim3 kv_grid(ublocks(p.seqlen, kBlockN), static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
  const size_t tiles = static_cast<size_t>(2 * kBlockN + 2 * kBlockM) * kLd * sizeof(T) + 2 * kBlockM * sizeof(float);
  if (p.deterministic) {
    auto dkdv = rope_attention_bwd_dkdv_kernel<T, kD, false>;
    set_smem(dkdv, tiles);
    dkdv<<<kv_grid, kThreads, tiles, stream>>>(p, sc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto dq = rope_attention_bwd_dq_kernel<T, kD>;
    set_smem(dq, tiles);
    const dim3 q_grid(ublocks(p.seqlen, kBlockM), static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
    dq<<<q_grid, kThreads, tiles, stream>>>(p, sc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    auto dkdv = rope_attention_bwd_dkdv_kernel<T, kD, true>;
    const size_t smem = tiles + static_cast<size_t>(kBlockM) * (kBlockN + attn::kPad) * sizeof(T);
    set_smem(dkdv, smem);
    dkdv<<<kv_grid, kThreads, smem, stream>>>(p, sc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rope_attention_bwd_dq_convert_kernel<T, kD><<<ublocks(rows * kD, 256), 256, 0, stream>>>(p, sc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace pirope::cuda
