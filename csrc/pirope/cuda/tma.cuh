// Hopper (sm_90a) data movement for the warp-specialised rope_attention kernels: the
// tensor memory accelerator (TMA: one thread copies a whole tile from global to shared
// memory, swizzled as the wgmma descriptors of wgmma.cuh expect), the shared-memory
// barriers (mbarrier) that tell consumers a tile has landed and the producer that a
// stage is free again, named barriers between warpgroups, and the register
// re-balancing between producer and consumer warpgroups (setmaxnreg).
//
// Pipeline protocol (one ring of kStages smem stages per operand, as in CUTLASS / FA3):
//   full[s]  count 1: the producer's arrive.expect_tx(bytes); completes when the TMA
//            copies of stage s have delivered those bytes;
//   empty[s] count = consumer threads: each consumer thread arrives once it has
//            finished reading stage s (its wgmma waited for).
// Use number u of stage s = u % kStages has phase parity (u / kStages) & 1: consumers
// wait full[s] for that parity, the producer waits empty[s] for the opposite one (a
// fresh barrier counts its "previous" phase as complete, so the first round passes).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda.h>  // CUtensorMap (the type only: the driver is reached through the runtime)

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../attention_params.h"

namespace pirope::cuda {

// Dynamic shared memory one block may opt in to on sm_90 (227 KB; the launchers check
// their layouts against it at compile time).
constexpr size_t kSm90SmemPerBlock = 227 * 1024;

// Element type of a tile map: the attention tensors, or the float32 dQ accumulator.
enum class TileElem { kFloat16, kBFloat16, kFloat32 };
template <typename T>
constexpr TileElem tile_elem() {
  static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>);
  return std::is_same_v<T, float> ? TileElem::kFloat32
                                  : std::is_same_v<T, c10::Half> ? TileElem::kFloat16 : TileElem::kBFloat16;
}

// Host: a TMA descriptor of a (batch, seqlen, heads, head_dim) tensor `t` (unit stride
// on the head dim) whose box is 128 bytes of head-dim columns (64 2-byte elements, 32
// float32) x box_rows rows of one (batch, head), in smem in the 128-byte swizzle of
// attn::Smem::kSwizzle128 (attn::tile_offset with the element's size). Loads read rows
// past seqlen as zeros; stores and reductions skip them. False (and no CUDA error left
// behind) when TMA cannot describe the tensor (alignment, strides) or the driver lacks
// cuTensorMapEncodeTiled: the caller then uses a kernel without TMA. Defined in tma.cu.
bool encode_tile_map(CUtensorMap* map, const AttentionTensor& t, int64_t batch, int64_t seqlen, int64_t heads,
                     int head_dim, TileElem elem, int box_rows);

namespace tma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One thread initialises; then fence_barrier_init and a block-wide barrier before use.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Producer: this phase completes when `bytes` more bytes have arrived (and this arrival).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Spins until the phase of parity `parity` of bar has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// Box (c0, row0, head, batch) of `map` into smem dst (1024-byte aligned), completing
// `bar`'s transaction count by the box's bytes. One thread issues it.
__device__ __forceinline__ void load_box(void* dst, const CUtensorMap* map, int c0, int row0, int head, int batch,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(row0), "r"(head), "r"(batch), "r"(smem_addr(bar))
      : "memory");
}
// A kRows x kD tile (layout attn::Smem::kSwizzle128: kD / 64 panels of kRows x 64) of
// rows row0.. of (batch, head): one box per panel, all completing `bar`.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void load_tile(T* dst, const CUtensorMap* map, int64_t row0, int64_t head,
                                          int64_t batch, uint64_t* bar) {
  static_assert(sizeof(T) == 2, "64 columns per 128-byte panel");
#pragma unroll
  for (int c = 0; c < kD / 64; ++c)
    load_box(dst + c * kRows * 64, map, 64 * c, static_cast<int>(row0), static_cast<int>(head),
             static_cast<int>(batch), bar);
}
// Adds the float32 box (c0, row0, head, batch) of `map` from smem src (1024-byte
// aligned, written by this CTA's threads, then fence.proxy.async and a barrier) into
// global memory, element-wise and atomically with respect to other reductions. One
// thread issues it; it joins this thread's next committed bulk group.
__device__ __forceinline__ void reduce_add_box(const CUtensorMap* map, const void* src, int c0, int row0, int head,
                                               int batch) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(row0), "r"(head), "r"(batch), "r"(smem_addr(src))
      : "memory");
}
// Adds a float32 kRows x kCols tile (attn::tile_offset<kCols, kRows, kSwizzle128, 4>:
// panels of kRows x 32) into columns col0.. of rows row0.. of (batch, head): one box per
// panel, then commits them as one bulk group.
template <int kCols, int kRows>
__device__ __forceinline__ void reduce_add_tile(const CUtensorMap* map, const float* src, int col0, int64_t row0,
                                                int64_t head, int64_t batch) {
#pragma unroll
  for (int c = 0; c < kCols / 32; ++c)
    reduce_add_box(map, src + c * kRows * 32, col0 + 32 * c, static_cast<int>(row0), static_cast<int>(head),
                   static_cast<int>(batch));
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's bulk groups still read their smem source (the
// buffer may then be rewritten) ...
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// ... or are still in flight at all (their writes to global memory done).
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Named barrier `id` (1..15; 0 is __syncthreads) over kCount threads: sync waits for
// all kCount, arrive counts this thread without waiting (the producer side of a
// hand-over between warpgroups).
template <int kCount>
__device__ __forceinline__ void bar_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kCount) : "memory");
}
template <int kCount>
__device__ __forceinline__ void bar_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kCount) : "memory");
}

// Per-thread register budget of this warpgroup from here on (a multiple of 8, 24..256):
// the producer gives registers back, the consumers take them.
template <int kRegs>
__device__ __forceinline__ void regs_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void regs_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

}  // namespace tma
}  // namespace pirope::cuda
