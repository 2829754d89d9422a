// p ← p·(1 − lr·λ) − lr·scale·u over lists: the last stage of every optimizer step (decoupled weight decay, then
// the scaled direction), and the proof that schemas, both backends and the fakes fit together.
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/multi_tensor.h"

namespace fastoptim {

struct DecoupledUpdate {
  const float* lr;
  float weight_decay;
  float scale;

  struct Math {
    float keep;  // 1 − lr·λ
    float step;  // lr·scale
    template <typename P, typename U>
    C10_HOST_DEVICE void operator()(P& p, const U& u) const {
      p = element_cast<P>(element_cast<float>(p) * keep - step * element_cast<float>(u));
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext&) const {
    const float lr_now = *lr;
    return {1.0f - lr_now * weight_decay, lr_now * scale};
  }
};

// `Backend` provides `multi_tensor_apply<Ts...>(lists, functor)` for its device.
template <typename Backend>
void decoupled_update_(at::TensorList params, at::TensorList updates, const at::Tensor& lr, double weight_decay,
                       double scale) {
  const auto device = check_tensor_lists({{"params", params}, {"updates", updates}});
  if (!device) return;
  check_scalar("lr", lr, *device);
  const at::ScalarType param_dtype = common_float_dtype("params", params);
  const at::ScalarType update_dtype = common_float_dtype("updates", updates);
  const DecoupledUpdate functor{lr.data_ptr<float>(), static_cast<float>(weight_decay), static_cast<float>(scale)};
  FASTOPTIM_DISPATCH_PARAM_UPDATE(param_dtype, update_dtype, "decoupled_update_", [&] {
    Backend::template multi_tensor_apply<param_t, const update_t>({params, updates}, functor);
  });
}

}  // namespace fastoptim
