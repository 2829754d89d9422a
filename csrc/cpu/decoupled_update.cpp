#include <torch/library.h>

#include "cpu/multi_tensor_apply.h"
#include "kernels/decoupled_update.h"

TORCH_LIBRARY_IMPL(fastoptim, CPU, m) {
  m.impl("decoupled_update_", &fastoptim::decoupled_update_<fastoptim::cpu::Backend>);
}
