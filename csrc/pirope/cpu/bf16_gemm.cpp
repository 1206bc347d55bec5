// AVX512-BF16 tile product (see bf16_gemm.h). Compiled for any x86-64 target: the
// kernel carries its own target attribute and runs only after a runtime check.
#include "bf16_gemm.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <utility>

#include <c10/util/Exception.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PIROPE_HAVE_BF16_DOT 1
#include <immintrin.h>
#define PIROPE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
// Fully unrolled register-tile loops, so that the accumulators stay in registers
// (GCC keeps a partly unrolled array of vectors on the stack: 3x slower).
#if defined(__clang__)
#define PIROPE_UNROLL _Pragma("unroll")
#else
#define PIROPE_UNROLL _Pragma("GCC unroll 16")
#endif
#endif

namespace pirope::cpu::bf16 {

bool enabled() {
#ifdef PIROPE_HAVE_BF16_DOT
  // The CPU does not change; the switch is read each call so tests can flip it.
  static const bool cpu = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("PIROPE_CPU_BF16_DOT");
  return cpu && !(env && std::strcmp(env, "0") == 0);
#else
  return false;
#endif
}

#ifdef PIROPE_HAVE_BF16_DOT
namespace {

// Register tile: MR rows of C by NV vectors of 16 columns (MR * NV accumulators,
// NV loads of B and MR broadcasts of A per row pair of B; 6 x 4 uses 29 of the 32
// zmm registers). The last vector's columns are masked by `last`.
constexpr int kMR = 6, kNV = 4, kNR = 16 * kNV;

template <int MR, int NV>
PIROPE_BF16_TARGET void tile(int64_t k, float alpha, const c10::BFloat16* a, int64_t lda,
                             const c10::BFloat16* b, int64_t ldp, bool accumulate,
                             float* c, int64_t ldc, __mmask16 last) {
  __m512 acc[MR][NV];
  PIROPE_UNROLL for (int i = 0; i < MR; ++i)
    PIROPE_UNROLL for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 2) {
    const c10::BFloat16* brow = b + kk * ldp;  // row pair kk / 2: 2 * ldp elements
    __m512i bv[NV];
    PIROPE_UNROLL for (int j = 0; j < NV; ++j)
      bv[j] = j + 1 < NV ? _mm512_loadu_si512(brow + 32 * j)
                         : _mm512_maskz_loadu_epi32(last, brow + 32 * j);
    PIROPE_UNROLL for (int i = 0; i < MR; ++i) {
      int32_t pair;  // A[i][kk], A[i][kk + 1], to every lane
      std::memcpy(&pair, a + i * lda + kk, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      PIROPE_UNROLL for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, (__m512bh)bv[j]);
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

using TileFn = void (*)(int64_t, float, const c10::BFloat16*, int64_t, const c10::BFloat16*,
                        int64_t, bool, float*, int64_t, __mmask16);

// kTiles[mr - 1][nv - 1] = tile<mr, nv>.
template <int... MR>
struct TileTable {
  template <int M, int... NV>
  static constexpr std::array<TileFn, kNV> row(std::integer_sequence<int, NV...>) {
    return {&tile<M, NV + 1>...};
  }
  static constexpr std::array<std::array<TileFn, kNV>, sizeof...(MR)> make() {
    return {row<MR + 1>(std::make_integer_sequence<int, kNV>{})...};
  }
};
template <int... MR>
constexpr auto make_tiles(std::integer_sequence<int, MR...>) {
  return TileTable<MR...>::make();
}
constexpr auto kTiles = make_tiles(std::make_integer_sequence<int, kMR>{});

PIROPE_BF16_TARGET void round_row_avx512(const float* src, int64_t n,
                                         c10::BFloat16* dst) {
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

PIROPE_BF16_TARGET void interleave_rows_avx512(const float* r0, const float* r1, int64_t n,
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
#ifdef PIROPE_HAVE_BF16_DOT
  round_row_avx512(src, n, dst);
#else
  TORCH_CHECK(false, "bf16::round_row: this build has no AVX512-BF16 kernel");
#endif
}

void interleave_rows(const float* r0, const float* r1, int64_t n, c10::BFloat16* dst) {
#ifdef PIROPE_HAVE_BF16_DOT
  interleave_rows_avx512(r0, r1, n, dst);
#else
  TORCH_CHECK(false, "bf16::interleave_rows: this build has no AVX512-BF16 kernel");
#endif
}

void gemm(int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
          int64_t lda, const c10::BFloat16* b, int64_t ldp, bool accumulate, float* c,
          int64_t ldc) {
#ifdef PIROPE_HAVE_BF16_DOT
  TORCH_INTERNAL_ASSERT(k % 2 == 0 && lda % 2 == 0 && n <= ldp, "bf16::gemm: bad operands");
  // Column panels of B (k x 64: 32 KB for k = 256) stay in L1 while the row
  // tiles of A stream past them.
  for (int64_t j0 = 0; j0 < n; j0 += kNR) {
    const int64_t w = std::min<int64_t>(kNR, n - j0);
    const int nv = int((w + 15) / 16);
    const int tail = int(w - 16 * (nv - 1));
    const __mmask16 last = __mmask16((1u << tail) - 1u);
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const int mr = int(std::min<int64_t>(kMR, m - i0));
      kTiles[mr - 1][nv - 1](k, alpha, a + i0 * lda, lda, b + 2 * j0, ldp, accumulate,
                             c + i0 * ldc + j0, ldc, last);
    }
  }
#else
  TORCH_CHECK(false, "bf16::gemm: this build has no AVX512-BF16 kernel");
#endif
}

}  // namespace pirope::cpu::bf16
