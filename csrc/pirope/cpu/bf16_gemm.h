// Tile products with bfloat16 operands and float32 results on CPUs with AVX512-BF16
// (vdpbf16ps: each float32 lane accumulates the products of one *pair* of bfloat16s,
// exactly, into float32). libtorch exports no bfloat16 GEMM with a float32 result
// that runs at the speed of these instructions (its cpublas brgemm falls back to
// an sgemm-speed path without AMX), so pirope carries this one small kernel.
//
// Used by the CPU rope_attention kernels for bfloat16 inputs, in the same rounding
// as flash attention: q and k rounded to bfloat16 after the rotation (what
// apply_rope_qk + SDPA rounds too), probabilities rounded to bfloat16 before they
// multiply v, float32 accumulation.
#pragma once

#include <algorithm>
#include <cstdint>

#include <c10/util/BFloat16.h>

namespace pirope::cpu::bf16 {

// True when the CPU (and OS) support AVX512-BF16 and the environment variable
// PIROPE_CPU_BF16_DOT is not "0" (set it to 0 for the float32 sgemm path).
bool enabled();

// The "B" operand of C = A B, (k x n), packed the way vdpbf16ps reads it: element
// (kk, j) at ((kk / 2) * ldp + j) * 2 + kk % 2, i.e. the two rows of each row pair
// interleaved. ldp >= n counts pairs of a row pair. k is even: an odd operand is
// padded with a zero row (and A with a zero column).
inline int64_t packed_index(int64_t kk, int64_t j, int64_t ldp) {
  return ((kk >> 1) * ldp + j) * 2 + (kk & 1);
}

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

// Rows [r0, r0 + n) of a matrix (rows x d, row stride ld) as rows kk of a packed B
// operand (k = rows, the reduction index; ldp = d). When r0 + n is odd, the zero
// partner row r0 + n is written too, so the buffer holds round_up(r0 + n, 2) rows.
template <typename S>
void pack_rows_as_k(const S* src, int64_t ld, int64_t r0, int64_t n, int64_t d,
                    c10::BFloat16* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j)
      dst[packed_index(r0 + i, j, d)] = c10::BFloat16(float(src[i * ld + j]));
  if ((r0 + n) % 2)
    for (int64_t j = 0; j < d; ++j) dst[packed_index(r0 + n, j, d)] = c10::BFloat16(0.f);
}

// Rows [r0, r0 + n) of a matrix (rows x d, row stride ld) as columns j of a packed B
// operand (k = d, the reduction index; B = the matrix transposed). ldp >= rows; an
// odd d gets a zero partner row.
template <typename S>
void pack_rows_as_n(const S* src, int64_t ld, int64_t r0, int64_t n, int64_t d,
                    c10::BFloat16* dst, int64_t ldp) {
  for_each_blocked(n, d, [&](int64_t i, int64_t j) {
    dst[packed_index(j, r0 + i, ldp)] = c10::BFloat16(float(src[i * ld + j]));
  });
  if (d % 2)
    for (int64_t i = 0; i < n; ++i) dst[packed_index(d, r0 + i, ldp)] = c10::BFloat16(0.f);
}

// dst (nc x nr, row stride ldd) = src (nr x nc, row stride ld) transposed and rounded.
// For operands transposed once per head (O(seqlen x head_dim)), not per tile.
template <typename S>
void transpose_rows(const S* src, int64_t ld, int64_t nr, int64_t nc, c10::BFloat16* dst,
                    int64_t ldd) {
  for_each_blocked(nr, nc, [&](int64_t i, int64_t j) {
    dst[j * ldd + i] = c10::BFloat16(float(src[i * ld + j]));
  });
}

// Per-tile conversions (vectorised; only callable when enabled()):
// dst[0, n) = src rounded, plus a zero at dst[n] when n is odd (an A operand row).
void round_row(const float* src, int64_t n, c10::BFloat16* dst);
// dst[2 j] = r0[j], dst[2 j + 1] = r1[j] (0 when r1 is null), j < n: rows r0, r1 as one
// row pair of a packed B operand.
void interleave_rows(const float* r0, const float* r1, int64_t n, c10::BFloat16* dst);

inline int64_t round_up2(int64_t x) { return x + (x & 1); }

// Leading dimension (in elements of `bytes` bytes) for n columns: even, plus one
// cache line, so that rows a power of two apart do not all fall into one L1 set
// (long operands would otherwise evict themselves from the cache during a product).
inline int64_t padded_ld(int64_t n, int64_t bytes) { return round_up2(n) + 64 / bytes; }

// C (m x n, float32, row stride ldc) = alpha * A B, plus C when accumulate.
// A: (m x k) bfloat16, row-major, row stride lda (even); B packed as above; k even.
// Only callable when enabled().
void gemm(int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
          int64_t lda, const c10::BFloat16* b, int64_t ldp, bool accumulate, float* c,
          int64_t ldc);

}  // namespace pirope::cpu::bf16
