// Autograd of the fused attention, for every caller (Python, torch.compile, LibTorch):
// the backward is its own op, which recomputes the probabilities from the saved
// log-sum-exp. q, k and v get gradients, and attention sinks theirs (below); the tables
// and positions do not, and lse (an auxiliary output) is not differentiable.
// Gradients of the backward (the sinks' included) are not implemented, and say so instead
// of being taken as zero.
// (Under torch.func, python/pirope/_autograd takes over with the same backward op.)
#include <ATen/TensorOperators.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../ops.h"
#include "defined.h"

namespace pirope {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradient of attention sinks. A sink joins each row's softmax as a key of logit s_h
// and no value: p_sink = exp(s_h - lse) (lse includes it), and out = sum_j p_j v_j with
// d p_j / d s_h = -p_j p_sink, so dL/ds_h = -sum over the head's rows of p_sink *
// rowsum(grad_out * out) (the D of the backward). lse: (batch, heads_q, seqlen), or
// (heads_q, total) when packed; out, grad_out: (batch, seqlen, heads_q, headdim) or
// (total, heads_q, headdim).
at::Tensor sinks_grad(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                      const at::Tensor& sinks, bool packed) {
  const auto math = lse.scalar_type();
  const at::Tensor d = (grad_out.to(math) * out.to(math)).sum(-1);  // (b, s, h) or (t, h)
  if (packed)
    return -((sinks.to(math).unsqueeze(1) - lse).exp() * d.t()).sum(1).to(sinks.scalar_type());
  return -((sinks.to(math).view({1, -1, 1}) - lse).exp() * d.permute({0, 2, 1}))
              .sum(at::IntArrayRef{0, 2})
              .to(sinks.scalar_type());
}

[[noreturn]] void no_double_backward() {
  TORCH_CHECK_NOT_IMPLEMENTED(
      false, "rope_attention: double backward (gradients of gradients) is not supported");
  std::abort();  // not reached: the check above always throws
}

// sinks_grad as a node of its own: built from differentiable ops, it would let a second
// backward through (with lse, which depends on q, k and the sinks, as a constant: wrong)
struct SinksGrad : torch::autograd::Function<SinksGrad> {
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& out,
                               const at::Tensor& lse, const at::Tensor& sinks, bool packed) {
    return {sinks_grad(grad_out, out, lse, sinks, packed)};
  }

  static variable_list backward(AutogradContext*, variable_list) { no_double_backward(); }
};

struct Attention : torch::autograd::Function<Attention> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                               const std::optional<at::Tensor>& pos, bool causal,
                               double softmax_scale, bool interleaved, bool deterministic,
                               const std::optional<at::Tensor>& cu_seqlens, int64_t window_left,
                               int64_t window_right, double softcap,
                               const std::optional<at::Tensor>& sinks) {
    at::Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, lse) = rope_attention(q, k, v, cos, sin, pos, causal, softmax_scale,
                                          interleaved, deterministic, cu_seqlens, window_left,
                                          window_right, softcap, sinks);
    }
    ctx->save_for_backward({q, k, v, out, lse, cos, sin, pos.value_or(at::Tensor()),
                            cu_seqlens.value_or(at::Tensor()), sinks.value_or(at::Tensor())});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["softmax_scale"] = softmax_scale;
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["deterministic"] = deterministic;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["softcap"] = softcap;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    auto optional = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    auto [dq, dk, dv] = rope_attention_backward(
        grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[6],
        optional(s[7]), d.at("causal").toBool(), d.at("softmax_scale").toDouble(),
        d.at("interleaved").toBool(), d.at("deterministic").toBool(), optional(s[8]),
        d.at("window_left").toInt(), d.at("window_right").toInt(), d.at("softcap").toDouble());
    variable_list out = {dq, dk, dv};
    // none for cos, sin, position_ids, the flags, cu_seqlens, the window and softcap; the
    // sinks' own, last
    out.resize(15);
    if (s[9].defined()) out[14] = SinksGrad::apply(grads[0], s[3], s[4], s[9], s[8].defined())[0];
    return out;
  }
};

struct AttentionBackward : torch::autograd::Function<AttentionBackward> {
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse, const at::Tensor& cos, const at::Tensor& sin,
                               const std::optional<at::Tensor>& pos, bool causal,
                               double softmax_scale, bool interleaved, bool deterministic,
                               const std::optional<at::Tensor>& cu_seqlens, int64_t window_left,
                               int64_t window_right, double softcap) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [dq, dk, dv] = rope_attention_backward(grad_out, q, k, v, out, lse, cos, sin, pos, causal,
                                                softmax_scale, interleaved, deterministic,
                                                cu_seqlens, window_left, window_right, softcap);
    return {dq, dk, dv};
  }

  static variable_list backward(AutogradContext*, variable_list) { no_double_backward(); }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& pos, bool causal,
    double softmax_scale, bool interleaved, bool deterministic,
    const std::optional<at::Tensor>& cu_seqlens, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& sinks) {
  check_defined("rope_attention", {{"q", q}, {"k", k}, {"v", v}, {"cos", cos}, {"sin", sin}});
  auto out = Attention::apply(q, k, v, cos, sin, pos, causal, softmax_scale, interleaved,
                              deterministic, cu_seqlens, window_left, window_right, softcap, sinks);
  // lse leaves detached, so no gradient reaches it (its grads[1] in backward is always
  // zero): the effect of mark_non_differentiable, which compiled autograd does not accept
  // in a C++ Function
  return {out[0], out[1].detach()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& pos, bool causal, double softmax_scale, bool interleaved,
    bool deterministic, const std::optional<at::Tensor>& cu_seqlens, int64_t window_left,
    int64_t window_right, double softcap) {
  check_defined("rope_attention_backward", {{"grad_out", grad_out}, {"q", q}, {"k", k}, {"v", v},
                                            {"out", out}, {"lse", lse}, {"cos", cos}, {"sin", sin}});
  auto grads = AttentionBackward::apply(grad_out, q, k, v, out, lse, cos, sin, pos, causal,
                                        softmax_scale, interleaved, deterministic, cu_seqlens,
                                        window_left, window_right, softcap);
  return {grads[0], grads[1], grads[2]};
}

}  // namespace
}  // namespace pirope

TORCH_LIBRARY_IMPL(pirope, Autograd, m) {
  m.impl("rope_attention", &pirope::attention_autograd);
  m.impl("rope_attention_backward", &pirope::attention_backward_autograd);
}
