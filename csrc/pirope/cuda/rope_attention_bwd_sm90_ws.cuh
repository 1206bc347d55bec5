// Warp-specialised Hopper (sm_90a) dK/dV kernel of the rope_attention backward: the
// work items and math of rope_attention_bwd_sm90.cuh on the producer/consumer pipeline
// of rope_attention_fwd_sm90_ws.cuh:
//   - producer warpgroup: one thread loads K, V once and then every item's q and dO
//     tiles with TMA; one warp loads the item's row stats (lse, D) into smem; both
//     complete the stage's `full` mbarrier. Two stages; the consumers free a stage
//     (`empty`) once every product that reads it has finished;
//   - two consumer warpgroups (64 keys each) only compute. Per item: S^T and dP^T
//     issued, P^T computed once S^T is done (while dP^T still runs), then dS^T;
//     dV += P^T dO and dK += dS^T Q run while dS^T goes to smem for dQ = dS K (both
//     warpgroups' halves: one named barrier instead of the two block-wide barriers per
//     item of the other kernel, whose threads also issued every copy);
//   - dQ leaves through smem: each warpgroup writes its float32 half to a swizzled smem
//     tile and one of its threads adds the tile into the accumulator with a TMA
//     reduction (cp.reduce.async.bulk.tensor), as FlashAttention-3 does, instead of
//     float2 atomics from every thread (16 per thread and item at head dim 128) that
//     take the consumers' issue slots. The reduction runs while the next item is computed.
//     (PIROPE_WS_DQ=atomic keeps the atomics, kTmaDq = false: ws_dq_atomics.)
// Chosen by PIROPE_ATTENTION_SM90=ws or ws_bwd (use_sm90_ws_kernels) where the sm_90a
// kernels run and TMA can describe q, dO, k, v and the dQ accumulator (else
// rope_attention_bwd_sm90.cuh runs).
#pragma once

#include "rope_attention_bwd_sm90.cuh"
#include "tma.cuh"

namespace pirope::cuda {

namespace bwd90ws {
constexpr int kStages = 2;
constexpr int kConsumers = 256;
constexpr int kThreads = kConsumers + 128;
constexpr int kProducerRegs = 24;  // 128 x 24 + 256 x 240 = 384 x 168 (the launch budget)
constexpr int kConsumerRegs = 240;  // 232 spills in the consumers (head dim 128)
constexpr int kBarConsumers = 1;   // named barrier of the consumer warpgroups
constexpr int kBarDq = 2;          // 2 + warpgroup: that warpgroup's dQ tile is in smem

// This thread's dQ accumulators (C layout: rows 16 warp + g, + 8 of the 64 queries,
// columns 8 jd + 2 tq, + 1 of the warpgroup's kCols) into the float32 smem tile that
// tma::reduce_add_tile adds to the accumulator (128-byte panels of 32 columns).
template <int kCols>
__device__ __forceinline__ void stage_dq(float* dq_s, const float (&dq)[kCols / 8][4]) {
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int jd = 0; jd < kCols / 8; ++jd)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int off =
          attn::tile_offset<kCols, bwd90::kBlockM, attn::Smem::kSwizzle128, 4>(16 * warp + g + 8 * r, 8 * jd + 2 * tq);
      *reinterpret_cast<float2*>(dq_s + off) = make_float2(dq[jd][2 * r], dq[jd][2 * r + 1]);
    }
}
}  // namespace bwd90ws

// kAtomicDq: dQ is added here (else by the deterministic dq kernel); kTmaDq: by TMA
// reductions (else float2 atomics).
template <typename T, int kD, bool kAtomicDq, bool kTmaDq>
__global__ void __launch_bounds__(bwd90ws::kThreads, 1)
    rope_attention_bwd_dkdv_sm90_ws_kernel(const __grid_constant__ CUtensorMap q_map,
                                           const __grid_constant__ CUtensorMap do_map,
                                           const __grid_constant__ CUtensorMap k_map,
                                           const __grid_constant__ CUtensorMap v_map,
                                           const __grid_constant__ CUtensorMap dq_map, const AttentionParams p,
                                           const BackwardScratch sc) {
#ifdef PIROPE_SM90A_DEVICE
  using namespace bwd90ws;
  using bwd90::kBlockM;
  using bwd90::kBlockN;
  constexpr int kTile = kBlockM * kD;  // elements of a q or dO tile
  constexpr int kCols = bwd90::kDqCols<kD>;
  constexpr bool kDqTile = kAtomicDq && kTmaDq;
  // smem: K, V; kStages x (q, dO); atomic mode: 2 x dS^T, with kTmaDq dQ (float32, kCols
  // columns per warpgroup); kStages x (lse, D); barriers.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = wg::align1024<T>(smem_raw);  // every tile starts at a multiple of 1 KB
  T* v_s = k_s + kBlockN * kD;
  T* q_st = v_s + kBlockN * kD;          // stage s: q at q_st + 2 s kTile, dO right after
  T* ds_s = q_st + 2 * kStages * kTile;  // 2 buffers of kBlockN x kBlockM (atomic mode)
  float* dq_s = reinterpret_cast<float*>(ds_s + (kAtomicDq ? 2 * kBlockN * kBlockM : 0));
  float* stats = dq_s + (kDqTile ? kBlockM * kD : 0);  // [s][lse | D][64]
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(stats + 2 * kStages * kBlockM);
  uint64_t* full = kv_full + 1;
  uint64_t* empty = full + kStages;
  static_assert(kBlockN * (kD + 4) * sizeof(float) <= (2 * kBlockN * kD + 2 * kStages * kTile) * sizeof(T),
                "the float32 epilogue tile reuses the k/v/q/dO tiles' smem");

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int64_t hk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const bwd90::Items items(p, n0, hk);
  const int64_t n_items = items.count();

  if (threadIdx.x == 0) {
    tma::mbar_init(kv_full, 1);
    for (int s = 0; s < kStages; ++s) {
      tma::mbar_init(&full[s], 1 + 32);  // the TMA thread's expect_tx + the stats warp's lanes
      tma::mbar_init(&empty[s], kConsumers);
    }
    tma::fence_barrier_init();
  }
  __syncthreads();  // the last block-wide barrier: the producer warpgroup leaves early

  const int wg = __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / 128, 0);  // uniform (see the forward)
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  if (wg == kConsumers / 128) {
    tma::regs_dealloc<kProducerRegs>();
    if (warp == 0 && lane == 0) {  // TMA: K and V once, then (q, dO) per item
      tma::prefetch_map(&q_map);
      tma::prefetch_map(&do_map);
      tma::mbar_arrive_expect_tx(kv_full, 2 * kBlockN * kD * sizeof(T));
      tma::load_tile<T, kD, kBlockN>(k_s, &k_map, n0, hk, b, kv_full);
      tma::load_tile<T, kD, kBlockN>(v_s, &v_map, n0, hk, b, kv_full);
      for (int64_t it = 0; it < n_items; ++it) {
        const int st = static_cast<int>(it % kStages);
        tma::mbar_wait(&empty[st], ((it / kStages) & 1) ^ 1);
        tma::mbar_arrive_expect_tx(&full[st], 2 * kTile * sizeof(T));
        T* q_dst = q_st + 2 * st * kTile;
        tma::load_tile<T, kD, kBlockM>(q_dst, &q_map, items.row(it), items.head(it), b, &full[st]);
        tma::load_tile<T, kD, kBlockM>(q_dst + kTile, &do_map, items.row(it), items.head(it), b, &full[st]);
      }
    } else if (warp == 1) {  // the row stats of each item (lse in the log2 domain, D)
      for (int64_t it = 0; it < n_items; ++it) {
        const int st = static_cast<int>(it % kStages);
        tma::mbar_wait(&empty[st], ((it / kStages) & 1) ^ 1);
        float* lse_s = stats + 2 * st * kBlockM;
        load_row_stats<kBlockM, 32>(lse_s, lse_s + kBlockM, p, sc.d, b, items.head(it), items.row(it), lane);
        tma::mbar_arrive(&full[st]);  // releases this lane's stores to the consumers
      }
    }
    return;
  }

  // Consumers: warpgroup wg owns keys n0 + 64 wg .. + 63.
  tma::regs_alloc<kConsumerRegs>();
  const int g = lane / 4;
  const int row0 = 64 * wg + 16 * warp;  // this warp's first key row in the block
  const float scale_log2 = static_cast<float>(p.softmax_scale) * bwd::kLog2e;
  const int64_t keys[2] = {n0 + row0 + g, n0 + row0 + g + 8};
  const bool dq_leader = threadIdx.x % 128 == 0;  // issues its warpgroup's dQ reductions

  float dk[kD / 8][4], dv[kD / 8][4];
  attn::zero(dk);
  attn::zero(dv);
  tma::mbar_wait(kv_full, 0);

  for (int64_t it = 0; it < n_items; ++it) {
    const int st = static_cast<int>(it % kStages);
    const int64_t hq = items.head(it), m0 = items.row(it);
    tma::mbar_wait(&full[st], (it / kStages) & 1);
    const T* q_s = q_st + 2 * st * kTile;
    const T* do_s = q_s + kTile;
    const float* lse_s = stats + 2 * st * kBlockM;
    const float* d_s = lse_s + kBlockM;

    // S^T = K Q^T and dP^T = V dO^T for this warpgroup's 64 keys x 64 queries; P^T
    // (exp2: the MUFU pipe) while dP^T is still in flight, then dS^T = P^T * (dP^T - D).
    float pt[kBlockM / 8][4], dst[kBlockM / 8][4];
    bwd90::issue_scores_t<T, kD>(pt, dst, k_s, v_s, q_s, do_s, wg);
    wg::wait<1>();  // S^T is done (groups complete in order)
    wg::fence_operand(pt);
    bwd90::probs_ds_t</*kDs=*/false>(pt, dst, p, m0, n0, keys, lse_s, d_s, scale_log2);
    wg::wait<0>();
    wg::fence_operand(dst);
    ds_t<kBlockM>(dst, pt, d_s);

    // P^T and dS^T as A operands, dS^T into smem for dQ (before the products read its
    // registers: FlashAttention-3's order); then dV += P^T dO and dK += dS^T Q (rotated
    // basis; scale and un-rotation in the epilogue) run while dQ = dS K is issued.
    // dQ (64 queries x kCols columns of this warpgroup) = dS K over both warpgroups'
    // keys: dS^T of item it in buffer it % 2 (a warpgroup may still be reading the
    // other one: it has passed this item's barrier, not the next).
    T* ds_buf = kAtomicDq ? ds_s + (it % 2) * kBlockN * kBlockM : nullptr;
    uint32_t pf[kBlockM / 16][4], dsf[kBlockM / 16][4];
    bwd90::issue_dv_dk<T, kD>(dv, dk, pf, dsf, pt, dst, q_s, do_s, ds_buf, row0);
    if constexpr (kAtomicDq) {
      wg::fence_proxy_async();
      // The previous item's dQ reduction has read this warpgroup's dQ tile (long done by
      // now); the barrier below passes that on to the warpgroup's other threads.
      if (kDqTile && dq_leader) tma::bulk_wait_read<0>();
      tma::bar_sync<kConsumers>(kBarConsumers);
      if (kCols * wg < kD) {
        float dq[kCols / 8][4];
        attn::zero(dq);  // (the product overwrites it: defined values for the asm operands)
        wg::fence();
        wg::gemm_ss<T, kCols, 1, 1, kBlockN / 16>(
            dq, [&](int k) { return wg::desc_mn<T, kBlockM, kBlockN>(ds_buf, 16 * k, 0); },
            [&](int k) { return wg::desc_mn<T, kD, kBlockN>(k_s, 16 * k, kCols * wg); }, false);
        wg::wait<0>();
        wg::fence_operand(dq);
        tma::mbar_arrive(&empty[st]);  // dV, dK and dQ are done with this stage
        if constexpr (kTmaDq) {
          float* dq_buf = dq_s + wg * kBlockM * kCols;
          bwd90ws::stage_dq<kCols>(dq_buf, dq);
          wg::fence_proxy_async();  // the tile, for the TMA unit's reads
          tma::bar_sync<128>(kBarDq + wg);
          if (dq_leader) tma::reduce_add_tile<kCols, kBlockM>(&dq_map, dq_buf, kCols * wg, m0, hq, b);
        } else {
          bwd90::add_dq<kD>(dq, sc, p, b, hq, m0, kCols * wg);
        }
      } else {
        wg::wait<0>();
        tma::mbar_arrive(&empty[st]);
      }
    } else {
      wg::wait<0>();
      tma::mbar_arrive(&empty[st]);
    }
    wg::fence_operand(dv);
    wg::fence_operand(dk);
    wg::fence_operand(pf);
    wg::fence_operand(dsf);
  }
  if (kDqTile && dq_leader) tma::bulk_wait<0>();  // the last reduction has read its smem tile (and landed)

  store_dk_dv<T, kD, kBlockN, kConsumers>(smem_raw, dk, dv, row0, p, b, hk, n0,
                                          [] { tma::bar_sync<kConsumers>(kBarConsumers); });
#else
  __trap();  // launched only on sm_90 devices by a build with sm_90a code (use_sm90_kernels)
#endif
}

// Returns false (nothing launched) when TMA cannot describe q, dO, k, v or (dQ by TMA
// reductions) the dQ accumulator, or the kernel was built with fewer registers than its
// warpgroups' split.
template <typename T, int kD>
bool launch_rope_attention_bwd_dkdv_sm90_ws(const AttentionParams& p, const BackwardScratch& sc,
                                            cudaStream_t stream) {
  using namespace bwd90ws;
  using bwd90::kBlockM;
  using bwd90::kBlockN;
  constexpr TileElem kElem = tile_elem<T>();
  const bool tma_dq = !p.deterministic && !ws_dq_atomics();
  CUtensorMap q_map, do_map, k_map, v_map, dq_map{};
  // The float32 dQ accumulator (batch, seqlen, heads_q, kD), contiguous (atomic mode).
  const AttentionTensor dq_accum{sc.dq_accum, p.seqlen * p.heads_q * kD, p.heads_q * kD, kD};
  const auto kernel = p.deterministic ? rope_attention_bwd_dkdv_sm90_ws_kernel<T, kD, false, false>
                      : tma_dq        ? rope_attention_bwd_dkdv_sm90_ws_kernel<T, kD, true, true>
                                      : rope_attention_bwd_dkdv_sm90_ws_kernel<T, kD, true, false>;
  if (!has_register_budget(kernel, kThreads, (kThreads - kConsumers) * kProducerRegs + kConsumers * kConsumerRegs) ||
      !encode_tile_map(&q_map, p.q, p.batch, p.seqlen, p.heads_q, kD, kElem, kBlockM) ||
      !encode_tile_map(&do_map, p.grad_out, p.batch, p.seqlen, p.heads_q, kD, kElem, kBlockM) ||
      !encode_tile_map(&k_map, p.k, p.batch, p.seqlen, p.heads_kv, kD, kElem, kBlockN) ||
      !encode_tile_map(&v_map, p.v, p.batch, p.seqlen, p.heads_kv, kD, kElem, kBlockN) ||
      (tma_dq && !encode_tile_map(&dq_map, dq_accum, p.batch, p.seqlen, p.heads_q, kD, TileElem::kFloat32, kBlockM)))
    return false;
  // K, V, kStages x (q, dO), in atomic mode 2 x dS^T (+ the float32 dQ tile with TMA
  // reductions), kStages x (lse, D), the barriers, + 1 KB of alignment slack.
  constexpr size_t kDsSmem = size_t{2} * kBlockN * kBlockM * sizeof(T), kDqSmem = kBlockM * kD * sizeof(float);
  constexpr size_t kSmem = static_cast<size_t>(2 * kBlockN + 2 * kStages * kBlockM) * kD * sizeof(T) +
                           2 * kStages * kBlockM * sizeof(float) + (1 + 2 * kStages) * sizeof(uint64_t) + 1024;
  static_assert(kSmem + kDsSmem + kDqSmem <= kSm90SmemPerBlock, "smem of the ws dkdv kernel exceeds the sm_90 limit");
  const size_t smem = kSmem + (p.deterministic ? 0 : kDsSmem) + (tma_dq ? kDqSmem : 0);
  launch_kernel(kernel, attention_grid(p, kBlockN, p.heads_kv), kThreads, smem, stream, q_map, do_map, k_map, v_map,
                dq_map, p, sc);
  return true;
}

}  // namespace pirope::cuda
