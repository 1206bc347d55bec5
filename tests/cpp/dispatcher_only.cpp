// A LibTorch program that reaches pirope only through the dispatcher, by name (no
// pirope:: symbol referenced): libpirope.so must still be loaded, so that its
// TORCH_LIBRARY registers the ops (linkers with --as-needed would drop it). Also built
// with the C++ standard the pirope target hands on, nothing set here.
#include <cstdio>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

int main() {
  try {
    auto op = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("pirope::apply_rope", "")
                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&, bool)>();
    // angle pi/2 on one pair: (1, 0) -> (0, 1)
    auto x = at::tensor({1.0, 0.0}, at::kDouble).view({1, 1, 1, 2});
    auto out = op.call(x, at::zeros({1, 1}), at::ones({1, 1}), std::nullopt, false);
    const bool ok = out.flatten()[0].item<double>() == 0.0 && out.flatten()[1].item<double>() == 1.0;
    std::printf("%s\n", ok ? "ok" : "wrong rotation");
    return ok ? 0 : 1;
  } catch (const c10::Error& e) {
    std::printf("error: %s\n", e.what_without_backtrace());
    return 1;
  }
}
