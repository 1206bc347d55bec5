// Plain parameter struct of the fused RoPE attention: the boundary between the
// torch-facing op code (rope_attention.cpp) and the kernels. Pointers, sizes and
// strides only; no torch headers.
#pragma once

#include <cstdint>

#include "rope_params.h"

namespace pirope {

// One (batch, seqlen, heads, head_dim) tensor with a unit stride on head_dim.
// Strides are in elements.
struct AttentionTensor {
  void* ptr = nullptr;
  int64_t stride_b = 0, stride_s = 0, stride_h = 0;
};

struct AttentionParams {
  // Forward reads q, k, v and writes out, lse. Backward also reads out, lse and
  // grad_out, and writes dq, dk, dv (in the un-rotated basis of q and k).
  AttentionTensor q, k, v, out, grad_out, dq, dk, dv;
  // Log-sum-exp of each (scaled) score row, contiguous (batch, heads_q, seqlen), in
  // the math type (float32, or float64 for float64 input).
  void* lse = nullptr;

  int64_t batch = 0, seqlen = 0;
  int64_t heads_q = 0, heads_kv = 0;  // heads_q is a multiple of heads_kv
  int64_t head_dim = 0;
  bool causal = true;  // key j is seen by query i when j <= i
  double softmax_scale = 1.0;
  // Backward: bit-identical gradients run to run (CUDA: no float atomics; the CPU
  // backward is always deterministic).
  bool deterministic = false;
  // CUDA: k (and, in the backward, q) already rotated by a pre-pass (p.k, p.q point at
  // the rotated copies).
  bool k_prerotated = false;
  bool q_prerotated = false;

  // Tables, positions, rotary_dim and layout of the rotation; rope.t is unused.
  // token_position(rope, b, s) gives the position of token (b, s).
  RopeParams rope;
};

}  // namespace pirope
