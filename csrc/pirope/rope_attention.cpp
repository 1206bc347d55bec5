// rope_attention / rope_attention_backward: argument validation (shared by every
// backend), layout planning, and the C++ API that calls the dispatcher.
#include "rope_attention.h"

#include <cmath>
#include <limits>

#include <ATen/core/dispatch/Dispatcher.h>

#include "apply_rope.h"
#include "ops.h"

namespace pirope {
namespace {

constexpr const char* kFwd = "rope_attention";
constexpr const char* kBwd = "rope_attention_backward";

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The math type of the kernels, also the dtype of lse.
at::ScalarType math_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_4d(const char* op, const char* name, const at::Tensor& x, const char* heads) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be (batch, seqlen, ", heads,
              ", headdim), got shape ", x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

// q, k, v (and, for the backward, out and grad_out): shapes, dtypes, devices.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& v) {
  check_4d(op, "q", q, "nheads_q");
  check_4d(op, "k", k, "nheads_kv");
  check_4d(op, "v", v, "nheads_kv");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k},
                                {"v", v}}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name,
                " must have the dtype of q (", q.scalar_type(), "), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(),
                " like q, got ", t.device());
    TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == q.size(1), op, ": ", name,
                " must have the batch and seqlen of q (", q.size(0), ", ", q.size(1),
                "), got shape ", t.sizes());
    TORCH_CHECK(t.size(3) == q.size(3), op, ": ", name,
                " must have the head dim of q (", q.size(3), "), got shape ", t.sizes());
  }
  TORCH_CHECK(v.size(2) == k.size(2), op,
              ": k and v must have the same number of heads, got shapes ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, op,
              ": nheads_q must be a multiple of nheads_kv, got nheads_q = ", q.size(2),
              " and nheads_kv = ", k.size(2));
  TORCH_CHECK(q.size(3) >= 1, op, ": headdim must be >= 1, got shape ", q.sizes());
}

void check_like_q(const char* op, const char* name, const at::Tensor& t,
                  const at::Tensor& q) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q ",
              q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name,
              " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(),
              " like q, got ", t.device());
}

void check_scale(const char* op, double scale, at::ScalarType dtype) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op,
              ": softmax_scale must be finite and > 0, got ", scale);
  // Every dtype but float64 is computed in float32, where a larger scale is inf.
  TORCH_CHECK(dtype == at::kDouble || scale <= std::numeric_limits<float>::max(), op,
              ": softmax_scale must be at most ", std::numeric_limits<float>::max(),
              " (the largest float32: ", dtype, " inputs are computed in float32), got ", scale);
}


// Tables, positions and common sizes; checks the positions (on CPU).
AttentionParams plan(const char* op, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& position_ids, bool causal,
                     double scale, bool interleaved, at::Tensor& cos_u,
                     at::Tensor& sin_u) {
  check_tables(op, q, cos, sin);
  check_scale(op, scale, q.scalar_type());
  const int64_t batch = q.size(0), seqlen = q.size(1);
  std::optional<at::Tensor> pos;
  if (position_ids.has_value() && position_ids->defined())
    pos = plan_positions(op, q, *position_ids, batch, seqlen);
  const int64_t max_positions = cos.size(0);
  if (q.device().is_cpu() && batch * seqlen > 0)
    check_positions_in_range(op, pos, seqlen, max_positions);

  AttentionParams p;
  p.batch = batch;
  p.seqlen = seqlen;
  p.heads_q = q.size(2);
  p.heads_kv = k.size(2);
  p.head_dim = q.size(3);
  p.causal = causal;
  p.softmax_scale = scale;
  std::tie(cos_u, sin_u) =
      fill_rope_tables(p.rope, cos, sin, pos, batch, seqlen, q.size(3), interleaved);
  return p;
}

}  // namespace

AttentionTensor tensor_args(const at::Tensor& t) {
  return {const_cast<void*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

std::tuple<at::Tensor, at::Tensor> rope_attention_run(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids, bool causal,
    double softmax_scale, bool interleaved, AttentionLauncher launch) {
  check_qkv(kFwd, q, k, v);
  at::Tensor cos_u, sin_u;
  AttentionParams p = plan(kFwd, q, k, cos, sin, position_ids, causal, softmax_scale,
                           interleaved, cos_u, sin_u);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.seqlen},
                             q.options().dtype(math_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};

  const at::Tensor q_u = unit_last_stride(q), k_u = unit_last_stride(k),
                   v_u = unit_last_stride(v);
  p.q = tensor_args(q_u);
  p.k = tensor_args(k_u);
  p.v = tensor_args(v_u);
  p.out = tensor_args(out);
  p.lse = lse.data_ptr();
  launch(p, q.scalar_type(), cos.scalar_type(), q.device());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_backward_run(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& position_ids, bool causal, double softmax_scale,
    bool interleaved, bool deterministic, AttentionLauncher launch) {
  check_qkv(kBwd, q, k, v);
  check_like_q(kBwd, "grad_out", grad_out, q);
  check_like_q(kBwd, "out", out, q);
  TORCH_CHECK(lse.defined(), kBwd, ": lse must be a tensor, got None");
  const at::ScalarType lse_dtype = math_dtype(q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) &&
                  lse.size(2) == q.size(1),
              kBwd, ": lse must be (batch, nheads_q, seqlen) = (", q.size(0), ", ",
              q.size(2), ", ", q.size(1), "), got shape ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype, kBwd, ": lse must be ", lse_dtype,
              " (the forward's), got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), kBwd, ": lse must be on ", q.device(),
              " like q, got ", lse.device());
  at::Tensor cos_u, sin_u;
  AttentionParams p = plan(kBwd, q, k, cos, sin, position_ids, causal, softmax_scale,
                           interleaved, cos_u, sin_u);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0) {  // no query: no gradient flows (k, v may still be non-empty)
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor q_u = unit_last_stride(q), k_u = unit_last_stride(k),
                   v_u = unit_last_stride(v), o_u = unit_last_stride(out),
                   g_u = unit_last_stride(grad_out), lse_c = lse.contiguous();
  p.q = tensor_args(q_u);
  p.k = tensor_args(k_u);
  p.v = tensor_args(v_u);
  p.out = tensor_args(o_u);
  p.grad_out = tensor_args(g_u);
  p.dq = tensor_args(dq);
  p.dk = tensor_args(dk);
  p.dv = tensor_args(dv);
  p.lse = const_cast<void*>(lse_c.const_data_ptr());
  p.deterministic = deterministic;
  launch(p, q.scalar_type(), cos.scalar_type(), q.device());
  return {dq, dk, dv};
}

// ---- C++ API: calls through the dispatcher, so autograd/CPU/CUDA all apply. ----

namespace {
// softmax_scale, by default headdim ** -0.5 (as in Python).
double default_scale(const at::Tensor& q, std::optional<double> softmax_scale) {
  if (softmax_scale) return *softmax_scale;
  TORCH_CHECK(q.defined() && q.dim() >= 1 && q.size(-1) >= 1, kFwd,
              ": q must be (batch, seqlen, nheads_q, headdim) with headdim >= 1 for the default "
              "softmax_scale, got ", q.defined() ? q.sizes() : at::IntArrayRef{});
  return 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids, bool causal,
    std::optional<double> softmax_scale, bool interleaved, bool deterministic) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pirope::rope_attention", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, bool, double, bool, bool)>();
  return op.call(q, k, v, cos, sin, position_ids, causal, default_scale(q, softmax_scale),
                 interleaved, deterministic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& position_ids, bool causal,
    std::optional<double> softmax_scale, bool interleaved, bool deterministic) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pirope::rope_attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, bool, double, bool, bool)>();
  return op.call(grad_out, q, k, v, out, lse, cos, sin, position_ids, causal,
                 default_scale(q, softmax_scale), interleaved, deterministic);
}

}  // namespace pirope
