// CUDA backward of rope_attention (FlashAttention-2 style), with the rotary embedding
// fused: q and k are rotated once by a pre-pass (or as tiles are loaded, for short
// sequences), dq and dk are accumulated in the rotated basis and rotated back (by
// -angle) once, in the epilogue.
//
// With S = scale * rot(q) rot(k)^T, P = softmax(S) (recomputed from the saved lse),
// dP = dO V^T, D = rowsum(dO * O) and dS = P * (dP - D):
//   dV = P^T dO,   dK = scale * rot^-1(dS^T Q),   dQ = scale * rot^-1(dS K).
// Kernels:
//   1. dot_do_o: D for every query row.
//   2. dkdv: one block per 128 keys of one (batch, kv head); 8 warps x 16 keys keep dK
//      and dV in registers while looping over every query head of the GQA group and
//      every 64-query tile (causal: only tiles at or after the keys), the next tile's
//      q and dO streaming in (cp.async) during this one's products. Without
//      p.deterministic it also adds each tile's dQ contribution into a float32 buffer
//      with vector atomics (fast; the summation order, hence the last bits, varies).
//      On sm_90 (use_sm90_kernels) its wgmma version runs instead:
//      rope_attention_bwd_sm90.cuh (or, with PIROPE_ATTENTION_SM90=ws, the
//      warp-specialised TMA one, rope_attention_bwd_sm90_ws.cuh).
//   3a. dq_convert (atomic mode): dQ = scale * rot^-1(dq_accum), cast.
//   3b. dq (deterministic mode): one block per 64 queries recomputes S and dP over the
//      key tiles and accumulates dQ in registers: no atomics, bit-identical results,
//      7 tile products per (query tile, key tile) instead of 5 (S and dP are computed
//      twice): +40% tensor-core work.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "../attention_params.h"
#include "attention_mma.cuh"
#include "rope_attention_launch.h"

namespace pirope::cuda {

namespace bwd {
// dkdv kernel: kBlockN keys per block, 16 per warp; query tiles of kBlockM rows,
// double-buffered (the next tile's q and dO stream in with cp.async during this one).
constexpr int kBlockN = 128;
constexpr int kBlockM = 64;
constexpr int kThreads = 32 * kBlockN / 16;  // 8 warps
// Deterministic dq kernel: kDqBlockM queries per block (16 per warp), key tiles of kDqBlockN.
constexpr int kDqBlockM = 64;
constexpr int kDqBlockN = 64;
constexpr int kDqThreads = 32 * kDqBlockM / 16;  // 4 warps
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

// Loads the log2-domain lse and D of query rows [m0, m0 + kRows) of head hq; kThreads
// threads take part, `tid` (0..kThreads-1) being this one.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_row_stats(float* lse_s, float* d_s, const AttentionParams& p,
                                               const float* d, int64_t b, int64_t hq, int64_t m0,
                                               int tid = threadIdx.x) {
  for (int i = tid; i < kRows; i += kThreads) {
    const int64_t s = m0 + i;
    const int64_t off = (b * p.heads_q + hq) * p.seqlen + s;
    lse_s[i] = s < p.seqlen ? static_cast<const float*>(p.lse)[off] * bwd::kLog2e : INFINITY;
    d_s[i] = s < p.seqlen ? d[off] : 0.f;
  }
}

// Entries of the recomputed P^T: whether a key x query tile (keys n0.. kBlockN, queries
// m0.. kBlockM) crosses the diagonal or the sequence end (only then is each entry
// tested), and one entry: exp2(s * scale_log2 - lse) of the raw score s, exactly 0 where
// masked (causal, padding).
template <int kBlockN, int kBlockM>
__device__ __forceinline__ bool full_tile(const AttentionParams& p, int64_t m0, int64_t n0) {
  return m0 + kBlockM <= p.seqlen && n0 + kBlockN <= p.seqlen && !(p.causal && n0 + kBlockN - 1 > m0);
}
__device__ __forceinline__ float prob(float s, bool full, const AttentionParams& p, int64_t key, int64_t query,
                                      float scale_log2, float lse) {
  const bool valid = full || (key < p.seqlen && query < p.seqlen && (!p.causal || key <= query));
  return valid ? exp2f(fmaf(s, scale_log2, -lse)) : 0.f;
}

// dS^T = P^T * (dP^T - D), in place of dP^T, D per query (column).
template <int kBlockM>
__device__ __forceinline__ void ds_t(float (&dpt)[kBlockM / 8][4], const float (&pt)[kBlockM / 8][4],
                                     const float* d_s) {
  const int tq = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dpt[j][e] = pt[j][e] * (dpt[j][e] - d_s[8 * j + 2 * tq + (e & 1)]);
}

// The dkdv epilogue, through smem (the tiles are free now; `smem` holds a float32 tile of
// kBlockN x (kD + 4)): dK scaled and rotated back to the un-rotated basis, and dV, each
// warp's accumulators being block rows row0.. (C layout). Threads 0..kThreads-1 take
// part; sync() is their barrier.
template <typename T, int kD, int kBlockN, int kThreads, typename Sync = attn::BlockSync>
__device__ __forceinline__ void store_dk_dv(unsigned char* smem, const float (&dk)[kD / 8][4],
                                            const float (&dv)[kD / 8][4], int row0, const AttentionParams& p,
                                            int64_t b, int64_t hk, int64_t n0, Sync sync = {}) {
  float* tile = reinterpret_cast<float*>(smem);
  sync();
  attn::acc_to_smem<kD>(tile, dk, row0);
  sync();
  attn::store_tile<T, kD, kBlockN, kThreads>(tile, p.dk, p, b, hk, n0, true, static_cast<float>(p.softmax_scale));
  sync();
  attn::acc_to_smem<kD>(tile, dv, row0);
  sync();
  attn::store_tile<T, kD, kBlockN, kThreads>(tile, p.dv, p, b, hk, n0, false, 1.f);
}

template <typename T, int kD, bool kAtomicDq>
__global__ void __launch_bounds__(bwd::kThreads, 1) rope_attention_bwd_dkdv_kernel(const AttentionParams p,
                                                                                   const BackwardScratch sc) {
  using namespace attn;
  using namespace bwd;
  constexpr int kLd = kD + kPad;
  constexpr int kLdS = kBlockN + kPad;
  constexpr int kStage = 2 * kBlockM * kLd;  // one stage: q tile, then dO tile
  // smem: K, V; two stages of (q, dO); two of (lse, D); dS as [query][key] (atomic mode).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + kBlockN * kLd;
  T* stages = v_s + kBlockN * kLd;
  float* stats = reinterpret_cast<float*>(stages + 2 * kStage);  // [stage][lse | D][kBlockM]
  T* ds_s = reinterpret_cast<T*>(stats + 4 * kBlockM);
  static_assert(kBlockN * (kD + 4) * sizeof(float) <= (2 * kBlockN * kLd + 2 * kStage) * sizeof(T),
                "the float32 epilogue tile reuses the k/v/q/dO tiles' smem");

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int64_t hk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t group = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const float scale_log2 = static_cast<float>(p.softmax_scale) * kLog2e;
  const int64_t keys[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};

  // Work items: every query tile at or after the keys (causal) of every q head of the
  // GQA group; item i = (head hk * group + i / tiles, query tile i % tiles).
  const int64_t m_begin = p.causal ? n0 : 0;  // causal: queries before the keys see none of them
  const int64_t tiles = (p.seqlen - m_begin + kBlockM - 1) / kBlockM;
  const int64_t items = group * tiles;
  const auto item_head = [&](int64_t i) { return hk * group + i / tiles; };
  const auto item_row = [&](int64_t i) { return m_begin + (i % tiles) * kBlockM; };
  // Stage item i: q (a plain async copy when pre-rotated) and dO with cp.async, one
  // commit group per item; the row stats with plain loads.
  const auto stage_item = [&](int64_t i, int st) {
    const int64_t hq = item_head(i), m0 = item_row(i);
    stage_tile_pair<T, kD, kBlockM, kThreads>(stages + st * kStage, p.q, p.q_prerotated, p.grad_out, p, b, hq, m0);
    load_row_stats<kBlockM, kThreads>(stats + 2 * st * kBlockM, stats + (2 * st + 1) * kBlockM, p, sc.d, b,
                                      hq, m0);
  };

  load_tile<T, kD, kBlockN, kThreads>(k_s, p.k, p, b, hk, n0, !p.k_prerotated);
  load_tile<T, kD, kBlockN, kThreads>(v_s, p.v, p, b, hk, n0, false);
  stage_item(0, 0);

  float dk[kD / 8][4], dv[kD / 8][4];
  zero(dk);
  zero(dv);

  for (int64_t it = 0; it < items; ++it) {
    const int st = static_cast<int>(it & 1);
    const int64_t hq = item_head(it), m0 = item_row(it);
    __syncthreads();  // every warp is done with the other stage (item it - 1) and with dS
    stage_next_and_wait(it + 1 < items, [&] { stage_item(it + 1, st ^ 1); });
    __syncthreads();  // ... for every warp (and K, V, the row stats)
    const T* q_s = stages + st * kStage;
    const T* do_s = q_s + kBlockM * kLd;
    const float* lse_s = stats + 2 * st * kBlockM;
    const float* d_s = lse_s + kBlockM;

    // S^T = K Q^T for this warp's 16 keys x 64 queries.
    float pt[kBlockM / 8][4];
    zero(pt);
    gemm_nt<T, kBlockM / 8, kD>(pt, k_s, kLd, warp * 16, q_s, kLd);
    // P^T from the saved lse; masked entries (causal, padding) are exactly 0. Only
    // tiles that cross the diagonal or the sequence end need the mask. (The per-entry
    // math of prob(), written out: through it ptxas spilled 8 bytes more here.)
    const bool full_tile = m0 + kBlockM <= p.seqlen && n0 + kBlockN <= p.seqlen &&
                           !(p.causal && n0 + kBlockN - 1 > m0);
#pragma unroll
    for (int j = 0; j < kBlockM / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = 8 * j + 2 * tq + (e & 1);
        const int64_t query = m0 + qi, key = keys[e >> 1];
        const bool valid = full_tile || (key < p.seqlen && query < p.seqlen && (!p.causal || key <= query));
        pt[j][e] = valid ? exp2f(fmaf(pt[j][e], scale_log2, -lse_s[qi])) : 0.f;
      }
    }
    // dV += P^T dO.
    gemm_acc_nn<T, kD / 8, kBlockM>(dv, pt, do_s, kLd);
    // dP^T = V dO^T, then dS^T = P^T * (dP^T - D), in place.
    float dst[kBlockM / 8][4];
    zero(dst);
    gemm_nt<T, kBlockM / 8, kD>(dst, v_s, kLd, warp * 16, do_s, kLd);
    ds_t<kBlockM>(dst, pt, d_s);
    // dK += dS^T Q (rotated basis; scale and un-rotation in the epilogue).
    gemm_acc_nn<T, kD / 8, kBlockM>(dk, dst, q_s, kLd);
    if constexpr (kAtomicDq) {
      // dQ (64 queries x kD) += dS K (128 keys): dS goes through smem transposed to
      // [query][key]; warp w then owns queries 16 (w % 4).. and half w / 4 of the columns.
      static_assert(kThreads / 32 == 2 * (kBlockM / 16), "8 warps = 4 query row tiles x 2 column halves");
      constexpr int kCols = kD / 2;
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          ds_s[(8 * j + 2 * tq + (e & 1)) * kLdS + warp * 16 + g + 8 * (e >> 1)] = static_cast<T>(dst[j][e]);
      __syncthreads();
      const int r0 = 16 * (warp % 4), c0 = kCols * (warp / 4);
      float dq[kCols / 8][4];
      zero(dq);
      gemm_nn<T, kCols / 8, kBlockN>(dq, ds_s, kLdS, r0, k_s, kLd, c0);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = m0 + r0 + g + 8 * r;
        if (row >= p.seqlen) continue;
        float* dst_row = sc.dq_accum + ((b * p.seqlen + row) * p.heads_q + hq) * kD + c0;
#pragma unroll
        for (int jd = 0; jd < kCols / 8; ++jd) atomic_add2(dst_row + 8 * jd + 2 * tq, dq[jd][2 * r], dq[jd][2 * r + 1]);
      }
    }
  }

  store_dk_dv<T, kD, kBlockN, kThreads>(smem_raw, dk, dv, warp * 16, p, b, hk, n0);
}

// Deterministic dQ: one block per kDqBlockM queries of one (batch, q head); key tiles
// double-buffered (the next K, V stream in with cp.async during this tile's products).
template <typename T, int kD>
__global__ void __launch_bounds__(bwd::kDqThreads) rope_attention_bwd_dq_kernel(const AttentionParams p,
                                                                                const BackwardScratch sc) {
  using namespace attn;
  constexpr int kBlockM = bwd::kDqBlockM, kBlockN = bwd::kDqBlockN, kThreads = bwd::kDqThreads;
  constexpr int kLd = kD + kPad;
  constexpr int kStage = 2 * kBlockN * kLd;  // one stage: K tile, then V tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* do_s = q_s + kBlockM * kLd;
  T* stages = do_s + kBlockM * kLd;
  float* lse_s = reinterpret_cast<float*>(stages + 2 * kStage);
  float* d_s = lse_s + kBlockM;

  // Causal: the last query blocks see the most keys; launch them first (shorter tail).
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int64_t hq = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = hq / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const float scale_log2 = static_cast<float>(p.softmax_scale) * bwd::kLog2e;
  const int64_t rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  // K (a plain async copy when pre-rotated) and V of key tile n0 into stage st.
  const auto stage_tile = [&](int64_t n0, int st) {
    stage_tile_pair<T, kD, kBlockN, kThreads>(stages + st * kStage, p.k, p.k_prerotated, p.v, p, b, hk, n0);
  };

  load_tile<T, kD, kBlockM, kThreads>(q_s, p.q, p, b, hq, m0, !p.q_prerotated);
  load_tile<T, kD, kBlockM, kThreads>(do_s, p.grad_out, p, b, hq, m0, false);
  load_row_stats<kBlockM, kThreads>(lse_s, d_s, p, sc.d, b, hq, m0);
  stage_tile(0, 0);
  __syncthreads();
  const float lse_r[2] = {lse_s[warp * 16 + g], lse_s[warp * 16 + g + 8]};
  const float d_r[2] = {d_s[warp * 16 + g], d_s[warp * 16 + g + 8]};

  float dq[kD / 8][4];
  zero(dq);

  const int64_t n_end = p.causal ? std::min<int64_t>(p.seqlen, m0 + kBlockM) : p.seqlen;
  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    const int st = static_cast<int>((n0 / kBlockN) & 1);
    __syncthreads();  // every warp is done with the other stage (tile n0 - kBlockN)
    if (n0 + kBlockN < n_end) {
      stage_tile(n0 + kBlockN, st ^ 1);
      cp_async_wait<1>();  // tile n0 has landed (the next may be in flight)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_s = stages + st * kStage;
    const T* v_s = k_s + kBlockN * kLd;
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
        const float pr = valid ? exp2f(fmaf(s[j][e], scale_log2, -lse_r[e >> 1])) : 0.f;
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

// The dkdv step on sm_90a, rope_attention_bwd_sm90.cuh and rope_attention_bwd_sm90_ws.cuh
// (included by the same .cu files); the warp-specialised one returns false when it
// cannot take the call.
template <typename T, int kD>
void launch_rope_attention_bwd_dkdv_sm90(const AttentionParams& p, const BackwardScratch& sc, cudaStream_t stream);
template <typename T, int kD>
bool launch_rope_attention_bwd_dkdv_sm90_ws(const AttentionParams& p, const BackwardScratch& sc,
                                            cudaStream_t stream);

// Explicitly instantiated once per (dtype, head dim) in rope_attention_bwd_<dtype>_hd<kD>.cu.
template <typename T, int kD>
void launch_rope_attention_bwd(const AttentionParams& p, const BackwardScratch& sc, cudaStream_t stream) {
  using namespace bwd;
  constexpr size_t kLd = kD + attn::kPad;
  const auto ublocks = [](int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); };

  const int64_t rows = p.batch * p.seqlen * p.heads_q;
  rope_attention_bwd_dot_do_o_kernel<T, kD><<<ublocks(rows, kThreads / 32), kThreads, 0, stream>>>(p, sc.d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (use_sm90_kernels(p, /*backward=*/true)) {
    if (!use_sm90_ws_kernels(/*backward=*/true) || !launch_rope_attention_bwd_dkdv_sm90_ws<T, kD>(p, sc, stream))
      launch_rope_attention_bwd_dkdv_sm90<T, kD>(p, sc, stream);
  } else {
    // K, V, two stages of (q, dO), two of (lse, D); + dS in atomic mode.
    const size_t smem = (2 * kBlockN + 4 * kBlockM) * kLd * sizeof(T) + 4 * kBlockM * sizeof(float) +
                        (p.deterministic ? 0 : static_cast<size_t>(kBlockM) * (kBlockN + attn::kPad) * sizeof(T));
    launch_kernel(p.deterministic ? rope_attention_bwd_dkdv_kernel<T, kD, false>
                                  : rope_attention_bwd_dkdv_kernel<T, kD, true>,
                  attention_grid(p, kBlockN, p.heads_kv), kThreads, smem, stream, p, sc);
  }
  if (p.deterministic) {
    // q, dO, two stages of (K, V), lse, D.
    const size_t dq_smem = (2 * kDqBlockM + 4 * kDqBlockN) * kLd * sizeof(T) + 2 * kDqBlockM * sizeof(float);
    launch_kernel(rope_attention_bwd_dq_kernel<T, kD>, attention_grid(p, kDqBlockM, p.heads_q), kDqThreads, dq_smem,
                  stream, p, sc);
  } else {
    rope_attention_bwd_dq_convert_kernel<T, kD><<<ublocks(rows * kD, 256), 256, 0, stream>>>(p, sc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace pirope::cuda
