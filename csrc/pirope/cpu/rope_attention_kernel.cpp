// CPU forward of rope_attention: flash-style tiling with an online softmax, in
// float32 (float64 for float64 input). Work is split over (batch, query head,
// chunk of query rows) with at::parallel_for. A task rotates the keys it needs once
// into its float32 scratch (cheap: seqlen x headdim, against the seqlen^2 x headdim
// of the products), rotates each query tile as it loads it, and multiplies tiles
// through ATen's CPU BLAS. No seqlen x seqlen matrix exists: the scores live in one
// (kBlockQ x kBlockK) tile per thread.
#include <limits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../rope_attention.h"
#include "attention_tiles.h"

namespace pirope::cpu {

// Defined in rope_attention_backward_kernel.cpp.
void launch_rope_attention_backward_cpu(const AttentionParams& p, at::ScalarType dtype,
                                        at::ScalarType table_dtype, c10::Device device);

namespace {

// Query rows per task: several tiles, so that the keys a task rotates are reused.
constexpr int64_t kChunkQ = 4 * kBlockQ;

template <typename scalar_t, typename table_t>
void forward_cpu(const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirectV = std::is_same_v<scalar_t, acc_t>;  // multiply v in place
  const int64_t S = p.seqlen, D = p.head_dim, G = p.heads_q / p.heads_kv;
  const int64_t nchunks = (S + kChunkQ - 1) / kChunkQ;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const RopeParams& r = p.rope;

  at::parallel_for(0, p.batch * p.heads_q * nchunks, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas one_blas_thread;
    // Per-task scratch: rotated keys (and converted values) of one kv head,
    // then one query tile, its scores and its output accumulator.
    std::vector<acc_t> kbuf, vbuf;
    std::vector<acc_t> qt(kBlockQ * D), st(kBlockQ * kBlockK), ot(kBlockQ * D);
    std::vector<acc_t> m(kBlockQ), l(kBlockQ);
    int64_t cached_b = -1, cached_hk = -1, cached_n = 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % nchunks, hq = (task / nchunks) % p.heads_q;
      const int64_t b = task / (nchunks * p.heads_q), hk = hq / G;
      const int64_t c0 = c * kChunkQ, c1 = std::min(S, c0 + kChunkQ);
      const int64_t kend = p.causal ? c1 : S;  // keys this chunk can see

      const scalar_t* kp = static_cast<const scalar_t*>(p.k.ptr) + b * p.k.stride_b +
                           hk * p.k.stride_h;
      const scalar_t* vp = static_cast<const scalar_t*>(p.v.ptr) + b * p.v.stride_b +
                           hk * p.v.stride_h;
      // Keys (and values) rows [0, kend) of head (b, hk) in the math type. Tasks of
      // one thread are consecutive, so they extend what the previous task loaded.
      if (b != cached_b || hk != cached_hk) cached_n = 0;
      cached_b = b;
      cached_hk = hk;
      const bool direct_v = kDirectV && p.v.stride_s >= D && p.v.stride_s <= INT32_MAX;
      if (kend > cached_n) {
        kbuf.resize(kend * D);
        load_rotated<scalar_t, table_t, acc_t>(r, b, cached_n, kend - cached_n,
                                               kp + cached_n * p.k.stride_s,
                                               p.k.stride_s, kbuf.data() + cached_n * D, D);
        if (!direct_v) {
          vbuf.resize(kend * D);
          convert_rows(vp + cached_n * p.v.stride_s, p.v.stride_s, kend - cached_n, D,
                       vbuf.data() + cached_n * D, D);
        }
        cached_n = kend;
      }
      // float32/float64 values are multiplied where they are, when BLAS can stride them.
      const acc_t* vrows = direct_v ? reinterpret_cast<const acc_t*>(vp) : vbuf.data();
      const int64_t ldv = direct_v ? p.v.stride_s : D;

      const scalar_t* qp = static_cast<const scalar_t*>(p.q.ptr) + b * p.q.stride_b +
                           hq * p.q.stride_h;
      scalar_t* op = static_cast<scalar_t*>(p.out.ptr) + b * p.out.stride_b +
                     hq * p.out.stride_h;
      acc_t* lse = static_cast<acc_t*>(p.lse) + (b * p.heads_q + hq) * S;

      for (int64_t q0 = c0; q0 < c1; q0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, c1 - q0);
        load_rotated<scalar_t, table_t, acc_t>(r, b, q0, nq, qp + q0 * p.q.stride_s,
                                               p.q.stride_s, qt.data(), D);
        std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(l.begin(), l.end(), acc_t(0));
        std::fill(ot.begin(), ot.end(), acc_t(0));
        const int64_t qend = p.causal ? q0 + nq : S;
        for (int64_t k0 = 0; k0 < qend; k0 += kBlockK) {
          const int64_t nk = std::min(kBlockK, qend - k0);
          // scores = scale * q k^T
          gemm_nt<acc_t>(nq, nk, D, scale, qt.data(), D, kbuf.data() + k0 * D, D,
                         acc_t(0), st.data(), kBlockK);
          for (int64_t i = 0; i < nq; ++i) {
            acc_t* srow = st.data() + i * kBlockK;
            const int64_t nv = visible_keys(p.causal, q0 + i, k0, nk);
            if (nv > 0) {
              const acc_t m_new = std::max(m[i], row_max(srow, nv));
              const acc_t alpha = std::exp(m[i] - m_new);  // 0 on the first block
              l[i] = l[i] * alpha + exp_row(srow, nv, m_new);
              m[i] = m_new;
              if (alpha != acc_t(1)) {
                acc_t* orow = ot.data() + i * D;
                for (int64_t j = 0; j < D; ++j) orow[j] *= alpha;
              }
            }
            std::fill(srow + std::max<int64_t>(nv, 0), srow + nk, acc_t(0));
          }
          // o += p v
          gemm_nn<acc_t>(nq, D, nk, acc_t(1), st.data(), kBlockK, vrows + k0 * ldv, ldv,
                         acc_t(1), ot.data(), D);
        }
        for (int64_t i = 0; i < nq; ++i) {
          // Every row sees at least key 0 (causal) or all keys: l > 0.
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
      forward_cpu<x_t, scalar_t>(p);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pirope, CPU, m) {
  register_rope_attention_kernels<launch_rope_attention_cpu,
                                  launch_rope_attention_backward_cpu>(m);
}

}  // namespace pirope::cpu
