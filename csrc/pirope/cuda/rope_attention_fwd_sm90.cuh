// Hopper (sm_90a) forward of rope_attention: the algorithm of rope_attention_fwd.cuh
// (online softmax in the log2 domain, q rotated on the way into smem, k pre-rotated)
// with both tile products on warpgroup tensor cores (wgmma.cuh).
//
// Block = 2 warpgroups = 128 query rows of one (batch, q head), 64 per warpgroup. For
// every 128-key tile: S = Q K^T (ss: q and K K-major from smem; 64 x 128 float32 per
// warpgroup), mask, online softmax, O += P V (rs: P from the S registers, V MN-major
// from smem). The next K and V tiles stream in with cp.async during this tile's work
// (two smem stages). Needs p.k_prerotated (use_sm90_kernels). On an H100 (bf16, GQA
// 32/8, causal, 16k tokens) 7.6 ms against 8.3 ms for the mma.sync kernel and 3.5 ms
// for cuDNN: the softmax does not overlap the products (benchmarks/results/H100.md);
// rope_attention_fwd_sm90_ws.cuh is the pipelined version (opt-in until measured).
#pragma once

#include "rope_attention_fwd.cuh"
#include "wgmma.cuh"

namespace pirope::cuda {

namespace fwd90 {
constexpr int kBlockM = 128;  // query rows per block (64 per warpgroup)
constexpr int kBlockN = 128;  // keys per tile
constexpr int kThreads = 256;
constexpr attn::Smem kSmem = attn::Smem::kSwizzle128;  // every tile (wgmma.cuh)

// The per-tile math both Hopper forward kernels share (this one and the warp-specialised
// one, rope_attention_fwd_sm90_ws.cuh), for one warp's rows row0 + g and row0 + g + 8
// (g = lane / 4, tq = lane % 4) of a 64-row warpgroup slice that starts at block row
// wg_row0, against the 128 keys n0.. of a tile.

// Masks only tiles that cross the diagonal or the sequence end (block rows r see tile
// keys c <= r + diag).
__device__ __forceinline__ void mask_tile(float (&s)[kBlockN / 8][4], const AttentionParams& p, int64_t m0,
                                          int64_t n0, int wg_row0, int row0, int g, int tq) {
  if (p.causal ? n0 + kBlockN - 1 > m0 + wg_row0 || n0 + kBlockN > p.seqlen : n0 + kBlockN > p.seqlen) {
    const int key_end = static_cast<int>(std::min<int64_t>(p.seqlen - n0, kBlockN));
    const int diag = static_cast<int>(m0 - n0);
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 8 * j + 2 * tq + (e & 1), r = row0 + g + 8 * (e >> 1);
        if (c >= key_end || (p.causal && c > r + diag)) s[j][e] = -INFINITY;
      }
  }
}

// Online softmax in the log2 domain (as rope_attention_fwd.cuh): s becomes
// exp2(s * scale_log2 - running max), row_max (raw, unscaled) and row_sum move on, and
// corr[r] is the factor the output accumulated so far must be multiplied by.
__device__ __forceinline__ void online_softmax(float (&s)[kBlockN / 8][4], float (&row_max)[2], float (&row_sum)[2],
                                               float (&corr)[2], float scale_log2) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // rows g (r = 0) and g + 8 (r = 1) of this warp
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
    const float new_max = fmaxf(row_max[r], tile_max);
    const float safe = new_max == -INFINITY ? 0.f : new_max * scale_log2;
    corr[r] = exp2f(fmaf(row_max[r], scale_log2, -safe));
    row_max[r] = new_max;
    row_sum[r] *= corr[r];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      s[j][2 * r] = exp2f(fmaf(s[j][2 * r], scale_log2, -safe));
      s[j][2 * r + 1] = exp2f(fmaf(s[j][2 * r + 1], scale_log2, -safe));
      row_sum[r] += s[j][2 * r] + s[j][2 * r + 1];
    }
  }
}
template <int NB>
__device__ __forceinline__ void rescale_rows(float (&o)[NB][4], const float (&corr)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      o[j][2 * r] *= corr[r];
      o[j][2 * r + 1] *= corr[r];
    }
}

// Epilogue, step 1: O / row sum, and the natural-log log-sum-exp of each row into p.lse.
template <int NB>
__device__ __forceinline__ void normalize_rows(float (&o)[NB][4], const float (&row_max)[2],
                                               const float (&row_sum)[2], const AttentionParams& p, int64_t b,
                                               int64_t hq, int64_t row_g, int tq, float scale_log2) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      o[j][2 * r] *= inv;
      o[j][2 * r + 1] *= inv;
    }
    const int64_t row = row_g + 8 * r;
    if (tq == 0 && row < p.seqlen) {
      float* lse = static_cast<float*>(p.lse) + (b * p.heads_q + hq) * p.seqlen + row;
      *lse = (row_max[r] * scale_log2 + log2f(sum)) * 0.6931471805599453f;
    }
  }
}

// Epilogue: step 1, then O through a float32 smem tile (reusing the q/k/v tiles once
// sync() has passed: threads 0..kThreads-1 take part) to 16-byte stores.
template <typename T, int kD, int kThreads, typename Sync = attn::BlockSync>
__device__ __forceinline__ void store_out(unsigned char* smem, float (&o)[kD / 8][4], const float (&row_max)[2],
                                          const float (&row_sum)[2], const AttentionParams& p, int64_t b,
                                          int64_t hq, int64_t m0, int row0, float scale_log2, Sync sync = {}) {
  const int lane = threadIdx.x % 32;
  normalize_rows(o, row_max, row_sum, p, b, hq, m0 + row0 + lane / 4, lane % 4, scale_log2);
  sync();  // every warpgroup is done with the q/k/v tiles: reuse their smem
  float* tile = reinterpret_cast<float*>(smem);
  attn::acc_to_smem<kD>(tile, o, row0);
  sync();
  attn::store_tile<T, kD, kBlockM, kThreads>(tile, p.out, p, b, hq, m0, false, 1.f);
}
}  // namespace fwd90

template <typename T, int kD>
__global__ void __launch_bounds__(fwd90::kThreads, 1) rope_attention_fwd_sm90_kernel(const AttentionParams p) {
#ifdef PIROPE_SM90A_DEVICE
  using namespace fwd90;
  constexpr int kStage = 2 * kBlockN * kD;  // one stage: K tile, then V tile
  static_assert(kBlockM * (kD + 4) * sizeof(float) <= (kBlockM * kD + 2 * kStage) * sizeof(T),
                "the float32 epilogue tile reuses the q/k/v tiles' smem");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = wg::align1024<T>(smem_raw);  // every tile below starts at a multiple of 1 KB
  T* stages = q_s + kBlockM * kD;

  // Causal: the last query blocks have the most keys; launch them first (shorter tail).
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int64_t hq = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = hq / (p.heads_q / p.heads_kv);
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int row0 = 64 * wg + 16 * warp;  // this warp's first row in the block
  const float scale_log2 = static_cast<float>(p.softmax_scale) * 1.4426950408889634f;
  const auto stage_tile = [&](int64_t n0, int st) {
    T* k_dst = stages + st * kStage;
    attn::copy_tile_async<T, kD, kBlockN, kThreads, kSmem>(k_dst, p.k, p, b, hk, n0);
    attn::copy_tile_async<T, kD, kBlockN, kThreads, kSmem>(k_dst + kBlockN * kD, p.v, p, b, hk, n0);
    attn::cp_async_commit();
  };

  attn::load_tile<T, kD, kBlockM, kThreads, kSmem>(q_s, p.q, p, b, hq, m0, true);
  stage_tile(0, 0);

  float o[kD / 8][4];
  attn::zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // raw (unscaled) max

  const int64_t n_end = p.causal ? std::min<int64_t>(p.seqlen, m0 + kBlockM) : p.seqlen;
  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    const int st = static_cast<int>((n0 / kBlockN) & 1);
    __syncthreads();  // every warpgroup is done with the other stage (tile n0 - kBlockN)
    attn::stage_next_and_wait(n0 + kBlockN < n_end, [&] { stage_tile(n0 + kBlockN, st ^ 1); });
    wg::fence_proxy_async();  // the landed tiles (and the q tile), for the tensor cores
    __syncthreads();
    const T* k_s = stages + st * kStage;
    const T* v_s = k_s + kBlockN * kD;

    // S = Q K^T for this warpgroup's 64 rows x 128 keys.
    float s[kBlockN / 8][4];
    attn::zero(s);
    wg::fence();
    wg::gemm_ss<T, kBlockN, 0, 0, kD / 16>(
        s, [&](int k) { return wg::desc_k<T, kD, kBlockM>(q_s, 64 * wg, 16 * k); },
        [&](int k) { return wg::desc_k<T, kD, kBlockN>(k_s, 0, 16 * k); }, false);
    wg::wait<0>();
    wg::fence_operand(s);

    fwd90::mask_tile(s, p, m0, n0, 64 * wg, row0, g, tq);
    float corr[2];
    fwd90::online_softmax(s, row_max, row_sum, corr, scale_log2);
    fwd90::rescale_rows(o, corr);

    // O += P V over the tile's 128 keys.
    wg::fence();
    wg::gemm_rs<T, kD, 1, kBlockN / 16>(o, s, [&](int k) { return wg::desc_mn<T, kD, kBlockN>(v_s, 16 * k, 0); });
    wg::wait<0>();
    wg::fence_operand(o);
  }

  fwd90::store_out<T, kD, kThreads>(smem_raw, o, row_max, row_sum, p, b, hq, m0, row0, scale_log2);
#else
  __trap();  // launched only on sm_90 devices by a build with sm_90a code (use_sm90_kernels)
#endif
}

template <typename T, int kD>
void launch_rope_attention_fwd_sm90(const AttentionParams& p, cudaStream_t stream) {
  using namespace fwd90;
  // q, 2 x (K, V), + 1 KB of alignment slack.
  const size_t smem = static_cast<size_t>(kBlockM + 4 * kBlockN) * kD * sizeof(T) + 1024;
  launch_kernel(rope_attention_fwd_sm90_kernel<T, kD>, attention_grid(p, kBlockM, p.heads_q), kThreads, smem, stream,
                p);
}

}  // namespace pirope::cuda
