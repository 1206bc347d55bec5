// CUDA forward of rope_attention: FlashAttention-2-style tiled attention on tensor
// cores (mma.sync m16n8k16, sm_80+) with the rotary embedding applied to q and k
// tiles as they are loaded into shared memory.
//
// Block = 4 warps = 64 query rows of one (batch, q-head); each warp owns 16 rows.
// For every 64-key tile: S = Q K^T (fp32 accumulators), online softmax in the log2
// domain, O += P V with P re-packed from the S accumulators as the A operand.
// Supported: float16/bfloat16, head_dim 64 or 128, 16-byte aligned rows, rotary
// layouts whose chunks are 8-element aligned. Anything else is rejected here and
// routed by the Python wrapper to apply_rope_qk + torch SDPA.
//
// STATUS: compile-checked for sm_80/sm_90 only; not yet run on a GPU. The Python
// wrapper uses it only when PIROPE_CUDA_ATTENTION=1 until benchmarks/gpu_check.sh
// has verified it (it sets that variable for its test run).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "../rope_attention.h"
#include "../rope_math.h"

namespace pirope::cuda {
namespace {

constexpr int kBlockM = 64;   // query rows per block (16 per warp)
constexpr int kBlockN = 64;   // keys per tile
constexpr int kThreads = 128;
constexpr int kPad = 8;       // smem row padding (elements) against bank conflicts

// The mma.sync m16n8k16 tensor-core product with float32 accumulators, and the packing
// of two floats into one 16-bit-pair operand register, for T = float16 or bfloat16.
#define PIROPE_MMA_16816(TY)                                                              \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY                        \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"           \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T>
struct Mma {
  static constexpr bool kHalf = std::is_same_v<T, at::Half>;
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    uint32_t r;
    if constexpr (kHalf) {
      __half2 h = __floats2half2_rn(x, y);
      r = *reinterpret_cast<uint32_t*>(&h);
    } else {
      __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
      r = *reinterpret_cast<uint32_t*>(&h);
    }
    return r;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    if constexpr (kHalf) {
      PIROPE_MMA_16816("f16");
    } else {
      PIROPE_MMA_16816("bf16");
    }
  }
};

// Two 16-bit elements packed into one 32-bit mma operand register (lo = lower index).
template <typename T>
__device__ __forceinline__ uint32_t pack_raw(const T& lo, const T& hi) {
  return static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(lo)) |
         (static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(hi)) << 16);
}

// 8 elements (16 bytes) of a row, as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = static_cast<float>(e[j]);
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int j = 0; j < 8; ++j) e[j] = static_cast<T>(v[j]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Loads rows [row0, row0 + kBlockM) of one head of `t` into smem (row stride kD +
// kPad), rotated by the rows' positions when `rotate`; rows past seqlen are zero and
// a row whose position is out of range is NaN (so the error cannot pass unseen).
// Work unit: a 16-byte chunk; in the half layout a unit is the chunk pair (c, c + half).
template <typename T, int kD>
__device__ void load_tile(T* smem, const AttentionTensor& t, const AttentionParams& p, int64_t b,
                          int64_t h, int64_t row0, bool rotate) {
  const RopeParams& rp = p.rope;
  const int64_t half = rp.rotary_dim / 2;
  const int rot_units = rotate ? (rp.interleaved ? rp.rotary_dim / 8 : half / 8) : 0;
  const int rot_elems = rotate ? static_cast<int>(rp.rotary_dim) : 0;
  const int copy_units = (kD - rot_elems) / 8;
  const int units = rot_units + copy_units;
  const float* cos_t = static_cast<const float*>(rp.cos);
  const float* sin_t = static_cast<const float*>(rp.sin);
  for (int u = threadIdx.x; u < kBlockM * units; u += kThreads) {
    const int r = u / units, c = u % units;
    const int64_t s = row0 + r;
    T* dst = smem + r * (kD + kPad);
    if (s >= p.seqlen) {  // padding rows
      float z[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (c < rot_units && !rp.interleaved) store8(dst + (c * 8 + half), z);
      store8(dst + (c < rot_units ? c * 8 : rot_elems + (c - rot_units) * 8), z);
      continue;
    }
    const T* src = static_cast<const T*>(t.ptr) + b * t.stride_b + s * t.stride_s + h * t.stride_h;
    if (c >= rot_units) {  // pass-through features, or no rotation at all (v)
      const int e = rot_elems + (c - rot_units) * 8;
      float v[8];
      load8(src + e, v);
      store8(dst + e, v);
      continue;
    }
    const int64_t pos = token_position(rp, b, s);
    const float* cr = cos_t + (pos < 0 ? 0 : pos) * rp.table_stride;
    const float* sr = sin_t + (pos < 0 ? 0 : pos) * rp.table_stride;
    const float nan = NAN;
    if (rp.interleaved) {  // 8 elements = 4 pairs (2i, 2i+1), i = 4c..4c+3
      float v[8];
      load8(src + c * 8, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float o1, o2;
        rotate_pair<float>(v[2 * j], v[2 * j + 1], cr[4 * c + j], sr[4 * c + j], o1, o2);
        v[2 * j] = pos < 0 ? nan : o1;
        v[2 * j + 1] = pos < 0 ? nan : o2;
      }
      store8(dst + c * 8, v);
    } else {  // pairs (i, i + half), i = 8c..8c+7
      float x1[8], x2[8];
      load8(src + c * 8, x1);
      load8(src + half + c * 8, x2);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float o1, o2;
        rotate_pair<float>(x1[j], x2[j], cr[8 * c + j], sr[8 * c + j], o1, o2);
        x1[j] = pos < 0 ? nan : o1;
        x2[j] = pos < 0 ? nan : o2;
      }
      store8(dst + c * 8, x1);
      store8(dst + half + c * 8, x2);
    }
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) rope_attention_fwd_kernel(const AttentionParams p) {
  using M = Mma<T>;
  constexpr int kLd = kD + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + kBlockM * kLd;
  T* v_s = k_s + kBlockN * kLd;

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t hq = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = hq / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;  // mma fragment coordinates
  const float scale_log2 = static_cast<float>(p.softmax_scale) * 1.4426950408889634f;

  load_tile<T, kD>(q_s, p.q, p, b, hq, m0, true);

  float o[kD / 8][4];
#pragma unroll
  for (int j = 0; j < kD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int64_t rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  const int64_t n_end = p.causal ? std::min<int64_t>(p.seqlen, m0 + kBlockM) : p.seqlen;
  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    __syncthreads();  // previous tile fully consumed
    load_tile<T, kD>(k_s, p.k, p, b, hk, n0, true);
    load_tile<T, kD>(v_s, p.v, p, b, hk, n0, false);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys (8 n-tiles of 8 keys).
    float s[kBlockN / 8][4];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    const T* qw = q_s + (warp * 16) * kLd;
#pragma unroll
    for (int k0 = 0; k0 < kD; k0 += 16) {
      uint32_t a[4];
      a[0] = *reinterpret_cast<const uint32_t*>(qw + g * kLd + k0 + 2 * tq);
      a[1] = *reinterpret_cast<const uint32_t*>(qw + (g + 8) * kLd + k0 + 2 * tq);
      a[2] = *reinterpret_cast<const uint32_t*>(qw + g * kLd + k0 + 8 + 2 * tq);
      a[3] = *reinterpret_cast<const uint32_t*>(qw + (g + 8) * kLd + k0 + 8 + 2 * tq);
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        const T* kr = k_s + (8 * j + g) * kLd + k0 + 2 * tq;
        M::mma(s[j], a, *reinterpret_cast<const uint32_t*>(kr),
               *reinterpret_cast<const uint32_t*>(kr + 8));
      }
    }

    // Scale into the log2 domain, mask, and update the running max / sum per row.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = n0 + 8 * j + 2 * tq + (e & 1);
        const int64_t row = rows[e >> 1];
        const bool masked = key >= p.seqlen || (p.causal && key > row);
        s[j][e] = masked ? -INFINITY : s[j][e] * scale_log2;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
      }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 threads of a quad share a row
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      // A row with no visible key yet keeps max -inf: use 0 so exp2 gives 0, not NaN.
      const float safe = new_max == -INFINITY ? 0.f : new_max;
      corr[r] = exp2f(row_max[r] - safe);
      row_max[r] = new_max;
      row_sum[r] *= corr[r];
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - safe);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - safe);
        row_sum[r] += s[j][2 * r] + s[j][2 * r + 1];
      }
    }
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      o[j][0] *= corr[0];
      o[j][1] *= corr[0];
      o[j][2] *= corr[1];
      o[j][3] *= corr[1];
    }

    // O += P V: the S accumulators of n-tiles 2m and 2m+1 form the A operand of
    // key chunk m (16 keys); V (row-major keys x dims) gives the B operand.
#pragma unroll
    for (int m = 0; m < kBlockN / 16; ++m) {
      uint32_t a[4];
      a[0] = M::pack(s[2 * m][0], s[2 * m][1]);
      a[1] = M::pack(s[2 * m][2], s[2 * m][3]);
      a[2] = M::pack(s[2 * m + 1][0], s[2 * m + 1][1]);
      a[3] = M::pack(s[2 * m + 1][2], s[2 * m + 1][3]);
      const T* v0 = v_s + (16 * m + 2 * tq) * kLd;
#pragma unroll
      for (int jd = 0; jd < kD / 8; ++jd) {
        const int col = 8 * jd + g;
        M::mma(o[jd], a, pack_raw(v0[col], v0[kLd + col]),
               pack_raw(v0[8 * kLd + col], v0[9 * kLd + col]));
      }
    }
  }

  // Epilogue: normalise, write O and the natural-log log-sum-exp of each row.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = rows[r];
    if (row >= p.seqlen) continue;
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    T* dst = static_cast<T*>(p.out.ptr) + b * p.out.stride_b + row * p.out.stride_s + hq * p.out.stride_h;
#pragma unroll
    for (int jd = 0; jd < kD / 8; ++jd) {
      dst[8 * jd + 2 * tq] = static_cast<T>(o[jd][2 * r] * inv);
      dst[8 * jd + 2 * tq + 1] = static_cast<T>(o[jd][2 * r + 1] * inv);
    }
    if (tq == 0) {
      float* lse = static_cast<float*>(p.lse) + (b * p.heads_q + hq) * p.seqlen + row;
      *lse = (row_max[r] + log2f(row_sum[r])) * 0.6931471805599453f;
    }
  }
}

bool aligned_rows(const AttentionTensor& t) {
  return reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && t.stride_b % 8 == 0 &&
         t.stride_s % 8 == 0 && t.stride_h % 8 == 0;
}

template <typename T, int kD>
void launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(kBlockM + 2 * kBlockN) * (kD + kPad) * sizeof(T);
  auto kernel = rope_attention_fwd_kernel<T, kD>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((p.seqlen + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which calls the tensor-core kernel handles (python/pirope/rope_attention.py applies
// the same rule before choosing this kernel).
bool supported(const AttentionParams& p, at::ScalarType dtype, at::ScalarType table_dtype) {
  const int64_t r = p.rope.rotary_dim;
  const bool rot_ok = p.rope.interleaved ? r % 8 == 0 : r % 16 == 0;
  return (dtype == at::kHalf || dtype == at::kBFloat16) && table_dtype == at::kFloat &&
         (p.head_dim == 64 || p.head_dim == 128) && rot_ok && aligned_rows(p.q) &&
         aligned_rows(p.k) && aligned_rows(p.v) && aligned_rows(p.out);
}

void launch_rope_attention_fwd_cuda(const AttentionParams& p, at::ScalarType dtype,
                                    at::ScalarType table_dtype, c10::Device device) {
  TORCH_CHECK(supported(p, dtype, table_dtype),
              "rope_attention: the CUDA kernel supports float16/bfloat16 q/k/v with head dim "
              "64 or 128, float32 tables, 16-byte aligned rows and rotary_dim a multiple of 16 "
              "(8 interleaved); got dtype ", dtype, ", head dim ", p.head_dim, ", rotary_dim ",
              p.rope.rotary_dim, ". pirope.rope_attention falls back to apply_rope_qk + SDPA "
              "for these.");
  TORCH_CHECK(p.seqlen <= int64_t{65535} * kBlockM && p.heads_q <= 65535 && p.batch <= 65535,
              "rope_attention: CUDA grid limits exceeded");
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  if (dtype == at::kHalf) {
    p.head_dim == 64 ? launch_fwd<at::Half, 64>(p, stream) : launch_fwd<at::Half, 128>(p, stream);
  } else {
    p.head_dim == 64 ? launch_fwd<at::BFloat16, 64>(p, stream)
                     : launch_fwd<at::BFloat16, 128>(p, stream);
  }
}

}  // namespace

// Forward only: the CUDA backward kernel is its own issue. Until it lands, the Python
// wrapper takes this kernel only for calls that need no gradient.
TORCH_LIBRARY_IMPL(pirope, CUDA, m) {
  m.impl("rope_attention", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cos, const at::Tensor& sin,
                              const std::optional<at::Tensor>& pos, bool causal, double scale,
                              bool interleaved) {
    return rope_attention_run(q, k, v, cos, sin, pos, causal, scale, interleaved,
                              launch_rope_attention_fwd_cuda);
  });
}

}  // namespace pirope::cuda
