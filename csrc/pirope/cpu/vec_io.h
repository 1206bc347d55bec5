// Vectorised loads and stores in the math type of a storage type: float32 math for
// float32/float16/bfloat16 data, float64 for float64. Shared by the CPU kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace pirope::cpu {

template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int kWidth = Vec::size();

  // kWidth elements at p, widened to the math type.
  static Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float<scalar_t>(p, v);
      return v;
    }
  }
  // kWidth elements to p, rounded once to the storage type.
  static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, kWidth);
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
