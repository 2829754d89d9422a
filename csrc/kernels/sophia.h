// Sophia-H (benchmark-spec §1.11) in one pass: m ← β1·m + (1−β1)·g; u = clip(m̂ / max(γ·h, ε), −c, c);
// w ← w − lr·(u + λ·w). And the Hessian EMA h ← β2·h + (1−β2)·ĥ of the refresh steps (no bias correction).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "kernels/sign_momentum.h"

namespace fastoptim {

struct SophiaStep {
  StepScalars scalars;
  const float* steps;  // steps[i]: the step count t of the call's i-th tensor (see step_counts)
  float beta1, gamma, eps, clip_threshold;

  struct Math {
    StepScalars::Values s;
    float beta1, gamma, eps, clip_threshold, bias1;
    template <typename P, typename S>
    C10_HOST_DEVICE void operator()(P& p, const P& g, S& m, const S& h) const {
      const float mf = lerp(element_cast<float>(m), s.grad_scale * element_cast<float>(g), 1.0f - beta1);
      m = element_cast<S>(mf);
      const float curvature = gamma * element_cast<float>(h);
      // Comparisons written so that a NaN passes through, as torch's clamp lets it.
      const float ratio = mf / ((curvature < eps ? eps : curvature) * bias1);
      const float u = ratio < -clip_threshold ? -clip_threshold : (ratio > clip_threshold ? clip_threshold : ratio);
      decoupled_step(p, u, s);
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext& ctx) const {
    return {scalars.load(), beta1, gamma, eps, clip_threshold, bias_correction(beta1, steps[ctx.tensor])};
  }
};

struct HessianEma {
  float beta2;
  template <typename E, typename S>
  C10_HOST_DEVICE void operator()(S& h, const E& estimate) const {
    h = element_cast<S>(lerp(element_cast<float>(h), element_cast<float>(estimate), 1.0f - beta2));
  }
  C10_HOST_DEVICE HessianEma load(const ChunkContext&) const { return *this; }
};

template <typename Backend>
void sophia_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
             const at::Tensor& lr, at::TensorList steps, double beta1, double gamma, double eps,
             double clip_threshold, double weight_decay, const std::optional<at::Tensor>& grad_scale) {
  const auto device = check_tensor_lists(
      {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"hessians", hessians}});
  if (!device) return;
  check_scalar("lr", lr, *device);
  const at::Tensor counts = step_counts(steps, params.size(), *device);
  const at::ScalarType param_dtype = common_float_dtype("params", params);
  check_grads_like_params(grads, param_dtype);
  const at::ScalarType state_dtype =
      check_state_dtype({{"exp_avgs", exp_avgs}, {"hessians", hessians}}, param_dtype);
  const SophiaStep functor{
      {lr.data_ptr<float>(), optional_scalar("grad_scale", grad_scale, *device), static_cast<float>(weight_decay)},
      counts.data_ptr<float>(),
      static_cast<float>(beta1),
      static_cast<float>(gamma),
      static_cast<float>(eps),
      static_cast<float>(clip_threshold)};
  FASTOPTIM_DISPATCH_PARAM_STATE(param_dtype, state_dtype, "sophia_", [&] {
    Backend::template multi_tensor_apply<param_t, const param_t, state_t, const state_t>(
        {params, grads, exp_avgs, hessians}, functor);
  });
}

// estimates have the parameters' dtype; hessians are float32 or that dtype.
template <typename Backend>
void sophia_hessian_(at::TensorList hessians, at::TensorList estimates, double beta2) {
  const auto device = check_tensor_lists({{"hessians", hessians}, {"estimates", estimates}});
  if (!device) return;
  const at::ScalarType estimate_dtype = common_float_dtype("estimates", estimates);
  const at::ScalarType state_dtype = check_state_dtype({{"hessians", hessians}}, estimate_dtype);
  FASTOPTIM_DISPATCH_PARAM_STATE(estimate_dtype, state_dtype, "sophia_hessian_", [&] {
    Backend::template multi_tensor_apply<state_t, const param_t>({hessians, estimates},
                                                                 HessianEma{static_cast<float>(beta2)});
  });
}

}  // namespace fastoptim
