// The elementwise optimizer ops for this backend, registered from one translation unit: the kernels live in
// csrc/kernels/ (one header per family), and one file keeps the heavy ATen headers parsed once.
#include <torch/library.h>

#include "cuda/multi_tensor_apply.cuh"
#include "kernels/adam.h"
#include "kernels/adam_mini.h"
#include "kernels/global_norm.h"
#include "kernels/sign_momentum.h"
#include "kernels/sophia.h"

TORCH_LIBRARY_IMPL(fastoptim, CUDA, m) {
  m.impl("adamw_", &fastoptim::adamw_<fastoptim::cuda::Backend>);
  m.impl("cautious_adamw_", &fastoptim::cautious_adamw_<fastoptim::cuda::Backend>);
  m.impl("cautious_mask_counts", &fastoptim::cautious_mask_counts<fastoptim::cuda::Backend>);
  m.impl("mars_adamw_", &fastoptim::mars_adamw_<fastoptim::cuda::Backend>);
  m.impl("adam_mini_", &fastoptim::adam_mini_<fastoptim::cuda::Backend>);
  m.impl("lion_", &fastoptim::lion_<fastoptim::cuda::Backend>);
  m.impl("signum_", &fastoptim::signum_<fastoptim::cuda::Backend>);
  m.impl("momentum_", &fastoptim::momentum_<fastoptim::cuda::Backend>);
  m.impl("sophia_", &fastoptim::sophia_<fastoptim::cuda::Backend>);
  m.impl("sophia_hessian_", &fastoptim::sophia_hessian_<fastoptim::cuda::Backend>);
  m.impl("clip_scale", &fastoptim::clip_scale<fastoptim::cuda::Backend>);
  m.impl("mars_clip_scale", &fastoptim::mars_clip_scale<fastoptim::cuda::Backend>);
}
