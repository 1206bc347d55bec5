// Warp-specialised Hopper (sm_90a) forward of rope_attention: the math of
// rope_attention_fwd_sm90.cuh (same tiles, same per-tile helpers) on the pipeline that
// FlashAttention-3 and cuDNN use, so that the softmax overlaps the tensor cores:
//   - a producer warpgroup (one thread of it) streams K and V tiles with TMA (tma.cuh)
//     into two-stage rings guarded by mbarriers; it gives most of its registers to
//   - two consumer warpgroups (64 query rows each) that only compute;
//   - ping-pong: the consumers take turns issuing their products (two named barriers),
//     so one warpgroup's softmax runs while the other's products occupy the tensor cores;
//   - within a warpgroup, S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued together and
//     the softmax of S_j runs while the second product is still in flight.
// Chosen by PIROPE_ATTENTION_SM90=ws or ws_fwd (use_sm90_ws_kernels) where the sm_90a
// kernels run and TMA can describe k and v (else rope_attention_fwd_sm90.cuh runs).
#pragma once

#include "rope_attention_fwd_sm90.cuh"
#include "tma.cuh"

namespace pirope::cuda {

namespace fwd90ws {
constexpr int kStages = 2;              // smem stages per operand (K and V rings)
constexpr int kConsumers = 256;         // threads of the two consumer warpgroups
constexpr int kThreads = kConsumers + 128;  // + the producer warpgroup
constexpr int kProducerRegs = 40;       // 128 x 40 + 256 x 232 = 384 x 168 (the launch budget)
constexpr int kConsumerRegs = 232;
constexpr int kBarConsumers = 1;        // named barriers (0 is __syncthreads)
constexpr int kBarTurn = 2;             // 2 + warpgroup: that consumer's turn to issue products
}  // namespace fwd90ws

template <typename T, int kD>
__global__ void __launch_bounds__(fwd90ws::kThreads, 1)
    rope_attention_fwd_sm90_ws_kernel(const __grid_constant__ CUtensorMap k_map,
                                      const __grid_constant__ CUtensorMap v_map, const AttentionParams p) {
#ifdef PIROPE_SM90A_DEVICE
  using namespace fwd90ws;
  using fwd90::kBlockM;
  using fwd90::kBlockN;
  constexpr int kTile = kBlockN * kD;  // elements of one K or V stage
  constexpr uint32_t kTileBytes = kTile * sizeof(T);
  static_assert(kBlockM * (kD + 4) * sizeof(float) <= (kBlockM + 2 * kStages * kBlockN) * kD * sizeof(T),
                "the float32 epilogue tile reuses the q/k/v tiles' smem (not the barriers after them)");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = wg::align1024<T>(smem_raw);  // every tile starts at a multiple of 1 KB
  T* k_s = q_s + kBlockM * kD;
  T* v_s = k_s + kStages * kTile;
  uint64_t* k_full = reinterpret_cast<uint64_t*>(v_s + kStages * kTile);
  uint64_t* k_empty = k_full + kStages;
  uint64_t* v_full = k_empty + kStages;
  uint64_t* v_empty = v_full + kStages;

  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;  // longest blocks first
  const int64_t hq = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = hq / (p.heads_q / p.heads_kv);
  const int64_t n_end = p.causal ? std::min<int64_t>(p.seqlen, m0 + kBlockM) : p.seqlen;
  const int n_tiles = static_cast<int>((n_end + kBlockN - 1) / kBlockN);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      tma::mbar_init(&k_full[s], 1);
      tma::mbar_init(&v_full[s], 1);
      tma::mbar_init(&k_empty[s], kConsumers);
      tma::mbar_init(&v_empty[s], kConsumers);
    }
    tma::fence_barrier_init();
  }
  __syncthreads();  // the last block-wide barrier: the producer warpgroup leaves early

  // The warpgroup index through a shuffle, so the compiler sees it is warp-uniform: a
  // branch on threadIdx.x looks divergent to ptxas, which then serialises every wgmma.
  const int wg = __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / 128, 0);
  if (wg == kConsumers / 128) {
    // Producer: tile j of K, then of V, into stage j % kStages once the consumers have
    // released that stage's previous tile (j - kStages).
    tma::regs_dealloc<kProducerRegs>();
    if (threadIdx.x == kConsumers) {
      tma::prefetch_map(&k_map);
      tma::prefetch_map(&v_map);
      for (int j = 0; j < n_tiles; ++j) {
        const int st = j % kStages;
        const uint32_t parity = ((j / kStages) & 1) ^ 1;
        tma::mbar_wait(&k_empty[st], parity);
        tma::mbar_arrive_expect_tx(&k_full[st], kTileBytes);
        tma::load_tile<T, kD, kBlockN>(k_s + st * kTile, &k_map, int64_t{j} * kBlockN, hk, b, &k_full[st]);
        tma::mbar_wait(&v_empty[st], parity);
        tma::mbar_arrive_expect_tx(&v_full[st], kTileBytes);
        tma::load_tile<T, kD, kBlockN>(v_s + st * kTile, &v_map, int64_t{j} * kBlockN, hk, b, &v_full[st]);
      }
    }
    return;
  }

  // Consumers.
  tma::regs_alloc<kConsumerRegs>();
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int row0 = 64 * wg + 16 * warp;  // this warp's first row in the block
  const float scale_log2 = static_cast<float>(p.softmax_scale) * 1.4426950408889634f;

  // q rotated on the way in (registers: TMA cannot rotate), then handed to the async proxy.
  attn::load_tile<T, kD, kBlockM, kConsumers, fwd90::kSmem>(q_s, p.q, p, b, hq, m0, true);
  wg::fence_proxy_async();
  tma::bar_sync<kConsumers>(kBarConsumers);
  const int my_turn = kBarTurn + wg, other_turn = kBarTurn + 1 - wg;
  if (wg == 1) tma::bar_arrive<kConsumers>(kBarTurn);  // warpgroup 0 issues first

  float o[kD / 8][4];
  attn::zero(o);
  float s[kBlockN / 8][4];
  attn::zero(s);  // (every S product overwrites it: defined values for the asm operands)
  uint32_t pf[kBlockN / 16][4];  // P of the previous tile as A operands of O += P V
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, corr[2];

  // The waits for a tile's TMA load come before wg::fence(), not between it and the
  // products: code after the fence that writes the products' registers (pf, the
  // descriptors) makes ptxas inject a warpgroup.arrive of its own (its C7519 note).
  const auto wait_k = [&](int j) { tma::mbar_wait(&k_full[j % kStages], (j / kStages) & 1); };
  const auto wait_v = [&](int j) { tma::mbar_wait(&v_full[j % kStages], (j / kStages) & 1); };
  const auto issue_s = [&](int j) {  // S = Q K_j^T (overwrites s); K_j waited for
    const T* k_tile = k_s + (j % kStages) * kTile;
    wg::gemm_ss<T, kBlockN, 0, 0, kD / 16>(
        s, [&](int k) { return wg::desc_k<T, kD, kBlockM>(q_s, 64 * wg, 16 * k); },
        [&](int k) { return wg::desc_k<T, kD, kBlockN>(k_tile, 0, 16 * k); }, false);
  };
  const auto issue_pv = [&](int j) {  // O += P_j V_j, P_j in pf; V_j waited for
    const T* v_tile = v_s + (j % kStages) * kTile;
    wg::gemm_rs<T, kD, 1, kBlockN / 16>(o, pf, [&](int k) { return wg::desc_mn<T, kD, kBlockN>(v_tile, 16 * k, 0); });
  };
  const auto softmax = [&](int j) {  // S_j (waited for) -> P_j in s; corr for O
    fwd90::mask_tile(s, p, m0, int64_t{j} * kBlockN, 64 * wg, row0, g, tq);
    fwd90::online_softmax(s, row_max, row_sum, corr, scale_log2);
  };
  const auto to_operands = [&] {  // P_j -> pf
#pragma unroll
    for (int k = 0; k < kBlockN / 16; ++k) attn::acc_to_a<T>(pf[k], s, k);
  };

  // Tile 0: S only (O is still zero).
  tma::bar_sync<kConsumers>(my_turn);
  wait_k(0);
  wg::fence();
  issue_s(0);
  tma::bar_arrive<kConsumers>(other_turn);
  wg::wait<0>();
  wg::fence_operand(s);
  tma::mbar_arrive(&k_empty[0]);
  softmax(0);
  to_operands();

  for (int j = 1; j < n_tiles; ++j) {
    tma::bar_sync<kConsumers>(my_turn);
    wait_v(j - 1);  // V_{j-1} was loaded before K_j
    wait_k(j);
    wg::fence();  // orders the register writes above (o rescaled, pf) before both products
    issue_s(j);
    issue_pv(j - 1);
    tma::bar_arrive<kConsumers>(other_turn);
    wg::wait<1>();  // S_j is done (groups complete in order); P_{j-1} V_{j-1} may still run
    wg::fence_operand(s);
    tma::mbar_arrive(&k_empty[j % kStages]);
    softmax(j);  // overlaps the P V product, which reads pf, not s
    wg::wait<0>();
    wg::fence_operand(o);
    wg::fence_operand(pf);
    tma::mbar_arrive(&v_empty[(j - 1) % kStages]);
    fwd90::rescale_rows(o, corr);
    to_operands();
  }

  tma::bar_sync<kConsumers>(my_turn);
  wait_v(n_tiles - 1);
  wg::fence();
  issue_pv(n_tiles - 1);
  // Warpgroup 1 waits for this last hand-over; warpgroup 0 waits for none after it.
  if (wg == 0) tma::bar_arrive<kConsumers>(other_turn);
  wg::wait<0>();
  wg::fence_operand(o);
  wg::fence_operand(pf);

  // Epilogue as rope_attention_fwd_sm90.cuh, with the consumers' own barrier (every
  // tile has landed and been read once it has passed).
  fwd90::store_out<T, kD, kConsumers>(smem_raw, o, row_max, row_sum, p, b, hq, m0, row0, scale_log2,
                                      [] { tma::bar_sync<kConsumers>(kBarConsumers); });
#else
  __trap();  // launched only on sm_90 devices by a build with sm_90a code (use_sm90_kernels)
#endif
}

// Returns false (nothing launched) when TMA cannot describe k or v, or the kernel was
// built with fewer registers than its warpgroups' split.
template <typename T, int kD>
bool launch_rope_attention_fwd_sm90_ws(const AttentionParams& p, cudaStream_t stream) {
  using namespace fwd90ws;
  constexpr TileElem kElem = tile_elem<T>();
  constexpr auto kernel = rope_attention_fwd_sm90_ws_kernel<T, kD>;
  CUtensorMap k_map, v_map;
  if (!has_register_budget(kernel, kThreads, (kThreads - kConsumers) * kProducerRegs + kConsumers * kConsumerRegs) ||
      !encode_tile_map(&k_map, p.k, p.batch, p.seqlen, p.heads_kv, kD, kElem, fwd90::kBlockN) ||
      !encode_tile_map(&v_map, p.v, p.batch, p.seqlen, p.heads_kv, kD, kElem, fwd90::kBlockN))
    return false;
  // q, kStages x (K, V), the 4 x kStages barriers, + 1 KB of alignment slack.
  constexpr size_t smem = static_cast<size_t>(fwd90::kBlockM + 2 * kStages * fwd90::kBlockN) * kD * sizeof(T) +
                          4 * kStages * sizeof(uint64_t) + 1024;
  static_assert(smem <= kSm90SmemPerBlock, "smem of the ws forward kernel exceeds the sm_90 limit");
  launch_kernel(kernel, attention_grid(p, fwd90::kBlockM, p.heads_q), kThreads, smem, stream, k_map, v_map, p);
  return true;
}

}  // namespace pirope::cuda
