// Every schema of the pirope library, declared once. Kernels are registered per
// dispatch key in cpu/*.cpp, cuda/*_kernel.{cu,cpp} and autograd/*.cpp; fake kernels, batching
// rules and the autograd used under torch.func in Python (python/pirope/_fake,
// _vmap, _autograd).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "ops.h"

#ifndef PIROPE_TORCH_VERSION
#define PIROPE_TORCH_VERSION "unknown"
#endif
#ifndef PIROPE_CUDA_VERSION
#define PIROPE_CUDA_VERSION ""
#endif
#ifndef PIROPE_CUDA_ARCHS
#define PIROPE_CUDA_ARCHS ""
#endif
#if defined(CPU_CAPABILITY_AVX512)
#define PIROPE_CPU_CAPABILITY "AVX512"
#elif defined(CPU_CAPABILITY_AVX2)
#define PIROPE_CPU_CAPABILITY "AVX2"
#else
#define PIROPE_CPU_CAPABILITY "DEFAULT"
#endif

TORCH_LIBRARY(pirope, m) {
  // Rotary embedding. Backward ops rotate by the negative angle. Trailing
  // underscore: in place (annotated as mutating q/k).
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin, Tensor? position_ids, "
        "bool interleaved) -> Tensor");
  m.def("apply_rope_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor? position_ids, "
        "bool interleaved) -> ()");
  m.def("apply_rope_backward(Tensor grad, Tensor cos, Tensor sin, "
        "Tensor? position_ids, bool interleaved) -> Tensor");
  m.def("apply_rope_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, "
        "Tensor? position_ids, bool interleaved) -> (Tensor, Tensor)");
  m.def("apply_rope_qk_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, "
        "Tensor? position_ids, bool interleaved) -> ()");
  m.def("apply_rope_qk_backward(Tensor grad_q, Tensor grad_k, Tensor cos, "
        "Tensor sin, Tensor? position_ids, bool interleaved) -> (Tensor, Tensor)");

  // Fused RoPE attention. Returns the output and the log-sum-exp of each query row
  // (batch, nheads_q, seqlen) in float32 (float64 for float64 input, so that float64
  // gradients stay exact), which the backward reuses. `deterministic` only matters to
  // the backward (the forward takes it so that autograd can pass it on). cu_seqlens:
  // packed sequences, q/k/v (total, heads, headdim) and lse (nheads_q, total); CPU only.
  // window_left/right: sliding-window attention (flash-attn's window_size; -1: no
  // bound; causal overrides window_right); CPU only. softcap: attention-logit soft-cap
  // (Gemma 2; flash-attn's softcap): scores s become softcap * tanh(s / softcap); 0: none;
  // CPU only. sinks: attention sinks (GPT-OSS), one logit per query head that joins each
  // row's softmax without a value (lse includes it); CPU only. The backward op takes no
  // sinks: it recomputes the probabilities from that lse (their gradient is autograd's).
  m.def("rope_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, "
        "Tensor? position_ids, bool causal, float softmax_scale, bool interleaved, "
        "bool deterministic=False, Tensor? cu_seqlens=None, int window_left=-1, "
        "int window_right=-1, float softcap=0.0, Tensor? sinks=None) -> (Tensor, Tensor)");
  m.def("rope_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor out, Tensor lse, Tensor cos, Tensor sin, Tensor? position_ids, "
        "bool causal, float softmax_scale, bool interleaved, bool deterministic=False, "
        "Tensor? cu_seqlens=None, int window_left=-1, int window_right=-1, "
        "float softcap=0.0) -> (Tensor, Tensor, Tensor)");
}

// The in-place rotary ops as autograd sees them (the Python API wraps them in a
// differentiable Function, under which grad mode is off; direct calls get only this),
// layered like torch's own in-place ops: the ADInplaceOrView kernel bumps the version
// counter of what they write (also inside inference_mode for normal tensors; for an
// inference tensor outside it, bumping raises as for torch's ops), so a tensor saved
// for backward and then rotated in place is caught at backward instead of giving wrong
// gradients; the Autograd kernel refuses a tensor that requires grad (the raw op has
// no derivative). torch's fallbacks bump only returned tensors, and these ops return
// nothing (as torch.compile's functionalization wants), hence these kernels.
namespace {
template <typename F>
void for_each_written(const c10::OperatorHandle& op, torch::jit::Stack* stack, F f) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const at::Tensor& t = (*stack)[first + i].toTensor();
    TORCH_CHECK(t.defined(), op.schema().name(), ": ", arguments[i].name(),
                " must be a tensor, got None");  // before anything reads its version
    f(arguments[i].name(), t);
  }
}

void refuse_requires_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                          torch::jit::Stack* stack) {
  for_each_written(op, stack, [&](const std::string& name, const at::Tensor& t) {
    TORCH_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), op.schema().name(), ": ", name,
                " requires grad; the raw in-place op has no derivative: use the out-of-place op "
                "(or, from Python, pirope.apply_rope / apply_rope_qk(..., inplace=True), which are "
                "differentiable)");
  });
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void bump_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  for_each_written(op, stack, [](const std::string&, const at::Tensor& t) {
    torch::autograd::impl::bump_version(t);  // raises for an inference tensor outside inference_mode
  });
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}
}  // namespace

TORCH_LIBRARY_IMPL(pirope, Autograd, m) {
  m.impl("apply_rope_", torch::CppFunction::makeFromBoxedFunction<&refuse_requires_grad>());
  m.impl("apply_rope_qk_", torch::CppFunction::makeFromBoxedFunction<&refuse_requires_grad>());
}
TORCH_LIBRARY_IMPL(pirope, ADInplaceOrView, m) {
  m.impl("apply_rope_", torch::CppFunction::makeFromBoxedFunction<&bump_versions>());
  m.impl("apply_rope_qk_", torch::CppFunction::makeFromBoxedFunction<&bump_versions>());
}

namespace pirope {
BuildInfo build_info() {
#ifdef PIROPE_WITH_CUDA
  constexpr bool with_cuda = true;
#else
  constexpr bool with_cuda = false;
#endif
#ifdef _OPENMP
  constexpr bool openmp = true;
#else
  constexpr bool openmp = false;
#endif
  return {PIROPE_TORCH_VERSION, with_cuda, PIROPE_CUDA_VERSION, PIROPE_CUDA_ARCHS,
          PIROPE_CPU_CAPABILITY, openmp};
}
}  // namespace pirope
