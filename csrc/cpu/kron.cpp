#include <torch/library.h>

#include "cpu/multi_tensor_apply.h"
#include "kernels/kron.h"

TORCH_LIBRARY_IMPL(fastoptim, CPU, m) {
  m.impl("kron_precondition", &fastoptim::kron_precondition<fastoptim::cpu::Backend>);
  m.impl("kron_update_preconditioner_", &fastoptim::kron_update_preconditioner_<fastoptim::cpu::Backend>);
  m.impl("kron_balance_", &fastoptim::kron_balance_);
}
