#include <torch/library.h>

#include "cpu/multi_tensor_apply.h"
#include "cpu/symmetric_tiles.h"
#include "kernels/soap.h"

namespace fastoptim::cpu {
// method="auto" computes the statistics on upper-triangular tiles from this block side up. One thread of a shared
// AMD EPYC measured no gain below it: both sides of 4 blocks of 512 × 512 in 31 ms tiled against 30 ms plain.
constexpr int64_t kSoapSymmetricMinRows = 1024;
}  // namespace fastoptim::cpu

TORCH_LIBRARY_IMPL(fastoptim, CPU, m) {
  m.impl("soap_gram_", &fastoptim::soap_gram_<fastoptim::cpu::SymmetricTiles, fastoptim::cpu::kSoapSymmetricMinRows>);
  m.impl("soap_eigenbasis_", &fastoptim::soap_eigenbasis_);
  m.impl("soap_rotated_adam_", &fastoptim::soap_rotated_adam_<fastoptim::cpu::Backend>);
  m.impl("soap_refresh_", &fastoptim::soap_refresh_);
}
