// Autograd through the C++ API (LibTorch, no Python): gradients of every op against
// the float64 reference's own autograd (plain ATen ops).
#include "catch.h"

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "pirope/ops.h"
#include "reference.h"

using pirope_test::close;
using pirope_test::pi_tables;
using pirope_test::reference;

namespace {

at::Tensor leaf(at::IntArrayRef shape) { return at::randn(shape, at::kDouble).requires_grad_(); }

at::Tensor grad_of(const at::Tensor& loss, const at::Tensor& x, bool create_graph = false) {
  return torch::autograd::grad({loss}, {x}, {}, /*retain_graph=*/true, create_graph)[0];
}

// The message of the c10::Error call() throws, or "no error".
template <typename Call>
std::string error_of(const Call& call) {
  try {
    call();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "no error";
}

// Causal attention in float64 on the reference rotation, k and v repeated over their
// query-head group (GQA), scores materialised; with window_left >= 0, query i sees keys
// i - window_left .. i only.
at::Tensor attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                               double scale, int64_t window_left = -1, double softcap = 0.0) {
  const int64_t group = q.size(2) / k.size(2);
  auto qr = reference(q, cos, sin, pos, false).transpose(1, 2);
  auto kr = reference(k, cos, sin, pos, false).repeat_interleave(group, 2).transpose(1, 2);
  auto vr = v.repeat_interleave(group, 2).transpose(1, 2);
  auto scores = at::matmul(qr, kr.transpose(-2, -1)) * scale;
  if (softcap > 0) scores = softcap * at::tanh(scores / softcap);
  const int64_t s = q.size(1);
  auto hidden = at::ones({s, s}, at::kBool).triu(1);
  if (window_left >= 0) hidden = hidden | at::ones({s, s}, at::kBool).tril(-window_left - 1);
  scores = scores.masked_fill(hidden, -INFINITY);
  return at::matmul(scores.softmax(-1), vr).transpose(1, 2);
}

}  // namespace

TEST_CASE("apply_rope and apply_rope_qk are differentiable twice", "[autograd]") {
  at::manual_seed(3);
  auto [cos, sin] = pi_tables(32, 16, 4.0);
  auto pos = at::randint(0, 16, {2, 9}, at::kLong);
  auto w = at::randn({2, 9, 4, 32}, at::kDouble);
  auto x = leaf({2, 9, 4, 32});
  for (bool interleaved : {false, true}) {
    auto g = grad_of((pirope::apply_rope(x, cos, sin, pos, interleaved) * w).sum(), x);
    auto ref = grad_of((reference(x, cos, sin, pos, interleaved) * w).sum(), x);
    REQUIRE(close(g, ref, 1e-12));
  }
  // q and k in one op (GQA head counts), and a gradient of the gradient
  auto q = leaf({2, 9, 4, 32}), k = leaf({2, 9, 2, 32});
  auto wk = at::randn({2, 9, 2, 32}, at::kDouble);
  auto [oq, ok] = pirope::apply_rope_qk(q, k, cos, sin, pos);
  auto loss = (oq * w).pow(2).sum() + (ok * wk).sum();
  auto ref_loss = (reference(q, cos, sin, pos, false) * w).pow(2).sum() +
                  (reference(k, cos, sin, pos, false) * wk).sum();
  auto gq = grad_of(loss, q, /*create_graph=*/true), ref_gq = grad_of(ref_loss, q, true);
  REQUIRE(close(gq, ref_gq, 1e-12));
  REQUIRE(close(grad_of(loss, k), grad_of(ref_loss, k), 1e-12));
  REQUIRE(close(grad_of(gq.sum(), q), grad_of(ref_gq.sum(), q), 1e-12));
}

TEST_CASE("rope_attention gradients of q k v with the default softmax_scale", "[autograd]") {
  at::manual_seed(4);
  auto [cos, sin] = pi_tables(32, 16, 2.0);
  auto pos = at::arange(11, at::kLong).unsqueeze(0).expand({2, 11});
  auto q = leaf({2, 11, 4, 32}), k = leaf({2, 11, 2, 32}), v = leaf({2, 11, 2, 32});
  auto g = at::randn({2, 11, 4, 32}, at::kDouble);
  auto [out, lse] = pirope::rope_attention(q, k, v, cos, sin);  // scale 32 ** -0.5, causal
  auto ref = attention_reference(q, k, v, cos, sin, pos, 1.0 / std::sqrt(32.0));
  REQUIRE(close(out, ref.detach(), 1e-12));
  REQUIRE_FALSE(lse.requires_grad());
  for (const auto& x : {q, k, v})
    REQUIRE(close(grad_of((out * g).sum(), x), grad_of((ref * g).sum(), x).detach(), 1e-12));
  // the backward is not differentiable again: it says so
  auto gq = grad_of((out * g).sum(), q, /*create_graph=*/true);
  REQUIRE_THROWS_AS(grad_of(gq.sum(), q), c10::NotImplementedError);
}

TEST_CASE("rope_attention on packed sequences: each sequence alone, gradients included", "[autograd]") {
  at::manual_seed(5);
  auto [cos, sin] = pi_tables(32, 16, 2.0);
  // sequences of 4, 0 and 9 tokens back to back; positions restart in each
  auto cu = at::tensor(std::vector<int64_t>{0, 4, 4, 13}, at::kLong);
  auto q = leaf({13, 4, 32}), k = leaf({13, 2, 32}), v = leaf({13, 2, 32});
  auto g = at::randn({13, 4, 32}, at::kDouble);
  auto [out, lse] = pirope::rope_attention(q, k, v, cos, sin, std::nullopt, true, std::nullopt,
                                           false, false, cu);
  REQUIRE(lse.sizes() == at::IntArrayRef{4, 13});
  std::vector<at::Tensor> refs;
  for (auto [from, to] : {std::pair<int64_t, int64_t>{0, 4}, {4, 13}}) {
    auto piece = [&](const at::Tensor& t) { return t.slice(0, from, to).unsqueeze(0); };
    auto pos = at::arange(to - from, at::kLong).unsqueeze(0);
    refs.push_back(attention_reference(piece(q), piece(k), piece(v), cos, sin, pos,
                                       1.0 / std::sqrt(32.0)).squeeze(0));
  }
  auto ref = at::cat(refs);
  REQUIRE(close(out, ref.detach(), 1e-12));
  for (const auto& x : {q, k, v})
    REQUIRE(close(grad_of((out * g).sum(), x), grad_of((ref * g).sum(), x).detach(), 1e-12));
}

TEST_CASE("rope_attention with a sliding window: the keys of the band only", "[autograd]") {
  at::manual_seed(6);
  auto [cos, sin] = pi_tables(32, 300, 2.0);
  auto pos = at::arange(300, at::kLong).unsqueeze(0);
  auto q = leaf({1, 300, 4, 32}), k = leaf({1, 300, 2, 32}), v = leaf({1, 300, 2, 32});
  auto g = at::randn({1, 300, 4, 32}, at::kDouble);
  // window_right is ignored by a causal call (flash-attn's rule)
  auto [out, lse] = pirope::rope_attention(q, k, v, cos, sin, std::nullopt, true, std::nullopt,
                                           false, false, std::nullopt, 70, 5);
  auto ref = attention_reference(q, k, v, cos, sin, pos, 1.0 / std::sqrt(32.0), 70);
  REQUIRE(close(out, ref.detach(), 1e-12));
  for (const auto& x : {q, k, v})
    REQUIRE(close(grad_of((out * g).sum(), x), grad_of((ref * g).sum(), x).detach(), 1e-12));
  const std::string error = error_of([&] {
    pirope::rope_attention(q, k, v, cos, sin, std::nullopt, true, std::nullopt, false, false,
                           std::nullopt, -2);
  });
  INFO(error);
  REQUIRE(error.find("window_size") != std::string::npos);
}

TEST_CASE("rope_attention with a soft-cap: scores capped by tanh before the softmax", "[autograd]") {
  at::manual_seed(7);
  auto [cos, sin] = pi_tables(32, 300, 2.0);
  auto pos = at::arange(300, at::kLong).unsqueeze(0);
  // scores of a few units, so that a cap of 2 changes them
  auto q = (3 * at::randn({1, 300, 4, 32}, at::kDouble)).requires_grad_(),
       k = (3 * at::randn({1, 300, 2, 32}, at::kDouble)).requires_grad_(), v = leaf({1, 300, 2, 32});
  auto g = at::randn({1, 300, 4, 32}, at::kDouble);
  const double scale = 1.0 / std::sqrt(32.0);
  auto [out, lse] = pirope::rope_attention(q, k, v, cos, sin, std::nullopt, true, std::nullopt,
                                           false, false, std::nullopt, 70, -1, 2.0);
  auto ref = attention_reference(q, k, v, cos, sin, pos, scale, 70, 2.0);
  REQUIRE(close(out, ref.detach(), 1e-12));
  REQUIRE_FALSE(close(out, attention_reference(q, k, v, cos, sin, pos, scale, 70).detach(), 1e-3));
  for (const auto& x : {q, k, v})
    REQUIRE(close(grad_of((out * g).sum(), x), grad_of((ref * g).sum(), x).detach(), 1e-12));
  const std::string error = error_of([&] {
    pirope::rope_attention(q, k, v, cos, sin, std::nullopt, true, std::nullopt, false, false,
                           std::nullopt, -1, -1, -1.0);
  });
  INFO(error);
  REQUIRE(error.find("softcap") != std::string::npos);
}

TEST_CASE("rope_attention with attention sinks: a key of logit sink and no value per head", "[autograd]") {
  at::manual_seed(8);
  auto [cos, sin] = pi_tables(32, 300, 2.0);
  auto q = leaf({2, 300, 4, 32}), k = leaf({2, 300, 2, 32}), v = leaf({2, 300, 2, 32});
  auto sinks = (2 * at::randn({4}, at::kDouble)).requires_grad_();
  auto g = at::randn({2, 300, 4, 32}, at::kDouble);
  auto call = [&](const std::optional<at::Tensor>& s) {
    return pirope::rope_attention(q, k, v, cos, sin, std::nullopt, true, std::nullopt, false, false,
                                  std::nullopt, 90, -1, 0.0, s);
  };
  auto [out, lse] = call(sinks);
  // against the call without sinks: lse' = logaddexp(lse, sink), out' = out exp(lse - lse')
  auto [plain, plain_lse] = call(std::nullopt);
  auto want_lse = at::logaddexp(plain_lse, sinks.detach().view({1, 4, 1}));
  REQUIRE(close(lse, want_lse, 1e-12));
  REQUIRE(close(out, plain.detach() * (plain_lse - want_lse).exp().transpose(1, 2).unsqueeze(-1), 1e-12));
  // the sinks' gradient against central differences of sum(out * g)
  auto ds = grad_of((out * g).sum(), sinks);
  for (int64_t h = 0; h < 4; ++h) {
    const double eps = 1e-6;
    auto up = sinks.detach().clone(), down = sinks.detach().clone();
    up[h] += eps;
    down[h] -= eps;
    const double fd = ((std::get<0>(call(up)) * g).sum() - (std::get<0>(call(down)) * g).sum()).item<double>() /
                      (2 * eps);
    REQUIRE(std::abs(ds[h].item<double>() - fd) < 1e-6 * std::max(1.0, std::abs(fd)));
  }
}

TEST_CASE("in-place rotation refuses tensors that require grad", "[autograd]") {
  auto [cos, sin] = pi_tables(32, 8, 1.0);
  auto q = leaf({1, 8, 2, 32}), k = at::randn({1, 8, 1, 32}, at::kDouble);
  REQUIRE_THROWS_AS(pirope::apply_rope_qk_(q, k, cos, sin), c10::Error);
}

TEST_CASE("an undefined tensor argument is named, not tripped over by autograd", "[autograd]") {
  // The autograd (and in-place) kernels run before the ops' shared checks.
  auto [cos, sin] = pi_tables(32, 8, 1.0);
  auto x = at::randn({1, 8, 2, 32}, at::kDouble);
  const auto raises = [](const auto& call, const std::string& prefix) {
    const std::string got = error_of(call);
    INFO("expected \"" << prefix << "...\", got \"" << got << "\"");
    REQUIRE(got.rfind(prefix, 0) == 0);
  };
  for (bool grad : {false, true}) {
    auto q = x.clone().requires_grad_(grad);
    raises([&] { pirope::apply_rope(at::Tensor(), cos, sin); }, "apply_rope: x must be a tensor, got None");
    raises([&] { pirope::apply_rope_qk(q, at::Tensor(), cos, sin); }, "apply_rope_qk: k must be a tensor, got None");
    raises([&] { pirope::rope_attention(q, q, at::Tensor(), cos, sin); },
           "rope_attention: v must be a tensor, got None");
  }
  raises([&] { pirope::apply_rope_qk_(x, at::Tensor(), cos, sin); },
         "pirope::apply_rope_qk_: k must be a tensor, got None");
}
