// What the CPU and CUDA multi-tensor launchers share: how a list of tensors is cut into chunks, and the contract of
// an element functor.
//
// An element functor is a small struct whose `load()` (callable on host and device) reads the step's scalars from
// their 0-dim tensors once per chunk and returns the per-element math: a callable taking one element reference from
// each list, in list order. Writing the math once as a C10_HOST_DEVICE functor is what makes the CPU and CUDA
// kernels compute the same function.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastoptim {

// Elements per chunk: large enough to amortise a CUDA block's start, small enough to balance the CPU threads.
constexpr int64_t kChunkSize = 65536;

}  // namespace fastoptim
