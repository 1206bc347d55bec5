// CPU kernel of apply_rope / apply_rope_qk (and their backward and in-place forms).
// Work is split over tokens (batch x seqlen) with at::parallel_for; each token loads
// its cos/sin row once (in the math type) and rotates every head of q and then k.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include "../apply_rope.h"
#include "../rope_math.h"
#include "vec_io.h"

namespace pirope::cpu {
namespace {

// Rotates one head row: `half` pairs starting at in/out; cs/sn are the token's
// cos/sin in the math type. Pairs are (i, i + half) or, interleaved, (2i, 2i + 1).
template <typename scalar_t, bool kInterleaved>
void rotate_row(const scalar_t* in, scalar_t* out, const at::opmath_type<scalar_t>* cs,
                const at::opmath_type<scalar_t>* sn, int64_t half) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int W = IO::kWidth;
  constexpr int C = IO::kChunk;  // pairs per iteration (2 vectors)
  int64_t i = 0;
  for (; i + C <= half; i += C) {
    Vec x1[2], x2[2];
    if constexpr (kInterleaved) {  // 2C elements = C pairs, de-interleaved
      auto [a0, a1] = IO::load2(in + 2 * i);
      auto [b0, b1] = IO::load2(in + 2 * i + C);
      std::tie(x1[0], x2[0]) = at::vec::deinterleave2(a0, a1);
      std::tie(x1[1], x2[1]) = at::vec::deinterleave2(b0, b1);
    } else {
      std::tie(x1[0], x1[1]) = IO::load2(in + i);
      std::tie(x2[0], x2[1]) = IO::load2(in + half + i);
    }
    Vec o1[2], o2[2];
    for (int h = 0; h < 2; ++h) {  // rotate_pair, W pairs at once
      const Vec c = Vec::loadu(cs + i + h * W), s = Vec::loadu(sn + i + h * W);
      o1[h] = x1[h] * c - x2[h] * s;
      o2[h] = x2[h] * c + x1[h] * s;
    }
    if constexpr (kInterleaved) {
      auto [a0, a1] = at::vec::interleave2(o1[0], o2[0]);
      auto [b0, b1] = at::vec::interleave2(o1[1], o2[1]);
      IO::store2(out + 2 * i, a0, a1);
      IO::store2(out + 2 * i + C, b0, b1);
    } else {
      IO::store2(out + i, o1[0], o1[1]);
      IO::store2(out + half + i, o2[0], o2[1]);
    }
  }
  using acc_t = at::opmath_type<scalar_t>;
  for (; i < half; ++i) {  // tail: fewer than C pairs left
    const int64_t a = pair_first(i, half, kInterleaved), b = pair_second(i, half, kInterleaved);
    acc_t o1, o2;
    rotate_pair<acc_t>(static_cast<acc_t>(in[a]), static_cast<acc_t>(in[b]), cs[i], sn[i], o1, o2);
    out[a] = static_cast<scalar_t>(o1);
    out[b] = static_cast<scalar_t>(o2);
  }
}

template <typename scalar_t, typename table_t, bool kInterleaved>
void rope_cpu(const RopeParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = p.rotary_dim / 2;
  const int64_t tail = p.head_dim - p.rotary_dim;
  const int64_t ntok = p.batch * p.seqlen;
  int64_t heads_total = 0;
  for (int t = 0; t < p.ntensors; ++t) heads_total += p.t[t].heads;
  // About 32k elements of work per task: enough to amortise the task overhead.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, heads_total * p.head_dim));

  at::parallel_for(0, ntok, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(2 * half);  // this task's cos/sin row, in the math type
    acc_t* cs = row.data();
    acc_t* sn = row.data() + half;
    for (int64_t tok = begin; tok < end; ++tok) {
      const int64_t b = tok / p.seqlen, s = tok % p.seqlen;
      // Range was checked by rope_run; token_position maps a bad one to -1.
      const int64_t pos = token_position(p, b, s);
      TORCH_CHECK_INDEX(pos >= 0, "apply_rope: position out of range");
      const table_t* crow = static_cast<const table_t*>(p.cos) + pos * p.table_stride;
      const table_t* srow = static_cast<const table_t*>(p.sin) + pos * p.table_stride;
      load_row(cs, crow, half, false);
      load_row(sn, srow, half, p.conjugate);
      for (int t = 0; t < p.ntensors; ++t) {
        const RopeTensorArgs& a = p.t[t];
        const scalar_t* in = static_cast<const scalar_t*>(a.in) + b * a.in_stride_b + s * a.in_stride_s;
        scalar_t* out = static_cast<scalar_t*>(a.out) + b * a.out_stride_b + s * a.out_stride_s;
        for (int64_t h = 0; h < a.heads; ++h) {
          const scalar_t* ih = in + h * a.in_stride_h;
          scalar_t* oh = out + h * a.out_stride_h;
          rotate_row<scalar_t, kInterleaved>(ih, oh, cs, sn, half);
          if (p.copy_tail && tail > 0)
            std::copy(ih + p.rotary_dim, ih + p.head_dim, oh + p.rotary_dim);
        }
      }
    }
  });
}

void launch_rope_cpu(const RopeParams& p, at::ScalarType x_dtype,
                     at::ScalarType table_dtype, c10::Device) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "apply_rope_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(table_dtype, "apply_rope_cpu_table", [&] {
      if (p.interleaved)
        rope_cpu<x_t, scalar_t, true>(p);
      else
        rope_cpu<x_t, scalar_t, false>(p);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pirope, CPU, m) { register_apply_rope_kernels<launch_rope_cpu>(m); }

}  // namespace pirope::cpu
