// The Adam family in one pass over memory (benchmark-spec §1.1–§1.4): AdamW and NAdamW (adamw_), Cautious
// (cautious_adamw_: a counting pass over g and m for the per-tensor mask mean, cautious_mask_counts on its own, then
// the update) and Mars
// (mars_adamw_: Adam on the corrected gradient, keeping the previous raw gradient).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "kernels/step_math.h"

namespace fastoptim {

// The Adam moments and direction at one step count; the same code in every Adam kernel.
struct AdamMoments {
  float beta1, beta2, eps;
  float bias1, sqrt_bias2;  // 1 − β1^t, √(1 − β2^t)
  // Their reciprocals: a multiply per element instead of a divide, which on the CPU is what bounds the step.
  float inv_bias1, inv_sqrt_bias2;
  int nesterov;  // not bool: a byte-wide flag keeps GCC from vectorising loops whose elements are all 16-bit
  float nesterov_m, nesterov_g;  // NAdamW's numerator β1·m/(1−β1^(t+1)) + (1−β1)·g/(1−β1^t)

  C10_HOST_DEVICE static AdamMoments at(float step, float beta1, float beta2, float eps, bool nesterov) {
    const float bias1 = bias_correction(beta1, step);
    const float sqrt_bias2 = ::sqrtf(bias_correction(beta2, step));
    return {beta1,
            beta2,
            eps,
            bias1,
            sqrt_bias2,
            1.0f / bias1,
            1.0f / sqrt_bias2,
            nesterov,
            beta1 / bias_correction(beta1, step + 1.0f),
            (1.0f - beta1) / bias1};
  }

  // Updates m with the gradient g; returns the numerator m̂ (or NAdamW's), which has the direction's sign.
  C10_HOST_DEVICE float numerator(float g, float& m) const {
    m += (1.0f - beta1) * (g - m);
    return nesterov ? nesterov_m * m + nesterov_g * g : m * inv_bias1;
  }

  // Updates v with g; returns the direction numerator/(√v̂ + ε).
  C10_HOST_DEVICE float scaled(float numerator, float g, float& v) const {
    v = beta2 * v + (1.0f - beta2) * g * g;
    return numerator / (::sqrtf(v) * inv_sqrt_bias2 + eps);
  }

  // Updates m and v with the gradient g; returns u = m̂/(√v̂ + ε).
  C10_HOST_DEVICE float direction(float g, float& m, float& v) const { return scaled(numerator(g, m), g, v); }
};

// The hyperparameters an Adam kernel reads: fixed ones by value, the step's from device memory.
struct AdamScalars {
  StepScalars step_scalars;
  const float* steps;  // steps[i]: the step count t of the call's i-th tensor (see step_counts)
  float beta1, beta2, eps;
  bool nesterov;

  C10_HOST_DEVICE AdamMoments moments(const ChunkContext& ctx) const {
    return AdamMoments::at(steps[ctx.tensor], beta1, beta2, eps, nesterov);
  }
};

struct AdamWStep {
  AdamScalars scalars;

  struct Math {
    StepScalars::Values s;
    AdamMoments adam;
    template <typename P, typename S>
    C10_HOST_DEVICE void operator()(P& p, const P& g, S& m, S& v) const {
      float mf = element_cast<float>(m), vf = element_cast<float>(v);
      const float u = adam.direction(s.grad_scale * element_cast<float>(g), mf, vf);
      m = element_cast<S>(mf);
      v = element_cast<S>(vf);
      decoupled_step(p, u, s);
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext& ctx) const {
    return {scalars.step_scalars.load(), scalars.moments(ctx)};
  }
};

// Cautious, pass 1: per tensor, how many elements have u·g > 0, with u's sign that of its numerator (from the first
// moment this step will write): the pass reads g and m only.
struct CautiousCount {
  AdamScalars scalars;
  unsigned long long* counts;  // one per tensor, zeroed by the caller

  struct Math {
    float grad_scale;
    AdamMoments adam;
    unsigned long long* count;
    template <typename P, typename S>
    C10_HOST_DEVICE float operator()(const P& g, const S& m) const {
      float mf = element_cast<float>(m);
      const float gf = grad_scale * element_cast<float>(g);
      return adam.numerator(gf, mf) * gf > 0.0f ? 1.0f : 0.0f;
    }
    // A chunk's count is below 2^24, so its float sum is exact.
    C10_HOST_DEVICE void finish(float chunk_count) const {
      atomic_add(count, static_cast<unsigned long long>(chunk_count));
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext& ctx) const {
    return {scalars.step_scalars.load().grad_scale, scalars.moments(ctx), counts + ctx.tensor};
  }
};

// Cautious, pass 2: the Adam step with u ← u·1[u·g > 0]/(mean(1[u·g > 0]) + ε). Both passes take the mask from
// the numerator, computed by the same inline code from the same inputs, so they agree on it. The mean comes from
// pass 1's counts, or is given (`means`: a tensor stepped in parts on several ranks, whose counts were summed).
struct CautiousStep {
  AdamScalars scalars;
  const unsigned long long* counts;  // used where means is null
  const float* means;

  struct Math {
    StepScalars::Values s;
    AdamMoments adam;
    float mask_scale;  // 1/(mean(mask) + ε)
    template <typename P, typename S>
    C10_HOST_DEVICE void operator()(P& p, const P& g, S& m, S& v) const {
      float mf = element_cast<float>(m), vf = element_cast<float>(v);
      const float gf = s.grad_scale * element_cast<float>(g);
      const float numerator = adam.numerator(gf, mf);
      const float u = adam.scaled(numerator, gf, vf);
      m = element_cast<S>(mf);
      v = element_cast<S>(vf);
      decoupled_step(p, numerator * gf > 0.0f ? u * mask_scale : 0.0f, s);
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext& ctx) const {
    const float mean = means != nullptr ? means[ctx.tensor]
                                        : static_cast<float>(static_cast<double>(counts[ctx.tensor]) /
                                                             static_cast<double>(ctx.numel));
    return {scalars.step_scalars.load(), scalars.moments(ctx), 1.0f / (mean + scalars.eps)};
  }
};

// Mars: Adam on c = g + γ·β1/(1−β1)·(g − g_prev), times the clip factor; then g_prev ← g.
struct MarsStep {
  AdamScalars scalars;
  float correction;  // γ·β1/(1−β1)

  struct Math {
    StepScalars::Values s;
    AdamMoments adam;
    float correction;
    template <typename P, typename S>
    C10_HOST_DEVICE void operator()(P& p, const P& g, S& prev, S& m, S& v) const {
      const float gf = element_cast<float>(g);
      const float c = s.grad_scale * (gf + correction * (gf - element_cast<float>(prev)));
      prev = element_cast<S>(gf);
      float mf = element_cast<float>(m), vf = element_cast<float>(v);
      const float u = adam.direction(c, mf, vf);
      m = element_cast<S>(mf);
      v = element_cast<S>(vf);
      decoupled_step(p, u, s);
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext& ctx) const {
    return {scalars.step_scalars.load(), scalars.moments(ctx), correction};
  }
};

// Checks shared by the Adam ops; returns the device (nullopt: nothing to do) and the params' and state dtypes.
struct AdamCall {
  std::optional<at::Device> device;
  at::ScalarType param_dtype, state_dtype;
  at::Tensor step_counts;  // what scalars.steps points into: kept alive until the kernels are queued
  AdamScalars scalars;
};

inline AdamCall check_adam_call(at::TensorList params, at::TensorList grads, c10::ArrayRef<NamedList> state,
                                const at::Tensor& lr, at::TensorList steps,
                                double beta1, double beta2, double eps, double weight_decay,
                                const std::optional<at::Tensor>& grad_scale, bool nesterov) {
  std::vector<NamedList> lists{{"params", params}, {"grads", grads}};
  lists.insert(lists.end(), state.begin(), state.end());
  AdamCall call{check_tensor_lists(lists), at::kFloat, at::kFloat, {}, {}};
  if (!call.device) return call;
  check_scalar("lr", lr, *call.device);
  call.step_counts = step_counts(steps, params.size(), *call.device);
  call.param_dtype = common_float_dtype("params", params);
  check_grads_like_params(grads, call.param_dtype);
  call.state_dtype = check_state_dtype(state, call.param_dtype);
  call.scalars = {{lr.data_ptr<float>(), optional_scalar("grad_scale", grad_scale, *call.device),
                   static_cast<float>(weight_decay)},
                  call.step_counts.data_ptr<float>(),
                  static_cast<float>(beta1),
                  static_cast<float>(beta2),
                  static_cast<float>(eps),
                  nesterov};
  return call;
}

template <typename Backend>
void adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
            const at::Tensor& lr, at::TensorList steps, double beta1, double beta2, double eps, double weight_decay,
            bool nesterov, const std::optional<at::Tensor>& grad_scale) {
  const AdamCall call = check_adam_call(params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, lr,
                                        steps, beta1, beta2, eps, weight_decay, grad_scale, nesterov);
  if (!call.device) return;
  FASTOPTIM_DISPATCH_PARAM_STATE(call.param_dtype, call.state_dtype, "adamw_", [&] {
    Backend::template multi_tensor_apply<param_t, const param_t, state_t, state_t>(
        {params, grads, exp_avgs, exp_avg_sqs}, AdamWStep{call.scalars});
  });
}

// Cautious's pass 1 on checked arguments: per tensor, the count of u·g > 0 (int64).
template <typename Backend>
at::Tensor count_cautious_mask(const AdamCall& call, at::TensorList grads, at::TensorList exp_avgs) {
  const at::Tensor counts = at::zeros({static_cast<int64_t>(grads.size())},
                                      at::TensorOptions().dtype(at::kLong).device(call.device.value_or(at::kCPU)));
  if (!call.device) return counts;
  auto* count_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  FASTOPTIM_DISPATCH_PARAM_STATE(call.param_dtype, call.state_dtype, "cautious_mask_counts", [&] {
    Backend::template multi_tensor_reduce<param_t, state_t>({grads, exp_avgs}, CautiousCount{call.scalars, count_ptr});
  });
  return counts;
}

// Cautious's pass 1 on its own, for a caller that steps parts of tensors and sums the counts of the parts before
// pass 2 (cautious_adamw_ with mask_means). The same arguments as cautious_adamw_, checked the same way; nothing is
// written.
template <typename Backend>
at::Tensor cautious_mask_counts(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, const at::Tensor& lr, at::TensorList steps, double beta1,
                                double beta2, double eps, double weight_decay, bool nesterov,
                                const std::optional<at::Tensor>& grad_scale) {
  const AdamCall call = check_adam_call(params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, lr,
                                        steps, beta1, beta2, eps, weight_decay, grad_scale, nesterov);
  return count_cautious_mask<Backend>(call, grads, exp_avgs);
}

template <typename Backend>
void cautious_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, const at::Tensor& lr, at::TensorList steps, double beta1,
                     double beta2, double eps, double weight_decay, bool nesterov,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& mask_means) {
  const AdamCall call = check_adam_call(params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, lr,
                                        steps, beta1, beta2, eps, weight_decay, grad_scale, nesterov);
  if (!call.device) return;
  if (mask_means) {
    const at::Tensor& t = *mask_means;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == static_cast<int64_t>(params.size()) && t.scalar_type() == at::kFloat,
                "fastoptim: mask_means must be a float32 vector with one value per tensor (", params.size(),
                "), got dtype ", dtype_name(t.scalar_type()), " and shape ", t.sizes());
    TORCH_CHECK(t.device() == *call.device && t.is_contiguous(), "fastoptim: mask_means is on ", t.device(),
                (t.is_contiguous() ? "" : " and not contiguous"), "; it must be contiguous on ", *call.device);
  }
  const at::Tensor counts = mask_means ? at::Tensor() : count_cautious_mask<Backend>(call, grads, exp_avgs);
  const CautiousStep step{
      call.scalars,
      counts.defined() ? reinterpret_cast<const unsigned long long*>(counts.data_ptr<int64_t>()) : nullptr,
      mask_means ? mask_means->data_ptr<float>() : nullptr};
  FASTOPTIM_DISPATCH_PARAM_STATE(call.param_dtype, call.state_dtype, "cautious_adamw_", [&] {
    Backend::template multi_tensor_apply<param_t, const param_t, state_t, state_t>(
        {params, grads, exp_avgs, exp_avg_sqs}, step);
  });
}

template <typename Backend>
void mars_adamw_(at::TensorList params, at::TensorList grads, at::TensorList prev_grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, const at::Tensor& lr, at::TensorList steps, double beta1, double beta2,
                 double eps, double weight_decay, double gamma, const std::optional<at::Tensor>& grad_scale) {
  const AdamCall call = check_adam_call(
      params, grads, {{"prev_grads", prev_grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, lr, steps,
      beta1, beta2, eps, weight_decay, grad_scale, false);
  if (!call.device) return;
  const auto correction = static_cast<float>(gamma * beta1 / (1.0 - beta1));
  FASTOPTIM_DISPATCH_PARAM_STATE(call.param_dtype, call.state_dtype, "mars_adamw_", [&] {
    Backend::template multi_tensor_apply<param_t, const param_t, state_t, state_t, state_t>(
        {params, grads, prev_grads, exp_avgs, exp_avg_sqs}, MarsStep{call.scalars, correction});
  });
}

}  // namespace fastoptim
