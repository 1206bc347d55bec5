// pirope::apply_rope from an installed pirope against the same rotation in plain ATen ops.
// Nothing but pirope::pirope gives this program its include paths, C++ standard and
// LibTorch.
#include <cstdio>

#include <ATen/ATen.h>
#include <pirope/ops.h>

int main() {
  try {
    const int64_t seqlen = 6, half = 4;
    at::manual_seed(0);
    auto x = at::randn({2, seqlen, 3, 2 * half});
    auto inv = at::pow(10000.0, -at::arange(half, at::kDouble) / half);
    auto ang = at::arange(seqlen, at::kDouble).unsqueeze(1) * inv.unsqueeze(0);
    auto cos = ang.cos().to(at::kFloat), sin = ang.sin().to(at::kFloat);

    auto out = pirope::apply_rope(x, cos, sin);

    // Non-interleaved: feature i pairs with i + half.
    auto c = cos.view({1, seqlen, 1, half}), s = sin.view({1, seqlen, 1, half});
    auto x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
    auto want = at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
    const double err = (out - want).abs().max().item<double>();
    std::printf("pirope::apply_rope vs ATen: max abs error %g\n", err);
    return out.sizes() == x.sizes() && err <= 1e-5 ? 0 : 1;
  } catch (const c10::Error& e) {
    std::printf("error: %s\n", e.what_without_backtrace());
    return 1;
  }
}
