#include <torch/library.h>

#include "cuda/multi_tensor_apply.cuh"
#include "kernels/decoupled_update.h"

TORCH_LIBRARY_IMPL(fastoptim, CUDA, m) {
  m.impl("decoupled_update_", &fastoptim::decoupled_update_<fastoptim::cuda::Backend>);
}
