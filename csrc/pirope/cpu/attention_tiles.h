// Tile helpers shared by the CPU forward and backward of rope_attention: row-major
// products through ATen's CPU BLAS, rows loaded (rotated) into the math type and
// stored back (un-rotated), and the exponentials of the softmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>  // vec_reduce_all (not included by vec.h in older torch)
#include <ATen/cpu/vec/vec.h>

#include "../attention_params.h"
#include "../rope_math.h"

namespace pirope::cpu {

// Tile sizes (rows of queries and keys per product). A (kBlockQ x kBlockK) score
// tile and a (kBlockQ x headdim) accumulator stay in L2.
// At seqlen 4096 (fp32, headdim 128, one thread) 64 x 256, 128 x 256, 128 x 512
// and 256 x 256 ran within 5% of each other, at the speed of ATen's SDPA: the tile
// products are as fast as MKL's sgemm makes them.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 256;

// ---- Work split. ----

// body(begin, end) over contiguous runs of the tasks [0, n) (as at::parallel_for), the runs
// of about equal total cost(t) rather than of equal count: packed sequences of mixed
// lengths make some tasks far heavier than others, and a split by count would hand one
// thread the long sequence. Consecutive tasks stay together (tasks may reuse what the
// previous one loaded); which thread runs a task never changes its result.
template <typename Cost, typename Body>
void parallel_for_cost(int64_t n, Cost cost, Body body) {
  if (n <= 0) return;
  std::vector<double> start(n + 1, 0.0);  // start[t]: the cost of tasks before t
  for (int64_t t = 0; t < n; ++t) start[t + 1] = start[t] + static_cast<double>(cost(t));
  const int64_t bins = std::min<int64_t>(n, 4 * static_cast<int64_t>(at::get_num_threads()));
  // first task of bin k: the first whose start reaches k/bins of the total
  auto first = [&](int64_t k) -> int64_t {
    if (k >= bins) return n;
    const double at_least = start[n] * static_cast<double>(k) / static_cast<double>(bins);
    return std::lower_bound(start.begin(), start.begin() + n, at_least) - start.begin();
  };
  at::parallel_for(0, bins, 1, [&](int64_t k0, int64_t k1) {
    const int64_t begin = first(k0), end = first(k1);
    if (begin < end) body(begin, end);
  });
}

// ---- Row-major products through the BLAS that ATen links (MKL's sgemm_/dgemm_,
// exported by libtorch_cpu; ATen's own cpublas::gemm overloads for float/double are
// not exported). BLAS is column-major: a row-major (m x n) matrix is its
// column-major (n x m) transpose, so C = A B becomes C^T = B^T A^T and the operands
// swap. lda/ldb/ldc are row strides, at least the row length, below 2^31. ----

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const float* alpha, const float* a, const int* lda,
            const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const double* alpha, const double* a, const int* lda,
            const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

// MKL (when torch links it) would open a nested OpenMP team inside every product
// called from an at::parallel_for task; its threads then spin against ours (5x
// slower on 2 cores). MKL_Set_Num_Threads_Local is the C entry point (the
// lower-case symbol is the Fortran one, taking a pointer). Weak, so a build of
// torch on another BLAS still loads.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// One BLAS thread for the calling thread while in scope (each task runs its own
// products; the parallelism is across tasks).
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) prev_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int prev_ = 0;  // 0: back to the global setting
};

// Column-major C (m x n) = alpha op(A) op(B) + beta C.
template <typename T>
void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const int mi = int(m), ni = int(n), ki = int(k);
  const int la = int(std::max<int64_t>(lda, 1)), lb = int(std::max<int64_t>(ldb, 1)),
            lc = int(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  else
    dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

// C (m x n) = alpha * A (m x k) * B^T, B stored (n x k), + beta * C.
template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
             const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  blas_gemm<T>('T', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// C (m x n) = alpha * A (m x k) * B (k x n) + beta * C.
template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
             const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  blas_gemm<T>('N', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// C (m x n) = alpha * A^T * B + beta * C, A stored (k x m), B (k x n).
template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
             const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  blas_gemm<T>('N', 'T', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// ---- Rows in and out of the math type. ----

// Rows s0 .. s0+n-1 of one head of sequence `seq` (row stride `stride`), rotated by
// their positions, into dst (row stride ld) in the math type acc_t. The
// head_dim - rotary_dim pass-through features are copied.
template <typename scalar_t, typename table_t, typename acc_t>
void load_rotated(const RopeParams& r, const AttentionSequence& seq, int64_t s0, int64_t n,
                  const scalar_t* src, int64_t stride, acc_t* dst, int64_t ld) {
  const int64_t half = r.rotary_dim / 2;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* x = src + i * stride;
    acc_t* y = dst + i * ld;
    // rope_attention.cpp checked every position on CPU.
    const int64_t pos = token_position(r, seq.entry, seq.row0 + s0 + i);
    const table_t* cs = static_cast<const table_t*>(r.cos) + pos * r.table_stride;
    const table_t* sn = static_cast<const table_t*>(r.sin) + pos * r.table_stride;
    if (r.interleaved) {
      for (int64_t j = 0; j < half; ++j)
        rotate_pair<acc_t>(acc_t(x[2 * j]), acc_t(x[2 * j + 1]), acc_t(cs[j]),
                           acc_t(sn[j]), y[2 * j], y[2 * j + 1]);
    } else {
      for (int64_t j = 0; j < half; ++j)
        rotate_pair<acc_t>(acc_t(x[j]), acc_t(x[j + half]), acc_t(cs[j]), acc_t(sn[j]),
                           y[j], y[j + half]);
    }
    for (int64_t j = r.rotary_dim; j < r.head_dim; ++j) y[j] = acc_t(x[j]);
  }
}

// The inverse of load_rotated: rows of src (math type, row stride ld) rotated by
// -angle (the backward of the rotation) and rounded once into dst.
template <typename scalar_t, typename table_t, typename acc_t>
void store_unrotated(const RopeParams& r, const AttentionSequence& seq, int64_t s0, int64_t n,
                     const acc_t* src, int64_t ld, scalar_t* dst, int64_t stride) {
  const int64_t half = r.rotary_dim / 2;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* x = src + i * ld;
    scalar_t* y = dst + i * stride;
    const int64_t pos = token_position(r, seq.entry, seq.row0 + s0 + i);
    const table_t* cs = static_cast<const table_t*>(r.cos) + pos * r.table_stride;
    const table_t* sn = static_cast<const table_t*>(r.sin) + pos * r.table_stride;
    for (int64_t j = 0; j < half; ++j) {
      const int64_t a = pair_first(j, half, r.interleaved);
      const int64_t c = pair_second(j, half, r.interleaved);
      acc_t o1, o2;
      rotate_pair<acc_t>(x[a], x[c], acc_t(cs[j]), -acc_t(sn[j]), o1, o2);
      y[a] = scalar_t(o1);
      y[c] = scalar_t(o2);
    }
    for (int64_t j = r.rotary_dim; j < r.head_dim; ++j) y[j] = scalar_t(x[j]);
  }
}

// n rows of d features from src (row stride `stride`) into dst (row stride ld).
template <typename S, typename D>
void convert_rows(const S* src, int64_t stride, int64_t n, int64_t d, D* dst,
                  int64_t ld) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) dst[i * ld + j] = D(src[i * stride + j]);
}

// ---- Softmax pieces. ----

template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>)
    return x.exp_u20();  // the fast exp of ATen's own CPU flash attention
  else
    return x.exp();
}

// max of x[0..n), n >= 1.
template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  acc_t m = x[0];
  int64_t j = 0;
  if (n >= W) {
    Vec vm = Vec::loadu(x);
    for (j = W; j + W <= n; j += W) vm = at::vec::maximum(vm, Vec::loadu(x + j));
    m = at::vec::vec_reduce_all<acc_t>(
        [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = exp(x[j] - sub) for j < n; returns the sum of the new values.
template <typename acc_t>
acc_t exp_row(acc_t* x, int64_t n, acc_t sub) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vs(sub);
  Vec vsum(acc_t(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec e = vexp<acc_t>(Vec::loadu(x + j) - vs);
    e.store(x + j);
    vsum = vsum + e;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - sub);
    sum += x[j];
  }
  return sum;
}

// tanh. float: through exp, as Sleef's tanh (through ATen, AVX2) takes 2.5x as long, a
// third of the fused forward at Gemma 2's cap: 1 - 2 / (exp(2x) + 1) (+-1 once exp(2x)
// leaves the float range), or, where |x| < 0.4 and that would cancel, the odd series
// x (1 - x^2/3 + 2x^4/15 - 17x^6/315 + 62x^8/2835 - 1382x^10/155925 + 21844x^12/6081075)
// (truncation below 1e-8 relative). Measured over 2^24 points: within 5 ulps, 1.8e-7
// absolute (Sleef's: 1 ulp). double: Sleef's tanh.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vtanh(const at::vec::Vectorized<acc_t>& x) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (!std::is_same_v<acc_t, float>) {
    return x.tanh();
  } else {
    const Vec x2 = x * x;
    Vec p = at::vec::fmadd(x2, Vec(21844.f / 6081075.f), Vec(-1382.f / 155925.f));
    for (const float c : {62.f / 2835.f, -17.f / 315.f, 2.f / 15.f, -1.f / 3.f, 1.f})
      p = at::vec::fmadd(p, x2, Vec(c));
    const Vec far = Vec(1.f) - Vec(2.f) / ((x + x).exp() + Vec(1.f));
    return Vec::blendv(far, x * p, x.abs() < Vec(0.4f));
  }
}

// Attention-logit soft-cap (Gemma 2): x[j] = cap * tanh(x[j] / cap) for j < n (cap > 0;
// divided, not multiplied by 1 / cap, which overflows for a tiny cap). With `slope`, also
// slope[j] = 1 - tanh^2: the derivative of the capped score by the score, which the
// backward multiplies dS by.
template <typename acc_t>
void softcap_row(acc_t* x, int64_t n, acc_t cap, acc_t* slope = nullptr) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vcap(cap), one(acc_t(1));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec t = vtanh<acc_t>(Vec::loadu(x + j) / vcap);
    (t * vcap).store(x + j);
    if (slope != nullptr) (one - t * t).store(slope + j);
  }
  for (; j < n; ++j) {
    const acc_t t = std::tanh(x[j] / cap);
    x[j] = cap * t;
    if (slope != nullptr) slope[j] = acc_t(1) - t * t;
  }
}

// The keys of block [k0, k0 + nk) that query row q (of a sequence of S rows) sees:
// [lo, hi), counted from k0 (lo == hi: none).
struct KeySpan {
  int64_t lo, hi;
  int64_t size() const { return hi - lo; }
};
inline KeySpan visible_keys(const AttentionBand& band, int64_t S, int64_t q, int64_t k0,
                            int64_t nk) {
  // first(q) <= q < end(q): lo <= hi
  return {std::clamp<int64_t>(band.first(q) - k0, 0, nk),
          std::clamp<int64_t>(band.end(q, S) - k0, 0, nk)};
}

// row[j] = 0 for the keys of the block (nk) the row does not see.
template <typename acc_t>
void zero_unseen(acc_t* row, KeySpan seen, int64_t nk) {
  std::fill(row, row + seen.lo, acc_t(0));
  std::fill(row + seen.hi, row + nk, acc_t(0));
}

// First row of the tile of `block` rows (tiles from row 0) that holds row j.
inline int64_t tile_start(int64_t j, int64_t block) { return j / block * block; }

}  // namespace pirope::cpu
