// rope_attention / rope_attention_backward: validation and planning shared by every
// backend. A backend provides a forward and a backward launcher and registers both
// ops with register_rope_attention_kernels<fwd, bwd>(m); argument checks, output
// allocation and layout handling live once, in rope_attention.cpp.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "attention_params.h"

namespace pirope {

// A (batch, seqlen, heads, head_dim) tensor as the kernels' AttentionTensor.
AttentionTensor tensor_args(const at::Tensor& t);

// Runs the forward (writes out, lse) or the backward (writes dq, dk, dv) described
// by `params`. dtype is the dtype of q/k/v, table_dtype the dtype of cos/sin.
using AttentionLauncher = void (*)(const AttentionParams& params, at::ScalarType dtype,
                                   at::ScalarType table_dtype, c10::Device device);

// Checks every argument, allocates (out, lse) and runs the forward. cu_seqlens: packed
// sequences (q, k, v of (total, heads, headdim); CPU only). window_left/right: sliding
// window (-1: none; CPU only). softcap: attention-logit soft-cap (0: none; CPU only).
// sinks: (heads_q,) attention-sink logits (none: no sinks; CPU only).
std::tuple<at::Tensor, at::Tensor> rope_attention_run(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids, bool causal,
    double softmax_scale, bool interleaved, const std::optional<at::Tensor>& cu_seqlens,
    int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& sinks, AttentionLauncher launch);

// Checks every argument, allocates (dq, dk, dv) and runs the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_backward_run(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& position_ids, bool causal, double softmax_scale,
    bool interleaved, bool deterministic, const std::optional<at::Tensor>& cu_seqlens,
    int64_t window_left, int64_t window_right, double softcap, AttentionLauncher launch);

// A backend's adjustment of q, k, v (and grad_out) before the checks, e.g. a copy of
// inputs its kernels cannot address as they are. nullptr: none.
using TensorPrep = at::Tensor (*)(const at::Tensor&);

template <AttentionLauncher Fwd, AttentionLauncher Bwd, TensorPrep Prep = nullptr>
void register_rope_attention_kernels(torch::Library& m) {
  using OptT = std::optional<at::Tensor>;
  using T = at::Tensor;
  static constexpr auto prep = [](const T& t) -> T {
    if constexpr (Prep != nullptr) return Prep(t);
    return t;
  };
  m.impl("rope_attention", [](const T& q, const T& k, const T& v, const T& cos,
                              const T& sin, const OptT& pos, bool causal, double scale,
                              bool interleaved, bool /*deterministic: backward only*/,
                              const OptT& cu_seqlens, int64_t window_left, int64_t window_right,
                              double softcap, const OptT& sinks) {
    return rope_attention_run(prep(q), prep(k), prep(v), cos, sin, pos, causal, scale,
                              interleaved, cu_seqlens, window_left, window_right, softcap,
                              sinks, Fwd);
  });
  m.impl("rope_attention_backward",
         [](const T& grad_out, const T& q, const T& k, const T& v, const T& out,
            const T& lse, const T& cos, const T& sin, const OptT& pos, bool causal,
            double scale, bool interleaved, bool deterministic, const OptT& cu_seqlens,
            int64_t window_left, int64_t window_right, double softcap) {
           return rope_attention_backward_run(prep(grad_out), prep(q), prep(k), prep(v),
                                              prep(out), lse, cos, sin, pos, causal, scale,
                                              interleaved, deterministic, cu_seqlens,
                                              window_left, window_right, softcap, Bwd);
         });
}

}  // namespace pirope
