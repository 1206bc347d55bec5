// AVX512 tile products (see avx512_gemm.h). Compiled for any x86-64 target: the
// kernels carry their own target attribute and run only after a runtime check.
#include "avx512_gemm.h"

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <utility>
#include <vector>

#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PIROPE_HAVE_AVX512 1
#include <immintrin.h>
// One target for every kernel here; the float ones use no AVX512-BF16 instruction
// (they are only run where AVX512F/BW/VL are present).
#define PIROPE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
// Fully unrolled register-tile loops, so that the accumulators stay in registers
// (GCC keeps a partly unrolled array of vectors on the stack: 3x slower).
#if defined(__clang__)
#define PIROPE_UNROLL _Pragma("unroll")
#else
#define PIROPE_UNROLL _Pragma("GCC unroll 16")
#endif
#endif

namespace pirope::cpu::avx512 {

namespace {
// PIROPE_CPU_GEMM, read at each call, so tests can flip it; a typo must not pass for
// the default.
std::string_view mode() {
  const char* env = std::getenv("PIROPE_CPU_GEMM");
  const std::string_view m = env ? env : "";
  TORCH_CHECK(m.empty() || m == "auto" || m == "avx512" || m == "blas" || m == "portable",
              "PIROPE_CPU_GEMM must be 'auto', 'avx512', 'blas' or 'portable', got '", m, "'");
  return m;
}

// Whether the functions below run their portable versions: PIROPE_CPU_GEMM=portable at
// the last enabled() call (every op calls it before any product), so that no tile reads
// the environment (getenv per row would cost more than an AVX512-BF16 tile product).
std::atomic<bool> use_portable{false};
}  // namespace

bool portable() { return mode() == "portable"; }

template <typename T>
bool enabled() {
  const std::string_view m = mode();
  use_portable.store(m == "portable", std::memory_order_relaxed);
  if (m == "portable") return true;
  if (m == "blas" || (std::is_same_v<T, c10::BFloat16> && m == "avx512")) return false;
#ifdef PIROPE_HAVE_AVX512
  static const bool cpu = [] {  // the CPU does not change
    const bool base = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
    if constexpr (std::is_same_v<T, c10::BFloat16>)
      return base && __builtin_cpu_supports("avx512bf16");
    return base;
  }();
  return cpu;
#else
  return false;
#endif
}

namespace {

// ---- Portable versions (PIROPE_CPU_GEMM=portable): the same products in plain C++ and
// ATen's vector types, one row of C at a time (it stays in L1 while B streams past),
// B in float32 (bfloat16 operands converted once per product; each product of a pair
// added in turn, as vdpbf16ps adds them): the AVX512 kernels' results up to summation
// order.

template <typename T>
void gemm_portable(int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda,
                   const T* b, int64_t ldp, bool accumulate, float* c, int64_t ldc) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const float* bf;  // B (k x n), row stride ldb
  int64_t ldb;
  std::vector<float> converted;
  if constexpr (std::is_same_v<T, float>) {
    bf = b;
    ldb = ldp;
  } else {
    converted.resize(k * n);
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t j = 0; j < n; ++j) converted[kk * n + j] = float(b[packed_index<T>(kk, j, ldp)]);
    bf = converted.data();
    ldb = n;
  }
  std::vector<float> row(n);
  for (int64_t i = 0; i < m; ++i) {
    std::fill(row.begin(), row.end(), 0.f);
    for (int64_t kk = 0; kk < k; ++kk) {
      const float ai = float(a[i * lda + kk]);
      const Vec va(ai);
      const float* bk = bf + kk * ldb;
      int64_t j = 0;
      for (; j + W <= n; j += W)
        at::vec::fmadd(va, Vec::loadu(bk + j), Vec::loadu(row.data() + j)).store(row.data() + j);
      for (; j < n; ++j) row[j] += ai * bk[j];
    }
    float* crow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) crow[j] = alpha * row[j] + (accumulate ? crow[j] : 0.f);
  }
}

void round_row_portable(const float* src, int64_t n, c10::BFloat16* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = c10::BFloat16(src[j]);  // round to nearest even
  if (n % 2) dst[n] = c10::BFloat16(0.f);
}

void interleave_rows_portable(const float* r0, const float* r1, int64_t n, c10::BFloat16* dst) {
  for (int64_t j = 0; j < n; ++j) {
    dst[2 * j] = c10::BFloat16(r0[j]);
    dst[2 * j + 1] = c10::BFloat16(r1 ? r1[j] : 0.f);
  }
}

}  // namespace

#ifdef PIROPE_HAVE_AVX512
namespace {

// Register tile: MR rows of C by NV vectors of 16 columns (MR * NV accumulators,
// NV loads of B and MR broadcasts of A per step of k; 6 x 4 uses 29 of the 32 zmm
// registers). The last vector's columns are masked by `last`.
constexpr int kMR = 6, kNV = 4, kNR = 16 * kNV;

template <typename T, int MR, int NV>
PIROPE_AVX512_TARGET void tile(int64_t k, float alpha, const T* a, int64_t lda, const T* b,
                               int64_t ldp, bool accumulate, float* c, int64_t ldc,
                               __mmask16 last) {
  constexpr int64_t P = kPair<T>;
  __m512 acc[MR][NV];
  PIROPE_UNROLL for (int i = 0; i < MR; ++i)
    PIROPE_UNROLL for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += P) {
    const T* brow = b + kk * ldp;  // row (pair) kk / P: P * ldp elements
    __m512i bv[NV];                // 16 columns (of P elements each) per vector
    PIROPE_UNROLL for (int j = 0; j < NV; ++j)
      bv[j] = j + 1 < NV ? _mm512_loadu_si512(brow + 16 * P * j)
                         : _mm512_maskz_loadu_epi32(last, brow + 16 * P * j);
    PIROPE_UNROLL for (int i = 0; i < MR; ++i) {
      int32_t ai;  // A[i][kk .. kk + P), 32 bits, to every lane
      std::memcpy(&ai, a + i * lda + kk, sizeof(ai));
      const __m512i av = _mm512_set1_epi32(ai);
      PIROPE_UNROLL for (int j = 0; j < NV; ++j) {
        if constexpr (P == 2)
          acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)av, (__m512bh)bv[j]);
        else
          acc[i][j] = _mm512_fmadd_ps(_mm512_castsi512_ps(av), _mm512_castsi512_ps(bv[j]),
                                      acc[i][j]);
      }
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  PIROPE_UNROLL for (int i = 0; i < MR; ++i) {
    float* crow = c + i * ldc;
    PIROPE_UNROLL for (int j = 0; j < NV; ++j) {
      const __mmask16 mask = j + 1 < NV ? __mmask16(0xffff) : last;
      __m512 v = _mm512_mul_ps(acc[i][j], va);
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, crow + 16 * j));
      _mm512_mask_storeu_ps(crow + 16 * j, mask, v);
    }
  }
}

template <typename T>
using TileFn = void (*)(int64_t, float, const T*, int64_t, const T*, int64_t, bool, float*,
                        int64_t, __mmask16);

// tiles<T>()[mr - 1][nv - 1] = tile<T, mr, nv>.
template <typename T, int M, int... NV>
constexpr std::array<TileFn<T>, kNV> tile_row(std::integer_sequence<int, NV...>) {
  return {&tile<T, M, NV + 1>...};
}
template <typename T, int... MR>
constexpr std::array<std::array<TileFn<T>, kNV>, kMR> tile_table(
    std::integer_sequence<int, MR...>) {
  return {tile_row<T, MR + 1>(std::make_integer_sequence<int, kNV>{})...};
}
template <typename T>
constexpr auto kTiles = tile_table<T>(std::make_integer_sequence<int, kMR>{});

PIROPE_AVX512_TARGET void round_row_avx512(const float* src, int64_t n, c10::BFloat16* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
  if (j < n) {
    const __mmask16 m = __mmask16((1u << (n - j)) - 1u);
    _mm256_mask_storeu_epi16(dst + j, m,
                             (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + j)));
  }
  if (n % 2) dst[n] = c10::BFloat16(0.f);
}

PIROPE_AVX512_TARGET void interleave_rows_avx512(const float* r0, const float* r1, int64_t n,
                                                 c10::BFloat16* dst) {
  // cvtne2ps gives [r0 0..15 | r1 0..15] (second argument low); the permutation
  // takes halfwords 0,16,1,17,... : the pairs (r0[j], r1[j]).
  alignas(64) static constexpr int16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                   21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                   11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1u);
    const __m512 a = _mm512_maskz_loadu_ps(m, r0 + j);
    const __m512 b = r1 ? _mm512_maskz_loadu_ps(m, r1 + j) : _mm512_setzero_ps();
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    _mm512_mask_storeu_epi32(dst + 2 * j, m, _mm512_permutexvar_epi16(idx, both));
  }
}

}  // namespace
#endif

void round_row(const float* src, int64_t n, c10::BFloat16* dst) {
#ifdef PIROPE_HAVE_AVX512
  if (!use_portable.load(std::memory_order_relaxed)) return round_row_avx512(src, n, dst);
#endif
  round_row_portable(src, n, dst);
}

void interleave_rows(const float* r0, const float* r1, int64_t n, c10::BFloat16* dst) {
#ifdef PIROPE_HAVE_AVX512
  if (!use_portable.load(std::memory_order_relaxed))
    return interleave_rows_avx512(r0, r1, n, dst);
#endif
  interleave_rows_portable(r0, r1, n, dst);
}

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda, const T* b,
          int64_t ldp, bool accumulate, float* c, int64_t ldc) {
  constexpr int64_t P = kPair<T>;
  TORCH_INTERNAL_ASSERT(k % P == 0 && lda % P == 0 && n <= ldp, "avx512::gemm: bad operands");
  if (use_portable.load(std::memory_order_relaxed))
    return gemm_portable(m, n, k, alpha, a, lda, b, ldp, accumulate, c, ldc);
#ifdef PIROPE_HAVE_AVX512
  // Column panels of B (k x 64: 32 KB for k = 256 bfloat16s or 128 floats) stay in
  // L1 while the row tiles of A stream past them.
  for (int64_t j0 = 0; j0 < n; j0 += kNR) {
    const int64_t w = std::min<int64_t>(kNR, n - j0);
    const int nv = int((w + 15) / 16);
    const int tail = int(w - 16 * (nv - 1));
    const __mmask16 last = __mmask16((1u << tail) - 1u);
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const int mr = int(std::min<int64_t>(kMR, m - i0));
      kTiles<T>[mr - 1][nv - 1](k, alpha, a + i0 * lda, lda, b + P * j0, ldp, accumulate,
                                c + i0 * ldc + j0, ldc, last);
    }
  }
#else
  TORCH_CHECK(false, "avx512::gemm: this build has no AVX512 kernels");
#endif
}

template bool enabled<float>();
template bool enabled<c10::BFloat16>();
template void gemm<float>(int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, bool, float*, int64_t);
template void gemm<c10::BFloat16>(int64_t, int64_t, int64_t, float, const c10::BFloat16*,
                                  int64_t, const c10::BFloat16*, int64_t, bool, float*,
                                  int64_t);

}  // namespace pirope::cpu::avx512
