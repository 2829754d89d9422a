// What every elementwise optimizer kernel shares: the dtype rules of its lists, the step scalars it reads from
// device tensors, the clip factor folded into the gradient read, and the decoupled update w ← w − lr·(u + λ·w).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/multi_tensor.h"

// Runs the lambda __VA_ARGS__ (which sees `param_t` and `state_t`) for the params' dtype and a state dtype that is
// float32 or the params' dtype (check_state_dtype has made sure of it).
#define FASTOPTIM_DISPATCH_PARAM_STATE(PARAM_DTYPE, STATE_DTYPE, NAME, ...) \
  FASTOPTIM_DISPATCH_PARAM(PARAM_DTYPE, NAME, [&] {                          \
    if ((STATE_DTYPE) == at::kFloat) {                                       \
      using state_t = float;                                                 \
      __VA_ARGS__();                                                         \
    } else {                                                                 \
      using state_t = param_t;                                               \
      __VA_ARGS__();                                                         \
    }                                                                        \
  })

namespace fastoptim {

// Every list in `lists` has one dtype: float32 or the params' dtype (state is float32 by default; keeping it in the
// params' dtype is the memory-saving option). Returns that dtype (float32 for empty lists).
inline at::ScalarType check_state_dtype(c10::ArrayRef<NamedList> lists, at::ScalarType param_dtype) {
  std::optional<at::ScalarType> state_dtype;
  for (const auto& [name, list] : lists) {
    if (list.empty()) continue;
    const at::ScalarType dtype = common_float_dtype(name, list);
    TORCH_CHECK(dtype == at::kFloat || dtype == param_dtype, "fastoptim: ", name, " has dtype ", dtype_name(dtype),
                "; optimizer state must be float32 or the params' dtype ", dtype_name(param_dtype));
    TORCH_CHECK(!state_dtype || *state_dtype == dtype, "fastoptim: ", name, " has dtype ", dtype_name(dtype),
                " but the other state lists have ", dtype_name(*state_dtype), "; one call takes one state dtype");
    state_dtype = dtype;
  }
  return state_dtype.value_or(at::kFloat);
}

// grads[i] has the dtype of params[i] (as torch's autograd makes them).
inline void check_grads_like_params(at::TensorList grads, at::ScalarType param_dtype) {
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].scalar_type() == param_dtype, "fastoptim: grads[", i, "] has dtype ",
                dtype_name(grads[i].scalar_type()), " but params have ", dtype_name(param_dtype));
  }
}

// The clip factor's address, or nullptr when the gradients are not clipped.
inline const float* optional_scalar(const char* name, const std::optional<at::Tensor>& t, const at::Device& device) {
  if (!t) return nullptr;
  check_scalar(name, *t, device);
  return t->data_ptr<float>();
}

// The scalars of one step as the kernels see them: read once per chunk, from device memory.
struct StepScalars {
  const float* lr;
  const float* grad_scale;  // nullptr: not clipped
  float weight_decay;

  struct Values {
    float lr, keep, grad_scale;  // keep = 1 − lr·λ
  };

  C10_HOST_DEVICE Values load() const {
    const float lr_now = *lr;
    return {lr_now, 1.0f - lr_now * weight_decay, grad_scale ? *grad_scale : 1.0f};
  }
};

// The per-parameter step counters of a bias-correcting op: steps[i] is the count t of params[i] (1 on its first
// step), a 0-dim float32 tensor on the params' device. The ops only read them (the functional core advances them
// before the call), so parameters at different counts share one launch. Returns the counts gathered on the device
// into one float32 vector, which the kernels index by a chunk's tensor: no host read, so a step can be captured.
inline at::Tensor step_counts(at::TensorList steps, size_t n_params, const at::Device& device) {
  TORCH_CHECK(steps.size() == n_params, "fastoptim: steps has ", steps.size(), " tensors but params has ", n_params,
              "; pass one step counter per parameter");
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& t = steps[i];
    TORCH_CHECK(t.scalar_type() == at::kFloat, "fastoptim: steps[", i, "] has dtype ", dtype_name(t.scalar_type()),
                "; a step counter is a 0-dim float32 tensor");
    TORCH_CHECK(t.dim() == 0, "fastoptim: steps[", i, "] has ", t.dim(), " dims; a step counter is a 0-dim tensor");
    TORCH_CHECK(t.device() == device, "fastoptim: steps[", i, "] is on ", t.device(), " but the tensors are on ",
                device);
  }
  return at::stack(steps);
}

// 1 − β^t for the step count t held in a float; in double, so that 1 − β^t keeps its digits for β near 1.
C10_HOST_DEVICE inline float bias_correction(float beta, float step) {
  return static_cast<float>(1.0 - ::pow(static_cast<double>(beta), static_cast<double>(step)));
}

C10_HOST_DEVICE inline float sign_of(float x) { return static_cast<float>((x > 0.0f) - (x < 0.0f)); }

// w ← w − lr·(u + λ·w), computed as w·(1 − lr·λ) − lr·u in float32 and rounded once to the parameter's dtype.
template <typename P>
C10_HOST_DEVICE inline void decoupled_step(P& p, float u, const StepScalars::Values& s) {
  p = element_cast<P>(element_cast<float>(p) * s.keep - s.lr * u);
}

}  // namespace fastoptim
