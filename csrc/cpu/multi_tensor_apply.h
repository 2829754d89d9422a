// CPU multi-tensor apply: every (tensor, chunk) pair of a list of tensor lists becomes one task of at::parallel_for,
// and the element functor's math runs over the chunk in a plain loop the compiler can vectorise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "common/multi_tensor.h"

namespace fastoptim::cpu {

namespace detail {

template <typename... Ts, typename Functor, size_t... I>
void apply_chunks(const std::array<at::TensorList, sizeof...(Ts)>& lists, const Functor& functor,
                  std::index_sequence<I...>) {
  struct Chunk {
    int64_t tensor, start, size;
  };
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < lists[0].size(); ++t) {
    const int64_t numel = lists[0][t].numel();
    for (int64_t start = 0; start < numel; start += kChunkSize) {
      chunks.push_back({static_cast<int64_t>(t), start, std::min(kChunkSize, numel - start)});
    }
  }
  const auto math = functor.load();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& chunk = chunks[c];
      std::tuple<Ts*...> ptrs{(static_cast<Ts*>(lists[I][chunk.tensor].data_ptr()) + chunk.start)...};
      for (int64_t i = 0; i < chunk.size; ++i) {
        math(std::get<I>(ptrs)[i]...);
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
    detail::apply_chunks<Ts...>(lists, functor, std::index_sequence_for<Ts...>{});
  }
};

}  // namespace fastoptim::cpu
