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

namespace pirope::cpu {
namespace {

// Tiles of the backward. On a 2-core EPYC (fp32, headdim 128, seqlen 2048), query
// tiles of 32..128 rows and key tiles of 128..512 ran within 10% of each other;
// the forward's sizes were among the best.
constexpr int64_t kBwdBlockQ = kBlockQ;
constexpr int64_t kBwdBlockK = kBlockK;

template <typename scalar_t, typename table_t>
void backward_cpu(const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = p.seqlen, D = p.head_dim, G = p.heads_q / p.heads_kv;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const RopeParams& r = p.rope;

  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas one_blas_thread;
    // Per-task scratch, all (seqlen x headdim) in the math type: rotated keys,
    // values, dk and dv accumulators (summed over the group), and for the current
    // query head its rotated queries, dO and the dq accumulator.
    std::vector<acc_t> kr(S * D), vf(S * D), dk(S * D), dv(S * D);
    std::vector<acc_t> qr(S * D), dof(S * D), dq(S * D), delta(S);
    std::vector<acc_t> pt(kBwdBlockQ * kBwdBlockK), dpt(kBwdBlockQ * kBwdBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
      auto head = [&](const AttentionTensor& t, int64_t h) {
        return static_cast<const scalar_t*>(t.ptr) + b * t.stride_b + h * t.stride_h;
      };
      auto mhead = [&](const AttentionTensor& t, int64_t h) {
        return static_cast<scalar_t*>(t.ptr) + b * t.stride_b + h * t.stride_h;
      };
      load_rotated<scalar_t, table_t, acc_t>(r, b, 0, S, head(p.k, hk), p.k.stride_s,
                                             kr.data(), D);
      convert_rows(head(p.v, hk), p.v.stride_s, S, D, vf.data(), D);
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));

      for (int64_t g = 0; g < G; ++g) {
        const int64_t hq = hk * G + g;
        load_rotated<scalar_t, table_t, acc_t>(r, b, 0, S, head(p.q, hq), p.q.stride_s,
                                               qr.data(), D);
        convert_rows(head(p.grad_out, hq), p.grad_out.stride_s, S, D, dof.data(), D);
        const scalar_t* o = head(p.out, hq);
        for (int64_t i = 0; i < S; ++i) {
          acc_t acc = 0;
          const scalar_t* orow = o + i * p.out.stride_s;
          const acc_t* grow = dof.data() + i * D;
          for (int64_t j = 0; j < D; ++j) acc += grow[j] * acc_t(orow[j]);
          delta[i] = acc;
        }
        std::fill(dq.begin(), dq.end(), acc_t(0));
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
            const acc_t* qt = qr.data() + q0 * D;
            const acc_t* dot = dof.data() + q0 * D;
            // P = exp(scale q k^T - lse), zero where masked
            gemm_nt<acc_t>(nq, nk, D, scale, qt, D, kr.data() + k0 * D, D, acc_t(0),
                           pt.data(), kBwdBlockK);
            for (int64_t i = 0; i < nq; ++i) {
              acc_t* prow = pt.data() + i * kBwdBlockK;
              const int64_t nv = visible_keys(p.causal, q0 + i, k0, nk);
              if (nv > 0) exp_row(prow, nv, lse[q0 + i]);
              std::fill(prow + nv, prow + nk, acc_t(0));
            }
            // dV += P^T dO
            gemm_tn<acc_t>(nk, D, nq, acc_t(1), pt.data(), kBwdBlockK, dot, D, acc_t(1),
                           dv.data() + k0 * D, D);
            // dP = dO V^T, then dS = P * (dP - delta) in place
            gemm_nt<acc_t>(nq, nk, D, acc_t(1), dot, D, vf.data() + k0 * D, D, acc_t(0),
                           dpt.data(), kBwdBlockK);
            for (int64_t i = 0; i < nq; ++i) {
              const acc_t* prow = pt.data() + i * kBwdBlockK;
              acc_t* drow = dpt.data() + i * kBwdBlockK;
              const acc_t di = delta[q0 + i];
              for (int64_t j = 0; j < nk; ++j) drow[j] = prow[j] * (drow[j] - di);
            }
            // dK += scale dS^T q,  dQ += scale dS k
            gemm_tn<acc_t>(nk, D, nq, scale, dpt.data(), kBwdBlockK, qt, D, acc_t(1),
                           dk.data() + k0 * D, D);
            gemm_nn<acc_t>(nq, D, nk, scale, dpt.data(), kBwdBlockK, kr.data() + k0 * D, D,
                           acc_t(1), dq.data() + q0 * D, D);
          }
        }
        store_unrotated<scalar_t, table_t, acc_t>(r, b, 0, S, dq.data(), D,
                                                  mhead(p.dq, hq), p.dq.stride_s);
      }
      store_unrotated<scalar_t, table_t, acc_t>(r, b, 0, S, dk.data(), D,
                                                mhead(p.dk, hk), p.dk.stride_s);
      scalar_t* dvp = mhead(p.dv, hk);
      convert_rows(dv.data(), D, S, D, dvp, p.dv.stride_s);
    }
  });
}

}  // namespace

void launch_rope_attention_backward_cpu(const AttentionParams& p, at::ScalarType dtype,
                                        at::ScalarType table_dtype, c10::Device) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rope_attention_backward_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(table_dtype, "rope_attention_backward_cpu_table", [&] {
      backward_cpu<x_t, scalar_t>(p);
    });
  });
}

}  // namespace pirope::cpu
