// Momentum-buffer optimizers in one pass: Lion (benchmark-spec §1.5), signum (Scion's elementwise branch, §1.8)
// and the plain/Nesterov, heavy-ball/EMA momentum that feeds Muon's and Scion's Newton–Schulz (§1.7, §1.8).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "kernels/step_math.h"

namespace fastoptim {

C10_HOST_DEVICE inline float lerp(float from, float to, float weight) { return from + weight * (to - from); }

// u = sign(β1·m + (1−β1)·g); m ← β2·m + (1−β2)·g; w ← w − lr·(u + λ·w).
struct LionStep {
  StepScalars scalars;
  float beta1, beta2;

  struct Math {
    StepScalars::Values s;
    float beta1, beta2;
    template <typename P, typename S>
    C10_HOST_DEVICE void operator()(P& p, const P& g, S& m) const {
      const float gf = s.grad_scale * element_cast<float>(g), mf = element_cast<float>(m);
      m = element_cast<S>(lerp(mf, gf, 1.0f - beta2));
      decoupled_step(p, sign_of(lerp(mf, gf, 1.0f - beta1)), s);
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext&) const { return {scalars.load(), beta1, beta2}; }
};

// buf ← β·buf + (1−β)·g; u = sign(buf); w ← w − lr·(u + λ·w).
struct SignumStep {
  StepScalars scalars;
  float beta;

  struct Math {
    StepScalars::Values s;
    float beta;
    template <typename P, typename S>
    C10_HOST_DEVICE void operator()(P& p, const P& g, S& buf) const {
      const float updated = lerp(element_cast<float>(buf), s.grad_scale * element_cast<float>(g), 1.0f - beta);
      buf = element_cast<S>(updated);
      decoupled_step(p, sign_of(updated), s);
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext&) const { return {scalars.load(), beta}; }
};

// Heavy ball: buf ← β·buf + g, u = β·buf + g (Nesterov) or buf. EMA: buf ← β·buf + (1−β)·g, u = β·buf + (1−β)·g
// (Nesterov) or buf. Parameters are not touched; the direction goes to `directions` when the caller gives them.
struct MomentumMath {
  float beta, grad_weight;  // grad_weight: 1 (heavy ball) or 1 − β (EMA)
  float grad_scale;
  int nesterov;  // not bool: a byte-wide flag keeps GCC from vectorising loops whose elements are all 16-bit

  template <typename G, typename S>
  C10_HOST_DEVICE float update(const G& g, S& buf) const {
    const float gf = grad_scale * element_cast<float>(g);
    const float updated = beta * element_cast<float>(buf) + grad_weight * gf;
    buf = element_cast<S>(updated);
    return nesterov ? beta * updated + grad_weight * gf : updated;
  }
  template <typename G, typename S>
  C10_HOST_DEVICE void operator()(const G& g, S& buf) const {
    update(g, buf);
  }
  template <typename G, typename S>
  C10_HOST_DEVICE void operator()(const G& g, S& buf, S& direction) const {
    direction = element_cast<S>(update(g, buf));
  }
};

struct MomentumStep {
  const float* grad_scale;
  float beta;
  bool nesterov, ema;

  C10_HOST_DEVICE MomentumMath load(const ChunkContext&) const {
    return {beta, ema ? 1.0f - beta : 1.0f, grad_scale ? *grad_scale : 1.0f, nesterov};
  }
};

// Checks of an op over (params, grads, one state list); returns the device (nullopt: nothing to do) and dtypes.
struct StateCall {
  std::optional<at::Device> device;
  at::ScalarType param_dtype, state_dtype;
  StepScalars scalars;
};

inline StateCall check_state_call(at::TensorList params, at::TensorList grads, NamedList state,
                                  const at::Tensor& lr, double weight_decay,
                                  const std::optional<at::Tensor>& grad_scale) {
  StateCall call{check_tensor_lists({{"params", params}, {"grads", grads}, state}), at::kFloat, at::kFloat, {}};
  if (!call.device) return call;
  check_scalar("lr", lr, *call.device);
  call.param_dtype = common_float_dtype("params", params);
  check_grads_like_params(grads, call.param_dtype);
  call.state_dtype = check_state_dtype({state}, call.param_dtype);
  call.scalars = {lr.data_ptr<float>(), optional_scalar("grad_scale", grad_scale, *call.device),
                  static_cast<float>(weight_decay)};
  return call;
}

template <typename Backend>
void lion_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const at::Tensor& lr, double beta1,
           double beta2, double weight_decay, const std::optional<at::Tensor>& grad_scale) {
  const StateCall call = check_state_call(params, grads, {"exp_avgs", exp_avgs}, lr, weight_decay, grad_scale);
  if (!call.device) return;
  FASTOPTIM_DISPATCH_PARAM_STATE(call.param_dtype, call.state_dtype, "lion_", [&] {
    Backend::template multi_tensor_apply<param_t, const param_t, state_t>(
        {params, grads, exp_avgs}, LionStep{call.scalars, static_cast<float>(beta1), static_cast<float>(beta2)});
  });
}

template <typename Backend>
void signum_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, const at::Tensor& lr,
             double beta, double weight_decay, const std::optional<at::Tensor>& grad_scale) {
  const StateCall call =
      check_state_call(params, grads, {"momentum_buffers", momentum_buffers}, lr, weight_decay, grad_scale);
  if (!call.device) return;
  FASTOPTIM_DISPATCH_PARAM_STATE(call.param_dtype, call.state_dtype, "signum_", [&] {
    Backend::template multi_tensor_apply<param_t, const param_t, state_t>({params, grads, momentum_buffers},
                                                                          SignumStep{call.scalars, static_cast<float>(beta)});
  });
}

// `directions` is empty (only the buffers are updated) or one tensor per grad, with the buffers' dtype.
template <typename Backend>
void momentum_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList directions, double beta,
               bool nesterov, bool ema, const std::optional<at::Tensor>& grad_scale) {
  const bool with_directions = !directions.empty();
  const auto device = with_directions
                          ? check_tensor_lists({{"grads", grads}, {"momentum_buffers", momentum_buffers},
                                                {"directions", directions}})
                          : check_tensor_lists({{"grads", grads}, {"momentum_buffers", momentum_buffers}});
  if (!device) return;
  const at::ScalarType grad_dtype = common_float_dtype("grads", grads);
  const at::ScalarType state_dtype = check_state_dtype(
      with_directions ? std::vector<NamedList>{{"momentum_buffers", momentum_buffers}, {"directions", directions}}
                      : std::vector<NamedList>{{"momentum_buffers", momentum_buffers}},
      grad_dtype);
  const MomentumStep functor{optional_scalar("grad_scale", grad_scale, *device), static_cast<float>(beta), nesterov,
                             ema};
  FASTOPTIM_DISPATCH_PARAM_STATE(grad_dtype, state_dtype, "momentum_", [&] {
    if (with_directions) {
      Backend::template multi_tensor_apply<const param_t, state_t, state_t>({grads, momentum_buffers, directions},
                                                                            functor);
    } else {
      Backend::template multi_tensor_apply<const param_t, state_t>({grads, momentum_buffers}, functor);
    }
  });
}

}  // namespace fastoptim
