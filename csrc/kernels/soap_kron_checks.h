// Argument checks of the Soap and Kron ops. Their tensors are batches of same-shape blocks: (B, *block) data and
// per block axis a (B, b, b) matrix or a (B, b) diagonal, all float32, dense, contiguous and on one device. Every
// check runs before anything is written and names the argument.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "common/checks.h"

namespace fastoptim {

inline void check_block_tensor(const std::string& name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "fastoptim: ", name, " is on ", t.device(), " but grads is on ", device,
              "; all tensors of one call must share a device");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastoptim: ", name, " has dtype ", dtype_name(t.scalar_type()),
              "; it must be float32");
  TORCH_CHECK(t.is_contiguous(), "fastoptim: ", name, " is not contiguous; call .contiguous() first");
}

// `grads` is (B, *block) with at least one block axis; returns the device every other tensor must be on.
inline at::Device check_block_batch(const at::Tensor& grads, int64_t min_axes, int64_t max_axes) {
  check_block_tensor("grads", grads, grads.device());
  TORCH_CHECK(grads.dim() >= 1 + min_axes && grads.dim() <= 1 + max_axes, "fastoptim: grads must be a batch of blocks "
              "(B, *block) with ", min_axes, " to ", max_axes, " block axes, got shape ", grads.sizes());
  return grads.device();
}

// `t` has exactly `shape` (the block batch's layout decides it).
inline void check_shape(const std::string& name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "fastoptim: ", name, " has shape ", t.sizes(), " but the blocks need ", shape);
}

// A per-axis matrix of the batch: (B, b, b) with b the size of block axis `axis` of grads.
inline void check_axis_matrix(const std::string& name, const at::Tensor& t, const at::Tensor& grads, int64_t axis) {
  check_block_tensor(name, t, grads.device());
  const int64_t b = grads.size(axis + 1);
  check_shape(name, t, {grads.size(0), b, b});
}

}  // namespace fastoptim
