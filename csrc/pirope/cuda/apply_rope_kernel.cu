// CUDA kernel of apply_rope / apply_rope_qk (and their backward and in-place forms).
//
// One block per token (batch x seqlen); its threads stride over (tensor, head, chunk)
// work items, so q and k are rotated in one launch. A chunk is 16 bytes of a head
// row when every pointer and stride allows 16-byte accesses (kAligned), else one
// pair (or, in the pass-through tail, up to kVec single elements). cos/sin are read
// in their own dtype (float32, or float64) and all math is in at::opmath_type.
// An out-of-range position turns the token's rows into NaN: checking it on the host
// would cost a device synchronisation, and NaN cannot pass unseen.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "../apply_rope.h"
#include "../rope_math.h"

namespace pirope::cuda {
namespace {

// N contiguous elements; one 16-byte access when kAligned.
template <int N, bool kAligned, typename T>
__device__ __forceinline__ void load_n(const T* p, T (&v)[N]) {
  if constexpr (kAligned) {
    // Through uint4, not a struct of T: copying a struct of c10::BFloat16/Half
    // compiles to N 2-byte loads (measured on H200: bfloat16 ran at 27% of the copy
    // floor while float32, whose struct copy vectorises, ran at 90%).
    static_assert(sizeof(T) * N == 16, "the aligned path moves 16-byte chunks");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    memcpy(v, w, 16);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = p[j];
  }
}
template <int N, bool kAligned, typename T>
__device__ __forceinline__ void store_n(T* p, const T (&v)[N]) {
  if constexpr (kAligned) {
    static_assert(sizeof(T) * N == 16, "the aligned path moves 16-byte chunks");
    uint32_t w[4];
    memcpy(w, v, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = v[j];
  }
}

// n consecutive cos (or sin) values of a table row, widened to the math type. Float32
// tables in the aligned kernel are read 16 bytes at a time (launch_typed checks their
// alignment); every head of a token reads the same row, so these hit L1.
template <int N, bool kAligned, typename table_t, typename acc_t>
__device__ __forceinline__ void load_table(const table_t* p, acc_t (&v)[N]) {
  if constexpr (kAligned && std::is_same_v<table_t, float> && N % 4 == 0) {
#pragma unroll
    for (int j = 0; j < N; j += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + j);
      v[j] = f.x;
      v[j + 1] = f.y;
      v[j + 2] = f.z;
      v[j + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = static_cast<acc_t>(p[j]);
  }
}

// kVec: elements per 16-byte chunk when aligned. Per item, the half layout rotates
// kPairs = kVec pairs (kVec elements at i and at i + half); the interleaved layout
// rotates kVec / 2 pairs (kVec contiguous elements). Unaligned: one pair per item.
template <typename T, typename table_t, int kVec, bool kAligned, bool kInterleaved>
__global__ void rope_kernel(const RopeParams p, int64_t rot_items, int64_t tail_items) {
  using acc_t = at::opmath_type<T>;
  constexpr int kN = kAligned ? kVec : (kInterleaved ? 2 : 1);  // elements per access
  constexpr int kPairs = kInterleaved ? kN / 2 : kN;

  const int64_t tok = blockIdx.x;
  const int64_t b = tok / p.seqlen, s = tok % p.seqlen;
  const int64_t pos = token_position(p, b, s);
  const acc_t nan = static_cast<acc_t>(NAN);
  const int64_t half = p.rotary_dim / 2;
  const int64_t per_head = rot_items + tail_items;
  const int64_t total = (p.t[0].heads + (p.ntensors > 1 ? p.t[1].heads : 0)) * per_head;
  const table_t* crow = static_cast<const table_t*>(p.cos) + (pos < 0 ? 0 : pos) * p.table_stride;
  const table_t* srow = static_cast<const table_t*>(p.sin) + (pos < 0 ? 0 : pos) * p.table_stride;

  for (int64_t item = threadIdx.x; item < total; item += blockDim.x) {
    int64_t hh = item / per_head;
    const int64_t c = item - hh * per_head;
    const int t = hh < p.t[0].heads ? 0 : 1;
    if (t == 1) hh -= p.t[0].heads;
    const RopeTensorArgs& a = p.t[t];
    const T* in = static_cast<const T*>(a.in) + b * a.in_stride_b + s * a.in_stride_s + hh * a.in_stride_h;
    T* out = static_cast<T*>(a.out) + b * a.out_stride_b + s * a.out_stride_s + hh * a.out_stride_h;

    if (c < rot_items) {
      const int64_t i0 = c * kPairs;  // first pair of this item
      T x1[kN], x2[kN];
      if constexpr (kInterleaved) {
        load_n<kN, kAligned>(in + 2 * i0, x1);  // x1 holds both halves of each pair
      } else {
        load_n<kN, kAligned>(in + i0, x1);
        load_n<kN, kAligned>(in + half + i0, x2);
      }
      acc_t cs_v[kPairs], sn_v[kPairs];
      load_table<kPairs, kAligned>(crow + i0, cs_v);
      load_table<kPairs, kAligned>(srow + i0, sn_v);
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const acc_t cs = cs_v[j];
        const acc_t sn = p.conjugate ? -sn_v[j] : sn_v[j];
        T& e1 = kInterleaved ? x1[2 * j] : x1[j];
        T& e2 = kInterleaved ? x1[2 * j + 1] : x2[j];
        acc_t o1, o2;
        rotate_pair<acc_t>(static_cast<acc_t>(e1), static_cast<acc_t>(e2), cs, sn, o1, o2);
        e1 = static_cast<T>(pos < 0 ? nan : o1);
        e2 = static_cast<T>(pos < 0 ? nan : o2);
      }
      if constexpr (kInterleaved) {
        store_n<kN, kAligned>(out + 2 * i0, x1);
      } else {
        store_n<kN, kAligned>(out + i0, x1);
        store_n<kN, kAligned>(out + half + i0, x2);
      }
    } else {  // pass-through features (only when out != in)
      constexpr int kT = kAligned ? kVec : 1;
      const int64_t e0 = p.rotary_dim + (c - rot_items) * kT;
      T v[kT];
      load_n<kT, kAligned>(in + e0, v);
#pragma unroll
      for (int j = 0; j < kT; ++j)
        if (pos < 0) v[j] = static_cast<T>(nan);
      store_n<kT, kAligned>(out + e0, v);
    }
  }
}

// True when every access of the 16-byte path is aligned for this tensor.
bool aligned16(const RopeTensorArgs& a, int64_t vec) {
  auto ok = [vec](int64_t stride) { return stride % vec == 0; };
  return reinterpret_cast<uintptr_t>(a.in) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(a.out) % 16 == 0 && ok(a.in_stride_b) &&
         ok(a.in_stride_s) && ok(a.in_stride_h) && ok(a.out_stride_b) &&
         ok(a.out_stride_s) && ok(a.out_stride_h);
}

template <typename T, typename table_t, bool kInterleaved>
void launch_typed(const RopeParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t half = p.rotary_dim / 2;
  const int64_t tail = p.head_dim - p.rotary_dim;
  bool aligned = p.head_dim % kVec == 0 && (kInterleaved ? p.rotary_dim % kVec == 0 : half % kVec == 0);
  for (int t = 0; t < p.ntensors; ++t) aligned = aligned && aligned16(p.t[t], kVec);
  if constexpr (std::is_same_v<table_t, float>) {  // 16-byte table reads (load_table)
    aligned = aligned && reinterpret_cast<uintptr_t>(p.cos) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(p.sin) % 16 == 0 && p.table_stride % 4 == 0;
  }

  const int64_t ntok = p.batch * p.seqlen;
  const int64_t heads = p.t[0].heads + (p.ntensors > 1 ? p.t[1].heads : 0);
  auto run = [&](auto kernel, int64_t rot_items, int64_t tail_items) {
    const int64_t items = heads * (rot_items + tail_items);
    const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (items + 31) / 32 * 32)));
    kernel<<<static_cast<unsigned int>(ntok), threads, 0, stream>>>(p, rot_items, tail_items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (aligned) {
    const int64_t rot = kInterleaved ? p.rotary_dim / kVec : half / kVec;
    run(rope_kernel<T, table_t, kVec, true, kInterleaved>, rot, p.copy_tail ? tail / kVec : 0);
  } else {
    run(rope_kernel<T, table_t, kVec, false, kInterleaved>, half, p.copy_tail ? tail : 0);
  }
}

}  // namespace

// Not file-local: rope_attention's k pre-pass (rope_attention_kernel.cpp) calls it too.
void launch_rope_cuda(const RopeParams& p, at::ScalarType x_dtype,
                      at::ScalarType table_dtype, c10::Device device) {
  TORCH_CHECK(p.batch * p.seqlen <= std::numeric_limits<int32_t>::max(),
              "apply_rope: batch * seqlen must fit in a 32-bit grid, got ", p.batch * p.seqlen);
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "apply_rope_cuda", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(table_dtype, "apply_rope_cuda_table", [&] {
      if (p.interleaved)
        launch_typed<x_t, scalar_t, true>(p, stream);
      else
        launch_typed<x_t, scalar_t, false>(p, stream);
    });
  });
}

TORCH_LIBRARY_IMPL(pirope, CUDA, m) { register_apply_rope_kernels<launch_rope_cuda>(m); }

}  // namespace pirope::cuda
