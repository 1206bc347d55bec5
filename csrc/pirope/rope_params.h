// Plain parameter struct: the boundary between the torch-facing op code and the
// CPU/CUDA rotary kernels. Kernels see only pointers, sizes and strides, so they
// include no torch headers and run from C++, CUDA or a unit test alike.
#pragma once

#include <cstdint>

namespace pirope {

// One tensor to rotate, viewed as (batch, seqlen, heads, head_dim) with the last
// dimension contiguous. Strides are in elements. `out` may equal `in` (in place).
struct RopeTensorArgs {
  const void* in = nullptr;
  void* out = nullptr;
  int64_t in_stride_b = 0, in_stride_s = 0, in_stride_h = 0;
  int64_t out_stride_b = 0, out_stride_s = 0, out_stride_h = 0;
  int64_t heads = 0;
};

struct RopeParams {
  // Up to two tensors (q and k) rotated in one pass; they share batch, seqlen,
  // head_dim and positions but may differ in head count.
  RopeTensorArgs t[2];
  int ntensors = 0;

  int64_t batch = 0, seqlen = 0;
  int64_t head_dim = 0;    // features per head
  int64_t rotary_dim = 0;  // leading features that rotate (even, <= head_dim)

  // cos/sin tables, (max_positions, rotary_dim / 2), row stride table_stride,
  // columns contiguous. Element type is a template parameter of the kernels.
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t table_stride = 0;
  int64_t max_positions = 0;

  // Position of token (b, s): pos[b * pos_stride_b + s * pos_stride_s], or s when
  // pos is null. A stride of 0 broadcasts (one row shared by the batch).
  const void* pos = nullptr;
  bool pos_int64 = true;
  int64_t pos_stride_b = 0, pos_stride_s = 0;

  bool interleaved = false;  // pairs (2i, 2i+1) instead of (i, i + rotary_dim/2)
  bool conjugate = false;    // rotate by -angle (the backward of the rotation)
  bool copy_tail = false;    // out != in: copy the head_dim - rotary_dim pass-through
};

}  // namespace pirope
