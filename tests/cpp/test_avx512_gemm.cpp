// The CPU attention's AVX512 tile products (csrc/pirope/cpu/avx512_gemm.h) against a
// float64 product of the same operands, over the edge cases the attention shapes only
// partly reach: rows not a multiple of the 6-row tile, columns not a multiple of 16,
// ldp > n, accumulate and alpha. Skips (with a message) on CPUs without AVX512; their
// portable version (PIROPE_CPU_GEMM=portable) runs everywhere.
#include "catch.h"

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "pirope/cpu/avx512_gemm.h"

namespace avx = pirope::cpu::avx512;

namespace {

// Largest |C - reference| / (1 + |reference|) over one product of random operands.
template <typename T>
double product_error(int64_t m, int64_t n, int64_t k, bool accumulate, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  const int64_t kp = avx::round_up_pair<T>(k), lda = kp + 2 * avx::kPair<T>, ldp = n + 3;
  const int64_t ldc = n + 5;
  std::vector<T> a(m * lda, T(0.f)), b(kp / avx::kPair<T> * ldp * avx::kPair<T>, T(0.f));
  std::vector<float> bf(k * n), c(m * ldc);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) a[i * lda + j] = T(normal(rng));
  for (int64_t j = 0; j < n; ++j)  // b as rows j of a (n x k) matrix: k^T packed
    for (int64_t kk = 0; kk < k; ++kk) bf[kk * n + j] = normal(rng);
  avx::pack_rows_as_k(bf.data(), n, 0, k, n, b.data());  // rows kk of B, ldp = n ...
  std::vector<T> bp(b.size(), T(0.f));                   // ... re-laid with ldp > n
  for (int64_t kk = 0; kk < kp; ++kk)
    for (int64_t j = 0; j < n; ++j)
      bp[avx::packed_index<T>(kk, j, ldp)] = b[avx::packed_index<T>(kk, j, n)];
  for (auto& x : c) x = normal(rng);
  const std::vector<float> c0 = c;
  const float alpha = 0.7f;
  avx::gemm<T>(m, n, kp, alpha, a.data(), lda, bp.data(), ldp, accumulate, c.data(), ldc);
  double worst = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double ref = accumulate ? c0[i * ldc + j] : 0.0;
      for (int64_t kk = 0; kk < k; ++kk)
        ref += double(alpha) * double(float(a[i * lda + kk])) * double(float(T(bf[kk * n + j])));
      worst = std::max(worst, std::abs(c[i * ldc + j] - ref) / (1 + std::abs(ref)));
    }
    for (int64_t j = n; j < ldc; ++j)  // columns past n are never written
      if (c[i * ldc + j] != c0[i * ldc + j]) return INFINITY;
  }
  return worst;
}

template <typename T>
void check_all_shapes() {
  if (!avx::enabled<T>()) {
    WARN("this CPU lacks the instructions; skipped");
    return;
  }
  std::mt19937 rng(0);
  for (int64_t m : {1, 5, 6, 7, 13, 64})
    for (int64_t n : {1, 15, 16, 17, 63, 64, 65, 130})
      for (int64_t k : {1, 2, 3, 64, 127, 128})
        for (bool acc : {false, true}) {
          INFO("m " << m << " n " << n << " k " << k << " accumulate " << acc);
          // float32 sums of exact products (bfloat16 pairs are exact in float32)
          REQUIRE(product_error<T>(m, n, k, acc, rng) < 1e-5 * std::sqrt(double(k) + 1));
        }
}

}  // namespace

TEST_CASE("avx512 float32 tile products equal a float64 product", "[avx512_gemm]") {
  check_all_shapes<float>();
}

TEST_CASE("avx512 bfloat16 tile products equal a float64 product", "[avx512_gemm]") {
  check_all_shapes<c10::BFloat16>();
}

namespace {
// PIROPE_CPU_GEMM=portable for one scope, the previous value restored after (each
// time read by enabled(), which decides the version the products run, as an op does).
class PortableProducts {
 public:
  PortableProducts() {
    const char* old = std::getenv("PIROPE_CPU_GEMM");
    if (old) old_ = old;
    had_ = old != nullptr;
    setenv("PIROPE_CPU_GEMM", "portable", 1);
    avx::enabled<float>();
  }
  ~PortableProducts() {
    if (had_)
      setenv("PIROPE_CPU_GEMM", old_.c_str(), 1);
    else
      unsetenv("PIROPE_CPU_GEMM");
    avx::enabled<float>();
  }

 private:
  std::string old_;
  bool had_ = false;
};
}  // namespace

TEST_CASE("portable tile products equal a float64 product, on any CPU", "[avx512_gemm]") {
  PortableProducts portable;
  REQUIRE(avx::portable());
  REQUIRE(avx::enabled<float>());
  REQUIRE(avx::enabled<c10::BFloat16>());
  check_all_shapes<float>();
  check_all_shapes<c10::BFloat16>();
}

TEST_CASE("bfloat16 rounding and row interleaving, AVX512 and portable alike", "[avx512_gemm]") {
  // 1 + 2^-8 is halfway between two bfloat16s: to even (1); 1 + 3 * 2^-8 up to 1 + 2^-6
  const std::vector<float> r0 = {1.f + 1.f / 256, 1.f + 3.f / 256, -2.5f, 3.f, 7.f};
  const std::vector<float> r1 = {4.f, 5.f, 6.f, 7.f, 8.f};
  const float rounded[] = {1.f, 1.f + 1.f / 64, -2.5f, 3.f, 7.f};
  auto check = [&] {
    std::vector<c10::BFloat16> row(6, c10::BFloat16(9.f)), pairs(10, c10::BFloat16(9.f));
    avx::round_row(r0.data(), 5, row.data());
    for (int j = 0; j < 5; ++j) REQUIRE(float(row[j]) == rounded[j]);
    REQUIRE(float(row[5]) == 0.f);  // odd n: the zero partner
    avx::interleave_rows(r0.data(), r1.data(), 5, pairs.data());
    for (int j = 0; j < 5; ++j) {
      REQUIRE(float(pairs[2 * j]) == rounded[j]);
      REQUIRE(float(pairs[2 * j + 1]) == r1[j]);
    }
    avx::interleave_rows(r0.data(), nullptr, 5, pairs.data());
    for (int j = 0; j < 5; ++j) REQUIRE(float(pairs[2 * j + 1]) == 0.f);
  };
  if (avx::enabled<c10::BFloat16>()) check();
  PortableProducts portable;
  check();
}

TEST_CASE("packed layout: bfloat16 row pairs interleave, odd k gets a zero row", "[avx512_gemm]") {
  // B (3 x 2) = [[1, 2], [3, 4], [5, 6]] as rows of a matrix: k = 3 rows, n = 2 columns.
  const float rows[] = {1, 2, 3, 4, 5, 6};
  std::vector<c10::BFloat16> b(4 * 2, c10::BFloat16(9.f));
  avx::pack_rows_as_k(rows, 2, 0, 3, 2, b.data());
  const float want[] = {1, 3, 2, 4, 5, 0, 6, 0};  // pairs (1,3) (2,4), then (5,0) (6,0)
  for (int i = 0; i < 8; ++i) REQUIRE(float(b[i]) == want[i]);
  std::vector<float> f(3 * 2, 9.f);  // float: plain row-major, nothing to pad
  avx::pack_rows_as_k(rows, 2, 0, 3, 2, f.data());
  for (int i = 0; i < 6; ++i) REQUIRE(f[i] == rows[i]);
}
