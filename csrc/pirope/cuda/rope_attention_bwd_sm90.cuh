// Hopper (sm_90a) dK/dV kernel of the rope_attention backward: the dkdv step of
// rope_attention_bwd.cuh (same work items, same math, same dQ atomics) with the five
// tile products on warpgroup tensor cores (wgmma.cuh) instead of mma.sync, whose
// per-warp operand traffic (ldmatrix) left the H100's tensor pipe 75% idle. Needs q
// and k pre-rotated (the tiles are plain async copies); the other kernels of the
// backward (D = rowsum(dO * O), dq_convert, the deterministic dq kernel) are shared.
//
// Block = 2 warpgroups = 128 keys of one (batch, kv head), 64 keys per warpgroup, dK and
// dV (64 x kD each) in registers. For every (q head of the GQA group, 64-query tile):
//   S^T = K Q^T, dP^T = V dO^T      (ss: K, V, q, dO K-major from smem)
//   P^T = exp2(S^T * scale_log2 - lse), dS^T = P^T * (dP^T - D)   (registers)
//   dV += P^T dO, dK += dS^T Q      (rs: P^T, dS^T as A from registers; dO, q MN-major)
//   dQ(64 x kD) += dS K             (atomic mode: dS^T staged in smem; warpgroup w
//                                    computes columns [64 w, 64 w + 64), float2 atomics;
//                                    head dim 64: warpgroup 0 alone)
// while the next tile's q and dO stream in with cp.async (two smem stages). On an H100
// (bf16, GQA 32/8, causal, 16k tokens) forward + backward take 29.4 ms with this kernel
// and the sm_90 forward, 38.2 ms with the mma.sync kernels, 14.7 ms with cuDNN.
#pragma once

#include "rope_attention_bwd.cuh"
#include "wgmma.cuh"

namespace pirope::cuda {

namespace bwd90 {
constexpr int kBlockN = 128;  // keys per block (64 per warpgroup)
constexpr int kBlockM = 64;   // queries per tile
constexpr int kThreads = 256;
constexpr attn::Smem kSmem = attn::Smem::kSwizzle128;  // every tile (wgmma.cuh)

// The work items of a dkdv block (keys n0.. of kv head hk): every 64-query tile at or
// after the keys (causal) of every q head of the GQA group; item i = (q head
// hk * group + i / tiles, query tile i % tiles), as in rope_attention_bwd_dkdv_kernel.
struct Items {
  int64_t group, tiles, m_begin, hk;
  __device__ __forceinline__ Items(const AttentionParams& p, int64_t n0, int64_t kv_head)
      : group(p.heads_q / p.heads_kv),
        tiles((p.seqlen - (p.causal ? n0 : 0) + kBlockM - 1) / kBlockM),
        m_begin(p.causal ? n0 : 0),
        hk(kv_head) {}
  __device__ __forceinline__ int64_t count() const { return group * tiles; }
  __device__ __forceinline__ int64_t head(int64_t i) const { return hk * group + i / tiles; }
  __device__ __forceinline__ int64_t row(int64_t i) const { return m_begin + (i % tiles) * kBlockM; }
};

// S^T = K Q^T, then dP^T = V dO^T (two wgmma groups, in that order) for warpgroup wg's 64
// keys x the tile's 64 queries (K, V: the block's kBlockN x kD tiles; q, dO: kBlockM x
// kD), issued, not waited for.
template <typename T, int kD>
__device__ __forceinline__ void issue_scores_t(float (&st)[kBlockM / 8][4], float (&dpt)[kBlockM / 8][4],
                                               const T* k_s, const T* v_s, const T* q_s, const T* do_s, int wg) {
  wg::fence();
  wg::gemm_ss<T, kBlockM, 0, 0, kD / 16>(
      st, [&](int k) { return wg::desc_k<T, kD, kBlockN>(k_s, 64 * wg, 16 * k); },
      [&](int k) { return wg::desc_k<T, kD, kBlockM>(q_s, 0, 16 * k); }, false);
  wg::gemm_ss<T, kBlockM, 0, 0, kD / 16>(
      dpt, [&](int k) { return wg::desc_k<T, kD, kBlockN>(v_s, 64 * wg, 16 * k); },
      [&](int k) { return wg::desc_k<T, kD, kBlockM>(do_s, 0, 16 * k); }, false);
}
// The same, waited for.
template <typename T, int kD>
__device__ __forceinline__ void scores_t(float (&st)[kBlockM / 8][4], float (&dpt)[kBlockM / 8][4], const T* k_s,
                                         const T* v_s, const T* q_s, const T* do_s, int wg) {
  issue_scores_t<T, kD>(st, dpt, k_s, v_s, q_s, do_s, wg);
  wg::wait<0>();
  wg::fence_operand(st);
  wg::fence_operand(dpt);
}

// P^T and dS^T of this thread's entries of a 64-key x 64-query tile (keys[0], keys[1]
// its two key rows, queries m0..), in place of the raw S^T and dP^T: P^T as prob(), and
// with kDs dS^T = P^T * (dP^T - D) in the same pass (rope_attention_bwd_sm90.cuh: as two
// passes, ptxas spilled); without, dS^T is left to ds_t (the warp-specialised kernel
// computes P^T while dP^T is still on the tensor cores).
template <bool kDs = true>
__device__ __forceinline__ void probs_ds_t(float (&pt)[kBlockM / 8][4], float (&dst)[kBlockM / 8][4],
                                           const AttentionParams& p, int64_t m0, int64_t n0,
                                           const int64_t (&keys)[2], const float* lse_s, const float* d_s,
                                           float scale_log2) {
  const int tq = threadIdx.x % 4;
  const bool full = full_tile<kBlockN, kBlockM>(p, m0, n0);
#pragma unroll
  for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qi = 8 * j + 2 * tq + (e & 1);
      pt[j][e] = prob(pt[j][e], full, p, keys[e >> 1], m0 + qi, scale_log2, lse_s[qi]);
      if constexpr (kDs) dst[j][e] = pt[j][e] * (dst[j][e] - d_s[qi]);
    }
}

// Atomic mode: dS^T (this warp's rows row0 + g, + 8 of the block's keys, as the A
// operands of issue_dv_dk below: a[k] holds n8 blocks 2k (registers 0, 1: rows g, g + 8) and
// 2k + 1 (registers 2, 3)) into smem as [key][query], the swizzled layout dQ = dS K
// reads as an MN-major A operand.
template <typename T>
__device__ __forceinline__ void stage_ds_t(T* ds_s, const uint32_t (&a)[kBlockM / 16][4], int row0) {
  const int lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int off = attn::tile_offset<kBlockM, kBlockN, kSmem>(row0 + g + 8 * r, 8 * j + 2 * tq);
      *reinterpret_cast<uint32_t*>(ds_s + off) = a[j / 2][2 * (j % 2) + r];
    }
}

// P^T and dS^T rounded to T as A operands (pf, dsf: they must stay unchanged until the
// products have been waited for), then dV += P^T dO and dK += dS^T Q issued (rotated
// basis; scale and un-rotation in the epilogue), not waited for. With ds_stage, dS^T goes
// to smem (stage_ds_t) before the products are issued, as FlashAttention-3 orders it (the
// warp-specialised kernel). Without, the caller stages it while dK's wgmma may still be
// reading dsf: reads only, so that the stores overlap the product, which the PTX ISA
// nonetheless calls undefined before the wait. The kernel below does this and was
// verified on an H100; should a toolchain or device ever break it, pass ds_stage.
template <typename T, int kD>
__device__ __forceinline__ void issue_dv_dk(float (&dv)[kD / 8][4], float (&dk)[kD / 8][4],
                                            uint32_t (&pf)[kBlockM / 16][4], uint32_t (&dsf)[kBlockM / 16][4],
                                            const float (&pt)[kBlockM / 8][4], const float (&dst)[kBlockM / 8][4],
                                            const T* q_s, const T* do_s, T* ds_stage = nullptr, int row0 = 0) {
#pragma unroll
  for (int k = 0; k < kBlockM / 16; ++k) {
    attn::acc_to_a<T>(pf[k], pt, k);
    attn::acc_to_a<T>(dsf[k], dst, k);
  }
  if (ds_stage != nullptr) stage_ds_t<T>(ds_stage, dsf, row0);
  wg::fence();
  wg::gemm_rs<T, kD, 1, kBlockM / 16>(dv, pf, [&](int k) { return wg::desc_mn<T, kD, kBlockM>(do_s, 16 * k, 0); });
  wg::gemm_rs<T, kD, 1, kBlockM / 16>(dk, dsf, [&](int k) { return wg::desc_mn<T, kD, kBlockM>(q_s, 16 * k, 0); });
}

// dQ columns per warpgroup: whole 64-column panels (head dim 64: warpgroup 0 alone).
template <int kD>
constexpr int kDqCols = kD >= 128 ? kD / 2 : kD;

// dQ (64 queries x kDqCols columns from col0: C layout, this warp rows 16 warp + g, + 8)
// added into the float32 accumulator with float2 atomics; rows past seqlen skipped.
template <int kD>
__device__ __forceinline__ void add_dq(const float (&dq)[kDqCols<kD> / 8][4], const BackwardScratch& sc,
                                       const AttentionParams& p, int64_t b, int64_t hq, int64_t m0, int col0) {
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = m0 + 16 * warp + g + 8 * r;
    if (row >= p.seqlen) continue;
    float* dst_row = sc.dq_accum + ((b * p.seqlen + row) * p.heads_q + hq) * kD + col0;
#pragma unroll
    for (int jd = 0; jd < kDqCols<kD> / 8; ++jd)
      attn::atomic_add2(dst_row + 8 * jd + 2 * tq, dq[jd][2 * r], dq[jd][2 * r + 1]);
  }
}
}  // namespace bwd90

template <typename T, int kD, bool kAtomicDq>
__global__ void __launch_bounds__(bwd90::kThreads, 1)
    rope_attention_bwd_dkdv_sm90_kernel(const AttentionParams p, const BackwardScratch sc) {
#ifdef PIROPE_SM90A_DEVICE
  using namespace bwd90;
  constexpr int kStage = 2 * kBlockM * kD;  // one stage: q tile, then dO tile
  // smem: K, V; two stages of (q, dO); two of (lse, D); dS^T as [key][query] (atomic mode).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = wg::align1024<T>(smem_raw);  // every tile below starts at a multiple of 1 KB
  T* v_s = k_s + kBlockN * kD;
  T* stages = v_s + kBlockN * kD;
  float* stats = reinterpret_cast<float*>(stages + 2 * kStage);  // [stage][lse | D][kBlockM]
  T* ds_s = reinterpret_cast<T*>(stats + 4 * kBlockM);
  static_assert(kBlockN * (kD + 4) * sizeof(float) <= (2 * kBlockN * kD + 2 * kStage) * sizeof(T),
                "the float32 epilogue tile reuses the k/v/q/dO tiles' smem");

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int64_t hk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int row0 = 64 * wg + 16 * warp;  // this warp's first key row in the block
  const float scale_log2 = static_cast<float>(p.softmax_scale) * bwd::kLog2e;
  const int64_t keys[2] = {n0 + row0 + g, n0 + row0 + g + 8};

  const bwd90::Items items(p, n0, hk);
  const int64_t n_items = items.count();
  const auto stage_item = [&](int64_t i, int st) {
    const int64_t hq = items.head(i), m0 = items.row(i);
    T* q_dst = stages + st * kStage;
    attn::copy_tile_async<T, kD, kBlockM, kThreads, kSmem>(q_dst, p.q, p, b, hq, m0);
    attn::copy_tile_async<T, kD, kBlockM, kThreads, kSmem>(q_dst + kBlockM * kD, p.grad_out, p, b, hq, m0);
    attn::cp_async_commit();
    load_row_stats<kBlockM, kThreads>(stats + 2 * st * kBlockM, stats + (2 * st + 1) * kBlockM, p, sc.d, b, hq,
                                      m0);
  };

  // K and V travel in item 0's commit group.
  attn::copy_tile_async<T, kD, kBlockN, kThreads, kSmem>(k_s, p.k, p, b, hk, n0);
  attn::copy_tile_async<T, kD, kBlockN, kThreads, kSmem>(v_s, p.v, p, b, hk, n0);
  stage_item(0, 0);

  float dk[kD / 8][4], dv[kD / 8][4];
  attn::zero(dk);
  attn::zero(dv);

  for (int64_t it = 0; it < n_items; ++it) {
    const int st = static_cast<int>(it & 1);
    const int64_t hq = items.head(it), m0 = items.row(it);
    __syncthreads();  // every warpgroup is done with the other stage (item it - 1) and with dS
    attn::stage_next_and_wait(it + 1 < n_items, [&] { stage_item(it + 1, st ^ 1); });
    wg::fence_proxy_async();  // the landed tiles, for the tensor cores' reads
    __syncthreads();
    const T* q_s = stages + st * kStage;
    const T* do_s = q_s + kBlockM * kD;
    const float* lse_s = stats + 2 * st * kBlockM;
    const float* d_s = lse_s + kBlockM;

    // S^T = K Q^T and dP^T = V dO^T for this warpgroup's 64 keys x 64 queries.
    float pt[kBlockM / 8][4], dst[kBlockM / 8][4];
    bwd90::scores_t<T, kD>(pt, dst, k_s, v_s, q_s, do_s, wg);

    // P^T from the saved lse (masked entries exactly 0), dS^T = P^T * (dP^T - D).
    bwd90::probs_ds_t(pt, dst, p, m0, n0, keys, lse_s, d_s, scale_log2);
    // dV += P^T dO, dK += dS^T Q.
    uint32_t pf[kBlockM / 16][4], dsf[kBlockM / 16][4];
    bwd90::issue_dv_dk<T, kD>(dv, dk, pf, dsf, pt, dst, q_s, do_s);
    if constexpr (kAtomicDq) {
      // dS^T into smem as [key][query] (swizzled layout, 64 columns), then
      // dQ (64 queries x kCols columns of this warpgroup) = dS K over all 128 keys:
      // A = dS (M = queries, K = keys) is MN-major there, B = K (N = dims) too.
      bwd90::stage_ds_t<T>(ds_s, dsf, row0);
      wg::fence_proxy_async();
      __syncthreads();
      constexpr int kCols = bwd90::kDqCols<kD>;
      if (kCols * wg < kD) {
        float dq[kCols / 8][4];
        attn::zero(dq);
        wg::fence();
        wg::gemm_ss<T, kCols, 1, 1, kBlockN / 16>(
            dq, [&](int k) { return wg::desc_mn<T, kBlockM, kBlockN>(ds_s, 16 * k, 0); },
            [&](int k) { return wg::desc_mn<T, kD, kBlockN>(k_s, 16 * k, kCols * wg); }, false);
        wg::wait<0>();
        wg::fence_operand(dq);
        bwd90::add_dq<kD>(dq, sc, p, b, hq, m0, kCols * wg);
      }
      wg::wait<0>();
    } else {
      wg::wait<0>();
    }
    wg::fence_operand(dv);
    wg::fence_operand(dk);
    wg::fence_operand(pf);
    wg::fence_operand(dsf);
  }

  store_dk_dv<T, kD, kBlockN, kThreads>(smem_raw, dk, dv, row0, p, b, hk, n0);
#else
  __trap();  // launched only on sm_90 devices by a build with sm_90a code (use_sm90_kernels)
#endif
}

// The dkdv step on sm_90a (p.q_prerotated and p.k_prerotated): grid and smem.
template <typename T, int kD>
void launch_rope_attention_bwd_dkdv_sm90(const AttentionParams& p, const BackwardScratch& sc, cudaStream_t stream) {
  using namespace bwd90;
  // K, V, two stages of (q, dO), two of (lse, D); + dS^T in atomic mode; + 1 KB of
  // alignment slack.
  const size_t smem = (2 * kBlockN + 4 * kBlockM) * kD * sizeof(T) + 4 * kBlockM * sizeof(float) +
                      (p.deterministic ? 0 : static_cast<size_t>(kBlockN) * kBlockM * sizeof(T)) + 1024;
  launch_kernel(p.deterministic ? rope_attention_bwd_dkdv_sm90_kernel<T, kD, false>
                                : rope_attention_bwd_dkdv_sm90_kernel<T, kD, true>,
                attention_grid(p, kBlockN, p.heads_kv), kThreads, smem, stream, p, sc);
}

}  // namespace pirope::cuda
