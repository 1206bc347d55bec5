// CPU backward of rope_attention. The probabilities are recomputed tile by tile
// from the saved log-sum-exp (P = exp(scale q k^T - lse)), with D = rowsum(dO * O):
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D),
//   dK += scale dS^T q,  dQ += scale dS k      (q, k rotated)
// and dq, dk are rotated back (by -angle) into the basis of the inputs. With a
// soft-cap c, P = exp(c tanh(scale q k^T / c) - lse) and dS gains the factor
// 1 - tanh^2 (the derivative of the capped score).
//
// Deterministic by construction: one task per (batch, kv head) owns dk and dv of
// that head and dq of the query heads of its group, and runs its sums in a fixed
// order, so gradients are bit-identical on every run and for any thread count.
// Packed sequences (cu_seqlens) are the sequences of the batch, each at its own rows.
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../rope_attention.h"
#include "attention_tiles.h"
#include "avx512_gemm.h"

namespace pirope::cpu {
namespace {

// Tiles of the backward. On a 2-core EPYC (fp32, headdim 128, seqlen 2048), query
// tiles of 32..128 rows and key tiles of 128..512 ran within 10% of each other;
// the forward's sizes were among the best.
constexpr int64_t kBwdBlockQ = kBlockQ;
constexpr int64_t kBwdBlockK = kBlockK;

// The five products of the backward and the gradient accumulators, on operands
// prepared per kv head (k, v) or query head (q, dO), rows [from, to) of them (stored
// at their own row, so tiles index them the same way whichever rows were loaded).
// BlasBackward multiplies math-type rows through BLAS; PackedBackward multiplies float
// or bfloat16 operands with avx512_gemm.h, accumulating dk and dv transposed
// (head_dim x seqlen, so that P and dS enter as B operands and are never transposed).
template <typename scalar_t, typename table_t>
class BlasBackward {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  // Whether the per-element arithmetic is the same for any decomposition into tasks
  // (BLAS may pick kernels by alignment and size: only the fused one-pass order).
  static constexpr bool kSplittable = false;
  BlasBackward(int64_t S, int64_t D)
      : D_(D), kr_(S * D), vf_(S * D), dk_(S * D), dv_(S * D), qr_(S * D), dof_(S * D),
        dq_(S * D) {}

  // kp, vp (and qp, dop, the outputs) point at row 0 of the head.
  void load_kv(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to, const scalar_t* kp,
               int64_t ks, const scalar_t* vp, int64_t vs) {
    load_rotated<scalar_t, table_t, acc_t>(r, seq, from, to - from, kp + from * ks, ks,
                                           kr_.data() + from * D_, D_);
    convert_rows(vp + from * vs, vs, to - from, D_, vf_.data() + from * D_, D_);
    std::fill(dk_.begin() + from * D_, dk_.begin() + to * D_, acc_t(0));
    std::fill(dv_.begin() + from * D_, dv_.begin() + to * D_, acc_t(0));
  }
  void load_q(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to, const scalar_t* qp,
              int64_t qs, const scalar_t* dop, int64_t dos) {
    load_rotated<scalar_t, table_t, acc_t>(r, seq, from, to - from, qp + from * qs, qs,
                                           qr_.data() + from * D_, D_);
    convert_rows(dop + from * dos, dos, to - from, D_, dof_.data() + from * D_, D_);
    std::fill(dq_.begin() + from * D_, dq_.begin() + to * D_, acc_t(0));
  }
  // pt (nq x nk, row stride ld) = scale q k^T
  void scores(int64_t q0, int64_t nq, int64_t k0, int64_t nk, acc_t scale, acc_t* pt,
              int64_t ld) {
    gemm_nt<acc_t>(nq, nk, D_, scale, qr_.data() + q0 * D_, D_, kr_.data() + k0 * D_, D_,
                   acc_t(0), pt, ld);
  }
  // dpt = dO v^T
  void dp(int64_t q0, int64_t nq, int64_t k0, int64_t nk, acc_t* dpt, int64_t ld) {
    gemm_nt<acc_t>(nq, nk, D_, acc_t(1), dof_.data() + q0 * D_, D_, vf_.data() + k0 * D_, D_,
                   acc_t(0), dpt, ld);
  }
  // dV += P^T dO
  void add_dv(int64_t q0, int64_t nq, int64_t k0, int64_t nk, const acc_t* pt, int64_t ld) {
    gemm_tn<acc_t>(nk, D_, nq, acc_t(1), pt, ld, dof_.data() + q0 * D_, D_, acc_t(1),
                   dv_.data() + k0 * D_, D_);
  }
  // dK += scale dS^T q
  void add_dk(int64_t q0, int64_t nq, int64_t k0, int64_t nk, acc_t scale, const acc_t* ds,
              int64_t ld) {
    gemm_tn<acc_t>(nk, D_, nq, scale, ds, ld, qr_.data() + q0 * D_, D_, acc_t(1),
                   dk_.data() + k0 * D_, D_);
  }
  // dQ += scale dS k
  void add_dq(int64_t q0, int64_t nq, int64_t k0, int64_t nk, acc_t scale, const acc_t* ds,
              int64_t ld) {
    gemm_nn<acc_t>(nq, D_, nk, scale, ds, ld, kr_.data() + k0 * D_, D_, acc_t(1),
                   dq_.data() + q0 * D_, D_);
  }
  void store_dq(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to, scalar_t* dqp,
                int64_t stride) {
    store_unrotated<scalar_t, table_t, acc_t>(r, seq, from, to - from, dq_.data() + from * D_,
                                              D_, dqp + from * stride, stride);
  }
  void store_dk_dv(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to, scalar_t* dkp,
                   int64_t dks, scalar_t* dvp, int64_t dvs) {
    store_unrotated<scalar_t, table_t, acc_t>(r, seq, from, to - from, dk_.data() + from * D_,
                                              D_, dkp + from * dks, dks);
    convert_rows(dv_.data() + from * D_, D_, to - from, D_, dvp + from * dvs, dvs);
  }

 private:
  int64_t D_;
  // (seqlen x headdim), math type: rotated keys, values, dk and dv accumulators
  // (summed over the group); for the current query head its rotated queries, dO
  // and the dq accumulator.
  std::vector<acc_t> kr_, vf_, dk_, dv_, qr_, dof_, dq_;
};

// T = float (float32/float16/bfloat16 input) or c10::BFloat16 (bfloat16 input, with
// AVX512-BF16: q, k, P and dS rounded to bfloat16 as flash attention rounds them).
template <typename scalar_t, typename table_t, typename T>
class PackedBackward {
 public:
  // Every output element is one fixed sequence of tile products whatever the task
  // split (the kernel's sums do not depend on where a tile sits in memory).
  static constexpr bool kSplittable = true;
  PackedBackward(int64_t S, int64_t D)
      : D_(D), Dk_(avx512::round_up_pair<T>(D)), ldn_(avx512::padded_ld(S, 4)),
        ldt_(avx512::padded_ld(S, 2)), ldg_(avx512::padded_ld(S, 4)), stage_(S * D),
        dkT_(D * ldg_), dvT_(D * ldg_), dq_(S * D), kn_(Dk_ * ldn_), vn_(Dk_ * ldn_),
        kk_(avx512::round_up_pair<T>(S) * D), qa_(S * Dk_), qT_(D * ldt_), doa_(S * Dk_),
        doT_(D * ldt_), tile_(kBwdBlockQ * kBwdBlockK) {}

  // k rotated (in float32) as the columns of k^T (scores) and as rows (dQ = dS k);
  // v as the columns of v^T (dP = dO v^T).
  void load_kv(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to, const scalar_t* kp,
               int64_t ks, const scalar_t* vp, int64_t vs) {
    const int64_t n = to - from;
    load_rotated<scalar_t, table_t, float>(r, seq, from, n, kp + from * ks, ks, stage_.data(), D_);
    avx512::pack_rows_as_n(stage_.data(), D_, from, n, D_, kn_.data(), ldn_);
    avx512::pack_rows_as_k(stage_.data(), D_, from, n, D_, kk_.data());
    avx512::pack_rows_as_n(vp + from * vs, vs, from, n, D_, vn_.data(), ldn_);
    for (int64_t j = 0; j < D_; ++j) {  // the accumulators of keys [from, to)
      std::fill_n(dkT_.data() + j * ldg_ + from, n, 0.f);
      std::fill_n(dvT_.data() + j * ldg_ + from, n, 0.f);
    }
  }
  // q rotated and dO, each row-major (scores, dP) and transposed (dK^T, dV^T).
  void load_q(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to, const scalar_t* qp,
              int64_t qs, const scalar_t* dop, int64_t dos) {
    const int64_t n = to - from;
    load_rotated<scalar_t, table_t, float>(r, seq, from, n, qp + from * qs, qs, stage_.data(), D_);
    avx512::rows_as_a(stage_.data(), D_, n, D_, qa_.data() + from * Dk_, Dk_);
    avx512::transpose_rows(stage_.data(), D_, n, D_, qT_.data() + from, ldt_);
    convert_rows(dop + from * dos, dos, n, D_, doa_.data() + from * Dk_, Dk_);
    avx512::transpose_rows(dop + from * dos, dos, n, D_, doT_.data() + from, ldt_);
    std::fill_n(dq_.data() + from * D_, n * D_, 0.f);
  }
  void scores(int64_t q0, int64_t nq, int64_t k0, int64_t nk, float scale, float* pt,
              int64_t ld) {
    avx512::gemm<T>(nq, nk, Dk_, scale, qa_.data() + q0 * Dk_, Dk_,
                    kn_.data() + avx512::packed_index<T>(0, k0, ldn_), ldn_, false, pt, ld);
  }
  void dp(int64_t q0, int64_t nq, int64_t k0, int64_t nk, float* dpt, int64_t ld) {
    avx512::gemm<T>(nq, nk, Dk_, 1.f, doa_.data() + q0 * Dk_, Dk_,
                    vn_.data() + avx512::packed_index<T>(0, k0, ldn_), ldn_, false, dpt, ld);
  }
  // dV^T += dO^T P (P enters as a B operand: no transpose)
  void add_dv(int64_t q0, int64_t nq, int64_t k0, int64_t nk, const float* pt, int64_t ld) {
    int64_t ldp;
    const T* pb = avx512::tile_as_b(pt, ld, nq, nk, tile_.data(), kBwdBlockK, ldp);
    avx512::gemm<T>(D_, nk, avx512::round_up_pair<T>(nq), 1.f, doT_.data() + q0, ldt_, pb,
                    ldp, true, dvT_.data() + k0, ldg_);
  }
  // dK^T += scale q^T dS
  void add_dk(int64_t q0, int64_t nq, int64_t k0, int64_t nk, float scale, const float* ds,
              int64_t ld) {
    int64_t ldp;
    const T* db = avx512::tile_as_b(ds, ld, nq, nk, tile_.data(), kBwdBlockK, ldp);
    avx512::gemm<T>(D_, nk, avx512::round_up_pair<T>(nq), scale, qT_.data() + q0, ldt_, db,
                    ldp, true, dkT_.data() + k0, ldg_);
  }
  // dQ += scale dS k
  void add_dq(int64_t q0, int64_t nq, int64_t k0, int64_t nk, float scale, const float* ds,
              int64_t ld) {
    int64_t lda;
    const T* da = avx512::tile_as_a(ds, ld, nq, nk, tile_.data(), kBwdBlockK, lda);
    avx512::gemm<T>(nq, D_, avx512::round_up_pair<T>(nk), scale, da, lda,
                    kk_.data() + avx512::packed_index<T>(k0, 0, D_), D_, true,
                    dq_.data() + q0 * D_, D_);
  }
  void store_dq(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to, scalar_t* dqp,
                int64_t stride) {
    store_unrotated<scalar_t, table_t, float>(r, seq, from, to - from, dq_.data() + from * D_, D_,
                                              dqp + from * stride, stride);
  }
  void store_dk_dv(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to, scalar_t* dkp,
                   int64_t dks, scalar_t* dvp, int64_t dvs) {
    const int64_t n = to - from;
    avx512::for_each_blocked(
        n, D_, [&](int64_t i, int64_t j) { stage_[i * D_ + j] = dkT_[j * ldg_ + from + i]; });
    store_unrotated<scalar_t, table_t, float>(r, seq, from, n, stage_.data(), D_,
                                              dkp + from * dks, dks);
    avx512::for_each_blocked(n, D_, [&](int64_t i, int64_t j) {
      dvp[(from + i) * dvs + j] = scalar_t(dvT_[j * ldg_ + from + i]);
    });
  }

 private:
  int64_t D_, Dk_;  // Dk_: D rounded up to pairs
  // Leading dimensions (avx512::padded_ld): columns of kn_ and vn_; of qT_ and doT_;
  // of dkT_ and dvT_.
  int64_t ldn_, ldt_, ldg_;
  std::vector<float> stage_, dkT_, dvT_, dq_;
  // Operands: k^T, v^T and k packed; q and dO row-major and transposed; per tile
  // (bfloat16 only) P or dS rounded, as an A or a packed B operand.
  std::vector<T> kn_, vn_, kk_, qa_, qT_, doa_, doT_, tile_;
};

// Which gradients a task accumulates.
enum class Grads { kAll, kKeyValue, kQuery };

// Tiles of (query tile q0, key tile k0): keys [k0, k0 + nk) that query rows
// [q0, q0 + nq) can see. Query tiles outside [query_start(k0), query_end(k0)) see none
// of the key tile's keys (causal: those before it; a window: those past it too), and
// keys past the last row's end (band.end) are masked for every row of the tile, so they
// are left out of the products (only tiles on the band's upper edge are clipped).
struct TileGrid {
  int64_t S;
  AttentionBand band;
  int64_t query_start(int64_t k0) const { return tile_start(band.first_query(k0), kBwdBlockQ); }
  int64_t query_end(int64_t k0) const {
    return band.end_query(std::min(S, k0 + kBwdBlockK) - 1, S);
  }
  int64_t nq(int64_t q0) const { return std::min(kBwdBlockQ, S - q0); }
  int64_t nk(int64_t q0, int64_t k0) const {
    return std::min(std::min(kBwdBlockK, S - k0), band.end(q0 + nq(q0) - 1, S) - k0);
  }
  // An end of query rows (exclusive) rounded up to a whole query tile.
  int64_t query_tile_end(int64_t end) const {
    return std::min(S, tile_start(end + kBwdBlockQ - 1, kBwdBlockQ));
  }
  // The (query, key) pairs of rows [from, to) of queries (keys: of keys): the sum of
  // what each row sees (a task's cost; O(rows), next to O(rows x keys x head_dim) work).
  int64_t pairs(int64_t from, int64_t to, bool keys) const {
    int64_t n = 0;
    for (int64_t i = from; i < to; ++i)
      n += keys ? band.end_query(i, S) - band.first_query(i) : band.end(i, S) - band.first(i);
    return n;
  }
};

// One thread's scratch: delta of the current query head's rows; per tile P, dP (then
// dS) and, with a soft-cap, its slope (kBwdBlockQ x kBwdBlockK, row stride kBwdBlockK).
template <typename acc_t>
struct TileScratch {
  TileScratch(int64_t S, bool capped)
      : delta(S), pt(kBwdBlockQ * kBwdBlockK), dpt(kBwdBlockQ * kBwdBlockK),
        slope(capped ? kBwdBlockQ * kBwdBlockK : 0) {}
  std::vector<acc_t> delta, pt, dpt, slope;
};

// The backward of one (query tile, key tile): P recomputed from the log-sum-exp,
// dS = P * (dO v^T - delta) (times the soft-cap's slope), and the products into the
// gradients `which` asks for.
template <typename acc_t, typename Products>
void backward_tile(Products& prod, const TileGrid& grid, int64_t q0, int64_t k0, acc_t scale,
                   acc_t cap, const acc_t* lse, TileScratch<acc_t>& w, Grads which) {
  const int64_t nq = grid.nq(q0), nk = grid.nk(q0, k0);
  acc_t *pt = w.pt.data(), *dpt = w.dpt.data(), *slope = w.slope.data();
  // P = exp(scale q k^T - lse) (capped: exp(cap tanh(scale q k^T / cap) - lse)), zero
  // where masked
  prod.scores(q0, nq, k0, nk, scale, pt, kBwdBlockK);
  for (int64_t i = 0; i < nq; ++i) {
    acc_t* prow = pt + i * kBwdBlockK;
    const KeySpan seen = visible_keys(grid.band, grid.S, q0 + i, k0, nk);
    if (seen.size() > 0) {
      if (cap > 0) softcap_row(prow + seen.lo, seen.size(), cap, slope + i * kBwdBlockK + seen.lo);
      exp_row(prow + seen.lo, seen.size(), lse[q0 + i]);
    }
    zero_unseen(prow, seen, nk);
  }
  if (which != Grads::kQuery) prod.add_dv(q0, nq, k0, nk, pt, kBwdBlockK);
  // dP = dO V^T, then dS = P * (dP - delta) in place; capped, times the slope where P
  // is not masked (elsewhere P = 0 and the slope is stale)
  prod.dp(q0, nq, k0, nk, dpt, kBwdBlockK);
  for (int64_t i = 0; i < nq; ++i) {
    const acc_t* prow = pt + i * kBwdBlockK;
    acc_t* drow = dpt + i * kBwdBlockK;
    const acc_t di = w.delta[q0 + i];
    for (int64_t j = 0; j < nk; ++j) drow[j] = prow[j] * (drow[j] - di);
    if (cap > 0) {
      const KeySpan seen = visible_keys(grid.band, grid.S, q0 + i, k0, nk);
      const acc_t* srow = slope + i * kBwdBlockK;
      for (int64_t j = seen.lo; j < seen.hi; ++j) drow[j] *= srow[j];
    }
  }
  if (which != Grads::kQuery) prod.add_dk(q0, nq, k0, nk, scale, dpt, kBwdBlockK);
  if (which != Grads::kKeyValue) prod.add_dq(q0, nq, k0, nk, scale, dpt, kBwdBlockK);
}

// Task t of n, in the order 0, n-1, 1, n-2, ...: causal tasks grow (or shrink) with
// their index, and at::parallel_for gives each thread a contiguous range of them.
inline int64_t zigzag(int64_t t, int64_t n) { return t % 2 ? n - 1 - t / 2 : t / 2; }

// make_products() gives one thread's products (BlasBackward or PackedBackward).
//
// One pass (the default): one task per (batch, kv head) owns dk and dv of that head
// and dq of the query heads of its group. When there are far fewer such tasks than
// threads (few kv heads, small batch) and the products allow it, two passes instead:
// dk, dv by (batch, kv head, block of keys), then dq by (batch, kv head, block of
// queries), recomputing P and dS in both (7 products per tile pair instead of 5).
// Both run every output's sums in the same order, so the gradients are bit-identical
// either way, for any thread count.
template <typename scalar_t, typename MakeProducts>
void backward_cpu(const AttentionParams& p, MakeProducts make_products) {
  using acc_t = at::opmath_type<scalar_t>;
  using Products = decltype(make_products());
  const int64_t D = p.head_dim, G = p.heads_q / p.heads_kv;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale), cap = static_cast<acc_t>(p.softcap);
  const RopeParams& r = p.rope;
  const int64_t lse_len = attention_lse_len(p);
  if (p.seqlen == 0 || p.batch * p.heads_kv == 0) return;  // (rope_attention.cpp returns first)

  // Sequence b of the batch (packed sequences: its rows of the packed tensors) and the
  // tiles of its length.
  struct Seq {
    AttentionSequence rows;
    TileGrid grid;
  };
  auto sequence = [&](int64_t b) {
    const AttentionSequence rows = attention_sequence(p, b);
    return Seq{rows, TileGrid{rows.len, attention_band(p)}};
  };
  auto head = [&](const AttentionTensor& t, const Seq& sq, int64_t h) {
    return static_cast<scalar_t*>(t.ptr) + sq.rows.offset(t, h);
  };
  auto lse_of = [&](const Seq& sq, int64_t hq) {
    return static_cast<const acc_t*>(p.lse) + sq.rows.lse_offset(p.heads_q, hq, lse_len);
  };
  // delta[i] = rowsum(dO * O) for rows [from, to) of query head hq
  auto compute_delta = [&](const Seq& sq, int64_t hq, int64_t from, int64_t to, acc_t* delta) {
    const scalar_t* o = head(p.out, sq, hq);
    const scalar_t* go = head(p.grad_out, sq, hq);
    for (int64_t i = from; i < to; ++i) {
      acc_t acc = 0;
      const scalar_t* orow = o + i * p.out.stride_s;
      const scalar_t* grow = go + i * p.grad_out.stride_s;
      for (int64_t j = 0; j < D; ++j) acc += acc_t(grow[j]) * acc_t(orow[j]);
      delta[i] = acc;
    }
  };
  auto load_kv = [&](Products& prod, const Seq& sq, int64_t hk, int64_t from, int64_t to) {
    prod.load_kv(r, sq.rows, from, to, head(p.k, sq, hk), p.k.stride_s, head(p.v, sq, hk),
                 p.v.stride_s);
  };
  auto load_q = [&](Products& prod, const Seq& sq, int64_t hq, int64_t from, int64_t to) {
    prod.load_q(r, sq.rows, from, to, head(p.q, sq, hq), p.q.stride_s,
                head(p.grad_out, sq, hq), p.grad_out.stride_s);
  };
  auto store_dq = [&](Products& prod, const Seq& sq, int64_t hq, int64_t from, int64_t to) {
    prod.store_dq(r, sq.rows, from, to, head(p.dq, sq, hq), p.dq.stride_s);
  };
  auto store_dk_dv = [&](Products& prod, const Seq& sq, int64_t hk, int64_t from, int64_t to) {
    prod.store_dk_dv(r, sq.rows, from, to, head(p.dk, sq, hk), p.dk.stride_s,
                     head(p.dv, sq, hk), p.dv.stride_s);
  };
  // Runs body(prod, scratch, task) for the tasks [0, ntasks) over the threads, split by
  // cost(task) (see parallel_for_cost).
  auto run_tasks = [&](int64_t ntasks, auto cost, auto body) {
    parallel_for_cost(ntasks, cost, [&](int64_t begin, int64_t end) {
      SingleThreadedBlas one_blas_thread;
      auto prod = make_products();
      TileScratch<acc_t> scratch(p.seqlen, cap > 0);
      for (int64_t task = begin; task < end; ++task) body(prod, scratch, task);
    });
  };

  // Two passes pay 7/5 of the products (plus repacking; measured ~1.6x the work on
  // a 2-core EPYC), so only when at least half the threads would idle otherwise.
  const bool two_pass =
      Products::kSplittable && 2 * p.batch * p.heads_kv <= at::get_num_threads();
  if (!two_pass) {
    // a task's products: the (query, key) pairs of its sequence
    auto cost = [&](int64_t task) {
      const TileGrid grid = sequence(task / p.heads_kv).grid;
      return grid.pairs(0, grid.S, false);
    };
    run_tasks(p.batch * p.heads_kv, cost, [&](Products& prod, TileScratch<acc_t>& w, int64_t task) {
      const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
      const Seq sq = sequence(b);
      const int64_t S = sq.rows.len;
      if (S == 0) return;  // an empty packed sequence
      load_kv(prod, sq, hk, 0, S);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t hq = hk * G + g;
        load_q(prod, sq, hq, 0, S);
        compute_delta(sq, hq, 0, S, w.delta.data());
        for (int64_t k0 = 0; k0 < S; k0 += kBwdBlockK)
          for (int64_t q0 = sq.grid.query_start(k0); q0 < sq.grid.query_end(k0); q0 += kBwdBlockQ)
            backward_tile(prod, sq.grid, q0, k0, scale, cap, lse_of(sq, hq), w, Grads::kAll);
        store_dq(prod, sq, hq, 0, S);
      }
      store_dk_dv(prod, sq, hk, 0, S);
    });
    return;
  }
  // Blocks of rows (whole key tiles) so that each pass has about two tasks per thread
  // (sized by the longest sequence; blocks past a sequence's end do nothing).
  const int64_t nkv = p.batch * p.heads_kv, ntiles = (p.seqlen + kBwdBlockK - 1) / kBwdBlockK;
  const int64_t want = std::clamp<int64_t>((2 * at::get_num_threads() + nkv - 1) / nkv, 1, ntiles);
  const int64_t rows = ((ntiles + want - 1) / want) * kBwdBlockK;
  const int64_t nsplit = (p.seqlen + rows - 1) / rows;
  // Costs of a block of rows [from, to) of sequence b: rows times the rows they meet.
  auto split_cost = [&](bool keys) {
    return [&, keys](int64_t t) -> int64_t {
      const int64_t i = zigzag(t, nkv * nsplit), c = i % nsplit, b = i / (nsplit * p.heads_kv);
      const TileGrid grid = sequence(b).grid;
      return grid.pairs(c * rows, std::min(grid.S, c * rows + rows), keys);
    };
  };
  // dk, dv of keys [kb, ke): every query head of the group, the query tiles that see them.
  run_tasks(nkv * nsplit, split_cost(true), [&](Products& prod, TileScratch<acc_t>& w, int64_t t) {
    const int64_t i = zigzag(t, nkv * nsplit);
    const int64_t c = i % nsplit, hk = (i / nsplit) % p.heads_kv, b = i / (nsplit * p.heads_kv);
    const Seq sq = sequence(b);
    const int64_t S = sq.rows.len;
    const int64_t kb = c * rows, ke = std::min(S, kb + rows);
    if (kb >= S) return;
    // whole query tiles: rows a tile holds past the band read zeros of P, not stale rows
    const int64_t qfrom = sq.grid.query_start(kb), qto = sq.grid.query_tile_end(sq.grid.band.end_query(ke - 1, S));
    load_kv(prod, sq, hk, kb, ke);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t hq = hk * G + g;
      load_q(prod, sq, hq, qfrom, qto);
      compute_delta(sq, hq, qfrom, qto, w.delta.data());
      for (int64_t k0 = kb; k0 < ke; k0 += kBwdBlockK)
        for (int64_t q0 = sq.grid.query_start(k0); q0 < sq.grid.query_end(k0); q0 += kBwdBlockQ)
          backward_tile(prod, sq.grid, q0, k0, scale, cap, lse_of(sq, hq), w, Grads::kKeyValue);
    }
    store_dk_dv(prod, sq, hk, kb, ke);
  });
  // dq of queries [qb, qe) of the group's query heads: the keys they see, in the
  // one-pass order (k0 ascending).
  run_tasks(nkv * nsplit, split_cost(false), [&](Products& prod, TileScratch<acc_t>& w, int64_t t) {
    const int64_t i = zigzag(t, nkv * nsplit);
    const int64_t c = i % nsplit, hk = (i / nsplit) % p.heads_kv, b = i / (nsplit * p.heads_kv);
    const Seq sq = sequence(b);
    const int64_t S = sq.rows.len;
    const int64_t qb = c * rows, qe = std::min(S, qb + rows);
    if (qb >= S) return;
    const int64_t kfrom = tile_start(sq.grid.band.first(qb), kBwdBlockK), kend = sq.grid.band.end(qe - 1, S);
    load_kv(prod, sq, hk, kfrom, kend);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t hq = hk * G + g;
      load_q(prod, sq, hq, qb, qe);
      compute_delta(sq, hq, qb, qe, w.delta.data());
      for (int64_t k0 = kfrom; k0 < kend; k0 += kBwdBlockK)
        for (int64_t q0 = std::max(qb, sq.grid.query_start(k0));
             q0 < std::min(qe, sq.grid.query_end(k0)); q0 += kBwdBlockQ)
          backward_tile(prod, sq.grid, q0, k0, scale, cap, lse_of(sq, hq), w, Grads::kQuery);
      store_dq(prod, sq, hq, qb, qe);
    }
  });
}

}  // namespace

void launch_rope_attention_backward_cpu(const AttentionParams& p, at::ScalarType dtype,
                                        at::ScalarType table_dtype, c10::Device) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rope_attention_backward_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(table_dtype, "rope_attention_backward_cpu_table", [&] {
      using table_t = scalar_t;
      const int64_t S = p.seqlen, D = p.head_dim;
      const bool packed_f32 = avx512::enabled<float>();  // (checks PIROPE_CPU_GEMM too)
      if constexpr (!std::is_same_v<x_t, double>) {
        if (std::is_same_v<x_t, c10::BFloat16> && avx512::enabled<c10::BFloat16>()) {
          backward_cpu<x_t>(p, [&] { return PackedBackward<x_t, table_t, c10::BFloat16>(S, D); });
          return;
        }
        if (packed_f32) {
          backward_cpu<x_t>(p, [&] { return PackedBackward<x_t, table_t, float>(S, D); });
          return;
        }
      }
      backward_cpu<x_t>(p, [&] { return BlasBackward<x_t, table_t>(S, D); });
    });
  });
}

}  // namespace pirope::cpu
