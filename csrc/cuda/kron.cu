#include <torch/library.h>

#include "cuda/multi_tensor_apply.cuh"
#include "kernels/kron.h"

TORCH_LIBRARY_IMPL(fastoptim, CUDA, m) {
  m.impl("kron_precondition", &fastoptim::kron_precondition<fastoptim::cuda::Backend>);
  m.impl("kron_update_preconditioner_", &fastoptim::kron_update_preconditioner_<fastoptim::cuda::Backend>);
  m.impl("kron_balance_", &fastoptim::kron_balance_);
}
