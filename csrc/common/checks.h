// Argument checks shared by every op's CPU and CUDA kernels. Each check runs before anything is written, and its
// message names the argument, so a bad call leaves parameters and state untouched and says what to fix.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>

namespace fastoptim {

using NamedList = std::pair<const char*, at::TensorList>;

// A dtype as Python users write it ("torch.float64"), so C++ and fake-kernel errors read the same.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

// Every list has the same length as the first; every tensor is contiguous and on the device of the first
// list's first tensor, which is returned (nullopt when the lists are empty: the op has nothing to do); the i-th
// tensors of all lists hold the same number of elements.
// (Sparse tensors never get here: the dispatcher has no kernel for them; fastoptim/ops refuses them by name.)
inline std::optional<at::Device> check_tensor_lists(c10::ArrayRef<NamedList> lists) {
  const auto& [first_name, first] = *lists.begin();
  for (const auto& [name, list] : lists) {
    TORCH_CHECK(list.size() == first.size(), "fastoptim: ", name, " has ", list.size(), " tensors but ", first_name,
                " has ", first.size());
  }
  if (first.empty()) return std::nullopt;
  const at::Device device = first[0].device();
  for (const auto& [name, list] : lists) {
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.device() == device, "fastoptim: ", name, "[", i, "] is on ", t.device(), " but ", first_name,
                  "[0] is on ", device, "; all tensors of one call must share a device");
      TORCH_CHECK(t.is_contiguous(), "fastoptim: ", name, "[", i, "] is not contiguous; call .contiguous() first");
      TORCH_CHECK(t.numel() == first[i].numel(), "fastoptim: ", name, "[", i, "] has ", t.numel(),
                  " elements but ", first_name, "[", i, "] has ", first[i].numel());
    }
  }
  return device;
}

// All tensors of `list` share one of the dtypes the kernels are built for: float32, bfloat16, float16.
inline at::ScalarType common_float_dtype(const char* name, at::TensorList list) {
  const at::ScalarType dtype = list[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fastoptim: ", name,
              " has dtype ", dtype_name(dtype), "; supported are float32, bfloat16 and float16");
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].scalar_type() == dtype, "fastoptim: ", name, "[", i, "] has dtype ", dtype_name(list[i].scalar_type()),
                " but ", name, "[0] has ", dtype_name(dtype), "; one call takes one dtype per list");
  }
  return dtype;
}

// `list` is float32 throughout (optimizer state is kept in float32 whatever the parameters' dtype).
inline void check_float32(const char* name, at::TensorList list) {
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].scalar_type() == at::kFloat, "fastoptim: ", name, "[", i, "] has dtype ",
                dtype_name(list[i].scalar_type()), "; it must be float32");
  }
}

// A step scalar (lr, bias correction, ...) lives in a 0-dim float32 tensor on the parameters' device, so a
// captured CUDA graph or a compiled step reads its current value instead of baking in a constant.
inline void check_scalar(const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == at::kFloat, "fastoptim: ", name,
              " must be a 0-dim float32 tensor, got dtype ", dtype_name(t.scalar_type()), " with ", t.dim(), " dims");
  TORCH_CHECK(t.device() == device, "fastoptim: ", name, " is on ", t.device(), " but the tensors are on ", device);
}

}  // namespace fastoptim
