// CUDA multi-tensor apply: one launch walks many tensors. The host packs tensor addresses and a block → (tensor,
// chunk) map into a kernel argument; each block runs the element functor over one chunk of one tensor. Tensors too
// many for one argument spill into further launches, a tensor's chunks may straddle two.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <tuple>
#include <utility>

#include "common/multi_tensor.h"

namespace fastoptim::cuda {

constexpr int kBlockSize = 512;
constexpr int kMaxBlocksPerLaunch = 320;
// Kernel arguments are limited to 4 KB; these capacities keep the metadata of each list depth under it.
constexpr int kMaxTensorsPerLaunch[] = {0, 110, 64, 48, 36, 30, 24};

template <int Depth>
struct TensorListMetadata {
  static constexpr int kMaxTensors = kMaxTensorsPerLaunch[Depth];
  void* addresses[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int tensor_index[kMaxTensors];  // position in the caller's list, for per-tensor outputs
  unsigned char block_to_tensor[kMaxBlocksPerLaunch];
  int block_to_chunk[kMaxBlocksPerLaunch];
};

template <typename... Ts, typename Functor, size_t... I>
__device__ __forceinline__ void run_chunk(const TensorListMetadata<sizeof...(Ts)>& meta, const Functor& functor,
                                          std::index_sequence<I...>) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t size = min(meta.numel[t] - start, kChunkSize);
  const auto math = functor.load();
  std::tuple<Ts*...> ptrs{(static_cast<Ts*>(meta.addresses[I][t]) + start)...};
  for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
    math(std::get<I>(ptrs)[i]...);
  }
}

template <typename Functor, typename... Ts>
__global__ void __launch_bounds__(kBlockSize) multi_tensor_kernel(TensorListMetadata<sizeof...(Ts)> meta,
                                                                  Functor functor) {
  run_chunk<Ts...>(meta, functor, std::index_sequence_for<Ts...>{});
}

// The backend that the op templates of csrc/kernels are instantiated with for CUDA.
struct Backend {
  // Applies `functor` elementwise over the i-th tensors of all `lists` together; `Ts` are their element types.
  template <typename... Ts, typename Functor>
  static void multi_tensor_apply(const std::array<at::TensorList, sizeof...(Ts)>& lists, const Functor& functor) {
    constexpr int Depth = sizeof...(Ts);
    using Meta = TensorListMetadata<Depth>;
    if (lists[0].empty()) return;
    const c10::cuda::CUDAGuard guard(lists[0][0].device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    Meta meta;
    int tensors = 0;
    int blocks = 0;
    const auto launch = [&] {
      multi_tensor_kernel<Functor, Ts...><<<blocks, kBlockSize, 0, stream>>>(meta, functor);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      blocks = 0;
    };
    for (size_t t = 0; t < lists[0].size(); ++t) {
      const int64_t numel = lists[0][t].numel();
      if (numel == 0) continue;
      for (int d = 0; d < Depth; ++d) meta.addresses[d][tensors] = lists[d][t].data_ptr();
      meta.numel[tensors] = numel;
      meta.tensor_index[tensors] = static_cast<int>(t);
      ++tensors;
      const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
      for (int64_t c = 0; c < chunks; ++c) {
        meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
        meta.block_to_chunk[blocks] = static_cast<int>(c);
        ++blocks;
        const bool last_chunk = c == chunks - 1;
        if (blocks == kMaxBlocksPerLaunch || (last_chunk && tensors == Meta::kMaxTensors)) {
          launch();
          if (last_chunk) {
            tensors = 0;
          } else {  // the current tensor's remaining chunks go on in the next launch, as its tensor 0
            for (int d = 0; d < Depth; ++d) meta.addresses[d][0] = meta.addresses[d][tensors - 1];
            meta.numel[0] = meta.numel[tensors - 1];
            meta.tensor_index[0] = meta.tensor_index[tensors - 1];
            tensors = 1;
          }
        }
      }
    }
    if (blocks > 0) launch();
  }
};

}  // namespace fastoptim::cuda
