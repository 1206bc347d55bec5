// Vectorised loads and stores in the math type of a storage type: float32 math for
// float32/float16/bfloat16 data, float64 for float64. Shared by the CPU kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace pirope::cpu {

// Loads and stores two math-type vectors (2 * kWidth elements) at a time: for
// float16/bfloat16 that is exactly one full Vectorized<scalar_t>, so conversions
// run on whole registers and stores never take the slow partial-store path.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int kWidth = Vec::size();
  static constexpr int kChunk = 2 * kWidth;  // elements per load2/store2

  static std::pair<Vec, Vec> load2(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return {Vec::loadu(p), Vec::loadu(p + kWidth)};
    } else {
      auto [a, b] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
      return {a, b};
    }
  }
  static void store2(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a.store(p);
      b.store(p + kWidth);
    } else {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    }
  }
};

// Widens n values of a float32/float64 table row into the math type acc_t, negated
// when `negate` (the backward uses sin(-a) = -sin(a)).
template <typename acc_t, typename table_t>
void load_row(acc_t* dst, const table_t* src, int64_t n, bool negate) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(src[i]);
    dst[i] = negate ? -v : v;
  }
}

}  // namespace pirope::cpu
