// The CUDA side of common/symmetric_tiles.h: all (matrix, upper tile pair) GEMMs of a batch in one
// cublasGemmBatchedEx call over device pointer arrays, and one mirror/combine kernel. Operands may be float32,
// bfloat16 or float16 (fp32 accumulation); the result's dtype may differ from the operands' (a float32 buffer for
// bfloat16 operands).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastoptim::cuda {

// A list of device addresses as a device array, copied from pinned memory on the current stream.
at::Tensor device_pointer_table(const std::vector<const void*>& pointers, const at::Device& device);

struct SymmetricTiles {
  static void upper_products(const at::Tensor& left, const at::Tensor& right, double alpha, double beta,
                             at::Tensor& out, int64_t tile);
  static void combine(const at::Tensor& upper, const at::Tensor& gram, double coef, at::Tensor& out);
};

}  // namespace fastoptim::cuda
