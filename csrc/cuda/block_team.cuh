// CUDA block teams (contract in common/block_team.h): one thread block of kTeamThreads threads per block of the
// batch; index i is owned by thread i mod kTeamThreads, so a warp's for_range walks consecutive indices (a row of
// a row-major matrix is read coalesced); the scratch is dynamic shared memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>

#include <cub/block/block_reduce.cuh>

#include "common/block_team.h"

namespace fastoptim::cuda {

constexpr int kTeamThreads = 128;
constexpr int64_t kMaxTeamScratchBytes = 48 * 1024;  // dynamic shared memory without an opt-in attribute

struct BlockTeam {
  template <typename F>
  __device__ void for_range(int lo, int hi, const F& f) const {
    const int tid = static_cast<int>(threadIdx.x);
    // the first i ≥ lo with i ≡ tid (mod kTeamThreads)
    for (int i = lo + (tid - lo % kTeamThreads + kTeamThreads) % kTeamThreads; i < hi; i += kTeamThreads) f(i);
  }

  __device__ void sync() const { __syncthreads(); }

  template <typename T, typename Op>
  __device__ T all_reduce(const T& value, const Op& op) const {
    using Reduce = cub::BlockReduce<T, kTeamThreads>;
    __shared__ typename Reduce::TempStorage storage;
    __shared__ T result;
    const T total = Reduce(storage).Reduce(value, op);  // valid in thread 0 only
    if (threadIdx.x == 0) result = total;
    __syncthreads();
    const T out = result;
    __syncthreads();  // every thread has read `result` (and cub its storage) before the next call writes them
    return out;
  }
};

template <typename Body>
__global__ void __launch_bounds__(kTeamThreads) block_team_kernel(Body body) {
  extern __shared__ float team_scratch[];
  body(BlockTeam{}, static_cast<int64_t>(blockIdx.x), team_scratch);
}

template <typename Body>
void for_each_block(const at::Device& device, int64_t blocks, int64_t scratch_floats, const Body& body) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "fastoptim: ", blocks, " blocks in one call; at most ",
              std::numeric_limits<int>::max());
  const int64_t bytes = scratch_floats * static_cast<int64_t>(sizeof(float));
  TORCH_CHECK(bytes <= kMaxTeamScratchBytes, "fastoptim: a block needs ", bytes, " bytes of scratch; at most ",
              kMaxTeamScratchBytes);
  const c10::cuda::CUDAGuard guard(device);
  block_team_kernel<Body><<<static_cast<unsigned>(blocks), kTeamThreads, static_cast<size_t>(bytes),
                            at::cuda::getCurrentCUDAStream()>>>(body);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastoptim::cuda
