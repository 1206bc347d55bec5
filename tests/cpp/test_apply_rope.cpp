// C++ API of the rotary ops against a LibTorch reference (plain ATen ops, float64).
#include "catch.h"

#include <ATen/ATen.h>

#include "pirope/ops.h"
#include "reference.h"

using pirope_test::close;
using pirope_test::pi_tables;
using pirope_test::reference;

TEST_CASE("apply_rope matches the reference in both layouts", "[apply_rope]") {
  at::manual_seed(0);
  auto [cos, sin] = pi_tables(64, 128, 4.0);
  auto x = at::randn({2, 33, 4, 96});  // partial rotary: 64 of 96 features
  auto pos = at::randint(0, 128, {2, 33}, at::kLong);
  for (bool interleaved : {false, true}) {
    auto out = pirope::apply_rope(x, cos, sin, pos, interleaved);
    REQUIRE(out.sizes() == x.sizes());
    REQUIRE(close(out, reference(x, cos, sin, pos, interleaved), 1e-5));
    REQUIRE(at::equal(out.narrow(-1, 64, 32), x.narrow(-1, 64, 32)));
  }
}

TEST_CASE("apply_rope_qk rotates q and k with different head counts", "[apply_rope_qk]") {
  at::manual_seed(1);
  auto [cos, sin] = pi_tables(128, 64, 2.0);
  auto q = at::randn({1, 40, 32, 128}, at::kBFloat16);
  auto k = at::randn({1, 40, 8, 128}, at::kBFloat16);
  auto pos = at::arange(40, at::kLong).unsqueeze(0);
  auto [oq, ok] = pirope::apply_rope_qk(q, k, cos, sin, std::nullopt, false);
  REQUIRE(oq.scalar_type() == at::kBFloat16);
  REQUIRE(close(oq, reference(q, cos, sin, pos, false), 3e-2));
  REQUIRE(close(ok, reference(k, cos, sin, pos, false), 3e-2));
}

TEST_CASE("in-place and backward ops", "[apply_rope_qk_][apply_rope_backward]") {
  at::manual_seed(2);
  auto [cos, sin] = pi_tables(32, 16, 1.0);
  auto q = at::randn({2, 16, 2, 32}, at::kDouble);
  auto k = at::randn({2, 16, 1, 32}, at::kDouble);
  auto q0 = q.clone(), k0 = k.clone();
  auto pos = at::arange(16, at::kLong).unsqueeze(0).expand({2, 16});
  pirope::apply_rope_qk_(q, k, cos, sin, std::nullopt, true);
  REQUIRE(close(q, reference(q0, cos, sin, pos, true), 1e-12));
  REQUIRE(close(k, reference(k0, cos, sin, pos, true), 1e-12));
  // the backward rotates back: R(-a) R(a) = I, up to cos^2 + sin^2 = 1 in float32
  auto back = pirope::apply_rope_backward(q, cos, sin, std::nullopt, true);
  REQUIRE(close(back, q0, 1e-6));
  REQUIRE(close(back, reference(q, cos, sin, pos, true, /*conjugate=*/true), 1e-12));
}

TEST_CASE("in-place rotation refuses memory shared with the tables", "[apply_rope_qk_][errors]") {
  // rows of cos read after being overwritten would give a wrong result without an error
  auto [cos, sin] = pi_tables(32, 8, 1.0);
  auto buf = at::randn({8 * 32 + cos.numel()});
  auto q = buf.narrow(0, 0, 8 * 32).view({1, 8, 1, 32});
  auto k = at::randn({1, 8, 1, 32});
  auto shared_cos = buf.narrow(0, 8 * 16, cos.numel()).view_as(cos);  // overlaps q's second half
  const auto q0 = q.clone(), k0 = k.clone();
  try {
    pirope::apply_rope_qk_(q, k, shared_cos, sin, std::nullopt, false);
    FAIL("expected an error");
  } catch (const c10::Error& e) {
    REQUIRE(std::string(e.what()).find("q shares memory with cos") != std::string::npos);
  }
  REQUIRE(at::equal(q, q0));
  REQUIRE(at::equal(k, k0));
  // disjoint parts of one buffer are fine
  auto apart = buf.narrow(0, 8 * 32, cos.numel()).view_as(cos);
  const auto want = pirope::apply_rope_qk(q, k, apart.clone(), sin, std::nullopt, false);
  pirope::apply_rope_qk_(q, k, apart, sin, std::nullopt, false);
  REQUIRE(at::equal(q, std::get<0>(want)));
  REQUIRE(at::equal(k, std::get<1>(want)));
}

TEST_CASE("bad input throws, naming the argument", "[errors]") {
  auto [cos, sin] = pi_tables(32, 8, 1.0);
  auto x = at::randn({1, 4, 2, 32});
  REQUIRE_THROWS_AS(pirope::apply_rope(x, cos, sin, at::tensor({0, 1, 2, 8}, at::kLong), false),
                    c10::IndexError);
  REQUIRE_THROWS_AS(pirope::apply_rope(at::randn({4, 32}), cos, sin, std::nullopt, false), c10::Error);
  REQUIRE_THROWS_AS(pirope::apply_rope(at::randn({1, 4, 2, 16}), cos, sin, std::nullopt, false),
                    c10::Error);
  try {
    pirope::apply_rope(x, cos, sin, at::tensor({0.0, 1.0, 2.0, 3.0}), false);
    FAIL("expected an error");
  } catch (const c10::Error& e) {
    REQUIRE(std::string(e.what()).find("position_ids must be int32 or int64") != std::string::npos);
  }
}

TEST_CASE("empty tensors", "[apply_rope]") {
  auto [cos, sin] = pi_tables(32, 8, 1.0);
  auto out = pirope::apply_rope(at::randn({0, 4, 2, 32}), cos, sin, std::nullopt, false);
  REQUIRE(out.size(0) == 0);
}
