// The CUDA side of common/symmetric_tiles.h: one cublasGemmStridedBatchedEx per strip (tile row) for the whole
// batch, no per-call address tables (capturable), and one mirror/combine kernel. Operands may be float32,
// bfloat16 or float16 (fp32 accumulation); the result's dtype may differ from the operands' (a float32 buffer for
// bfloat16 operands).
#pragma once

#include <ATen/ATen.h>

namespace fastoptim::cuda {

struct SymmetricTiles {
  static void upper_products(const at::Tensor& left, const at::Tensor& right, double alpha, double beta,
                             at::Tensor& out, int64_t tile);
  static void combine(const at::Tensor& upper, const at::Tensor& gram, double coef, double diagonal,
                      at::Tensor& out);
};

}  // namespace fastoptim::cuda
