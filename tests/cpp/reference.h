// Float64 references for the Catch2 tests, in plain ATen ops (differentiable, so the
// autograd tests take their gradients from them too).
#pragma once

#include <utility>

#include <ATen/ATen.h>

namespace pirope_test {

// cos/sin tables of Position Interpolation by `factor`, float32 like pirope's.
inline std::pair<at::Tensor, at::Tensor> pi_tables(int64_t rotary_dim, int64_t n, double factor) {
  auto inv = 1.0 / at::pow(10000.0, at::arange(0, rotary_dim, 2, at::kDouble) / rotary_dim);
  auto ang = at::arange(n, at::kDouble).unsqueeze(1) * (inv / factor).unsqueeze(0);
  return {ang.cos().to(at::kFloat), ang.sin().to(at::kFloat)};
}

// Reference: x (B, S, H, D) rotated with tables indexed by pos (B, S).
inline at::Tensor reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& pos, bool interleaved, bool conjugate = false) {
  const int64_t r = 2 * cos.size(1);
  auto xd = x.to(at::kDouble);
  auto c = cos.to(at::kDouble).index_select(0, pos.flatten()).view({pos.size(0), pos.size(1), 1, -1});
  auto s = sin.to(at::kDouble).index_select(0, pos.flatten()).view({pos.size(0), pos.size(1), 1, -1});
  if (conjugate) s = -s;
  auto rot = xd.narrow(-1, 0, r);
  at::Tensor x1, x2;
  if (interleaved) {
    x1 = rot.slice(-1, 0, r, 2);
    x2 = rot.slice(-1, 1, r, 2);
  } else {
    x1 = rot.narrow(-1, 0, r / 2);
    x2 = rot.narrow(-1, r / 2, r / 2);
  }
  auto o1 = x1 * c - x2 * s;
  auto o2 = x2 * c + x1 * s;
  auto out = interleaved ? at::stack({o1, o2}, -1).flatten(-2) : at::cat({o1, o2}, -1);
  return at::cat({out, xd.narrow(-1, r, x.size(-1) - r)}, -1);
}

inline bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  return (a.to(at::kDouble) - b).abs().max().item<double>() <= tol;
}

}  // namespace pirope_test
