// Math shared by the CPU and CUDA rotary kernels (and the fused attention):
// where a pair lives, where a token's position comes from, how a pair rotates.
// Everything is __host__ __device__ inline so both backends compile the same code.
#pragma once

#include <cstdint>

#include "rope_params.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PIROPE_HD __host__ __device__ __forceinline__
#else
#define PIROPE_HD inline
#endif

namespace pirope {

// Index of the first and second element of rotary pair i (0 <= i < rotary_dim/2).
// Half layout (Hugging Face / GPT-NeoX): (i, i + rotary_dim/2).
// Interleaved layout (Meta LLaMA / GPT-J): (2i, 2i + 1).
PIROPE_HD int64_t pair_first(int64_t i, int64_t half, bool interleaved) {
  return interleaved ? 2 * i : i;
}
PIROPE_HD int64_t pair_second(int64_t i, int64_t half, bool interleaved) {
  return interleaved ? 2 * i + 1 : i + half;
}

// The position of token (b, s); -1 when it is outside [0, max_positions).
PIROPE_HD int64_t token_position(const RopeParams& p, int64_t b, int64_t s) {
  if (p.pos == nullptr) return s < p.max_positions ? s : -1;
  const int64_t off = b * p.pos_stride_b + s * p.pos_stride_s;
  const int64_t v = p.pos_int64 ? static_cast<const int64_t*>(p.pos)[off]
                                : static_cast<const int32_t*>(p.pos)[off];
  return (v >= 0 && v < p.max_positions) ? v : -1;
}

// Rotation of the pair (x1, x2) by the angle whose cosine and sine are (c, s):
//   (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
// i.e. the complex product (x1 + i x2) * e^{i angle}. The backward of a rotation is
// the rotation by -angle (its transpose), obtained by passing -s.
template <typename T>
PIROPE_HD void rotate_pair(T x1, T x2, T c, T s, T& o1, T& o2) {
  o1 = x1 * c - x2 * s;
  o2 = x2 * c + x1 * s;
}

}  // namespace pirope
