// CPU multi-tensor launchers: every (tensor, chunk) pair of a list of tensor lists becomes one task of
// at::parallel_for, and the functor's math runs over the chunk in a plain loop that the compiler vectorises, once
// per x86-64 ISA level (AVX-512, AVX2+FMA, SSE2) with the level picked when the library loads. The functor
// contracts are in common/multi_tensor.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/multi_tensor.h"
#include "cpu/block_team.h"
#include "cpu/half_conversion.h"

namespace fastoptim::cpu {

namespace detail {

// GCC clones a function so marked for each level and resolves the call once, at load time, to the best the CPU
// has: the wheel runs everywhere and is as fast as a -march=native build. Elsewhere the loops build for the
// compiler's target flags.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTOPTIM_CPU_LEVELS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTOPTIM_CPU_LEVELS
#endif

// The math comes by value and the element pointers as restrict: with a reference GCC must assume that stores
// through the element pointers change the math's fields and keeps the loop scalar.
template <typename Math, typename... Ts>
FASTOPTIM_CPU_LEVELS void apply_loop(const Math math, int64_t size, Ts* __restrict... elements) {
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) {
    math(elements[i]...);
  }
}

// Adds math(elements) over the whole groups of kLanes elements into 16 interleaved partial sums in double and
// returns the sum over the last size % kLanes elements: wide enough to vectorise, and in a fixed order.
constexpr int64_t kLanes = 16;
template <typename Math, typename... Ts>
FASTOPTIM_CPU_LEVELS double reduce_loop(const Math math, double* __restrict lanes, int64_t size,
                                        Ts* __restrict... elements) {
  int64_t i = 0;
  for (; i + kLanes <= size; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += static_cast<double>(math(elements[i + l]...));
    }
  }
  double tail = 0.0;
  for (; i < size; ++i) {
    tail += static_cast<double>(math(elements[i]...));
  }
  return tail;
}

// float16 lists are staged: each run of kStage elements is converted into a float32 buffer (cpu/half_conversion.h),
// the math runs over the buffers, and the lists it writes are converted back. Other lists are used in place.
template <typename T>
constexpr bool is_half = std::is_same_v<std::remove_const_t<T>, c10::Half>;
constexpr int64_t kStage = 256;  // a multiple of kLanes, so staging does not change a reduction's order

template <typename T>
  requires(!is_half<T>)
T* staged(T* elements, float*) {
  return elements;
}
inline float* staged(c10::Half*, float* buffer) { return buffer; }
inline const float* staged(const c10::Half*, float* buffer) { return buffer; }

template <typename T>
  requires(!is_half<T>)
void stage_in(T*, float*, int64_t) {}
inline void stage_in(const c10::Half* elements, float* buffer, int64_t n) { halves_to_floats(elements, buffer, n); }

template <typename T>
void stage_out(T*, const float*, int64_t) {}  // read-only or not float16
inline void stage_out(c10::Half* elements, const float* buffer, int64_t n) { floats_to_halves(buffer, elements, n); }

// Runs body(n, pointers...) over the chunk, in one piece when no list is float16, else in staged runs.
template <typename Body, typename... Ts, size_t... I>
void for_each_run(int64_t size, const Body& body, std::index_sequence<I...>, Ts*... elements) {
  if constexpr (!(is_half<Ts> || ...)) {
    body(size, elements...);
  } else {
    alignas(64) float buffers[sizeof...(Ts)][kStage];
    for (int64_t start = 0; start < size; start += kStage) {
      const int64_t n = std::min(kStage, size - start);
      (stage_in(elements + start, buffers[I], n), ...);
      body(n, staged(elements + start, buffers[I])...);
      (stage_out(elements + start, buffers[I], n), ...);
    }
  }
}

template <typename Math, typename... Ts>
void apply_chunk(const Math& math, int64_t size, Ts*... elements) {
  for_each_run(size, [&](int64_t n, auto*... run) { apply_loop(math, n, run...); },
               std::index_sequence_for<Ts...>{}, elements...);
}

// Σ math(elements) over the chunk in double, the lanes combined in a fixed order: the same order at every ISA
// level and thread count, so a reduction is deterministic.
template <typename Math, typename... Ts>
double reduce_chunk(const Math& math, int64_t size, Ts*... elements) {
  double lanes[kLanes] = {};
  double tail = 0.0;
  for_each_run(size, [&](int64_t n, auto*... run) { tail += reduce_loop(math, lanes, n, run...); },
               std::index_sequence_for<Ts...>{}, elements...);
  double sum = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum + tail;
}

struct Chunk {
  int tensor;
  int64_t global_chunk;
  int64_t start, size;  // in elements (multi_tensor_apply/reduce) or in segments (segment_apply)
};

// The chunks of every tensor of `list`, in list order; `units(t)` counts a tensor's units, `per_chunk(t)` how many
// of them one chunk takes.
template <typename Units, typename PerChunk>
std::vector<Chunk> cut(at::TensorList list, const Units& units, const PerChunk& per_chunk) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < list.size(); ++t) {
    const int64_t n = units(t);
    if (n == 0) continue;
    const int64_t per = per_chunk(t);
    for (int64_t start = 0; start < n; start += per) {
      const int64_t index = static_cast<int64_t>(chunks.size());
      chunks.push_back({static_cast<int>(t), index, start, std::min(per, n - start)});
    }
  }
  return chunks;
}

inline std::vector<Chunk> element_chunks(at::TensorList list) {
  return cut(list, [&](size_t t) { return list[t].numel(); }, [](size_t) { return kChunkSize; });
}

template <typename... Ts, size_t... I>
std::tuple<Ts*...> pointers(const std::array<at::TensorList, sizeof...(Ts)>& lists, int tensor, int64_t offset,
                            std::index_sequence<I...>) {
  return {(static_cast<Ts*>(lists[I][tensor].data_ptr()) + offset)...};
}

// Runs body(math, pointers, size) for every element chunk of `lists`, the chunks spread over threads; `math` is the
// functor loaded for the chunk, `pointers` the chunk's start in each list.
template <typename... Ts, typename Functor, typename Body, size_t... I>
void for_each_chunk(const std::array<at::TensorList, sizeof...(Ts)>& lists, const Functor& functor,
                    std::index_sequence<I...> seq, const Body& body) {
  const std::vector<Chunk> chunks = element_chunks(lists[0]);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& chunk = chunks[c];
      const auto math = functor.load(ChunkContext{chunk.tensor, lists[0][chunk.tensor].numel(), chunk.global_chunk});
      body(math, pointers<Ts...>(lists, chunk.tensor, chunk.start, seq), chunk.size);
    }
  });
}

template <typename... Ts, typename Functor, size_t... I>
void apply(const std::array<at::TensorList, sizeof...(Ts)>& lists, const Functor& functor, std::index_sequence<I...> seq) {
  for_each_chunk<Ts...>(lists, functor, seq, [](const auto& math, const auto& ptrs, int64_t size) {
    apply_chunk(math, size, std::get<I>(ptrs)...);
  });
}

template <typename... Ts, typename Functor, size_t... I>
void reduce(const std::array<at::TensorList, sizeof...(Ts)>& lists, const Functor& functor, std::index_sequence<I...> seq) {
  for_each_chunk<Ts...>(lists, functor, seq, [](const auto& math, const auto& ptrs, int64_t size) {
    math.finish(static_cast<float>(reduce_chunk(math, size, std::get<I>(ptrs)...)));
  });
}

template <typename V, typename... Ts, typename Functor, size_t... I>
void segment_apply(const std::array<at::TensorList, sizeof...(Ts)>& lists, at::TensorList segment_state,
                   const Functor& functor, std::index_sequence<I...> seq) {
  const auto length = [&](size_t t) { return lists[0][t].numel() / segment_state[t].numel(); };
  const std::vector<Chunk> chunks = cut(
      lists[0], [&](size_t t) { return lists[0][t].numel() == 0 ? 0 : segment_state[t].numel(); },
      [&](size_t t) { return segments_per_chunk(length(t)); });
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& chunk = chunks[c];
      const auto math = functor.load(ChunkContext{chunk.tensor, lists[0][chunk.tensor].numel(), chunk.global_chunk});
      const int64_t len = length(chunk.tensor);
      V* states = static_cast<V*>(segment_state[chunk.tensor].data_ptr());
      for (int64_t s = chunk.start; s < chunk.start + chunk.size; ++s) {
        const auto ptrs = pointers<Ts...>(lists, chunk.tensor, s * len, seq);
        const double sum = reduce_chunk([math](const auto&... e) { return math.reduce(e...); }, len,
                                        std::get<I>(ptrs)...);
        const float shared = math.segment(states[s], static_cast<float>(sum), len);
        apply_chunk([math, shared](auto&... e) { math(shared, e...); }, len, std::get<I>(ptrs)...);
      }
    }
  });
}

}  // namespace detail

// The backend that the op templates of csrc/kernels are instantiated with for CPU.
struct Backend {
  // Applies `functor` elementwise over the i-th tensors of all `lists` together; `Ts` are their element types.
  template <typename... Ts, typename Functor>
  static void multi_tensor_apply(const std::array<at::TensorList, sizeof...(Ts)>& lists, const Functor& functor) {
    detail::apply<Ts...>(lists, functor, std::index_sequence_for<Ts...>{});
  }

  // Sums `functor`'s per-element values over each chunk and hands each chunk's sum to its `finish`.
  template <typename... Ts, typename Functor>
  static void multi_tensor_reduce(const std::array<at::TensorList, sizeof...(Ts)>& lists, const Functor& functor) {
    detail::reduce<Ts...>(lists, functor, std::index_sequence_for<Ts...>{});
  }

  // Per segment: sum `reduce` over it, update its state with `segment`, then apply the math to its elements.
  // segment_state[i] has element type V and its numel divides lists[0][i]'s.
  template <typename V, typename... Ts, typename Functor>
  static void multi_tensor_segment_apply(const std::array<at::TensorList, sizeof...(Ts)>& lists,
                                         at::TensorList segment_state, const Functor& functor) {
    detail::segment_apply<V, Ts...>(lists, segment_state, functor, std::index_sequence_for<Ts...>{});
  }

  // out (0-dim float32) ← finish(Σ partials), the sum taken in a fixed order in double.
  template <typename Finish>
  static void finish_sum(const at::Tensor& partials, const at::Tensor& out, const Finish& finish) {
    const float* values = partials.data_ptr<float>();
    double total = 0.0;
    for (int64_t i = 0; i < partials.numel(); ++i) total += values[i];
    *out.data_ptr<float>() = finish(total);
  }

  // Runs body(team, block, scratch) for every block in [0, blocks) (contract in common/block_team.h).
  template <typename Body>
  static void for_each_block(const at::Device&, int64_t blocks, int64_t scratch_floats, const Body& body) {
    cpu::for_each_block(blocks, scratch_floats, body);
  }
};

}  // namespace fastoptim::cpu
