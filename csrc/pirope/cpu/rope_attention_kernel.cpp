// CPU forward of rope_attention: flash-style tiling with an online softmax, in
// float32 (float64 for float64 input). Work is split over (batch, query head,
// chunk of query rows) with at::parallel_for. A task rotates the keys it needs once
// (cheap: seqlen x headdim, against the seqlen^2 x headdim of the products), rotates
// each query tile as it loads it, and multiplies tiles through avx512_gemm.h on
// AVX512 CPUs (float32 operands, or bfloat16 ones with AVX512-BF16), else through
// ATen's CPU BLAS (and always for float64). No seqlen x seqlen matrix exists: the
// scores live in one (kBlockQ x kBlockK) tile per thread. Packed sequences
// (cu_seqlens) are the sequences of the batch, each at its own rows
// (attention_sequence in attention_params.h); tasks past a sequence's end do nothing.
// A soft-cap (p.softcap) maps the scores a row sees before its softmax (softcap_row);
// an attention sink (p.sinks) starts it (see below).
#include <limits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../rope_attention.h"
#include "attention_tiles.h"
#include "avx512_gemm.h"

namespace pirope::cpu {

// Defined in rope_attention_backward_kernel.cpp.
void launch_rope_attention_backward_cpu(const AttentionParams& p, at::ScalarType dtype,
                                        at::ScalarType table_dtype, c10::Device device);

namespace {

// Query rows per task: several tiles, so that the keys a task rotates are reused.
constexpr int64_t kChunkQ = 4 * kBlockQ;

// The two products of the forward, on operands prepared once per head (keys,
// values) or per query tile. BlasProducts multiplies math-type tiles through BLAS;
// PackedProducts multiplies float or bfloat16 operands with avx512_gemm.h.
template <typename scalar_t, typename table_t>
class BlasProducts {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  explicit BlasProducts(int64_t D) : D_(D), qt_(kBlockQ * D) {}

  // Keys [from, to) of head (b, hk) rotated, values converted; kp, vp at row 0.
  void load_keys(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to,
                 const scalar_t* kp, int64_t ks, const scalar_t* vp, int64_t vs) {
    kbuf_.resize(to * D_);
    load_rotated<scalar_t, table_t, acc_t>(r, seq, from, to - from, kp + from * ks, ks,
                                           kbuf_.data() + from * D_, D_);
    // float32/float64 values are multiplied where they are, when BLAS can stride them.
    if (std::is_same_v<scalar_t, acc_t> && vs >= D_ && vs <= INT32_MAX) {
      vrows_ = reinterpret_cast<const acc_t*>(vp);
      ldv_ = vs;
    } else {
      vbuf_.resize(to * D_);
      convert_rows(vp + from * vs, vs, to - from, D_, vbuf_.data() + from * D_, D_);
      vrows_ = vbuf_.data();
      ldv_ = D_;
    }
  }
  void load_queries(const RopeParams& r, const AttentionSequence& seq, int64_t q0, int64_t nq,
                    const scalar_t* qp, int64_t qs) {
    load_rotated<scalar_t, table_t, acc_t>(r, seq, q0, nq, qp, qs, qt_.data(), D_);
  }
  // st (nq x nk, row stride ld) = scale * q k[k0, k0 + nk)^T
  void scores(int64_t nq, int64_t k0, int64_t nk, acc_t scale, acc_t* st, int64_t ld) {
    gemm_nt<acc_t>(nq, nk, D_, scale, qt_.data(), D_, kbuf_.data() + k0 * D_, D_, acc_t(0),
                   st, ld);
  }
  // ot (nq x D) += p (nq x nk, row stride ld) v[k0, k0 + nk)
  void add_pv(int64_t nq, int64_t k0, int64_t nk, const acc_t* pt, int64_t ld, acc_t* ot) {
    gemm_nn<acc_t>(nq, D_, nk, acc_t(1), pt, ld, vrows_ + k0 * ldv_, ldv_, acc_t(1), ot, D_);
  }

 private:
  int64_t D_;
  std::vector<acc_t> kbuf_, vbuf_, qt_;
  const acc_t* vrows_ = nullptr;
  int64_t ldv_ = 0;
};

// T = float (float32/float16/bfloat16 input) or c10::BFloat16 (bfloat16 input, with
// AVX512-BF16: q, k and p rounded to bfloat16 as flash attention rounds them).
template <typename scalar_t, typename table_t, typename T>
class PackedProducts {
 public:
  PackedProducts(int64_t D, int64_t S)
      : D_(D), Dk_(avx512::round_up_pair<T>(D)), ldk_(avx512::padded_ld(S, 4)),
        stage_(kChunkQ * D), qt_(kBlockQ * D), qa_(kBlockQ * Dk_), pa_(kBlockQ * kBlockK),
        kn_(Dk_ * ldk_), vk_(avx512::round_up_pair<T>(S) * D) {}

  // Keys [from, to) rotated (in float32) as the columns of k^T; values as rows.
  void load_keys(const RopeParams& r, const AttentionSequence& seq, int64_t from, int64_t to,
                 const scalar_t* kp, int64_t ks, const scalar_t* vp, int64_t vs) {
    for (int64_t r0 = from; r0 < to; r0 += kChunkQ) {
      const int64_t n = std::min(kChunkQ, to - r0);
      load_rotated<scalar_t, table_t, float>(r, seq, r0, n, kp + r0 * ks, ks, stage_.data(), D_);
      avx512::pack_rows_as_n(stage_.data(), D_, r0, n, D_, kn_.data(), ldk_);
    }
    avx512::pack_rows_as_k(vp + from * vs, vs, from, to - from, D_, vk_.data());
  }
  void load_queries(const RopeParams& r, const AttentionSequence& seq, int64_t q0, int64_t nq,
                    const scalar_t* qp, int64_t qs) {
    load_rotated<scalar_t, table_t, float>(r, seq, q0, nq, qp, qs, qt_.data(), D_);
    q_ = avx512::tile_as_a(qt_.data(), D_, nq, D_, qa_.data(), Dk_, ldq_);
  }
  void scores(int64_t nq, int64_t k0, int64_t nk, float scale, float* st, int64_t ld) {
    avx512::gemm<T>(nq, nk, Dk_, scale, q_, ldq_,
                    kn_.data() + avx512::packed_index<T>(0, k0, ldk_), ldk_, false, st, ld);
  }
  void add_pv(int64_t nq, int64_t k0, int64_t nk, const float* pt, int64_t ld, float* ot) {
    int64_t lda;
    const T* a = avx512::tile_as_a(pt, ld, nq, nk, pa_.data(), kBlockK, lda);
    avx512::gemm<T>(nq, D_, avx512::round_up_pair<T>(nk), 1.f, a, lda,
                    vk_.data() + avx512::packed_index<T>(k0, 0, D_), D_, true, ot, D_);
  }

 private:
  int64_t D_, Dk_, ldk_;  // Dk_: D rounded up to pairs; ldk_: columns of kn_
  std::vector<float> stage_, qt_;  // rotated keys, rotated query tile
  // Rounded query tile and probabilities (bfloat16 A operands), k^T and v (packed B).
  std::vector<T> qa_, pa_, kn_, vk_;
  const T* q_ = nullptr;  // the query tile as an A operand (qt_ or qa_)
  int64_t ldq_ = 0;
};

// make_products() gives one thread's Products (BlasProducts or PackedProducts).
template <typename scalar_t, typename MakeProducts>
void forward_cpu(const AttentionParams& p, MakeProducts make_products) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = p.head_dim, G = p.heads_q / p.heads_kv;
  const int64_t nchunks = (p.seqlen + kChunkQ - 1) / kChunkQ;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale), cap = static_cast<acc_t>(p.softcap);
  const RopeParams& r = p.rope;
  const acc_t* sinks = static_cast<const acc_t*>(p.sinks);

  const int64_t lse_len = attention_lse_len(p);

  const AttentionBand band = attention_band(p);
  // Keys [first, end) that the chunk of query rows [c0, c1) sees, first at a tile start.
  auto chunk_keys = [&](int64_t c0, int64_t c1, int64_t S) {
    return std::pair{tile_start(band.first(c0), kBlockK), band.end(c1 - 1, S)};
  };
  // cost of a task: its query rows times the keys they see (0 past a sequence's end)
  auto cost = [&](int64_t task) -> int64_t {
    const int64_t c = task % nchunks, b = task / (nchunks * p.heads_q);
    const int64_t S = attention_sequence(p, b).len, c0 = c * kChunkQ, c1 = std::min(S, c0 + kChunkQ);
    if (c0 >= S) return 0;
    const auto [kfirst, kend] = chunk_keys(c0, c1, S);
    return (c1 - c0) * (kend - kfirst);
  };
  parallel_for_cost(p.batch * p.heads_q * nchunks, cost, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas one_blas_thread;
    // Per-task scratch: the products' operands, then one query tile's scores and
    // output accumulator.
    auto prod = make_products();
    std::vector<acc_t> st(kBlockQ * kBlockK), ot(kBlockQ * D);
    std::vector<acc_t> m(kBlockQ), l(kBlockQ);
    int64_t cached_b = -1, cached_hk = -1, cached_lo = 0, cached_n = 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % nchunks, hq = (task / nchunks) % p.heads_q;
      const int64_t b = task / (nchunks * p.heads_q), hk = hq / G;
      // Sequence b: S rows (packed sequences: up to the longest, p.seqlen).
      const AttentionSequence seq = attention_sequence(p, b);
      const int64_t S = seq.len;
      const int64_t c0 = c * kChunkQ, c1 = std::min(S, c0 + kChunkQ);
      if (c0 >= S) continue;
      const auto [kfirst, kend] = chunk_keys(c0, c1, S);  // keys this chunk can see

      const scalar_t* kp = static_cast<const scalar_t*>(p.k.ptr) + seq.offset(p.k, hk);
      const scalar_t* vp = static_cast<const scalar_t*>(p.v.ptr) + seq.offset(p.v, hk);
      // Keys (and values) rows [kfirst, kend) of head (b, hk). Tasks of one thread are
      // consecutive, so they extend what the previous task loaded (a window moves
      // forward: rows before kfirst are no longer needed).
      if (b != cached_b || hk != cached_hk || kfirst < cached_lo || kfirst > cached_n)
        cached_lo = cached_n = kfirst;
      cached_b = b;
      cached_hk = hk;
      if (kend > cached_n) {
        prod.load_keys(r, seq, cached_n, kend, kp, p.k.stride_s, vp, p.v.stride_s);
        cached_n = kend;
      }

      const scalar_t* qp = static_cast<const scalar_t*>(p.q.ptr) + seq.offset(p.q, hq);
      scalar_t* op = static_cast<scalar_t*>(p.out.ptr) + seq.offset(p.out, hq);
      acc_t* lse = static_cast<acc_t*>(p.lse) + seq.lse_offset(p.heads_q, hq, lse_len);

      // A row's online softmax starts empty (max -inf, sum 0), or with its head's sink: a
      // key of logit sinks[hq] and no value (max = sink, sum = exp(sink - max) = 1; a sink
      // of -inf drops out at the first key, whose alpha = exp(-inf - max) is 0).
      const acc_t m0 = sinks ? sinks[hq] : -std::numeric_limits<acc_t>::infinity();
      const acc_t l0 = sinks ? acc_t(1) : acc_t(0);
      for (int64_t q0 = c0; q0 < c1; q0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, c1 - q0);
        prod.load_queries(r, seq, q0, nq, qp + q0 * p.q.stride_s, p.q.stride_s);
        std::fill(m.begin(), m.end(), m0);
        std::fill(l.begin(), l.end(), l0);
        std::fill(ot.begin(), ot.end(), acc_t(0));
        // keys of the tile's rows: from the first row's first to the last row's end
        const int64_t qend = band.end(q0 + nq - 1, S);
        for (int64_t k0 = tile_start(band.first(q0), kBlockK); k0 < qend; k0 += kBlockK) {
          const int64_t nk = std::min(kBlockK, qend - k0);
          prod.scores(nq, k0, nk, scale, st.data(), kBlockK);
          for (int64_t i = 0; i < nq; ++i) {
            acc_t* srow = st.data() + i * kBlockK;
            const KeySpan seen = visible_keys(band, S, q0 + i, k0, nk);
            if (seen.size() > 0) {
              acc_t* s = srow + seen.lo;
              if (cap > 0) softcap_row(s, seen.size(), cap);
              const acc_t m_new = std::max(m[i], row_max(s, seen.size()));
              const acc_t alpha = std::exp(m[i] - m_new);  // 0 on the first block
              l[i] = l[i] * alpha + exp_row(s, seen.size(), m_new);
              m[i] = m_new;
              if (alpha != acc_t(1)) {
                acc_t* orow = ot.data() + i * D;
                for (int64_t j = 0; j < D; ++j) orow[j] *= alpha;
              }
            }
            zero_unseen(srow, seen, nk);
          }
          prod.add_pv(nq, k0, nk, st.data(), kBlockK, ot.data());
        }
        for (int64_t i = 0; i < nq; ++i) {
          // Every row sees at least its own key: l > 0 (and >= 1 with a sink).
          const acc_t inv = acc_t(1) / l[i];
          const acc_t* orow = ot.data() + i * D;
          scalar_t* dst = op + (q0 + i) * p.out.stride_s;
          for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(orow[j] * inv);
          lse[q0 + i] = m[i] + std::log(l[i]);
        }
      }
    }
  });
}

void launch_rope_attention_cpu(const AttentionParams& p, at::ScalarType dtype,
                               at::ScalarType table_dtype, c10::Device) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rope_attention_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(table_dtype, "rope_attention_cpu_table", [&] {
      using table_t = scalar_t;
      const bool packed_f32 = avx512::enabled<float>();  // (checks PIROPE_CPU_GEMM too)
      if constexpr (!std::is_same_v<x_t, double>) {
        if (std::is_same_v<x_t, c10::BFloat16> && avx512::enabled<c10::BFloat16>()) {
          forward_cpu<x_t>(p, [&] {
            return PackedProducts<x_t, table_t, c10::BFloat16>(p.head_dim, p.seqlen);
          });
          return;
        }
        if (packed_f32) {
          forward_cpu<x_t>(
              p, [&] { return PackedProducts<x_t, table_t, float>(p.head_dim, p.seqlen); });
          return;
        }
      }
      forward_cpu<x_t>(p, [&] { return BlasProducts<x_t, table_t>(p.head_dim); });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pirope, CPU, m) {
  register_rope_attention_kernels<launch_rope_attention_cpu,
                                  launch_rope_attention_backward_cpu>(m);
}

}  // namespace pirope::cpu
