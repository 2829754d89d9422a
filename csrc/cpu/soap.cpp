#include <torch/library.h>

#include "cpu/multi_tensor_apply.h"
#include "kernels/soap.h"

TORCH_LIBRARY_IMPL(fastoptim, CPU, m) {
  m.impl("soap_gram_", &fastoptim::soap_gram_);
  m.impl("soap_eigenbasis_", &fastoptim::soap_eigenbasis_);
  m.impl("soap_rotated_adam_", &fastoptim::soap_rotated_adam_<fastoptim::cpu::Backend>);
  m.impl("soap_refresh_", &fastoptim::soap_refresh_);
}
