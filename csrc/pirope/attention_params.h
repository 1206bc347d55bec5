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
  // Packed sequences (varlen): when not null, the tensors hold one packed sequence
  // (batch index 0) of cu_seqlens[batch] tokens, and sequence b is its rows
  // [cu_seqlens[b], cu_seqlens[b+1]); batch counts the sequences, seqlen is the
  // longest, and lse is (heads_q, total tokens). Host memory (CPU kernels only).
  const int64_t* cu_seqlens = nullptr;
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

// Sequence b of the batch as the kernels address it: `len` rows from row `row0` of
// batch entry `entry` (dense: entry b from row 0; packed: entry 0 from
// cu_seqlens[b]); positions are token_position(rope, entry, row0 + s).
struct AttentionSequence {
  int64_t entry = 0, row0 = 0, len = 0;
  // lse row of query head hq (lse_len: the seqlen, or total tokens when packed).
  int64_t lse_offset(int64_t heads_q, int64_t hq, int64_t lse_len) const {
    return (entry * heads_q + hq) * lse_len + row0;
  }
  // Element offset of row 0 of head h of t.
  int64_t offset(const AttentionTensor& t, int64_t h) const {
    return entry * t.stride_b + row0 * t.stride_s + h * t.stride_h;
  }
};

inline AttentionSequence attention_sequence(const AttentionParams& p, int64_t b) {
  if (p.cu_seqlens == nullptr) return {b, 0, p.seqlen};
  return {0, p.cu_seqlens[b], p.cu_seqlens[b + 1] - p.cu_seqlens[b]};
}

// Row length of the lse tensor: seqlen, or the total tokens of packed sequences.
inline int64_t attention_lse_len(const AttentionParams& p) {
  return p.cu_seqlens == nullptr ? p.seqlen : p.cu_seqlens[p.batch];
}

}  // namespace pirope
