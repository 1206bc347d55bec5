// CUDA forward of rope_attention: dispatch to the tensor-core kernel of the dtype and
// head dim (rope_attention_fwd.cuh, one instantiation per rope_attention_fwd_*.cu),
// and registration of both CUDA ops (the backward is rope_attention_backward_kernel.cpp).
// Calls the kernels do not take (float32/64, other head dims) are routed by the Python
// wrapper to apply_rope_qk + torch SDPA; called directly, they raise. Inputs whose rows
// are not 16-byte aligned are copied first (align16), so any layout works.
#include <cstdlib>
#include <cstring>
#include <string>

#include "../rope_attention.h"
#include "rope_attention_dispatch.h"
#include "rope_attention_launch.h"

namespace pirope::cuda {
namespace {

bool aligned_rows(const AttentionTensor& t) {
  return reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && t.stride_b % 8 == 0 &&
         t.stride_s % 8 == 0 && t.stride_h % 8 == 0;
}

// q, k, v, out or grad_out as the kernels need them: rows 16-byte aligned (pointer and
// strides), last dim contiguous; anything else is copied (rare: odd views).
at::Tensor align16(const at::Tensor& t) {
  if (!t.defined() || t.dim() != 4 || t.numel() == 0 || !t.is_cuda()) return t;
  const int64_t item = static_cast<int64_t>(t.element_size());
  const bool ok = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.stride(3) == 1 &&
                  (t.stride(0) * item) % 16 == 0 && (t.stride(1) * item) % 16 == 0 &&
                  (t.stride(2) * item) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

}  // namespace

void check_supported(const char* op, const AttentionParams& p, at::ScalarType dtype,
                     at::ScalarType table_dtype) {
  const int64_t r = p.rope.rotary_dim;
  const bool rot_ok = p.rope.interleaved ? r % 8 == 0 : r % 16 == 0;
  bool aligned = aligned_rows(p.q) && aligned_rows(p.k) && aligned_rows(p.v) && aligned_rows(p.out);
  if (p.grad_out.ptr != nullptr) aligned = aligned && aligned_rows(p.grad_out);
  TORCH_CHECK((dtype == at::kHalf || dtype == at::kBFloat16) && table_dtype == at::kFloat &&
                  (p.head_dim == 64 || p.head_dim == 128) && rot_ok && aligned,
              op, ": the CUDA kernel supports float16/bfloat16 tensors with head dim 64 or 128, "
              "float32 tables, 16-byte aligned rows and rotary_dim a multiple of 16 (8 "
              "interleaved); got dtype ", dtype, ", head dim ", p.head_dim, ", rotary_dim ", r,
              ". pirope.rope_attention falls back to apply_rope_qk + SDPA for these.");
  TORCH_CHECK(p.seqlen <= int64_t{65535} * 64 && p.heads_q <= 65535 && p.batch <= 65535, op,
              ": CUDA grid limits exceeded (seqlen <= 4194240, heads and batch <= 65535)");
}

namespace {

// A rotated copy (batch, seqlen, heads, head_dim) of t, by the rope tables of p.
at::Tensor rotated_copy(const AttentionParams& p, const AttentionTensor& t, int64_t heads, at::ScalarType dtype,
                        at::ScalarType table_dtype, c10::Device device) {
  at::Tensor out = at::empty({p.batch, p.seqlen, heads, p.head_dim}, at::TensorOptions().dtype(dtype).device(device));
  RopeParams rp = p.rope;
  rp.ntensors = 1;
  rp.conjugate = false;
  rp.copy_tail = true;
  rp.t[0] = RopeTensorArgs{t.ptr, out.data_ptr(), t.stride_b, t.stride_s, t.stride_h,
                           out.stride(0), out.stride(1), out.stride(2), heads};
  launch_rope_cuda(rp, dtype, table_dtype, device);
  return out;
}

}  // namespace

PrerotatedQK maybe_prerotate(AttentionParams& p, bool with_q, at::ScalarType dtype, at::ScalarType table_dtype,
                             c10::Device device) {
  const char* env = std::getenv("PIROPE_ATTENTION_K_PREPASS");
  const bool want = env != nullptr ? std::strcmp(env, "0") != 0 : p.seqlen > 64;
  if (!want) return {};
  PrerotatedQK out;
  out.k = rotated_copy(p, p.k, p.heads_kv, dtype, table_dtype, device);
  p.k = tensor_args(out.k);
  p.k_prerotated = true;
  if (with_q) {
    out.q = rotated_copy(p, p.q, p.heads_q, dtype, table_dtype, device);
    p.q = tensor_args(out.q);
    p.q_prerotated = true;
  }
  return out;
}

namespace {

// PIROPE_ATTENTION_SM90: unset, empty or "1" (the wgmma kernels), "0" (the mma.sync
// kernels), "ws" / "ws_fwd" / "ws_bwd" (the warp-specialised TMA kernels, both directions
// or one). Anything else is an error, not a silent default.
struct Sm90Choice {
  bool on = true, ws_fwd = false, ws_bwd = false;
};
Sm90Choice sm90_choice() {
  const char* env = std::getenv("PIROPE_ATTENTION_SM90");
  const std::string v = env != nullptr ? env : "";
  const bool ws = v == "ws";
  TORCH_CHECK(v.empty() || v == "0" || v == "1" || ws || v == "ws_fwd" || v == "ws_bwd",
              "rope_attention: PIROPE_ATTENTION_SM90 must be 0, 1, ws, ws_fwd or ws_bwd, got '", v, "'");
  return Sm90Choice{v != "0", ws || v == "ws_fwd", ws || v == "ws_bwd"};
}

}  // namespace

bool ws_dq_atomics() {
  const char* env = std::getenv("PIROPE_WS_DQ");
  const std::string v = env != nullptr ? env : "";
  TORCH_CHECK(v.empty() || v == "tma" || v == "atomic",
              "rope_attention_backward: PIROPE_WS_DQ must be tma or atomic, got '", v, "'");
  return v == "atomic";
}

bool use_sm90_kernels(const AttentionParams& p, bool backward) {
  const Sm90Choice choice = sm90_choice();  // checked on every build and device
  if (backward) (void)ws_dq_atomics();      // likewise
#ifdef PIROPE_CUDA_SM90A
  if (!choice.on || !p.k_prerotated || (backward && !p.q_prerotated)) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
#else
  (void)choice;
  (void)p;
  (void)backward;
  return false;
#endif
}

bool use_sm90_ws_kernels(bool backward) {
  const Sm90Choice choice = sm90_choice();
  return backward ? choice.ws_bwd : choice.ws_fwd;
}

// Defined in rope_attention_backward_kernel.cpp.
void launch_rope_attention_bwd_cuda(const AttentionParams& p, at::ScalarType dtype,
                                    at::ScalarType table_dtype, c10::Device device);

namespace {

void launch_rope_attention_fwd_cuda(const AttentionParams& params, at::ScalarType dtype,
                                    at::ScalarType table_dtype, c10::Device device) {
  dispatch_rope_attention("rope_attention", /*backward=*/false, params, dtype, table_dtype, device,
                          [](auto cfg, const AttentionParams& p, cudaStream_t stream) {
                            using C = decltype(cfg);
                            launch_rope_attention_fwd<typename C::scalar_t, C::head_dim>(p, stream);
                          });
}

}  // namespace

TORCH_LIBRARY_IMPL(pirope, CUDA, m) {
  register_rope_attention_kernels<launch_rope_attention_fwd_cuda, launch_rope_attention_bwd_cuda, align16>(m);
}

}  // namespace pirope::cuda
