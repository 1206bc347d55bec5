// Tile products for the CPU attention kernels on AVX512 CPUs, with float32 results
// (and a portable version of them, portable() below):
//   float  operands: fused multiply-adds (vfmadd231ps);
//   bfloat16 operands: vdpbf16ps (AVX512-BF16), where each float32 lane adds the
//     products of one *pair* of bfloat16s, exactly, to its float32 sum.
// Why pirope carries them: the BLAS that torch links (MKL) runs AVX2 code on AMD
// CPUs (100 GFLOP/s on a Zen 5 core, where these reach 250 in float32 and 450 in
// bfloat16), and libtorch exports no bfloat16 GEMM with a float32 result (cpublas
// brgemm falls back to sgemm speed without AMX; the oneDNN symbols are hidden).
//
// Operands: A (m x k) row-major; B (k x n) "packed": element (kk, j) at
//   ((kk / P) * ldp + j) * P + kk % P,   P = kPair<T> (1 for float, 2 for bfloat16)
// i.e. row-major for float, and for bfloat16 the two rows of each row pair
// interleaved, the order vdpbf16ps reads. k is a multiple of P: an odd bfloat16
// operand is padded with a zero row of B (and a zero column of A).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>

namespace pirope::cpu::avx512 {

template <typename T>
constexpr int64_t kPair = std::is_same_v<T, c10::BFloat16> ? 2 : 1;

// Whether the attention kernels take these products (and their packed operands) for
// T now: the CPU (and OS) support AVX512F/BW/VL, plus AVX512-BF16 for bfloat16, and
// the environment variable PIROPE_CPU_GEMM does not rule it out: "blas" makes the
// attention kernels use torch's BLAS for every dtype, "avx512" float32 operands for
// bfloat16 too (to compare paths; read at each call; other values than these, "auto"
// and "portable" raise). T: float or c10::BFloat16.
template <typename T>
bool enabled();

// PIROPE_CPU_GEMM=portable: enabled<T>() on any CPU, with every function below in
// plain C++ instead of AVX512 (several times slower): the packed operands, task splits
// and bfloat16 rounding of the AVX512 paths, testable on CPUs without AVX512. Which
// version the functions below run is fixed by the last call of enabled<T>() (they read
// no environment themselves); portable() reads the variable now.
bool portable();

// C (m x n, float32, row stride ldc) = alpha * A B, plus C when accumulate.
// A: row stride lda (a multiple of P); B packed, ldp >= n; k a multiple of P.
// Only callable when enabled<T>().
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda, const T* b,
          int64_t ldp, bool accumulate, float* c, int64_t ldc);

template <typename T>
int64_t packed_index(int64_t kk, int64_t j, int64_t ldp) {
  constexpr int64_t P = kPair<T>;
  return ((kk / P) * ldp + j) * P + kk % P;
}

template <typename T>
int64_t round_up_pair(int64_t x) {
  return (x + kPair<T> - 1) / kPair<T> * kPair<T>;
}

// Leading dimension (in elements of `bytes` bytes) for n columns: even, plus one
// cache line, so that rows a power of two apart do not all fall into one L1 set
// (long operands would otherwise evict themselves from the cache during a product).
inline int64_t padded_ld(int64_t n, int64_t bytes) { return n + (n & 1) + 64 / bytes; }

// f(i, j) for every i < nr, j < nc, in 32 x 32 blocks: the order for copies that
// transpose (a plain row-by-row loop touches a new cache line on every write).
template <typename F>
void for_each_blocked(int64_t nr, int64_t nc, F f) {
  constexpr int64_t kB = 32;
  for (int64_t i0 = 0; i0 < nr; i0 += kB)
    for (int64_t j0 = 0; j0 < nc; j0 += kB)
      for (int64_t i = i0; i < std::min(nr, i0 + kB); ++i)
        for (int64_t j = j0; j < std::min(nc, j0 + kB); ++j) f(i, j);
}

// ---- Operands prepared once per head (O(seqlen x head_dim), scalar loops). ----

// Rows [r0, r0 + n) of a matrix (rows x d, row stride ld) as rows kk of a packed B
// operand (k = rows, the reduction index; ldp = d). When r0 + n is not a multiple
// of P, the zero partner row is written too.
template <typename T, typename S>
void pack_rows_as_k(const S* src, int64_t ld, int64_t r0, int64_t n, int64_t d, T* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) dst[packed_index<T>(r0 + i, j, d)] = T(float(src[i * ld + j]));
  for (int64_t i = r0 + n; i < round_up_pair<T>(r0 + n); ++i)
    for (int64_t j = 0; j < d; ++j) dst[packed_index<T>(i, j, d)] = T(0.f);
}

// Rows [r0, r0 + n) of a matrix (rows x d, row stride ld) as columns j of a packed B
// operand (k = d, the reduction index: B is the matrix transposed); ldp >= rows.
template <typename T, typename S>
void pack_rows_as_n(const S* src, int64_t ld, int64_t r0, int64_t n, int64_t d, T* dst,
                    int64_t ldp) {
  for_each_blocked(n, d, [&](int64_t i, int64_t j) {
    dst[packed_index<T>(j, r0 + i, ldp)] = T(float(src[i * ld + j]));
  });
  for (int64_t j = d; j < round_up_pair<T>(d); ++j)
    for (int64_t i = 0; i < n; ++i) dst[packed_index<T>(j, r0 + i, ldp)] = T(0.f);
}

// dst (nc x nr, row stride ldd) = src (nr x nc, row stride ld) transposed: an A operand.
template <typename T, typename S>
void transpose_rows(const S* src, int64_t ld, int64_t nr, int64_t nc, T* dst, int64_t ldd) {
  for_each_blocked(nr, nc,
                   [&](int64_t i, int64_t j) { dst[j * ldd + i] = T(float(src[i * ld + j])); });
}

// ---- Tiles (float32 scores, probabilities, dS) as operands, per product. ----

// Vectorised bfloat16 rounding (only callable when enabled<c10::BFloat16>()):
// dst[0, n) = src rounded, plus a zero at dst[n] when n is odd.
void round_row(const float* src, int64_t n, c10::BFloat16* dst);
// dst[2 j] = r0[j], dst[2 j + 1] = r1[j] (0 when r1 is null), j < n.
void interleave_rows(const float* r0, const float* r1, int64_t n, c10::BFloat16* dst);

// dst (row stride ldd) = float rows src (nr x nc, row stride ld) in T, for an A
// operand with k = nc (an odd bfloat16 row gets its zero column).
template <typename T>
void rows_as_a(const float* src, int64_t ld, int64_t nr, int64_t nc, T* dst, int64_t ldd) {
  for (int64_t i = 0; i < nr; ++i) {
    if constexpr (std::is_same_v<T, float>)
      std::copy(src + i * ld, src + i * ld + nc, dst + i * ldd);
    else
      round_row(src + i * ld, nc, dst + i * ldd);
  }
}

// A tile (nr x nc, row stride ld) as an A operand with k = nc: the tile itself for
// float; for bfloat16 its rows rounded into scratch (row stride ld_scratch).
template <typename T>
const T* tile_as_a(const float* t, int64_t ld, int64_t nr, int64_t nc, T* scratch,
                   int64_t ld_scratch, int64_t& lda) {
  if constexpr (std::is_same_v<T, float>) {
    lda = ld;
    return t;
  } else {
    rows_as_a(t, ld, nr, nc, scratch, ld_scratch);
    lda = ld_scratch;
    return scratch;
  }
}

// A tile (nr x nc, row stride ld) as a packed B operand with k = nr: the tile itself
// for float; for bfloat16 its row pairs interleaved into scratch (ld_scratch pairs).
template <typename T>
const T* tile_as_b(const float* t, int64_t ld, int64_t nr, int64_t nc, T* scratch,
                   int64_t ld_scratch, int64_t& ldp) {
  if constexpr (std::is_same_v<T, float>) {
    ldp = ld;
    return t;
  } else {
    for (int64_t i = 0; i < nr; i += 2)
      interleave_rows(t + i * ld, i + 1 < nr ? t + (i + 1) * ld : nullptr, nc,
                      scratch + i * ld_scratch);
    ldp = ld_scratch;
    return scratch;
  }
}

}  // namespace pirope::cpu::avx512
