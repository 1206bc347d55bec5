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
  // Sliding window (flash-attn's window_size): query i also sees key j only when
  // j >= i - window_left and j <= i + window_right; -1: no bound on that side. i and j
  // count rows within the sequence. CPU kernels only (the CUDA ones take no window: (-1, -1),
  // or (-1, any) with causal).
  int64_t window_left = -1, window_right = -1;
  double softmax_scale = 1.0;
  // Attention-logit soft-cap (Gemma 2, flash-attn's softcap): each score s = softmax_scale
  // q.k becomes softcap * tanh(s / softcap) before the mask and the softmax; 0: none. CPU
  // kernels only (the CUDA ones take 0).
  double softcap = 0.0;
  // Attention sinks (GPT-OSS): when not null, (heads_q,) logits of the math type, one per
  // query head, each joining every softmax row of its head as a key without a value (the
  // forward starts the row's online softmax at max = sink, sum = 1; lse includes it). The
  // backward needs nothing more: its probabilities come from that lse. CPU kernels only.
  const void* sinks = nullptr;
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

// The keys query row i sees: [first(i), end(i, S)) of a sequence of S rows (0 <= i < S),
// from the causal flag and the window (causal wins over window_right, as in flash-attn).
// Every row sees at least its own key. A bound past the sequence (up to INT64_MAX) is
// no bound: compared, never added.
struct AttentionBand {
  int64_t left = -1, right = -1;  // -1: unbounded
  int64_t first(int64_t i) const { return left < 0 || left >= i ? 0 : i - left; }
  int64_t end(int64_t i, int64_t S) const { return right < 0 || right >= S - i ? S : i + right + 1; }
  // Queries that see key j: [first_query(j), end_query(j, S)).
  int64_t first_query(int64_t j) const { return right < 0 || right >= j ? 0 : j - right; }
  int64_t end_query(int64_t j, int64_t S) const { return left < 0 || left >= S - j ? S : j + left + 1; }
};

inline AttentionBand attention_band(const AttentionParams& p) {
  return {p.window_left, p.causal ? 0 : p.window_right};
}

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
