#include <torch/library.h>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/symmetric_tiles.cuh"
#include "kernels/soap.h"

namespace fastoptim::cuda {
// method="auto" computes the statistics on upper-triangular tiles from this block side up (a guess, NOT measured on a
// GPU; bench/bench_soap_kron.py compares both methods).
constexpr int64_t kSoapSymmetricMinRows = 512;
}  // namespace fastoptim::cuda

TORCH_LIBRARY_IMPL(fastoptim, CUDA, m) {
  m.impl("soap_gram_", &fastoptim::soap_gram_<fastoptim::cuda::SymmetricTiles, fastoptim::cuda::kSoapSymmetricMinRows>);
  m.impl("soap_eigenbasis_", &fastoptim::soap_eigenbasis_);
  m.impl("soap_rotated_adam_", &fastoptim::soap_rotated_adam_<fastoptim::cuda::Backend>);
  m.impl("soap_refresh_", &fastoptim::soap_refresh_);
}
