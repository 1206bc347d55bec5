// Autograd of the rotary ops, for every caller (Python, torch.compile, LibTorch). A
// rotation is linear and orthogonal: the gradient of apply_rope is apply_rope_backward
// (rotation by the negative angle) and vice versa, each called through the dispatcher,
// so gradients of gradients work too. cos, sin and position_ids get no gradient.
// (Under torch.func, python/pirope/_autograd takes over with the same backward ops.)
#include <torch/autograd.h>
#include <torch/library.h>

#include "../ops.h"
#include "defined.h"

namespace pirope {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> positions(const at::Tensor& saved) {
  return saved.defined() ? std::optional<at::Tensor>(saved) : std::nullopt;
}

// The rotated tensors: x alone, or q and k (one launch; the ops' kernels below
// autograd). Inverse: rotate by the negative angle.
variable_list rotate(bool inverse, const variable_list& x, const at::Tensor& cos,
                     const at::Tensor& sin, const std::optional<at::Tensor>& pos,
                     bool interleaved) {
  if (x.size() == 1)
    return {inverse ? apply_rope_backward(x[0], cos, sin, pos, interleaved)
                    : apply_rope(x[0], cos, sin, pos, interleaved)};
  auto [q, k] = inverse ? apply_rope_qk_backward(x[0], x[1], cos, sin, pos, interleaved)
                        : apply_rope_qk(x[0], x[1], cos, sin, pos, interleaved);
  return {q, k};
}

void save(AutogradContext* ctx, const at::Tensor& cos, const at::Tensor& sin,
          const std::optional<at::Tensor>& pos, bool interleaved) {
  ctx->save_for_backward({cos, sin, pos.value_or(at::Tensor())});
  ctx->saved_data["interleaved"] = interleaved;
}

// The gradients of the rotated tensors (the inverse rotation of the incoming ones),
// then none for cos, sin, position_ids and interleaved.
variable_list rotate_back(bool inverse, AutogradContext* ctx, variable_list grads) {
  const auto saved = ctx->get_saved_variables();
  auto out = rotate(!inverse, grads, saved[0], saved[1], positions(saved[2]),
                    ctx->saved_data["interleaved"].toBool());
  out.resize(out.size() + 4);
  return out;
}

template <bool Inverse>
struct Rotate : torch::autograd::Function<Rotate<Inverse>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin, const std::optional<at::Tensor>& pos,
                            bool interleaved) {
    save(ctx, cos, sin, pos, interleaved);
    at::AutoDispatchBelowADInplaceOrView below;
    return rotate(Inverse, {x}, cos, sin, pos, interleaved)[0];
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return rotate_back(Inverse, ctx, std::move(grads));
  }
};

template <bool Inverse>
struct RotateQK : torch::autograd::Function<RotateQK<Inverse>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& cos, const at::Tensor& sin,
                               const std::optional<at::Tensor>& pos, bool interleaved) {
    save(ctx, cos, sin, pos, interleaved);
    at::AutoDispatchBelowADInplaceOrView below;
    return rotate(Inverse, {q, k}, cos, sin, pos, interleaved);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return rotate_back(Inverse, ctx, std::move(grads));
  }
};

template <bool Inverse>
at::Tensor rotate_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           const std::optional<at::Tensor>& pos, bool interleaved) {
  check_defined(Inverse ? "apply_rope_backward" : "apply_rope",
                {{Inverse ? "grad" : "x", x}, {"cos", cos}, {"sin", sin}});
  return Rotate<Inverse>::apply(x, cos, sin, pos, interleaved);
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> rotate_qk_autograd(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& cos, const at::Tensor& sin,
                                                      const std::optional<at::Tensor>& pos,
                                                      bool interleaved) {
  check_defined(Inverse ? "apply_rope_qk_backward" : "apply_rope_qk",
                {{Inverse ? "grad_q" : "q", q}, {Inverse ? "grad_k" : "k", k}, {"cos", cos}, {"sin", sin}});
  auto out = RotateQK<Inverse>::apply(q, k, cos, sin, pos, interleaved);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace pirope

TORCH_LIBRARY_IMPL(pirope, Autograd, m) {
  m.impl("apply_rope", &pirope::rotate_autograd<false>);
  m.impl("apply_rope_backward", &pirope::rotate_autograd<true>);
  m.impl("apply_rope_qk", &pirope::rotate_qk_autograd<false>);
  m.impl("apply_rope_qk_backward", &pirope::rotate_qk_autograd<true>);
}
