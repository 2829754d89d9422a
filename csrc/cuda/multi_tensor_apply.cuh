// CUDA multi-tensor launchers: one launch walks many tensors. The host packs tensor addresses and a block →
// (tensor, chunk) map into a kernel argument; each block runs the functor over one chunk of one tensor. Tensors too
// many for one argument spill into further launches, a tensor's chunks may straddle two. The functor contracts are
// in common/multi_tensor.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/multi_tensor.h"
#include "cuda/block_team.cuh"

namespace fastoptim::cuda {

constexpr int kBlockSize = 512;
constexpr int kMaxBlocksPerLaunch = 320;
// Kernel arguments are limited to 4 KB; these capacities keep the metadata of each list depth under it.
constexpr int kMaxTensorsPerLaunch[] = {0, 110, 64, 48, 36, 30, 24};
constexpr size_t kMaxMetadataBytes = 3900;  // leaves room for the functor and the chunk base

// Where each block of one launch works: its tensor's slot and its chunk within that tensor.
struct BlockMap {
  unsigned char block_to_tensor[kMaxBlocksPerLaunch];
  int block_to_chunk[kMaxBlocksPerLaunch];
};

// The tensors of one launch: `Depth` lists, at most `MaxTensors` tensors (the default keeps Depth lists under the
// argument limit).
template <int Depth, int MaxTensors = kMaxTensorsPerLaunch[Depth]>
struct TensorListMetadata : BlockMap {
  static constexpr int kMaxTensors = MaxTensors;
  void* addresses[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int tensor_index[kMaxTensors];  // position in the caller's lists

  void copy_slot(int from, int to) {
    for (int d = 0; d < Depth; ++d) addresses[d][to] = addresses[d][from];
    numel[to] = numel[from];
    tensor_index[to] = tensor_index[from];
  }
};

// TensorListMetadata plus each tensor's segment state (one value per segment) and segment count: as many tensors
// as Depth + 1 lists allow.
template <int Depth>
struct SegmentListMetadata : TensorListMetadata<Depth, kMaxTensorsPerLaunch[Depth + 1]> {
  using Base = TensorListMetadata<Depth, kMaxTensorsPerLaunch[Depth + 1]>;
  void* segment_state[Base::kMaxTensors];
  int64_t segments[Base::kMaxTensors];

  void copy_slot(int from, int to) {
    Base::copy_slot(from, to);
    segment_state[to] = segment_state[from];
    segments[to] = segments[from];
  }
};

// Sum of `value` over the block (blockDim.x == kBlockSize); the result is valid in thread 0. Ends with a barrier,
// so it may be called again at once.
template <typename T>
__device__ T block_sum(T value) {
  __shared__ T warp_sums[kBlockSize / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kBlockSize / 32 ? warp_sums[lane] : T(0);
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();
  return value;
}

template <typename... Ts, typename Meta, size_t... I>
__device__ __forceinline__ std::tuple<Ts*...> pointers(const Meta& meta, int slot, int64_t offset,
                                                       std::index_sequence<I...>) {
  return {(static_cast<Ts*>(meta.addresses[I][slot]) + offset)...};
}

// This block's chunk of an element walk: its size, the functor's math loaded for it, and each list's pointer to its
// first element.
template <typename... Ts, typename Functor, size_t... I>
__device__ __forceinline__ auto block_chunk(const TensorListMetadata<sizeof...(Ts)>& meta, const Functor& functor,
                                            int64_t chunk_base, std::index_sequence<I...> seq) {
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t size = min(meta.numel[slot] - start, kChunkSize);
  const auto math = functor.load(ChunkContext{meta.tensor_index[slot], meta.numel[slot], chunk_base + blockIdx.x});
  return std::make_tuple(size, math, pointers<Ts...>(meta, slot, start, seq));
}

// Elements each thread keeps in flight per list: a round issues all its loads before any math or store, so a
// memory-bound update has kIlp times the loads outstanding of a one-element loop.
constexpr int kIlp = 4;

// A thread's kIlp elements of one list, in registers; aligned so that kIlp consecutive elements load and store as
// one vector access (16 bytes of float32, 8 of bfloat16 or float16).
template <typename T>
struct alignas(kIlp * sizeof(std::remove_const_t<T>)) Lanes {
  std::remove_const_t<T> value[kIlp];
};

// Lists whose element type is const are read only: their registers are never written back.
template <typename T>
__device__ __forceinline__ void store(T* address, const std::remove_const_t<T>& value) {
  if constexpr (!std::is_const_v<T>) *address = value;
}

template <typename T>
__device__ __forceinline__ void store_lanes(T* address, const Lanes<T>& lanes) {
  if constexpr (!std::is_const_v<T>) *reinterpret_cast<Lanes<T>*>(address) = lanes;
}

// Whether every list's chunk starts on a Lanes boundary: a fresh tensor does (the caching allocator aligns to 512
// bytes and a chunk is 65536 elements); a view at another offset (a row shard, say) does not.
template <typename... Ts>
__device__ __forceinline__ bool lanes_aligned(Ts*... ptrs) {
  return ((reinterpret_cast<uintptr_t>(ptrs) % alignof(Lanes<Ts>) == 0) && ...);
}

template <typename Functor, typename... Ts, size_t... I>
__device__ __forceinline__ void apply_chunk(const TensorListMetadata<sizeof...(Ts)>& meta, const Functor& functor,
                                            int64_t chunk_base, std::index_sequence<I...> seq) {
  const auto [size, math, ptrs] = block_chunk<Ts...>(meta, functor, chunk_base, seq);
  int64_t done = 0;
  if (lanes_aligned(std::get<I>(ptrs)...)) {
    // Thread j takes elements [kIlp·j, kIlp·j + kIlp) of each group of kIlp·blockDim: one vector load per list.
    done = size - size % kIlp;
    for (int64_t i = (threadIdx.x) * static_cast<int64_t>(kIlp); i < done;
         i += static_cast<int64_t>(blockDim.x) * kIlp) {
      std::tuple<Lanes<Ts>...> lanes{*reinterpret_cast<const Lanes<Ts>*>(std::get<I>(ptrs) + i)...};
#pragma unroll
      for (int k = 0; k < kIlp; ++k) math(static_cast<Ts&>(std::get<I>(lanes).value[k])...);
      (store_lanes(std::get<I>(ptrs) + i, std::get<I>(lanes)), ...);
    }
  }
  // The rest (all of a chunk whose lists are not aligned, else the last size % kIlp elements): kIlp elements per
  // thread and round, each list's loads strided by blockDim so a warp's accesses stay coalesced.
  for (int64_t round = done; round < size; round += static_cast<int64_t>(blockDim.x) * kIlp) {
    std::tuple<Lanes<Ts>...> lanes;
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = round + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < size) ((std::get<I>(lanes).value[k] = std::get<I>(ptrs)[i]), ...);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = round + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < size) math(static_cast<Ts&>(std::get<I>(lanes).value[k])...);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = round + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < size) (store(std::get<I>(ptrs) + i, std::get<I>(lanes).value[k]), ...);
    }
  }
}

template <typename Functor, typename... Ts, size_t... I>
__device__ __forceinline__ void reduce_chunk(const TensorListMetadata<sizeof...(Ts)>& meta, const Functor& functor,
                                             int64_t chunk_base, std::index_sequence<I...> seq) {
  const auto [size, math, ptrs] = block_chunk<Ts...>(meta, functor, chunk_base, seq);
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
    sum += math(std::get<I>(ptrs)[i]...);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) math.finish(sum);
}

template <typename Functor, typename V, typename... Ts, size_t... I>
__device__ __forceinline__ void segment_chunk(const SegmentListMetadata<sizeof...(Ts)>& meta, const Functor& functor,
                                              int64_t chunk_base, std::index_sequence<I...> seq) {
  __shared__ float shared;
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t segments = meta.segments[slot];
  const int64_t length = meta.numel[slot] / segments;
  const int64_t first = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * segments_per_chunk(length);
  const int64_t last = min(segments, first + segments_per_chunk(length));
  const auto math = functor.load(ChunkContext{meta.tensor_index[slot], meta.numel[slot], chunk_base + blockIdx.x});
  for (int64_t s = first; s < last; ++s) {
    const auto ptrs = pointers<Ts...>(meta, slot, s * length, seq);
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < length; i += blockDim.x) {
      sum += math.reduce(std::get<I>(ptrs)[i]...);
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) shared = math.segment(static_cast<V*>(meta.segment_state[slot])[s], sum, length);
    __syncthreads();
    const float value = shared;
    for (int64_t i = threadIdx.x; i < length; i += blockDim.x) {
      math(value, std::get<I>(ptrs)[i]...);
    }
    __syncthreads();  // every thread has read `shared` before the next segment writes it
  }
}

template <typename Functor, typename... Ts>
__global__ void __launch_bounds__(kBlockSize)
    apply_kernel(TensorListMetadata<sizeof...(Ts)> meta, Functor functor, int64_t chunk_base) {
  apply_chunk<Functor, Ts...>(meta, functor, chunk_base, std::index_sequence_for<Ts...>{});
}

template <typename Functor, typename... Ts>
__global__ void __launch_bounds__(kBlockSize)
    reduce_kernel(TensorListMetadata<sizeof...(Ts)> meta, Functor functor, int64_t chunk_base) {
  reduce_chunk<Functor, Ts...>(meta, functor, chunk_base, std::index_sequence_for<Ts...>{});
}

template <typename Functor, typename V, typename... Ts>
__global__ void __launch_bounds__(kBlockSize)
    segment_kernel(SegmentListMetadata<sizeof...(Ts)> meta, Functor functor, int64_t chunk_base) {
  segment_chunk<Functor, V, Ts...>(meta, functor, chunk_base, std::index_sequence_for<Ts...>{});
}

template <typename Finish>
__global__ void __launch_bounds__(kBlockSize)
    finish_sum_kernel(const float* partials, int64_t n, float* out, Finish finish) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += partials[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *out = finish(sum);
}

// Packs the tensors of a call into launches: `chunks(t)` counts tensor t's chunks (0: skipped), `fill(meta, slot,
// t)` writes its addresses into a metadata slot, `launch(meta, blocks, chunk_base)` runs one kernel.
template <typename Meta, typename Chunks, typename Fill, typename Launch>
void pack_and_launch(size_t n_tensors, const Chunks& chunks, const Fill& fill, const Launch& launch) {
  static_assert(sizeof(Meta) <= kMaxMetadataBytes, "launch metadata too large for the kernel argument limit");
  Meta meta;
  int tensors = 0;
  int blocks = 0;
  int64_t chunk_base = 0;
  for (size_t t = 0; t < n_tensors; ++t) {
    const int64_t n = chunks(t);
    if (n == 0) continue;
    fill(meta, tensors, t);
    meta.tensor_index[tensors] = static_cast<int>(t);
    ++tensors;
    for (int64_t c = 0; c < n; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == n - 1;
      if (blocks == kMaxBlocksPerLaunch || (last_chunk && tensors == Meta::kMaxTensors)) {
        launch(meta, blocks, chunk_base);
        chunk_base += blocks;
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the current tensor's remaining chunks go on in the next launch, as its slot 0
          meta.copy_slot(tensors - 1, 0);
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(meta, blocks, chunk_base);
}

// Writes tensor t of every list into a metadata slot.
template <typename Meta, size_t Depth>
void fill_addresses(Meta& meta, int slot, const std::array<at::TensorList, Depth>& lists, size_t t) {
  for (size_t d = 0; d < Depth; ++d) meta.addresses[d][slot] = lists[d][t].data_ptr();
  meta.numel[slot] = lists[0][t].numel();
}

// The backend that the op templates of csrc/kernels are instantiated with for CUDA.
struct Backend {
  // Packs the i-th tensors of all `lists` into as few launches as the metadata allows; each is
  // launch(meta, blocks, chunk_base, stream).
  template <size_t Depth, typename Launch>
  static void launch_over(const std::array<at::TensorList, Depth>& lists, const Launch& launch) {
    using Meta = TensorListMetadata<Depth>;
    if (lists[0].empty()) return;
    const c10::cuda::CUDAGuard guard(lists[0][0].device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    pack_and_launch<Meta>(
        lists[0].size(), [&](size_t t) { return chunks_of(lists[0][t].numel()); },
        [&](Meta& meta, int slot, size_t t) { fill_addresses(meta, slot, lists, t); },
        [&](const Meta& meta, int blocks, int64_t chunk_base) {
          launch(meta, blocks, chunk_base, stream);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }

  // Applies `functor` elementwise over the i-th tensors of all `lists` together; `Ts` are their element types.
  template <typename... Ts, typename Functor>
  static void multi_tensor_apply(const std::array<at::TensorList, sizeof...(Ts)>& lists, const Functor& functor) {
    launch_over(lists, [&](const auto& meta, int blocks, int64_t chunk_base, cudaStream_t stream) {
      apply_kernel<Functor, Ts...><<<blocks, kBlockSize, 0, stream>>>(meta, functor, chunk_base);
    });
  }

  // Sums `functor`'s per-element values over each chunk and hands each chunk's sum to its `finish`.
  template <typename... Ts, typename Functor>
  static void multi_tensor_reduce(const std::array<at::TensorList, sizeof...(Ts)>& lists, const Functor& functor) {
    launch_over(lists, [&](const auto& meta, int blocks, int64_t chunk_base, cudaStream_t stream) {
      reduce_kernel<Functor, Ts...><<<blocks, kBlockSize, 0, stream>>>(meta, functor, chunk_base);
    });
  }

  // Per segment: sum `reduce` over it, update its state with `segment`, then apply the math to its elements.
  // segment_state[i] has element type V and its numel divides lists[0][i]'s.
  template <typename V, typename... Ts, typename Functor>
  static void multi_tensor_segment_apply(const std::array<at::TensorList, sizeof...(Ts)>& lists,
                                         at::TensorList segment_state, const Functor& functor) {
    constexpr int Depth = sizeof...(Ts);
    using Meta = SegmentListMetadata<Depth>;
    if (lists[0].empty()) return;
    const c10::cuda::CUDAGuard guard(lists[0][0].device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    pack_and_launch<Meta>(
        lists[0].size(),
        [&](size_t t) {
          const int64_t numel = lists[0][t].numel(), segments = segment_state[t].numel();
          if (numel == 0) return int64_t{0};
          const int64_t per = segments_per_chunk(numel / segments);
          return (segments + per - 1) / per;
        },
        [&](Meta& meta, int slot, size_t t) {
          fill_addresses(meta, slot, lists, t);
          meta.segment_state[slot] = segment_state[t].data_ptr();
          meta.segments[slot] = segment_state[t].numel();
        },
        [&](const Meta& meta, int blocks, int64_t chunk_base) {
          segment_kernel<Functor, V, Ts...><<<blocks, kBlockSize, 0, stream>>>(meta, functor, chunk_base);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }

  // out (0-dim float32) ← finish(Σ partials), the sum taken in a fixed order in double.
  template <typename Finish>
  static void finish_sum(const at::Tensor& partials, const at::Tensor& out, const Finish& finish) {
    const c10::cuda::CUDAGuard guard(out.device());
    finish_sum_kernel<<<1, kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(
        partials.data_ptr<float>(), partials.numel(), out.data_ptr<float>(), finish);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Runs body(team, block, scratch) for every block in [0, blocks), one thread block each (contract in
  // common/block_team.h).
  template <typename Body>
  static void for_each_block(const at::Device& device, int64_t blocks, int64_t scratch_floats, const Body& body) {
    cuda::for_each_block(device, blocks, scratch_floats, body);
  }
};

}  // namespace fastoptim::cuda
