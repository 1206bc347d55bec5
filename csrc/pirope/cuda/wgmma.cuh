// Hopper (sm_90a) building blocks of the rope_attention kernels: the warpgroup
// tensor-core product wgmma.mma_async (4 warps = 128 threads compute a 64 x N tile),
// its shared-memory descriptors, the 128-byte-swizzled smem layout they read, and the
// fences around them. Used by rope_attention_fwd_sm90.cuh and rope_attention_bwd_sm90.cuh;
// the mma.sync kernels (attention_mma.cuh) serve every other GPU.
//
// Register layouts (PTX ISA, wgmma .m64nNk16): warp w (0..3) of the warpgroup owns rows
// 16w..16w+15 of the 64-row tile, and within them the layout of mma.m16n8k16 (see
// attention_mma.cuh): the float32 accumulator of n8 block j is d[j][0..3] at
// (g, 8j+2t..), (g+8, 8j+2t..); an A operand from registers is the 16 x 16 A fragment
// (a0..a3) of that warp. So acc_to_a turns a 64 x 16k accumulator into the A operand of
// the next product, as in the mma.sync kernels.
//
// Shared-memory layout (attn::Smem::kSwizzle128, attn::tile_offset): 64-column panels of
// 128-byte rows, the 16-byte chunks of row r XOR-permuted by r % 8, as the hardware's
// 128-byte swizzle mode expects. The same tile serves as a K-major operand (rows = M or
// N, columns = K: q, k for S = Q K^T) and as an MN-major one (rows = K, columns = N: V
// for O = P V); only the descriptor differs (desc_k, desc_mn). (The unswizzled layout
// of 8 x 8 core matrices also worked, 8-16% slower: benchmarks/results/H100.md.)
#pragma once

#include <cstdint>

#include "attention_mma.cuh"

// Device code of this file exists for sm_90a only (wgmma is not in plain sm_90).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PIROPE_SM90A_DEVICE 1
#endif

namespace pirope::cuda::wg {

// attn::tile_offset must place every element where the hardware's 128-byte swizzle
// expects it (wgmma descriptors in layout mode 1, TMA's CU_TENSOR_MAP_SWIZZLE_128B):
// panels of 128-byte rows laid one after another, and within each 1024-byte atom of 8
// rows the byte offset o moved to o ^ ((o >> 7) % 8) << 4 (16-byte chunk c of row r to
// chunk c ^ r % 8). Checked here, at compile time, for 2-byte and float32 elements.
template <int kBytes>
constexpr bool tile_offset_is_hardware_swizzle() {
  constexpr int kPanel = 128 / kBytes, kRows = 64;
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 2 * kPanel; ++c) {
      const int plain = (c / kPanel) * kRows * 128 + r * 128 + (c % kPanel) * kBytes;
      const int swizzled = plain ^ (((plain >> 7) % 8) << 4);
      if (attn::tile_offset<2 * kPanel, kRows, attn::Smem::kSwizzle128, kBytes>(r, c) * kBytes != swizzled)
        return false;
    }
  return true;
}
static_assert(tile_offset_is_hardware_swizzle<2>() && tile_offset_is_hardware_swizzle<4>(),
              "attn::tile_offset disagrees with the hardware's 128-byte swizzle");

// Matrix descriptor (PTX ISA "matrix descriptor format") of a 128-byte-swizzled tile:
// start address, leading and stride byte offsets (each >> 4), base offset 0 (the
// tiles are 1024-byte aligned), layout mode 1 (128-byte swizzle).
__device__ __forceinline__ uint64_t make_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | static_cast<uint64_t>(lbo >> 4) << 16 |
         static_cast<uint64_t>(sbo >> 4) << 32 | uint64_t{1} << 62;
}
// K-major view of a kRows x kCols tile (rows = M or N, columns = K), from (r0, k0), r0 a
// multiple of 8 and k0 of 16: rows of one 64-column panel are 128 B apart, 8-row atoms
// 1024 B (SBO); k0 within the panel moves the start by 2 * (k0 % 64) bytes and the
// hardware applies the XOR to the final addresses (LBO is unused in this mode).
template <typename T, int kCols, int kRows>
__device__ __forceinline__ uint64_t desc_k(const T* tile, int r0, int k0) {
  return make_desc(tile + (k0 / 64) * (kRows * 64) + r0 * 64 + k0 % 64, 16, 1024);
}
// MN-major view (rows = K, columns = M or N), from (k0, n0), k0 a multiple of 16 and
// n0 of 64: SBO steps 8 rows of K (1024 B), LBO the next 64-column panel (kRows * 128 B).
template <typename T, int kCols, int kRows>
__device__ __forceinline__ uint64_t desc_mn(const T* tile, int k0, int n0) {
  return make_desc(tile + (n0 / 64) * (kRows * 64) + k0 * 64, kRows * 128, 1024);
}
// The first 1024-byte aligned address at or after smem (swizzled tiles need it; the
// launchers add 1024 bytes of slack).
template <typename T>
__device__ __forceinline__ T* align1024(unsigned char* smem) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return reinterpret_cast<T*>(smem + ((1024 - addr % 1024) % 1024));
}

// Makes this thread's generic-proxy smem writes (st.shared, cp.async once waited for)
// visible to the async proxy that wgmma reads smem through; then a barrier.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// wgmma.fence before the first wgmma of a batch (orders the registers it reads).
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads or writes of the accumulators across the
// wgmma issue / wait pair (the asm statements are ordered; the registers are not).
template <int NB>
__device__ __forceinline__ void fence_operand(float (&d)[NB][4]) {
#pragma unroll
  for (int j = 0; j < NB; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}
// The same for register A operands: keeps them live (unchanged) until the wait.
template <int NB>
__device__ __forceinline__ void fence_operand(uint32_t (&a)[NB][4]) {
#pragma unroll
  for (int j = 0; j < NB; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
}

// D (64 x N, float32) = A B (+ D when `accumulate`), K = 16. ss: A and B from smem
// descriptors (kTransA/kTransB = 1: MN-major); rs: A from registers (4 x b32 per thread).
template <int N>
struct Wgmma;

#define PIROPE_WGMMA_SS_ASM(N, TY, REGS, IA, IB, ISD, ITA, ITB)                                     \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" ISD ", 0;\n"                                                 \
  "wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TY "." TY " {" REGS "}, %" IA ", %" IB ", p, 1, 1, %" ITA \
  ", %" ITB ";\n}\n"
#define PIROPE_WGMMA_RS_ASM(N, TY, REGS, A0, A1, A2, A3, IB, ISD, ITB)                              \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" ISD ", 0;\n"                                                 \
  "wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TY "." TY " {" REGS "}, {%" A0 ", %" A1 ", %" A2 \
  ", %" A3 "}, %" IB ", p, 1, 1, %" ITB ";\n}\n"
#define PIROPE_WG_F4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define PIROPE_WG_D4 PIROPE_WG_F4(0), PIROPE_WG_F4(1), PIROPE_WG_F4(2), PIROPE_WG_F4(3)
#define PIROPE_WG_D8 PIROPE_WG_D4, PIROPE_WG_F4(4), PIROPE_WG_F4(5), PIROPE_WG_F4(6), PIROPE_WG_F4(7)
#define PIROPE_WG_D16                                                                                \
  PIROPE_WG_D8, PIROPE_WG_F4(8), PIROPE_WG_F4(9), PIROPE_WG_F4(10), PIROPE_WG_F4(11), PIROPE_WG_F4(12), \
      PIROPE_WG_F4(13), PIROPE_WG_F4(14), PIROPE_WG_F4(15)
#define PIROPE_WG_R16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define PIROPE_WG_R32                                                                                \
  PIROPE_WG_R16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define PIROPE_WG_R64                                                                                \
  PIROPE_WG_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, " \
                "%49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
// One specialization per N the kernels use (64, 128): NB = N / 8 accumulator blocks in
// registers REGS (constraints CONS); I0.. are the operand numbers after the accumulators.
#define PIROPE_WGMMA_SHAPE(N, NB, REGS, CONS, I0, I1, I2, I3, I4, I5, I6)                            \
  template <>                                                                                       \
  struct Wgmma<N> {                                                                                 \
    template <bool kHalf, int kTransA, int kTransB>                                                 \
    static __device__ __forceinline__ void ss(float (&d)[NB][4], uint64_t a, uint64_t b, int acc) { \
      if constexpr (kHalf)                                                                          \
        asm volatile(PIROPE_WGMMA_SS_ASM(#N, "f16", REGS, I0, I1, I2, I3, I4)                       \
                     : CONS                                                                         \
                     : "l"(a), "l"(b), "r"(acc), "n"(kTransA), "n"(kTransB));                       \
      else                                                                                          \
        asm volatile(PIROPE_WGMMA_SS_ASM(#N, "bf16", REGS, I0, I1, I2, I3, I4)                      \
                     : CONS                                                                         \
                     : "l"(a), "l"(b), "r"(acc), "n"(kTransA), "n"(kTransB));                       \
    }                                                                                               \
    template <bool kHalf, int kTransB>                                                              \
    static __device__ __forceinline__ void rs(float (&d)[NB][4], const uint32_t (&a)[4], uint64_t b, int acc) { \
      if constexpr (kHalf)                                                                          \
        asm volatile(PIROPE_WGMMA_RS_ASM(#N, "f16", REGS, I0, I1, I2, I3, I4, I5, I6)               \
                     : CONS                                                                         \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(acc), "n"(kTransB)); \
      else                                                                                          \
        asm volatile(PIROPE_WGMMA_RS_ASM(#N, "bf16", REGS, I0, I1, I2, I3, I4, I5, I6)              \
                     : CONS                                                                         \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(acc), "n"(kTransB)); \
    }                                                                                               \
  };
PIROPE_WGMMA_SHAPE(64, 8, PIROPE_WG_R32, PIROPE_WG_D8, "32", "33", "34", "35", "36", "37", "38")
PIROPE_WGMMA_SHAPE(128, 16, PIROPE_WG_R64, PIROPE_WG_D16, "64", "65", "66", "67", "68", "69", "70")
#undef PIROPE_WGMMA_SHAPE
#undef PIROPE_WG_R64
#undef PIROPE_WG_R32
#undef PIROPE_WG_R16
#undef PIROPE_WG_D16
#undef PIROPE_WG_D8
#undef PIROPE_WG_D4
#undef PIROPE_WG_F4
#undef PIROPE_WGMMA_RS_ASM
#undef PIROPE_WGMMA_SS_ASM

// acc (+)= A B over K = 16 * kSteps with both operands in smem: a(k) and b(k) give the
// descriptors of k-step k (16 columns of A, 16 rows of B); the first step overwrites
// acc unless `accumulate`. Issues the wgmma batch and commits it (not waited for).
template <typename T, int N, int kTransA, int kTransB, int kSteps, typename DescA, typename DescB>
__device__ __forceinline__ void gemm_ss(float (&acc)[N / 8][4], DescA a, DescB b, bool accumulate) {
  constexpr bool kHalf = std::is_same_v<T, at::Half>;
#pragma unroll
  for (int k = 0; k < kSteps; ++k)
    Wgmma<N>::template ss<kHalf, kTransA, kTransB>(acc, a(k), b(k), (k > 0 || accumulate) ? 1 : 0);
  commit();
}
// acc += P B, P the 64 x (16 kSteps) float32 accumulators p (rounded to T: probabilities
// or dS) as register A operands, B from smem (b(k): k-step k). Committed, not waited for.
template <typename T, int N, int kTransB, int kSteps, typename DescB>
__device__ __forceinline__ void gemm_rs(float (&acc)[N / 8][4], const float (&p)[2 * kSteps][4], DescB b) {
  constexpr bool kHalf = std::is_same_v<T, at::Half>;
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    uint32_t a[4];
    attn::acc_to_a<T>(a, p, k);
    Wgmma<N>::template rs<kHalf, kTransB>(acc, a, b(k), 1);
  }
  commit();
}
// acc += A B with A already in operand registers (a[k]: k-step k, e.g. from acc_to_a),
// for a product that runs while the caller works on other registers: a must stay
// unchanged until the wait (fence_operand(a) after it). Committed, not waited for.
template <typename T, int N, int kTransB, int kSteps, typename DescB>
__device__ __forceinline__ void gemm_rs(float (&acc)[N / 8][4], const uint32_t (&a)[kSteps][4], DescB b) {
  constexpr bool kHalf = std::is_same_v<T, at::Half>;
#pragma unroll
  for (int k = 0; k < kSteps; ++k) Wgmma<N>::template rs<kHalf, kTransB>(acc, a[k], b(k), 1);
  commit();
}

}  // namespace pirope::cuda::wg
