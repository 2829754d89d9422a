// What the CPU and CUDA multi-tensor launchers share: how a list of tensors is cut into chunks, and the contracts
// of the functors they run.
//
// Element functor (multi_tensor_apply): a small struct whose `load(const ChunkContext&)` (callable on host and
// device) reads the step's scalars from their 0-dim tensors once per chunk and returns the per-element math: a
// callable taking one element reference from each list, in list order. Writing the math once as a
// C10_HOST_DEVICE functor is what makes the CPU and CUDA kernels compute the same function. A list the math only
// reads is named with a const element type at the call (`apply<float, const float>`): it gets const references,
// and the CUDA launcher, which stages elements in registers, never writes it back.
//
// Reduce functor (multi_tensor_reduce): `load(ctx)` returns math whose `operator()(elements...)` gives a float
// per element and whose `finish(float chunk_sum)` receives the chunk's sum (once per chunk; on CUDA from one
// thread). Chunks are numbered in list order (`global_chunk`), so a functor that writes partials[global_chunk]
// gets the same sums in the same places on every run.
//
// Segment functor (multi_tensor_segment_apply): tensor i is cut into equal contiguous segments, one per element of
// a segment-state tensor (Adam-mini's blocks). `load(ctx)` returns math with `reduce(elements...)` (a float per
// element, summed over the segment), `segment(V& state, float sum, int64_t length)` (updates the segment's state
// and returns a float handed to every element of the segment) and `operator()(float, elements...)`.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastoptim {

// Elements per chunk: large enough to amortise a CUDA block's start, small enough to balance the CPU threads.
constexpr int64_t kChunkSize = 65536;

// Where a chunk lies: the position of its tensor in the caller's lists, that tensor's size, and the chunk's number
// counted over the whole call in list order (empty tensors have no chunks).
struct ChunkContext {
  int tensor;
  int64_t numel;
  int64_t global_chunk;
};

// *address += value, atomically, on the host (CPU kernels run chunks in parallel) and on the device. Integer sums
// are exact whatever the order, so a count accumulated this way is deterministic.
C10_HOST_DEVICE inline void atomic_add(unsigned long long* address, unsigned long long value) {
#ifdef __CUDA_ARCH__
  atomicAdd(address, value);
#else
  __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
#endif
}

// Chunks of a tensor of `numel` elements.
C10_HOST_DEVICE inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// Whole segments per chunk for segments of `length` elements: as many as fit in kChunkSize, at least one.
C10_HOST_DEVICE inline int64_t segments_per_chunk(int64_t length) {
  return length >= kChunkSize || length == 0 ? 1 : kChunkSize / length;
}

}  // namespace fastoptim
