// Host side of tma.cuh: TMA descriptors (CUtensorMap) of the attention tensors. The
// driver's cuTensorMapEncodeTiled is looked up once through the runtime, so the
// extension does not link libcuda itself.
#include "tma.cuh"

#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace pirope::cuda {

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // leave no sticky error for the next launch check
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

}  // namespace

bool encode_tile_map(CUtensorMap* map, const AttentionTensor& t, int64_t batch, int64_t seqlen, int64_t heads,
                     int head_dim, TileElem elem, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(t.ptr) % 16 != 0) return false;
  const int64_t elem_bytes = elem == TileElem::kFloat32 ? 4 : 2;
  // Dimensions innermost first: head dim, sequence, head, batch. TMA wants every stride
  // a multiple of 16 bytes below 2^40; a dimension of extent 1 is never stepped over,
  // so its stride (which torch leaves arbitrary) is replaced by a valid one.
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(seqlen),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const int64_t given[3] = {t.stride_s, t.stride_h, t.stride_b};
  cuuint64_t strides[3];
  int64_t extent = head_dim;  // elements spanned by the dimensions inside this one
  for (int i = 0; i < 3; ++i) {
    const int64_t s = dims[i + 1] == 1 ? extent : given[i];
    const int64_t bytes = s * elem_bytes;
    if (s <= 0 || bytes % 16 != 0 || bytes >= (int64_t{1} << 40)) return false;
    strides[i] = static_cast<cuuint64_t>(bytes);
    extent = std::max(extent, s * static_cast<int64_t>(dims[i + 1]));
  }
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(128 / elem_bytes), static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = elem == TileElem::kFloat32   ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                   : elem == TileElem::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode(map, type, 4, t.ptr, dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace pirope::cuda
