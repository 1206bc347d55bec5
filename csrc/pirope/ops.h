// pirope's C++ API, callable from LibTorch without Python. Each function calls the
// registered op through the dispatcher, so the CPU or CUDA kernel runs according to
// the inputs' device, and autograd (csrc/pirope/autograd) records the call when an
// input requires grad: x.backward() works as for torch's own ops.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace pirope {

// x: (batch, seqlen, nheads, headdim) or packed (total_tokens, nheads, headdim);
// cos, sin: (max_positions, rotary_dim / 2). The contract: README.md, "Contract details".
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& position_ids = std::nullopt,
                      bool interleaved = false);

// The gradient of apply_rope: rotation by the negative angle.
at::Tensor apply_rope_backward(const at::Tensor& grad, const at::Tensor& cos,
                               const at::Tensor& sin,
                               const std::optional<at::Tensor>& position_ids = std::nullopt,
                               bool interleaved = false);

// q and k rotated in one pass; they may have different head counts.
std::tuple<at::Tensor, at::Tensor> apply_rope_qk(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids = std::nullopt,
    bool interleaved = false);

// The gradient of apply_rope_qk: q and k rotated by the negative angle.
std::tuple<at::Tensor, at::Tensor> apply_rope_qk_backward(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids = std::nullopt,
    bool interleaved = false);

// In-place variant of apply_rope_qk (no autograd: tensors that require grad are refused).
void apply_rope_qk_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                    const at::Tensor& sin,
                    const std::optional<at::Tensor>& position_ids = std::nullopt,
                    bool interleaved = false);

// Fused RoPE + softmax attention. q: (batch, seqlen, nheads_q, headdim); k, v:
// (batch, seqlen, nheads_kv, headdim), nheads_q a multiple of nheads_kv. Returns
// (out, lse): out like q, lse (batch, nheads_q, seqlen) in float32 (float64 for
// float64 input), the log-sum-exp of each scaled score row. softmax_scale: default
// headdim ** -0.5, as in Python. cu_seqlens (packed sequences, CPU): q, k, v are
// (total, heads, headdim), sequence b is rows [cu_seqlens[b], cu_seqlens[b+1]), lse is
// (nheads_q, total), and positions restart at 0 in each sequence unless position_ids
// ((total,)) gives them. window_left/right (CPU): sliding-window attention as in
// flash-attn's window_size: query i sees key j only when i - window_left <= j <=
// i + window_right (-1: no bound; causal keeps j <= i whatever window_right says).
// softcap (CPU): attention-logit soft-cap as in Gemma 2 and flash-attn: each score s
// becomes softcap * tanh(s / softcap) before the mask and the softmax (lse is of the capped
// scores); 0: none. sinks (CPU): attention sinks as in GPT-OSS, (nheads_q,) logits, one per
// query head, each joining every softmax row of its head without a value (lse includes
// it); finite, or -inf for none. Differentiable (their gradient is -sum over rows of
// exp(sink - lse) * rowsum(grad_out * out)).
std::tuple<at::Tensor, at::Tensor> rope_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids = std::nullopt,
    bool causal = true, std::optional<double> softmax_scale = std::nullopt,
    bool interleaved = false, bool deterministic = false,
    const std::optional<at::Tensor>& cu_seqlens = std::nullopt, int64_t window_left = -1,
    int64_t window_right = -1, double softcap = 0.0,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// Gradients (dq, dk, dv) of rope_attention's out, from the saved out and lse.
// deterministic: bit-identical results run to run (always so on CPU; on CUDA it
// avoids float atomics at +40% tensor-core work in the backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& position_ids = std::nullopt, bool causal = true,
    std::optional<double> softmax_scale = std::nullopt, bool interleaved = false,
    bool deterministic = false, const std::optional<at::Tensor>& cu_seqlens = std::nullopt,
    int64_t window_left = -1, int64_t window_right = -1, double softcap = 0.0);

// Build facts, reported by pirope._C.build_info() and checked at import.
struct BuildInfo {
  const char* torch_version;
  bool with_cuda;
  const char* cuda_version;
  const char* cuda_archs;
  const char* cpu_capability;
  bool openmp;  // compiled with OpenMP: at::parallel_for really runs in parallel
};
BuildInfo build_info();

}  // namespace pirope
