// Building blocks shared by the CUDA rope_attention forward and backward kernels:
// the mma.sync m16n8k16 tensor-core product (float32 accumulators), ldmatrix loads of
// its operand fragments from shared memory, 16-byte global/shared moves, and the tile
// loader that rotates q or k rows by their positions on the way into shared memory.
//
// Fragment layout of mma.m16n8k16 (PTX ISA), lane = 4 * g + t (g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major)   a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 2t+8..)  a3: (g+8, 2t+8..)
//   B (16 x 8, k x n)        b0: (k = 2t..2t+1, n = g)          b1: (k = 2t+8..2t+9, n = g)
//   C (16 x 8)               c0,c1: (g, 2t..2t+1)               c2,c3: (g+8, 2t..2t+1)
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of
// matrix i and register i of lane (g, t) receives row g, columns 2t..2t+1 of matrix i
// (with .trans: column g, rows 2t..2t+1), which is exactly one A or B register above.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../attention_params.h"
#include "../rope_math.h"

namespace pirope::cuda::attn {

constexpr int kPad = 8;  // smem row padding (elements): rows 16 B apart mod 128 B, no bank conflicts

// Shared-memory layouts of a kRows x kD tile (kD the dimension contiguous in global
// memory): padded rows (kPad) for the mma.sync kernels' ldmatrix; for wgmma
// (wgmma.cuh) and TMA (tma.cuh) panels of 128-byte rows (64 columns of 2-byte elements,
// 32 of float32: kBytes) whose 16-byte chunks are permuted by XOR with the row index
// mod 8 (the hardware's "128-byte swizzle": conflict-free for the tensor cores' reads;
// tiles 1024-byte aligned).
enum class Smem { kPadded, kSwizzle128 };
template <int kD, int kRows, Smem L, int kBytes = 2>
__host__ __device__ constexpr int tile_offset(int r, int c) {
  if constexpr (L == Smem::kSwizzle128) {
    constexpr int kPanel = 128 / kBytes, kChunk = 16 / kBytes;  // columns per row, per chunk
    static_assert(kD % kPanel == 0 && kRows % 8 == 0, "whole 128-byte panels of 8-row atoms");
    return (c / kPanel) * (kRows * kPanel) + r * kPanel + (((c % kPanel) / kChunk) ^ (r % 8)) * kChunk +
           c % kChunk;
  } else {
    return r * (kD + kPad) + c;
  }
}

// D += A B for one 16x8x16 tile, T = at::Half or at::BFloat16, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, at::Half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T and packed into one operand register (x in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack(float x, float y) {
  uint32_t r;
  if constexpr (std::is_same_v<T, at::Half>) {
    const __half2 h = __floats2half2_rn(x, y);
    memcpy(&r, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    memcpy(&r, &h, 4);
  }
  return r;
}

// Four 8x8 b16 matrices from shared memory, p being this lane's row address (see the
// top of this file); kTrans: each lane receives a column pair instead of a row pair.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

// The A operand of a 16x16 block (rows r0.., columns k0..) of a row-major smem matrix.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* base, int ld, int r0, int k0) {
  const int lane = threadIdx.x % 32, mat = lane / 8, row = lane % 8;
  const T* p = base + (r0 + 8 * (mat % 2) + row) * ld + k0 + 8 * (mat / 2);
  ldmatrix_x4<false>(a, p);
}

// B operands of two n-tiles (n0..n0+7 -> b[0], b[1]; n0+8..n0+15 -> b[2], b[3]) over
// k0..k0+15, from a smem matrix stored [n][k] (k contiguous), e.g. K for S = Q K^T.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* base, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32, mat = lane / 8, row = lane % 8;
  const T* p = base + (n0 + 8 * (mat / 2) + row) * ld + k0 + 8 * (mat % 2);
  ldmatrix_x4<false>(b, p);
}

// The same two n-tiles from a smem matrix stored [k][n] (n contiguous), e.g. V for
// O = P V: ldmatrix.trans hands each lane a column pair instead of a row pair.
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* base, int ld, int k0, int n0) {
  const int lane = threadIdx.x % 32, mat = lane / 8, row = lane % 8;
  const T* p = base + (k0 + 8 * (mat % 2) + row) * ld + n0 + 8 * (mat / 2);
  ldmatrix_x4<true>(b, p);
}

// The A operand of a 16-row x 16-column chunk m of accumulators c[2m], c[2m+1] (the
// C layout of two n-tiles equals the A layout): how P or dS feed the next product.
template <typename T, int N>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[N][4], int m) {
  a[0] = pack<T>(c[2 * m][0], c[2 * m][1]);
  a[1] = pack<T>(c[2 * m][2], c[2 * m][3]);
  a[2] = pack<T>(c[2 * m + 1][0], c[2 * m + 1][1]);
  a[3] = pack<T>(c[2 * m + 1][2], c[2 * m + 1][3]);
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}
template <int MT, int N>
__device__ __forceinline__ void zero(float (&acc)[MT][N][4]) {
#pragma unroll
  for (int m = 0; m < MT; ++m) zero(acc[m]);
}

// The three tile products of the kernels, for one warp's MT x 16 rows (MT row tiles
// of 16, each ldmatrix'd B fragment feeding all MT of them: fewer smem reads per mma)
// and N = 8 * NT columns:
//   gemm_nt:     acc += A B^T, A = rows a_row0.. of a row-major smem matrix, B stored
//                [n][k] in smem (e.g. S = Q K^T, dP = dO V^T);
//   gemm_acc_nn: acc += P B, P = the (MT x 16) x K accumulators p in C layout
//                (probabilities or dS), B stored [k][n] in smem (O += P V, dK += dS^T Q);
//   gemm_nn:     acc += A B, A from smem as in gemm_nt, B stored [k][n] in smem from
//                column n0 (dQ += dS K with dS staged in smem).
// Each also takes a single row tile (float[NT][4]), i.e. MT = 1.
template <typename T, int MT, int NT, int K>
__device__ __forceinline__ void gemm_nt(float (&acc)[MT][NT][4], const T* a_s, int lda, int a_row0,
                                        const T* b_s, int ldb) {
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) load_a(a[m], a_s, lda, a_row0 + 16 * m, k0);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t bb[4];
      load_b_nk(bb, b_s, ldb, 8 * j, k0);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma<T>(acc[m][j], a[m], bb[0], bb[1]);
        mma<T>(acc[m][j + 1], a[m], bb[2], bb[3]);
      }
    }
  }
}
template <typename T, int MT, int NT, int K>
__device__ __forceinline__ void gemm_acc_nn(float (&acc)[MT][NT][4], const float (&p)[MT][K / 8][4],
                                            const T* b_s, int ldb) {
#pragma unroll
  for (int k = 0; k < K / 16; ++k) {
    uint32_t a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc_to_a<T>(a[m], p[m], k);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t bb[4];
      load_b_kn(bb, b_s, ldb, 16 * k, 8 * j);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma<T>(acc[m][j], a[m], bb[0], bb[1]);
        mma<T>(acc[m][j + 1], a[m], bb[2], bb[3]);
      }
    }
  }
}
template <typename T, int MT, int NT, int K>
__device__ __forceinline__ void gemm_nn(float (&acc)[MT][NT][4], const T* a_s, int lda, int a_row0, const T* b_s,
                                        int ldb, int n0) {
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) load_a(a[m], a_s, lda, a_row0 + 16 * m, k0);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t bb[4];
      load_b_kn(bb, b_s, ldb, k0, n0 + 8 * j);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma<T>(acc[m][j], a[m], bb[0], bb[1]);
        mma<T>(acc[m][j + 1], a[m], bb[2], bb[3]);
      }
    }
  }
}
// One row tile: a float[N][4] viewed as float[1][N][4] (same object representation).
template <int N>
__device__ __forceinline__ float (&one_tile(float (&acc)[N][4]))[1][N][4] {
  return *reinterpret_cast<float(*)[1][N][4]>(&acc);
}
template <int N>
__device__ __forceinline__ const float (&one_tile(const float (&acc)[N][4]))[1][N][4] {
  return *reinterpret_cast<const float(*)[1][N][4]>(&acc);
}
template <typename T, int NT, int K>
__device__ __forceinline__ void gemm_nt(float (&acc)[NT][4], const T* a_s, int lda, int a_row0, const T* b_s,
                                        int ldb) {
  gemm_nt<T, 1, NT, K>(one_tile(acc), a_s, lda, a_row0, b_s, ldb);
}
template <typename T, int NT, int K>
__device__ __forceinline__ void gemm_acc_nn(float (&acc)[NT][4], const float (&p)[K / 8][4], const T* b_s,
                                            int ldb) {
  gemm_acc_nn<T, 1, NT, K>(one_tile(acc), one_tile(p), b_s, ldb);
}
template <typename T, int NT, int K>
__device__ __forceinline__ void gemm_nn(float (&acc)[NT][4], const T* a_s, int lda, int a_row0, const T* b_s,
                                        int ldb, int n0) {
  gemm_nn<T, 1, NT, K>(one_tile(acc), a_s, lda, a_row0, b_s, ldb, n0);
}

// Vector atomic add of two adjacent floats (8-byte aligned p): one red.v2.f32 on sm_90,
// two scalar ones before it.
__device__ __forceinline__ void atomic_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// 8 elements (16 bytes) as floats, and back. Explicit vector instructions: a struct
// copy of c10::Half / BFloat16 elements compiles to 2- or 4-byte accesses.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  T e[8];
  memcpy(e, &raw, 16);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = static_cast<float>(e[j]);
}
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  T e[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) e[j] = static_cast<T>(v[j]);
  uint4 raw;
  memcpy(&raw, e, 16);
  return raw;
}
__device__ __forceinline__ void store16_shared(void* p, uint4 v) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("st.shared.v4.b32 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

__device__ __forceinline__ void store16_global(void* p, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1,%2,%3,%4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Rows [row0, row0 + kRows) of head h of `t` into smem (layout tile_offset<kD, kRows, L>),
// rotated by the rows' positions when `rotate`. Rows past seqlen are zero; a row whose
// position is out of range is NaN (so the error cannot pass unseen). A work unit is a
// 16-byte chunk; in the half layout the chunk pair (c, c + rotary_dim / 2).
template <typename T, int kD, int kRows, int kThreads, Smem L = Smem::kPadded>
__device__ void load_tile(T* smem, const AttentionTensor& t, const AttentionParams& p, int64_t b,
                          int64_t h, int64_t row0, bool rotate) {
  const RopeParams& rp = p.rope;
  const int half = static_cast<int>(rp.rotary_dim / 2);
  const int rot_elems = rotate ? static_cast<int>(rp.rotary_dim) : 0;
  const int rot_units = rotate ? (rp.interleaved ? rot_elems / 8 : half / 8) : 0;
  const int units = rot_units + (kD - rot_elems) / 8;
  const float* cos_t = static_cast<const float*>(rp.cos);
  const float* sin_t = static_cast<const float*>(rp.sin);
  for (int u = threadIdx.x; u < kRows * units; u += kThreads) {
    const int r = u / units, c = u % units;
    const int64_t s = row0 + r;
    const bool pair = c < rot_units && !rp.interleaved;  // unit covers c*8 and half + c*8
    const int e0 = c < rot_units ? c * 8 : rot_elems + (c - rot_units) * 8;
    T* dst = smem + tile_offset<kD, kRows, L>(r, e0);
    T* dst2 = smem + tile_offset<kD, kRows, L>(r, half + e0);  // the pair's second chunk
    if (s >= p.seqlen) {  // padding rows
      const uint4 z = make_uint4(0, 0, 0, 0);
      store16_shared(dst, z);
      if (pair) store16_shared(dst2, z);
      continue;
    }
    const T* src = static_cast<const T*>(t.ptr) + b * t.stride_b + s * t.stride_s + h * t.stride_h;
    float x1[8], x2[8];
    load8(src + e0, x1);
    if (c < rot_units) {
      const int64_t pos = token_position(rp, b, s);
      const float* cr = cos_t + (pos < 0 ? 0 : pos) * rp.table_stride;
      const float* sr = sin_t + (pos < 0 ? 0 : pos) * rp.table_stride;
      if (rp.interleaved) {  // 4 pairs (2i, 2i+1), i = 4c..4c+3
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float o1, o2;
          rotate_pair<float>(x1[2 * j], x1[2 * j + 1], cr[4 * c + j], sr[4 * c + j], o1, o2);
          x1[2 * j] = pos < 0 ? NAN : o1;
          x1[2 * j + 1] = pos < 0 ? NAN : o2;
        }
      } else {  // 8 pairs (i, i + half), i = 8c..8c+7
        load8(src + half + e0, x2);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          float o1, o2;
          rotate_pair<float>(x1[j], x2[j], cr[8 * c + j], sr[8 * c + j], o1, o2);
          x1[j] = pos < 0 ? NAN : o1;
          x2[j] = pos < 0 ? NAN : o2;
        }
        store16_shared(dst2, pack8<T>(x2));
      }
    }
    store16_shared(dst, pack8<T>(x1));
  }
}

// Rows [row0, row0 + kRows) of head h of `t` copied into smem (layout tile_offset<kD,
// kRows, L>) with cp.async (no registers, overlaps with the caller's math until
// cp_async_wait); rows past seqlen are zero-filled with ordinary stores. Eight
// consecutive threads fill 128 contiguous bytes of smem (no bank conflicts).
template <typename T, int kD, int kRows, int kThreads, Smem L = Smem::kPadded>
__device__ void copy_tile_async(T* smem, const AttentionTensor& t, const AttentionParams& p, int64_t b,
                                int64_t h, int64_t row0) {
  constexpr int kUnits = kD / 8;
  for (int u = threadIdx.x; u < kRows * kUnits; u += kThreads) {
    const int r = u / kUnits, e0 = (u % kUnits) * 8;
    const int64_t s = row0 + r;
    T* dst = smem + tile_offset<kD, kRows, L>(r, e0);
    if (s >= p.seqlen) {
      store16_shared(dst, make_uint4(0, 0, 0, 0));
      continue;
    }
    const T* src = static_cast<const T*>(t.ptr) + b * t.stride_b + s * t.stride_s + h * t.stride_h + e0;
    const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(src) : "memory");
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Rows [row0, row0 + kRows) of head h of `a`, then of `b`, into two consecutive smem
// tiles as one cp.async commit group: the pipeline stage of the backward kernels (q and
// dO, or K and V). `a` is rotated on the way in, through registers, unless `a_rotated`
// (pre-rotated by the pre-pass: then a plain async copy too).
template <typename T, int kD, int kRows, int kThreads>
__device__ __forceinline__ void stage_tile_pair(T* smem, const AttentionTensor& a, bool a_rotated,
                                                const AttentionTensor& b, const AttentionParams& p,
                                                int64_t batch, int64_t h, int64_t row0) {
  if (a_rotated) {
    copy_tile_async<T, kD, kRows, kThreads>(smem, a, p, batch, h, row0);
  } else {
    load_tile<T, kD, kRows, kThreads>(smem, a, p, batch, h, row0, true);
  }
  copy_tile_async<T, kD, kRows, kThreads>(smem + kRows * (kD + kPad), b, p, batch, h, row0);
  cp_async_commit();
}
// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The top of a double-buffered loop (two smem stages, one cp.async commit group per
// stage): starts copying the next step's tiles into the other stage when `has_next`
// (stage_next() commits them), then waits until this step's tiles have landed (the next
// step's may still be in flight). The caller's barrier follows.
template <typename StageNext>
__device__ __forceinline__ void stage_next_and_wait(bool has_next, StageNext&& stage_next) {
  if (has_next) {
    stage_next();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// The barrier between the steps of an epilogue: the whole block (the warp-specialised
// kernels pass one over their consumer warps only).
struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// Epilogue, step 1: a warp's C-layout accumulators (rows row0 + g, row0 + g + 8) into
// a float32 smem tile of row stride kD + 4, so that step 2 can work on whole rows.
template <int kD>
__device__ __forceinline__ void acc_to_smem(float* tile, const float (&acc)[kD / 8][4], int row0) {
  const int lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int j = 0; j < kD / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<float2*>(tile + (row0 + g + 8 * r) * (kD + 4) + 8 * j + 2 * tq) =
          make_float2(acc[j][2 * r], acc[j][2 * r + 1]);
}
template <int kD, int MT>
__device__ __forceinline__ void acc_to_smem(float* tile, const float (&acc)[MT][kD / 8][4], int row0) {
#pragma unroll
  for (int m = 0; m < MT; ++m) acc_to_smem<kD>(tile, acc[m], row0 + 16 * m);
}

// Epilogue, step 2 (the inverse of load_tile): rows [row0, row0 + kRows) of the smem
// tile, times `scale`, rotated back by -angle when `unrotate` (dq and dk live in the
// rotated basis), rounded to T and written with 16-byte stores to head h of `t`.
template <typename T, int kD, int kRows, int kThreads>
__device__ void store_tile(const float* tile, const AttentionTensor& t, const AttentionParams& p, int64_t b,
                           int64_t h, int64_t row0, bool unrotate, float scale) {
  const RopeParams& rp = p.rope;
  const int half = static_cast<int>(rp.rotary_dim / 2);
  const int rot_elems = unrotate ? static_cast<int>(rp.rotary_dim) : 0;
  const int rot_units = unrotate ? (rp.interleaved ? rot_elems / 8 : half / 8) : 0;
  const int units = rot_units + (kD - rot_elems) / 8;
  const float* cos_t = static_cast<const float*>(rp.cos);
  const float* sin_t = static_cast<const float*>(rp.sin);
  for (int u = threadIdx.x; u < kRows * units; u += kThreads) {
    const int r = u / units, c = u % units;
    const int64_t s = row0 + r;
    if (s >= p.seqlen) continue;
    const float* src = tile + r * (kD + 4);
    T* dst = static_cast<T*>(t.ptr) + b * t.stride_b + s * t.stride_s + h * t.stride_h;
    const int e0 = c < rot_units ? c * 8 : rot_elems + (c - rot_units) * 8;
    float x1[8], x2[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) x1[j] = src[e0 + j] * scale;
    if (c < rot_units) {
      const int64_t pos = token_position(rp, b, s);
      const float* cr = cos_t + (pos < 0 ? 0 : pos) * rp.table_stride;
      const float* sr = sin_t + (pos < 0 ? 0 : pos) * rp.table_stride;
      if (rp.interleaved) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float o1, o2;
          rotate_pair<float>(x1[2 * j], x1[2 * j + 1], cr[4 * c + j], -sr[4 * c + j], o1, o2);
          x1[2 * j] = pos < 0 ? NAN : o1;
          x1[2 * j + 1] = pos < 0 ? NAN : o2;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) x2[j] = src[half + e0 + j] * scale;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          float o1, o2;
          rotate_pair<float>(x1[j], x2[j], cr[8 * c + j], -sr[8 * c + j], o1, o2);
          x1[j] = pos < 0 ? NAN : o1;
          x2[j] = pos < 0 ? NAN : o2;
        }
        store16_global(dst + half + e0, pack8<T>(x2));
      }
    }
    store16_global(dst + e0, pack8<T>(x1));
  }
}

}  // namespace pirope::cuda::attn
