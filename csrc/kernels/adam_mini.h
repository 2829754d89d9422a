// Adam-mini (benchmark-spec §1.6) in one pass: each parameter is cut into equal contiguous blocks, one second
// moment per block, v_b ← β2·v_b + (1−β2)·mean_b(g²); u = m̂/(√v̂_b + ε). A chunk holds whole blocks, so the block
// mean, the update of v_b and the elementwise step run in the same kernel, with g read from cache the second time.
#pragma once

#include <ATen/ATen.h>

#include "kernels/adam.h"

namespace fastoptim {

struct AdamMiniStep {
  AdamScalars scalars;

  struct Math {
    StepScalars::Values s;
    AdamMoments adam;

    template <typename P, typename S>
    C10_HOST_DEVICE float reduce(const P&, const P& g, const S&) const {
      const float gf = s.grad_scale * element_cast<float>(g);
      return gf * gf;
    }

    // Updates the block's v from the sum of g² over its `length` elements; returns the denominator
    // (1 − β1^t)·(√v̂ + ε) that divides m, the bias correction of m folded in.
    template <typename S>
    C10_HOST_DEVICE float segment(S& v, float sum, int64_t length) const {
      const float vf = adam.beta2 * element_cast<float>(v) + (1.0f - adam.beta2) * (sum / static_cast<float>(length));
      v = element_cast<S>(vf);
      return adam.bias1 * (::sqrtf(element_cast<float>(v)) / adam.sqrt_bias2 + adam.eps);
    }

    template <typename P, typename S>
    C10_HOST_DEVICE void operator()(float denominator, P& p, const P& g, S& m) const {
      const float gf = s.grad_scale * element_cast<float>(g);
      const float mf = element_cast<float>(m) + (1.0f - adam.beta1) * (gf - element_cast<float>(m));
      m = element_cast<S>(mf);
      decoupled_step(p, mf / denominator, s);
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext& ctx) const {
    return {scalars.step_scalars.load(), scalars.moments(ctx)};
  }
};

// exp_avg_sqs[i] holds params[i]'s blocks: params[i].numel() must be a multiple of exp_avg_sqs[i].numel().
template <typename Backend>
void adam_mini_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const at::Tensor& lr, at::TensorList steps, double beta1, double beta2, double eps,
                double weight_decay, const std::optional<at::Tensor>& grad_scale) {
  const AdamCall call = check_adam_call(params, grads, {{"exp_avgs", exp_avgs}}, lr, steps, beta1, beta2, eps,
                                        weight_decay, grad_scale, false);
  if (!call.device) return;
  // exp_avg_sqs has one value per block, so it is checked on its own: same device and dtype rules, block counts
  // that divide the parameters.
  TORCH_CHECK(exp_avg_sqs.size() == params.size(), "fastoptim: exp_avg_sqs has ", exp_avg_sqs.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& v = exp_avg_sqs[i];
    TORCH_CHECK(v.is_contiguous(), "fastoptim: exp_avg_sqs[", i, "] is not contiguous; call .contiguous() first");
    TORCH_CHECK(v.device() == *call.device, "fastoptim: exp_avg_sqs[", i, "] is on ", v.device(),
                " but params[0] is on ", *call.device);
    const int64_t numel = params[i].numel(), blocks = v.numel();
    TORCH_CHECK(blocks > 0 ? numel % blocks == 0 : numel == 0, "fastoptim: exp_avg_sqs[", i, "] has ", blocks,
                " blocks, which does not divide params[", i, "]'s ", numel, " elements");
  }
  TORCH_CHECK(check_state_dtype({{"exp_avg_sqs", exp_avg_sqs}}, call.param_dtype) == call.state_dtype,
              "fastoptim: exp_avg_sqs and exp_avgs must share a dtype");
  FASTOPTIM_DISPATCH_PARAM_STATE(call.param_dtype, call.state_dtype, "adam_mini_", [&] {
    Backend::template multi_tensor_segment_apply<state_t, param_t, param_t, state_t>({params, grads, exp_avgs},
                                                                                    exp_avg_sqs, AdamMiniStep{call.scalars});
  });
}

}  // namespace fastoptim
