// apply_rope / apply_rope_qk: validation and planning shared by every backend.
//
// A backend provides one launcher (RopeLauncher) and registers the six rotary ops
// with register_apply_rope_kernels<launcher>(m); argument checks, output allocation,
// layout handling and position checks live once, in apply_rope.cpp.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "rope_params.h"

namespace pirope {

// Runs the rotation described by `params` on `device`. x_dtype is the dtype of the
// rotated tensors, table_dtype the dtype of cos/sin.
using RopeLauncher = void (*)(const RopeParams& params, at::ScalarType x_dtype,
                              at::ScalarType table_dtype, c10::Device device);

// Checks shared with the fused attention (rope_attention.cpp). `x` gives the device
// and head dim the tables must match.
void check_tables(const char* op, const at::Tensor& x, const at::Tensor& cos,
                  const at::Tensor& sin);
// position_ids: (seqlen,), (batch, seqlen) or (1, seqlen) for 4-D x; (total,) for
// packed x. Returns it expanded to (batch, seqlen) (a view, may have stride 0).
at::Tensor plan_positions(const char* op, const at::Tensor& x, const at::Tensor& pos,
                          int64_t batch, int64_t seqlen);
// IndexError unless every position (or 0..seqlen-1 when pos is empty) is a row of
// the tables. Reads the positions: CPU only (on CUDA it would cost a sync).
void check_positions_in_range(const char* op, const std::optional<at::Tensor>& pos,
                              int64_t seqlen, int64_t max_positions);

// RuntimeError unless q (and k, when not null) can be rotated in place: no element
// shared within q, within k or between them (it would be rotated twice), no memory
// shared with cos, sin or position_ids (read while q and k are written). Also used by
// the Python API before it rotates two views in place one at a time (pirope._C).
void check_inplace_targets(const char* op, const char* qname, const at::Tensor& q,
                           const char* kname, const at::Tensor* k, const at::Tensor& cos,
                           const at::Tensor& sin, const std::optional<at::Tensor>& position_ids);

// The kernels need a unit stride on the feature dim; anything else is copied.
at::Tensor unit_last_stride(const at::Tensor& x);

// The tensor as a 4-D (batch, seqlen, nheads, headdim) view: packed (total, heads,
// headdim) as (1, total, heads, headdim); other ranks as they are.
at::Tensor as_4d(const at::Tensor& x);

// Fills the table, position and size fields of the kernels' RopeParams (tables with a
// unit column stride and one row stride shared by cos and sin; copies otherwise).
// `pos` is plan_positions' (batch, seqlen) view. Returns the (cos, sin) tensors whose
// memory p points to: keep them alive while the kernel runs.
std::pair<at::Tensor, at::Tensor> fill_rope_tables(RopeParams& p, const at::Tensor& cos,
                                                   const at::Tensor& sin,
                                                   const std::optional<at::Tensor>& pos,
                                                   int64_t batch, int64_t seqlen,
                                                   int64_t head_dim, bool interleaved);

// Checks every argument, plans the kernel and runs it. `k` may be null (one tensor).
// conjugate rotates by -angle (the backward); inplace writes into q (and k).
// Returns the rotated tensors (the second is undefined when k is null).
std::tuple<at::Tensor, at::Tensor> rope_run(
    const char* op, const at::Tensor& q, const at::Tensor* k, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
    bool interleaved, bool conjugate, bool inplace, RopeLauncher launch);

// Registers apply_rope, apply_rope_, apply_rope_backward, apply_rope_qk,
// apply_rope_qk_ and apply_rope_qk_backward for one dispatch key.
template <RopeLauncher L>
void register_apply_rope_kernels(torch::Library& m) {
  using OptT = std::optional<at::Tensor>;
  using T = at::Tensor;
  m.impl("apply_rope", [](const T& x, const T& cos, const T& sin, const OptT& pos,
                          bool interleaved) {
    return std::get<0>(rope_run("apply_rope", x, nullptr, cos, sin, pos,
                                interleaved, false, false, L));
  });
  m.impl("apply_rope_", [](const T& x, const T& cos, const T& sin, const OptT& pos,
                           bool interleaved) {
    rope_run("apply_rope_", x, nullptr, cos, sin, pos, interleaved, false, true, L);
  });
  m.impl("apply_rope_backward", [](const T& grad, const T& cos, const T& sin,
                                   const OptT& pos, bool interleaved) {
    return std::get<0>(rope_run("apply_rope_backward", grad, nullptr, cos, sin, pos,
                                interleaved, true, false, L));
  });
  m.impl("apply_rope_qk", [](const T& q, const T& k, const T& cos, const T& sin,
                             const OptT& pos, bool interleaved) {
    return rope_run("apply_rope_qk", q, &k, cos, sin, pos, interleaved, false, false,
                    L);
  });
  m.impl("apply_rope_qk_", [](const T& q, const T& k, const T& cos, const T& sin,
                              const OptT& pos, bool interleaved) {
    rope_run("apply_rope_qk_", q, &k, cos, sin, pos, interleaved, false, true, L);
  });
  m.impl("apply_rope_qk_backward", [](const T& gq, const T& gk, const T& cos,
                                      const T& sin, const OptT& pos,
                                      bool interleaved) {
    return rope_run("apply_rope_qk_backward", gq, &gk, cos, sin, pos, interleaved,
                    true, false, L);
  });
}

}  // namespace pirope
