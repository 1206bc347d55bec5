// rope_attention / rope_attention_backward: argument validation (shared by every
// backend), layout planning, and the C++ API that calls the dispatcher.
#include "rope_attention.h"

#include <cmath>
#include <limits>

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>

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

// (batch, seqlen, heads, headdim), or (total, heads, headdim) for packed sequences.
void check_rank(const char* op, const char* name, const at::Tensor& x, const char* heads,
                bool packed) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor, got None");
  if (packed) {
    TORCH_CHECK(x.dim() == 3, op, ": with cu_seqlens (packed sequences) ", name,
                " must be (total, ", heads, ", headdim), got shape ", x.sizes());
  } else {
    TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be (batch, seqlen, ", heads,
                ", headdim), got shape ", x.sizes());
  }
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

// q, k, v (and, for the backward, out and grad_out): shapes, dtypes, devices. Packed
// ones are checked as their (1, total, heads, headdim) views.
void check_qkv(const char* op, const at::Tensor& q4, const at::Tensor& k4,
               const at::Tensor& v4, bool packed) {
  check_rank(op, "q", q4, "nheads_q", packed);
  check_rank(op, "k", k4, "nheads_kv", packed);
  check_rank(op, "v", v4, "nheads_kv", packed);
  const at::Tensor q = as_4d(q4), k = as_4d(k4), v = as_4d(v4);  // (rank checked above)
  // shapes in messages as the caller passed them
  auto shape = [&](const at::Tensor& t) { return packed ? t.sizes().slice(1) : t.sizes(); };
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k},
                                {"v", v}}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name,
                " must have the dtype of q (", q.scalar_type(), "), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(),
                " like q, got ", t.device());
    if (packed) {
      TORCH_CHECK(t.size(1) == q.size(1), op, ": ", name, " must have the total tokens of q (",
                  q.size(1), "), got shape ", shape(t));
    } else {
      TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == q.size(1), op, ": ", name,
                  " must have the batch and seqlen of q (", q.size(0), ", ", q.size(1),
                  "), got shape ", t.sizes());
    }
    TORCH_CHECK(t.size(3) == q.size(3), op, ": ", name,
                " must have the head dim of q (", q.size(3), "), got shape ", shape(t));
  }
  TORCH_CHECK(v.size(2) == k.size(2), op,
              ": k and v must have the same number of heads, got shapes ", shape(k),
              " and ", shape(v));
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, op,
              ": nheads_q must be a multiple of nheads_kv, got nheads_q = ", q.size(2),
              " and nheads_kv = ", k.size(2));
  TORCH_CHECK(q.size(3) >= 1, op, ": headdim must be >= 1, got shape ", shape(q));
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

// Sliding window: each bound -1 (none) or >= 0. The CUDA kernels take none (a causal
// call may pass any window_right: causal overrides it).
void check_window(const char* op, int64_t left, int64_t right, bool causal, const at::Tensor& q) {
  TORCH_CHECK(left >= -1 && right >= -1, op,
              ": window_size must be (left, right) with each -1 (unbounded) or >= 0, got (",
              left, ", ", right, ")");
  const bool plain = left == -1 && (causal || right == -1);
  TORCH_CHECK(plain || q.device().is_cpu(), op,
              ": window_size (sliding-window attention) is supported by the CPU kernels only; "
              "pirope.rope_attention runs it on ", q.device(), " unfused");
}

// Soft-cap: 0 (none) or a finite value > 0, within float32's positive range unless the
// inputs are float64 (other dtypes are computed in float32). The CUDA kernels take none.
void check_softcap(const char* op, double softcap, const at::Tensor& q) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op,
              ": softcap must be 0 (no soft-cap) or finite and > 0, got ", softcap);
  TORCH_CHECK(softcap == 0 || q.scalar_type() == at::kDouble ||
                  (softcap >= std::numeric_limits<float>::denorm_min() &&
                   softcap <= std::numeric_limits<float>::max()),
              op, ": softcap must be 0 or within float32's positive range (",
              std::numeric_limits<float>::denorm_min(), " to ", std::numeric_limits<float>::max(),
              ": ", q.scalar_type(), " inputs are computed in float32), got ", softcap);
  TORCH_CHECK(softcap == 0 || q.device().is_cpu(), op,
              ": softcap (attention-logit soft-capping) is supported by the CPU kernels only; "
              "pirope.rope_attention runs it on ", q.device(), " unfused");
}

// Attention sinks: (heads_q,), floating, on q's device; the CUDA kernels take none. On the
// CPU the values too: finite, or -inf (that head has no sink); NaN or +inf would make every
// row of the head NaN. Returned in the math type, contiguous (backs p.sinks).
at::Tensor check_sinks(const char* op, const at::Tensor& sinks, const at::Tensor& q,
                       int64_t heads_q) {
  TORCH_CHECK(sinks.dim() == 1 && sinks.size(0) == heads_q, op,
              ": sinks must be 1-D (nheads_q,) = (", heads_q, ",), got shape ", sinks.sizes());
  TORCH_CHECK(is_supported_dtype(sinks.scalar_type()), op,
              ": sinks must be float32, float64, float16 or bfloat16, got ", sinks.scalar_type());
  TORCH_CHECK(sinks.device() == q.device(), op, ": sinks must be on ", q.device(),
              " like q, got ", sinks.device());
  TORCH_CHECK(q.device().is_cpu(), op,
              ": sinks (attention sinks) are supported by the CPU kernels only; "
              "pirope.rope_attention runs them on ", q.device(), " unfused");
  TORCH_CHECK(!(sinks.isnan() | sinks.isposinf()).any().item<bool>(), op,
              ": sinks must be finite or -inf (no sink for that head), got NaN or +inf");
  // in the math type (float32 unless q is float64): a float64 sink past its range would be
  // +inf there (one past its negative range is -inf: no sink, as exp(sink) is 0 anyway)
  const at::Tensor s = sinks.to(math_dtype(q.scalar_type())).contiguous();
  TORCH_CHECK(!s.isposinf().any().item<bool>(), op, ": sinks must be at most ",
              std::numeric_limits<float>::max(), " (the largest float32: ", q.scalar_type(),
              " inputs are computed in float32), got ", sinks.max().item<double>());
  return s;
}

// Packed sequences: cu_seqlens checked (1-D int32/int64 on q's device (CPU), 0 first,
// non-decreasing, total tokens last) and copied to int64 host memory.
at::Tensor check_cu_seqlens(const char* op, const at::Tensor& cu, const at::Tensor& q) {
  TORCH_CHECK(cu.scalar_type() == at::kLong || cu.scalar_type() == at::kInt, op,
              ": cu_seqlens must be int32 or int64, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, op,
              ": cu_seqlens must be 1-D (number of sequences + 1,), got shape ", cu.sizes());
  TORCH_CHECK(cu.device() == q.device(), op, ": cu_seqlens must be on ", q.device(),
              " like q, got ", cu.device());
  TORCH_CHECK(q.device().is_cpu(), op,
              ": cu_seqlens (packed sequences) is supported by the CPU kernels only; "
              "pirope.rope_attention runs packed sequences on ", q.device(), " unfused");
  const at::Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* v = c.const_data_ptr<int64_t>();
  const int64_t n = c.numel(), total = q.size(0);
  TORCH_CHECK(v[0] == 0, op, ": cu_seqlens must start at 0, got ", v[0]);
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK(v[i] >= v[i - 1], op, ": cu_seqlens must be non-decreasing, got ", v[i - 1],
                " then ", v[i], " at index ", i);
  TORCH_CHECK(v[n - 1] == total, op, ": cu_seqlens must end at the total tokens of q (",
              total, "), got ", v[n - 1]);
  return c;
}

// Tables, positions and common sizes; checks the positions (on CPU). Packed sequences
// (cu: check_cu_seqlens' copy, or undefined) are planned as one (1, total) sequence
// whose positions restart at 0 in each sequence unless position_ids says otherwise.
// cos_u, sin_u and restart back the pointers of the returned params: keep them alive.
AttentionParams plan(const char* op, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& position_ids, bool causal,
                     double scale, bool interleaved, const at::Tensor& cu,
                     int64_t window_left, int64_t window_right, double softcap,
                     at::Tensor& cos_u, at::Tensor& sin_u, at::Tensor& restart) {
  check_tables(op, q, cos, sin);
  check_scale(op, scale, q.scalar_type());
  check_window(op, window_left, window_right, causal, q);
  check_softcap(op, softcap, q);
  const bool packed = cu.defined();
  // The rows the positions describe: (batch, seqlen), or (1, total) when packed.
  const int64_t rows_b = packed ? 1 : q.size(0), rows_s = packed ? q.size(0) : q.size(1);
  std::optional<at::Tensor> pos;
  if (position_ids.has_value() && position_ids->defined()) {
    pos = plan_positions(op, q, *position_ids, rows_b, rows_s);
  } else if (packed) {  // token i of sequence b: position i (p.rope points into restart)
    restart = at::empty({rows_s}, cu.options());
    int64_t* r = restart.data_ptr<int64_t>();
    const int64_t* c = cu.const_data_ptr<int64_t>();
    for (int64_t b = 0; b + 1 < cu.numel(); ++b)
      for (int64_t i = c[b]; i < c[b + 1]; ++i) r[i] = i - c[b];
    pos = restart.unsqueeze(0);
  }
  AttentionParams p;
  p.batch = packed ? cu.numel() - 1 : q.size(0);
  p.seqlen = q.size(1);
  if (packed) {
    const at::Tensor lens = cu.slice(0, 1) - cu.slice(0, 0, -1);
    p.seqlen = lens.numel() ? lens.max().item<int64_t>() : 0;
    p.cu_seqlens = cu.const_data_ptr<int64_t>();
  }
  const int64_t max_positions = cos.size(0);
  if (restart.defined()) {  // positions 0..len-1 of each sequence
    TORCH_CHECK_INDEX(p.seqlen <= max_positions, op, ": position_ids is None, so positions run "
                      "0..len-1 in each sequence, but the longest sequence in cu_seqlens has ",
                      p.seqlen, " tokens and cos/sin have only ", max_positions, " rows");
  } else if (q.device().is_cpu() && rows_b * rows_s > 0) {
    check_positions_in_range(op, pos, rows_s, max_positions);
  }
  const at::Tensor q4 = as_4d(q), k4 = as_4d(k);
  p.heads_q = q4.size(2);
  p.heads_kv = k4.size(2);
  p.head_dim = q4.size(3);
  p.causal = causal;
  p.window_left = window_left;
  p.window_right = window_right;
  p.softmax_scale = scale;
  p.softcap = softcap;
  std::tie(cos_u, sin_u) =
      fill_rope_tables(p.rope, cos, sin, pos, rows_b, rows_s, q4.size(3), interleaved);
  return p;
}

at::Tensor maybe_cu_seqlens(const char* op, const std::optional<at::Tensor>& cu_seqlens,
                            const at::Tensor& q) {
  if (!cu_seqlens.has_value() || !cu_seqlens->defined()) return {};
  return check_cu_seqlens(op, *cu_seqlens, q);
}

}  // namespace

AttentionTensor tensor_args(const at::Tensor& t) {
  return {const_cast<void*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

std::tuple<at::Tensor, at::Tensor> rope_attention_run(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids, bool causal,
    double softmax_scale, bool interleaved, const std::optional<at::Tensor>& cu_seqlens,
    int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& sinks, AttentionLauncher launch) {
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  check_qkv(kFwd, q, k, v, packed);
  const at::Tensor cu = maybe_cu_seqlens(kFwd, cu_seqlens, q);  // backs p.cu_seqlens
  at::Tensor cos_u, sin_u, restart;
  AttentionParams p = plan(kFwd, q, k, cos, sin, position_ids, causal, softmax_scale,
                           interleaved, cu, window_left, window_right, softcap, cos_u, sin_u, restart);
  at::Tensor sinks_u;  // backs p.sinks
  if (sinks.has_value() && sinks->defined()) {
    sinks_u = check_sinks(kFwd, *sinks, q, p.heads_q);
    p.sinks = sinks_u.const_data_ptr();
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto lse_options = q.options().dtype(math_dtype(q.scalar_type()));
  // (batch, heads_q, seqlen), or (heads_q, total) for packed sequences
  at::Tensor lse = packed ? at::empty({p.heads_q, q.size(0)}, lse_options)
                          : at::empty({p.batch, p.heads_q, p.seqlen}, lse_options);
  if (out.numel() == 0) return {out, lse};

  const at::Tensor q_u = unit_last_stride(as_4d(q)), k_u = unit_last_stride(as_4d(k)),
                   v_u = unit_last_stride(as_4d(v));
  p.q = tensor_args(q_u);
  p.k = tensor_args(k_u);
  p.v = tensor_args(v_u);
  p.out = tensor_args(as_4d(out));
  p.lse = lse.data_ptr();
  launch(p, q.scalar_type(), cos.scalar_type(), q.device());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_backward_run(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& position_ids, bool causal, double softmax_scale,
    bool interleaved, bool deterministic, const std::optional<at::Tensor>& cu_seqlens,
    int64_t window_left, int64_t window_right, double softcap, AttentionLauncher launch) {
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  check_qkv(kBwd, q, k, v, packed);
  check_like_q(kBwd, "grad_out", grad_out, q);
  check_like_q(kBwd, "out", out, q);
  TORCH_CHECK(lse.defined(), kBwd, ": lse must be a tensor, got None");
  const at::ScalarType lse_dtype = math_dtype(q.scalar_type());
  if (packed) {
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), kBwd,
                ": with cu_seqlens lse must be (nheads_q, total) = (", q.size(1), ", ",
                q.size(0), "), got shape ", lse.sizes());
  } else {
    TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) &&
                    lse.size(2) == q.size(1),
                kBwd, ": lse must be (batch, nheads_q, seqlen) = (", q.size(0), ", ",
                q.size(2), ", ", q.size(1), "), got shape ", lse.sizes());
  }
  TORCH_CHECK(lse.scalar_type() == lse_dtype, kBwd, ": lse must be ", lse_dtype,
              " (the forward's), got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), kBwd, ": lse must be on ", q.device(),
              " like q, got ", lse.device());
  const at::Tensor cu = maybe_cu_seqlens(kBwd, cu_seqlens, q);  // backs p.cu_seqlens
  at::Tensor cos_u, sin_u, restart;
  AttentionParams p = plan(kBwd, q, k, cos, sin, position_ids, causal, softmax_scale,
                           interleaved, cu, window_left, window_right, softcap, cos_u, sin_u, restart);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0) {  // no query: no gradient flows (k, v may still be non-empty)
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor q_u = unit_last_stride(as_4d(q)), k_u = unit_last_stride(as_4d(k)),
                   v_u = unit_last_stride(as_4d(v)), o_u = unit_last_stride(as_4d(out)),
                   g_u = unit_last_stride(as_4d(grad_out)), lse_c = lse.contiguous();
  p.q = tensor_args(q_u);
  p.k = tensor_args(k_u);
  p.v = tensor_args(v_u);
  p.out = tensor_args(o_u);
  p.grad_out = tensor_args(g_u);
  p.dq = tensor_args(as_4d(dq));
  p.dk = tensor_args(as_4d(dk));
  p.dv = tensor_args(as_4d(dv));
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
    std::optional<double> softmax_scale, bool interleaved, bool deterministic,
    const std::optional<at::Tensor>& cu_seqlens, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& sinks) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pirope::rope_attention", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, bool, double, bool, bool,
              const std::optional<at::Tensor>&, int64_t, int64_t, double,
              const std::optional<at::Tensor>&)>();
  return op.call(q, k, v, cos, sin, position_ids, causal, default_scale(q, softmax_scale),
                 interleaved, deterministic, cu_seqlens, window_left, window_right, softcap, sinks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& position_ids, bool causal,
    std::optional<double> softmax_scale, bool interleaved, bool deterministic,
    const std::optional<at::Tensor>& cu_seqlens, int64_t window_left, int64_t window_right,
    double softcap) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pirope::rope_attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, bool, double, bool, bool,
              const std::optional<at::Tensor>&, int64_t, int64_t, double)>();
  return op.call(grad_out, q, k, v, out, lse, cos, sin, position_ids, causal,
                 default_scale(q, softmax_scale), interleaved, deterministic, cu_seqlens,
                 window_left, window_right, softcap);
}

}  // namespace pirope
