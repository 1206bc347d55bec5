// apply_rope / apply_rope_qk: argument validation (shared by CPU and CUDA), layout
// planning, and the C++ API that calls the dispatcher.
#include "apply_rope.h"

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/isin.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/zeros.h>

#include "ops.h"

namespace pirope {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// x, q, k: (batch, seqlen, nheads, headdim) or packed (total_tokens, nheads, headdim).
void check_input(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(x.dim() == 4 || x.dim() == 3, op, ": ", name,
              " must be (batch, seqlen, nheads, headdim) or packed (total_tokens, "
              "nheads, headdim), got shape ",
              x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

}  // namespace

at::Tensor as_4d(const at::Tensor& x) { return x.dim() == 3 ? x.unsqueeze(0) : x; }

void check_tables(const char* op, const at::Tensor& x, const at::Tensor& cos,
                  const at::Tensor& sin) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos},
                                {"sin", sin}}) {
    TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
    TORCH_CHECK(t.dim() == 2, op, ": ", name,
                " must be (max_positions, rotary_dim // 2), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
                ": ", name, " must be float32 (or float64), got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
                " like the input, got ", t.device());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), op,
              ": cos and sin must have the same shape, got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), op,
              ": cos and sin must have the same dtype, got ", cos.scalar_type(),
              " and ", sin.scalar_type());
  const int64_t head_dim = x.size(-1);
  TORCH_CHECK(2 * cos.size(1) <= head_dim, op, ": rotary_dim = 2 * cos.size(1) = ",
              2 * cos.size(1), " exceeds the head dim ", head_dim);
}

// position_ids: (seqlen,), (batch, seqlen) or (1, seqlen) for 4-D input; (total,)
// for packed input. Returns it expanded to (batch, seqlen) (a view, may have stride 0).
at::Tensor plan_positions(const char* op, const at::Tensor& x,
                          const at::Tensor& pos, int64_t batch, int64_t seqlen) {
  TORCH_CHECK(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt, op,
              ": position_ids must be int32 or int64, got ", pos.scalar_type());
  TORCH_CHECK(pos.device() == x.device(), op, ": position_ids must be on ",
              x.device(), " like the input, got ", pos.device());
  if (x.dim() == 3) {
    TORCH_CHECK(pos.dim() == 1 && pos.size(0) == seqlen, op,
                ": for packed input (total_tokens, nheads, headdim) position_ids must "
                "be (total_tokens,) = (",
                seqlen, ",), got shape ", pos.sizes());
    return pos.unsqueeze(0);
  }
  const bool ok = (pos.dim() == 1 && pos.size(0) == seqlen) ||
                  (pos.dim() == 2 && pos.size(1) == seqlen &&
                   (pos.size(0) == batch || pos.size(0) == 1));
  TORCH_CHECK(ok, op, ": position_ids must be (seqlen,) = (", seqlen,
              ",) or (batch, seqlen) = (", batch, ", ", seqlen, "), got shape ",
              pos.sizes());
  return pos.expand({batch, seqlen});
}

void check_positions_in_range(const char* op, const std::optional<at::Tensor>& pos,
                              int64_t seqlen, int64_t max_positions) {
  if (pos) {
    auto [lo, hi] = at::aminmax(*pos);
    const int64_t mn = lo.item<int64_t>(), mx = hi.item<int64_t>();
    TORCH_CHECK_INDEX(mn >= 0 && mx < max_positions, op,
                      ": position_ids must be in [0, ", max_positions,
                      ") (the rows of cos/sin), got values in [", mn, ", ", mx, "]");
  } else {
    TORCH_CHECK_INDEX(seqlen <= max_positions, op,
                      ": position_ids is None, so positions run 0..", seqlen - 1,
                      ", but cos/sin have only ", max_positions, " rows");
  }
}

namespace {

void fill_tensor_args(RopeTensorArgs& a, const at::Tensor& in4, const at::Tensor& out4) {
  a.in = in4.const_data_ptr();
  a.out = out4.data_ptr();
  a.in_stride_b = in4.stride(0);
  a.in_stride_s = in4.stride(1);
  a.in_stride_h = in4.stride(2);
  a.out_stride_b = out4.stride(0);
  a.out_stride_s = out4.stride(1);
  a.out_stride_h = out4.stride(2);
  a.heads = in4.size(2);
}


// Element offsets (in the shared storage) at which the rows of a view start; the rows
// are its last dim (a.size(-1) long, unit stride), every other dim indexes rows (4-D
// for the ops; more under torch.func.vmap, whose physical tensors add the vmapped dims).
// Computed from sizes and strides only, on the CPU, so it never touches (or
// synchronises with) device memory.
at::Tensor row_starts(const at::Tensor& a) {
  auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor starts = at::zeros({1}, opts) + a.storage_offset();
  for (int64_t d = 0; d + 1 < a.dim(); ++d)
    starts = (starts.view({-1, 1}) + (at::arange(a.size(d), opts) * a.stride(d)).view({1, -1})).flatten();
  return starts;
}

// True when some row of `a` shares an element with some row of `b` (4-D views of one
// storage, unit feature stride): after sorting a's row starts, a row of b overlaps iff
// the nearest a-row starting at or before it reaches it, or the next one starts inside it.
bool rows_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto a_starts = std::get<0>(row_starts(a).sort());
  const auto b_starts = row_starts(b);
  const int64_t n = a_starts.numel();
  auto next = at::searchsorted(a_starts, b_starts, /*out_int32=*/false, /*right=*/true);
  auto prev = (next - 1).clamp_min(0);
  auto reach = (a_starts.index_select(0, prev) + a.size(-1)).gt(b_starts) & (next - 1).ge(0);
  auto inside = a_starts.index_select(0, next.clamp_max(n - 1)).lt(b_starts + b.size(-1)) & next.lt(n);
  return (reach | inside).any().item<bool>();
}

// Storage offsets of every element of a view (sizes and strides only, as row_starts).
at::Tensor element_offsets(const at::Tensor& a) {
  const auto cols = at::arange(a.size(-1), at::TensorOptions().dtype(at::kLong)) * a.stride(-1);
  return (row_starts(a).view({-1, 1}) + cols.view({1, -1})).flatten();
}

bool unit_features(const at::Tensor& a) { return a.size(-1) <= 1 || a.stride(-1) == 1; }

// No two elements of x share memory when, with its dims ordered by stride, every
// stride is at least the span of the smaller ones (any slice or permutation of a dense
// tensor): decided from sizes and strides alone, before the exact comparisons below.
bool strides_separate(const at::Tensor& x) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) > 1) dims.emplace_back(x.stride(d), x.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t span = 1;  // largest offset reached by the smaller dims, plus one
  for (const auto& [stride, size] : dims) {
    if (stride < span) return false;
    span += stride * (size - 1);
  }
  return true;
}

// Rows of a 4-D view (unit feature stride) that form one grid: row r of the
// batch * seqlen rows starts at storage_offset + r * stride, and each row's heads are
// packed (heads * headdim elements from the row start). Returns {stride, rows, width}
// or {0, 0, 0} when the view is not laid out so (then the exact comparison is used).
std::array<int64_t, 3> row_grid(const at::Tensor& a) {
  if (a.dim() != 4) return {0, 0, 0};
  const int64_t b = a.size(0), s = a.size(1), h = a.size(2), d = a.size(3);
  if (!unit_features(a) || (h > 1 && a.stride(2) != d)) return {0, 0, 0};
  int64_t stride = a.stride(1);
  if (s == 1) stride = a.stride(0);
  else if (b > 1 && a.stride(0) != s * a.stride(1)) return {0, 0, 0};
  return {stride, b * s, h * d};
}

// Floor and ceiling of n / d for d > 0 and any sign of n.
int64_t floor_div(int64_t n, int64_t d) { return n >= 0 ? n / d : -((-n + d - 1) / d); }
int64_t ceil_div(int64_t n, int64_t d) { return -floor_div(-n, d); }

// q and k as rows of one grid (same stride g and row count, each row's width within
// the stride, e.g. the q and k slices of a fused qkv projection): element cq of q's
// row i is at oq + i g + cq, element ck of k's row j at ok + j g + ck, so they meet iff
// (i - j) g = delta + ck - cq for delta = ok - oq, i.e. iff some m = i - j in
// [-(rows-1), rows-1] lies in the open interval ((delta - wq) / g, (delta + wk) / g).
// O(1), no allocation.
std::optional<bool> grid_rows_overlap(const at::Tensor& q4, const at::Tensor& k4) {
  const auto [gq, rq, wq] = row_grid(q4);
  const auto [gk, rk, wk] = row_grid(k4);
  if (gq == 0 || gq != gk || rq != rk || wq > gq || wk > gq) return std::nullopt;
  const int64_t delta = k4.storage_offset() - q4.storage_offset();
  const int64_t lo = std::max(floor_div(delta - wq, gq) + 1, -(rq - 1));
  const int64_t hi = std::min(ceil_div(delta + wk, gq) - 1, rq - 1);
  return lo <= hi;
}

// Whether two elements of x share memory (its in-place rotation would be garbage).
// torch answers "too hard" for overlapping layouts other than expanded dims: then the
// rows (or, with a non-unit feature stride, the elements) are compared exactly.
bool shares_elements(const at::Tensor& x) {
  const auto status = at::has_internal_overlap(x);
  if (status != at::MemOverlap::TooHard || x.numel() <= 1) return status == at::MemOverlap::Yes;
  if (strides_separate(x)) return false;
  const at::Tensor x4 = as_4d(x);
  if (unit_features(x4)) {  // rows of size(-1) elements: sorted starts at least a row apart
    const auto starts = std::get<0>(row_starts(x4).sort());
    return starts.numel() > 1 && (starts.slice(0, 1) - starts.slice(0, 0, -1)).lt(x4.size(-1)).any().item<bool>();
  }
  const auto offsets = std::get<0>(element_offsets(x4).sort());
  return (offsets.slice(0, 1) == offsets.slice(0, 0, -1)).any().item<bool>();
}

// Bytes [first, end) of t's storage that its elements can occupy.
std::pair<int64_t, int64_t> byte_extent(const at::Tensor& t) {
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const int64_t item = static_cast<int64_t>(t.element_size());
  return {t.storage_offset() * item, (last + 1) * item};
}

// Whether the memory a and b can occupy meets: by extent in their storage where they share
// one, else by address, for two storages may hold one memory (torch.from_numpy of one array
// twice) where torch's own overlap checks see none. Storages without memory (fake tensors
// under torch.compile, meta) are compared only with themselves.
bool extents_meet(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      a.device() != b.device())
    return false;
  uintptr_t base_a = 0, base_b = 0;
  if (!a.storage().is_alias_of(b.storage())) {
    base_a = reinterpret_cast<uintptr_t>(a.storage().data());
    base_b = reinterpret_cast<uintptr_t>(b.storage().data());
    if (base_a == 0 || base_b == 0) return false;
  }
  const auto [a0, a1] = byte_extent(a);
  const auto [b0, b1] = byte_extent(b);
  return base_a + a0 < base_b + b1 && base_b + b0 < base_a + a1;
}

// q and k rotated in place must not share an element (one would be rotated twice).
void check_disjoint(const char* op, const char* qname, const char* kname, const at::Tensor& q,
                    const at::Tensor& k) {
  // Offsets below count elements: q and k have one dtype (checked before).
  // (Storage-less tensors, e.g. functorch's wrappers, cannot be compared: the in-place
  // path refuses those transforms itself.)
  if (q.numel() == 0 || k.numel() == 0 || !q.has_storage() || !k.has_storage()) return;
  if (!q.storage().is_alias_of(k.storage())) {
    // Two storages may still hold the same memory (torch.from_numpy of one array twice),
    // where torch's overlap checks see nothing: refused where their extents meet.
    TORCH_CHECK(!extents_meet(q, k), op, ": ", qname, " and ", kname,
                " share memory and cannot both be rotated in place");
    return;
  }
  const auto status = at::get_overlap_status(q, k);
  bool overlap = status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  if (status == at::MemOverlapStatus::TooHard) {  // strided views of one storage, e.g. q/k of a fused qkv
    const at::Tensor q4 = as_4d(q), k4 = as_4d(k);
    if (const auto grid = grid_rows_overlap(q4, k4)) {
      overlap = *grid;
    } else {
      overlap = unit_features(q4) && unit_features(k4)
                    ? rows_overlap(q4, k4)
                    : at::isin(element_offsets(k4), element_offsets(q4)).any().item<bool>();
    }
  }
  TORCH_CHECK(!overlap, op, ": ", qname, " and ", kname,
              " share memory and cannot both be rotated in place");
}

// A tensor rotated in place must not share memory with what the kernel reads while it
// writes (the tables, the positions): a row read after it was overwritten would give a
// wrong result without any error. Compared by extent in memory (any layout, any dtype, any
// storage: two storages may hold one numpy array), so a tensor interleaved with a table
// without sharing an element is refused too.
void check_not_read(const char* op, const char* wname, const at::Tensor& w, const char* rname,
                    const at::Tensor& r) {
  TORCH_CHECK(!extents_meet(w, r), op, ": ", wname, " shares memory with ", rname,
              " and cannot be rotated in place (", rname, " would be read after being overwritten)");
}

}  // namespace

void check_inplace_targets(const char* op, const char* qname, const at::Tensor& q,
                           const char* kname, const at::Tensor* k, const at::Tensor& cos,
                           const at::Tensor& sin, const std::optional<at::Tensor>& position_ids) {
  TORCH_CHECK(!shares_elements(q), op, ": ", qname,
              " has elements that share memory (e.g. an expanded tensor) and "
              "cannot be rotated in place");
  if (k) {
    TORCH_CHECK(!shares_elements(*k), op, ": ", kname,
                " has elements that share memory (e.g. an expanded tensor) and "
                "cannot be rotated in place");
    check_disjoint(op, qname, kname, q, *k);
  }
  for (const auto& [wname, w] : {std::pair{qname, &q}, std::pair{kname, k}}) {
    if (w == nullptr) continue;
    check_not_read(op, wname, *w, "cos", cos);
    check_not_read(op, wname, *w, "sin", sin);
    if (position_ids.has_value() && position_ids->defined())
      check_not_read(op, wname, *w, "position_ids", *position_ids);
  }
}

at::Tensor unit_last_stride(const at::Tensor& x) {
  return (x.size(-1) <= 1 || x.stride(-1) == 1) ? x : x.contiguous();
}

std::pair<at::Tensor, at::Tensor> fill_rope_tables(RopeParams& p, const at::Tensor& cos,
                                                   const at::Tensor& sin,
                                                   const std::optional<at::Tensor>& pos,
                                                   int64_t batch, int64_t seqlen,
                                                   int64_t head_dim, bool interleaved) {
  const bool tables_ok = cos.stride(1) == 1 && sin.stride(1) == 1 &&
                         cos.stride(0) == sin.stride(0);
  at::Tensor cos_u = tables_ok ? cos : cos.contiguous();
  at::Tensor sin_u = tables_ok ? sin : sin.contiguous();
  p.batch = batch;
  p.seqlen = seqlen;
  p.head_dim = head_dim;
  p.rotary_dim = 2 * cos.size(1);
  p.cos = cos_u.const_data_ptr();
  p.sin = sin_u.const_data_ptr();
  p.table_stride = cos_u.stride(0);
  p.max_positions = cos.size(0);
  if (pos) {
    p.pos = pos->const_data_ptr();
    p.pos_int64 = pos->scalar_type() == at::kLong;
    p.pos_stride_b = pos->stride(0);
    p.pos_stride_s = pos->stride(1);
  }
  p.interleaved = interleaved;
  return {cos_u, sin_u};
}

std::tuple<at::Tensor, at::Tensor> rope_run(
    const char* op, const at::Tensor& q, const at::Tensor* k, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
    bool interleaved, bool conjugate, bool inplace, RopeLauncher launch) {
  const char* qname = k ? (conjugate ? "grad_q" : "q") : (conjugate ? "grad" : "x");
  const char* kname = conjugate ? "grad_k" : "k";
  check_input(op, qname, q);
  if (k) {
    check_input(op, kname, *k);
    TORCH_CHECK(k->dim() == q.dim(), op, ": ", qname, " and ", kname,
                " must have the same rank, got shapes ", q.sizes(), " and ",
                k->sizes());
    TORCH_CHECK(k->scalar_type() == q.scalar_type(), op, ": ", qname, " and ", kname,
                " must have the same dtype, got ", q.scalar_type(), " and ",
                k->scalar_type());
    TORCH_CHECK(k->device() == q.device(), op, ": ", qname, " and ", kname,
                " must be on the same device, got ", q.device(), " and ",
                k->device());
    const bool same_lead = q.dim() == 4 ? (q.size(0) == k->size(0) &&
                                           q.size(1) == k->size(1))
                                        : q.size(0) == k->size(0);
    TORCH_CHECK(same_lead && q.size(-1) == k->size(-1), op, ": ", qname, " and ",
                kname, " must agree on batch, seqlen and headdim, got shapes ",
                q.sizes(), " and ", k->sizes());
  }
  check_tables(op, q, cos, sin);

  const at::Tensor q4 = as_4d(q);
  const int64_t batch = q4.size(0), seqlen = q4.size(1);
  std::optional<at::Tensor> pos;
  if (position_ids.has_value() && position_ids->defined())
    pos = plan_positions(op, q, *position_ids, batch, seqlen);

  if (inplace) check_inplace_targets(op, qname, q, kname, k, cos, sin, position_ids);

  at::Tensor out_q = inplace ? q : at::empty_like(q);
  at::Tensor out_k = k ? (inplace ? *k : at::empty_like(*k)) : at::Tensor();
  // Positions are checked here on CPU, also for inputs without elements (zero heads:
  // nothing is read, but the call is as wrong as with heads); CUDA kernels turn an
  // out-of-range position into NaN rows instead (a check there would cost a device
  // synchronisation).
  const int64_t max_positions = cos.size(0);
  if (q.device().is_cpu() && batch * seqlen > 0)
    check_positions_in_range(op, pos, seqlen, max_positions);
  if (q.numel() == 0 && (!k || k->numel() == 0)) return {out_q, out_k};

  // Kernels read and write rows with a unit feature stride; other layouts go
  // through a temporary (rare: a view that transposes the feature dim).
  const at::Tensor in_q = unit_last_stride(q);
  const at::Tensor in_k = k ? unit_last_stride(*k) : at::Tensor();
  at::Tensor dst_q = unit_last_stride(out_q);
  at::Tensor dst_k = k ? unit_last_stride(out_k) : at::Tensor();
  if (inplace) {  // a copied input must not be aliased to a copied output
    dst_q = in_q;
    dst_k = in_k;
  }
  RopeParams p;
  p.ntensors = k ? 2 : 1;
  fill_tensor_args(p.t[0], as_4d(in_q), as_4d(dst_q));
  if (k) fill_tensor_args(p.t[1], as_4d(in_k), as_4d(dst_k));
  const auto tables =  // backs p.cos / p.sin until the launch returns
      fill_rope_tables(p, cos, sin, pos, batch, seqlen, q.size(-1), interleaved);
  p.conjugate = conjugate;
  p.copy_tail = !inplace;
  launch(p, q.scalar_type(), cos.scalar_type(), q.device());

  // Copy back where a temporary stood in for the real destination.
  if (!dst_q.is_same(out_q)) out_q.copy_(dst_q);
  if (k && !dst_k.is_same(out_k)) out_k.copy_(dst_k);
  return {out_q, out_k};
}

// ---- C++ API: calls through the dispatcher, so autograd/CPU/CUDA all apply. ----

namespace {
c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}
}  // namespace

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& position_ids, bool interleaved) {
  static auto op = op_handle("pirope::apply_rope")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&,
                                         const std::optional<at::Tensor>&, bool)>();
  return op.call(x, cos, sin, position_ids, interleaved);
}

at::Tensor apply_rope_backward(const at::Tensor& grad, const at::Tensor& cos,
                               const at::Tensor& sin,
                               const std::optional<at::Tensor>& position_ids,
                               bool interleaved) {
  static auto op = op_handle("pirope::apply_rope_backward")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&,
                                         const std::optional<at::Tensor>&, bool)>();
  return op.call(grad, cos, sin, position_ids, interleaved);
}

std::tuple<at::Tensor, at::Tensor> apply_rope_qk(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
    bool interleaved) {
  static auto op =
      op_handle("pirope::apply_rope_qk")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  return op.call(q, k, cos, sin, position_ids, interleaved);
}

std::tuple<at::Tensor, at::Tensor> apply_rope_qk_backward(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
    bool interleaved) {
  static auto op =
      op_handle("pirope::apply_rope_qk_backward")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  return op.call(grad_q, grad_k, cos, sin, position_ids, interleaved);
}

void apply_rope_qk_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                    const at::Tensor& sin,
                    const std::optional<at::Tensor>& position_ids, bool interleaved) {
  static auto op = op_handle("pirope::apply_rope_qk_")
                       .typed<void(const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, bool)>();
  op.call(q, k, cos, sin, position_ids, interleaved);
}

}  // namespace pirope
