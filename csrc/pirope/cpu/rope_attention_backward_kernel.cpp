// CPU backward of rope_attention. The probabilities are recomputed tile by tile
// from the saved log-sum-exp (P = exp(scale q k^T - lse)), with D = rowsum(dO * O):
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D),
//   dK += scale dS^T q,  dQ += scale dS k      (q, k rotated)
// and dq, dk are rotated back (by -angle) into the basis of the inputs.
//
// Deterministic by construction: one task per (batch, kv head) owns dk and dv of
// that head and dq of the query heads of its group, and runs its sums in a fixed
// order, so gradients are bit-identical on every run and for any thread count.
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
// prepared once per kv head (k, v) or query head (q, dO). BlasBackward multiplies
// math-type rows through BLAS; PackedBackward multiplies float or bfloat16 operands
// with avx512_gemm.h, accumulating dk and dv transposed (head_dim x seqlen, so that
// P and dS enter as B operands and are never transposed).
template <typename scalar_t, typename table_t>
class BlasBackward {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  BlasBackward(int64_t S, int64_t D)
      : D_(D), kr_(S * D), vf_(S * D), dk_(S * D), dv_(S * D), qr_(S * D), dof_(S * D),
        dq_(S * D) {}

  void load_kv(const RopeParams& r, int64_t b, int64_t S, const scalar_t* kp, int64_t ks,
               const scalar_t* vp, int64_t vs) {
    load_rotated<scalar_t, table_t, acc_t>(r, b, 0, S, kp, ks, kr_.data(), D_);
    convert_rows(vp, vs, S, D_, vf_.data(), D_);
    std::fill(dk_.begin(), dk_.end(), acc_t(0));
    std::fill(dv_.begin(), dv_.end(), acc_t(0));
  }
  void load_q(const RopeParams& r, int64_t b, int64_t S, const scalar_t* qp, int64_t qs,
              const scalar_t* dop, int64_t dos) {
    load_rotated<scalar_t, table_t, acc_t>(r, b, 0, S, qp, qs, qr_.data(), D_);
    convert_rows(dop, dos, S, D_, dof_.data(), D_);
    std::fill(dq_.begin(), dq_.end(), acc_t(0));
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
  // dK += scale dS^T q,  dQ += scale dS k
  void add_dk_dq(int64_t q0, int64_t nq, int64_t k0, int64_t nk, acc_t scale,
                 const acc_t* ds, int64_t ld) {
    gemm_tn<acc_t>(nk, D_, nq, scale, ds, ld, qr_.data() + q0 * D_, D_, acc_t(1),
                   dk_.data() + k0 * D_, D_);
    gemm_nn<acc_t>(nq, D_, nk, scale, ds, ld, kr_.data() + k0 * D_, D_, acc_t(1),
                   dq_.data() + q0 * D_, D_);
  }
  void store_dq(const RopeParams& r, int64_t b, int64_t S, scalar_t* dqp, int64_t stride) {
    store_unrotated<scalar_t, table_t, acc_t>(r, b, 0, S, dq_.data(), D_, dqp, stride);
  }
  void store_dk_dv(const RopeParams& r, int64_t b, int64_t S, scalar_t* dkp, int64_t dks,
                   scalar_t* dvp, int64_t dvs) {
    store_unrotated<scalar_t, table_t, acc_t>(r, b, 0, S, dk_.data(), D_, dkp, dks);
    convert_rows(dv_.data(), D_, S, D_, dvp, dvs);
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
  PackedBackward(int64_t S, int64_t D)
      : D_(D), Dk_(avx512::round_up_pair<T>(D)), ldn_(avx512::padded_ld(S, 4)),
        ldt_(avx512::padded_ld(S, 2)), ldg_(avx512::padded_ld(S, 4)), stage_(S * D),
        dkT_(D * ldg_), dvT_(D * ldg_), dq_(S * D), kn_(Dk_ * ldn_), vn_(Dk_ * ldn_),
        kk_(avx512::round_up_pair<T>(S) * D), qa_(S * Dk_), qT_(D * ldt_), doa_(S * Dk_),
        doT_(D * ldt_), tile_(kBwdBlockQ * kBwdBlockK) {}

  // k rotated (in float32) as the columns of k^T (scores) and as rows (dQ = dS k);
  // v as the columns of v^T (dP = dO v^T).
  void load_kv(const RopeParams& r, int64_t b, int64_t S, const scalar_t* kp, int64_t ks,
               const scalar_t* vp, int64_t vs) {
    load_rotated<scalar_t, table_t, float>(r, b, 0, S, kp, ks, stage_.data(), D_);
    avx512::pack_rows_as_n(stage_.data(), D_, 0, S, D_, kn_.data(), ldn_);
    avx512::pack_rows_as_k(stage_.data(), D_, 0, S, D_, kk_.data());
    avx512::pack_rows_as_n(vp, vs, 0, S, D_, vn_.data(), ldn_);
    std::fill(dkT_.begin(), dkT_.end(), 0.f);
    std::fill(dvT_.begin(), dvT_.end(), 0.f);
  }
  // q rotated and dO, each row-major (scores, dP) and transposed (dK^T, dV^T).
  void load_q(const RopeParams& r, int64_t b, int64_t S, const scalar_t* qp, int64_t qs,
              const scalar_t* dop, int64_t dos) {
    load_rotated<scalar_t, table_t, float>(r, b, 0, S, qp, qs, stage_.data(), D_);
    avx512::rows_as_a(stage_.data(), D_, S, D_, qa_.data(), Dk_);
    avx512::transpose_rows(stage_.data(), D_, S, D_, qT_.data(), ldt_);
    convert_rows(dop, dos, S, D_, doa_.data(), Dk_);
    avx512::transpose_rows(dop, dos, S, D_, doT_.data(), ldt_);
    std::fill(dq_.begin(), dq_.end(), 0.f);
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
  // dK^T += scale q^T dS,  dQ += scale dS k
  void add_dk_dq(int64_t q0, int64_t nq, int64_t k0, int64_t nk, float scale, const float* ds,
                 int64_t ld) {
    int64_t ldp, lda;
    const T* db = avx512::tile_as_b(ds, ld, nq, nk, tile_.data(), kBwdBlockK, ldp);
    avx512::gemm<T>(D_, nk, avx512::round_up_pair<T>(nq), scale, qT_.data() + q0, ldt_, db,
                    ldp, true, dkT_.data() + k0, ldg_);
    const T* da = avx512::tile_as_a(ds, ld, nq, nk, tile_.data(), kBwdBlockK, lda);
    avx512::gemm<T>(nq, D_, avx512::round_up_pair<T>(nk), scale, da, lda,
                    kk_.data() + avx512::packed_index<T>(k0, 0, D_), D_, true,
                    dq_.data() + q0 * D_, D_);
  }
  void store_dq(const RopeParams& r, int64_t b, int64_t S, scalar_t* dqp, int64_t stride) {
    store_unrotated<scalar_t, table_t, float>(r, b, 0, S, dq_.data(), D_, dqp, stride);
  }
  void store_dk_dv(const RopeParams& r, int64_t b, int64_t S, scalar_t* dkp, int64_t dks,
                   scalar_t* dvp, int64_t dvs) {
    avx512::for_each_blocked(
        S, D_, [&](int64_t i, int64_t j) { stage_[i * D_ + j] = dkT_[j * ldg_ + i]; });
    store_unrotated<scalar_t, table_t, float>(r, b, 0, S, stage_.data(), D_, dkp, dks);
    avx512::for_each_blocked(S, D_, [&](int64_t i, int64_t j) {
      dvp[i * dvs + j] = scalar_t(dvT_[j * ldg_ + i]);
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

// make_products() gives one thread's products (BlasBackward or PackedBackward).
template <typename scalar_t, typename MakeProducts>
void backward_cpu(const AttentionParams& p, MakeProducts make_products) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = p.seqlen, D = p.head_dim, G = p.heads_q / p.heads_kv;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const RopeParams& r = p.rope;

  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas one_blas_thread;
    auto prod = make_products();
    std::vector<acc_t> delta(S);
    std::vector<acc_t> pt(kBwdBlockQ * kBwdBlockK), dpt(kBwdBlockQ * kBwdBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
      auto head = [&](const AttentionTensor& t, int64_t h) {
        return static_cast<const scalar_t*>(t.ptr) + b * t.stride_b + h * t.stride_h;
      };
      auto mhead = [&](const AttentionTensor& t, int64_t h) {
        return static_cast<scalar_t*>(t.ptr) + b * t.stride_b + h * t.stride_h;
      };
      prod.load_kv(r, b, S, head(p.k, hk), p.k.stride_s, head(p.v, hk), p.v.stride_s);

      for (int64_t g = 0; g < G; ++g) {
        const int64_t hq = hk * G + g;
        prod.load_q(r, b, S, head(p.q, hq), p.q.stride_s, head(p.grad_out, hq),
                    p.grad_out.stride_s);
        const scalar_t* o = head(p.out, hq);
        const scalar_t* go = head(p.grad_out, hq);
        for (int64_t i = 0; i < S; ++i) {
          acc_t acc = 0;
          const scalar_t* orow = o + i * p.out.stride_s;
          const scalar_t* grow = go + i * p.grad_out.stride_s;
          for (int64_t j = 0; j < D; ++j) acc += acc_t(grow[j]) * acc_t(orow[j]);
          delta[i] = acc;
        }
        const acc_t* lse = static_cast<const acc_t*>(p.lse) + (b * p.heads_q + hq) * S;

        for (int64_t k0 = 0; k0 < S; k0 += kBwdBlockK) {
          const int64_t nk_block = std::min(kBwdBlockK, S - k0);
          // Causal: query tiles before k0 see none of these keys.
          const int64_t qstart = p.causal ? (k0 / kBwdBlockQ) * kBwdBlockQ : 0;
          for (int64_t q0 = qstart; q0 < S; q0 += kBwdBlockQ) {
            const int64_t nq = std::min(kBwdBlockQ, S - q0);
            // Causal: keys past the tile's last query are masked for every row; leave
            // them out of the products (only the diagonal tiles are clipped).
            const int64_t nk = p.causal ? std::min(nk_block, q0 + nq - k0) : nk_block;
            // P = exp(scale q k^T - lse), zero where masked
            prod.scores(q0, nq, k0, nk, scale, pt.data(), kBwdBlockK);
            for (int64_t i = 0; i < nq; ++i) {
              acc_t* prow = pt.data() + i * kBwdBlockK;
              const int64_t nv = visible_keys(p.causal, q0 + i, k0, nk);
              if (nv > 0) exp_row(prow, nv, lse[q0 + i]);
              std::fill(prow + nv, prow + nk, acc_t(0));
            }
            prod.add_dv(q0, nq, k0, nk, pt.data(), kBwdBlockK);
            // dP = dO V^T, then dS = P * (dP - delta) in place
            prod.dp(q0, nq, k0, nk, dpt.data(), kBwdBlockK);
            for (int64_t i = 0; i < nq; ++i) {
              const acc_t* prow = pt.data() + i * kBwdBlockK;
              acc_t* drow = dpt.data() + i * kBwdBlockK;
              const acc_t di = delta[q0 + i];
              for (int64_t j = 0; j < nk; ++j) drow[j] = prow[j] * (drow[j] - di);
            }
            prod.add_dk_dq(q0, nq, k0, nk, scale, dpt.data(), kBwdBlockK);
          }
        }
        prod.store_dq(r, b, S, mhead(p.dq, hq), p.dq.stride_s);
      }
      prod.store_dk_dv(r, b, S, mhead(p.dk, hk), p.dk.stride_s, mhead(p.dv, hk),
                       p.dv.stride_s);
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
      if constexpr (!std::is_same_v<x_t, double>) {
        if (std::is_same_v<x_t, c10::BFloat16> && avx512::enabled<c10::BFloat16>()) {
          backward_cpu<x_t>(p, [&] { return PackedBackward<x_t, table_t, c10::BFloat16>(S, D); });
          return;
        }
        if (avx512::enabled<float>()) {
          backward_cpu<x_t>(p, [&] { return PackedBackward<x_t, table_t, float>(S, D); });
          return;
        }
      }
      backward_cpu<x_t>(p, [&] { return BlasBackward<x_t, table_t>(S, D); });
    });
  });
}

}  // namespace pirope::cpu
