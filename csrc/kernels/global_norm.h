// Global-norm clipping without a pass over the update: one multi-tensor reduction writes each chunk's sum of
// squares, one single-block kernel adds them in a fixed order and writes min(1, max_norm/‖·‖) to a device scalar,
// and the update kernels multiply the gradient by it as they read it (their grad_scale).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "kernels/step_math.h"

namespace fastoptim {

// The sum of squares of each chunk of `Value`'s per-element values into partials[global_chunk].
template <typename Value>
struct ChunkSquares {
  Value value;
  float* partials;

  struct Math {
    typename Value::Math value;
    float* partial;
    template <typename... Ts>
    C10_HOST_DEVICE float operator()(const Ts&... elements) const {
      const float x = value(elements...);
      return x * x;
    }
    C10_HOST_DEVICE void finish(float sum) const { *partial = sum; }
  };

  C10_HOST_DEVICE Math load(const ChunkContext& ctx) const { return {value.load(), partials + ctx.global_chunk}; }
};

struct GradientValue {
  struct Math {
    template <typename G>
    C10_HOST_DEVICE float operator()(const G& g) const {
      return element_cast<float>(g);
    }
  };
  C10_HOST_DEVICE Math load() const { return {}; }
};

// Mars's corrected gradient c = g + γ·β1/(1−β1)·(g − g_prev), whose global norm Mars clips.
struct MarsCorrectedValue {
  float correction;
  struct Math {
    float correction;
    template <typename G, typename S>
    C10_HOST_DEVICE float operator()(const G& g, const S& prev) const {
      const float gf = element_cast<float>(g);
      return gf + correction * (gf - element_cast<float>(prev));
    }
  };
  C10_HOST_DEVICE Math load() const { return {correction}; }
};

// min(1, max_norm/√(sum of squares)): optax's clip_by_global_norm factor (1 for a zero norm, NaN for a NaN one).
struct ClipFactor {
  float max_norm;
  C10_HOST_DEVICE float operator()(double sum_of_squares) const {
    const float factor = static_cast<float>(static_cast<double>(max_norm) / ::sqrt(sum_of_squares));
    return factor > 1.0f ? 1.0f : factor;
  }
};

inline int64_t total_chunks(at::TensorList tensors) {
  int64_t chunks = 0;
  for (const at::Tensor& t : tensors) chunks += chunks_of(t.numel());
  return chunks;
}

inline at::Tensor clip_factor_tensor(at::Device device) {
  return at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
}

// tensors may mix float32, bfloat16 and float16 (one reduction launch per dtype present).
template <typename Backend>
at::Tensor clip_scale(at::TensorList tensors, double max_norm) {
  TORCH_CHECK(std::isfinite(max_norm) && max_norm > 0, "fastoptim: clip_scale: max_norm must be finite and > 0, got ",
              max_norm);
  const auto device = check_tensor_lists({{"tensors", tensors}});
  TORCH_CHECK(device, "fastoptim: clip_scale: tensors is empty; there is no device to put the factor on");
  std::array<std::vector<at::Tensor>, 3> by_dtype;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::ScalarType dtype = tensors[i].scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fastoptim: tensors[", i,
                "] has dtype ", dtype_name(dtype), "; supported are float32, bfloat16 and float16");
    by_dtype[dtype == at::kFloat ? 0 : dtype == at::kBFloat16 ? 1 : 2].push_back(tensors[i]);
  }
  const at::Tensor partials =
      at::empty({total_chunks(tensors)}, at::TensorOptions().dtype(at::kFloat).device(*device));
  float* next = partials.data_ptr<float>();
  for (const auto& group : by_dtype) {
    if (group.empty()) continue;
    FASTOPTIM_DISPATCH_PARAM(group[0].scalar_type(), "clip_scale", [&] {
      Backend::template multi_tensor_reduce<param_t>({group}, ChunkSquares<GradientValue>{{}, next});
    });
    next += total_chunks(group);
  }
  const at::Tensor factor = clip_factor_tensor(*device);
  Backend::finish_sum(partials, factor, ClipFactor{static_cast<float>(max_norm)});
  return factor;
}

template <typename Backend>
at::Tensor mars_clip_scale(at::TensorList grads, at::TensorList prev_grads, double gamma, double beta1,
                           double max_norm) {
  TORCH_CHECK(std::isfinite(max_norm) && max_norm > 0,
              "fastoptim: mars_clip_scale: max_norm must be finite and > 0, got ", max_norm);
  const auto device = check_tensor_lists({{"grads", grads}, {"prev_grads", prev_grads}});
  TORCH_CHECK(device, "fastoptim: mars_clip_scale: grads is empty; there is no device to put the factor on");
  const at::ScalarType grad_dtype = common_float_dtype("grads", grads);
  const at::ScalarType state_dtype = check_state_dtype({{"prev_grads", prev_grads}}, grad_dtype);
  const at::Tensor partials = at::empty({total_chunks(grads)}, at::TensorOptions().dtype(at::kFloat).device(*device));
  const ChunkSquares<MarsCorrectedValue> functor{{static_cast<float>(gamma * beta1 / (1.0 - beta1))},
                                                 partials.data_ptr<float>()};
  FASTOPTIM_DISPATCH_PARAM_STATE(grad_dtype, state_dtype, "mars_clip_scale", [&] {
    Backend::template multi_tensor_reduce<param_t, state_t>({grads, prev_grads}, functor);
  });
  const at::Tensor factor = clip_factor_tensor(*device);
  Backend::finish_sum(partials, factor, ClipFactor{static_cast<float>(max_norm)});
  return factor;
}

}  // namespace fastoptim
