#include <torch/library.h>

#include "cuda/multi_tensor_apply.cuh"
#include "kernels/soap.h"

TORCH_LIBRARY_IMPL(fastoptim, CUDA, m) {
  m.impl("soap_gram_", &fastoptim::soap_gram_);
  m.impl("soap_eigenbasis_", &fastoptim::soap_eigenbasis_);
  m.impl("soap_rotated_adam_", &fastoptim::soap_rotated_adam_<fastoptim::cuda::Backend>);
  m.impl("soap_refresh_", &fastoptim::soap_refresh_);
}
