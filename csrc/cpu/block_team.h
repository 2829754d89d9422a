// CPU block teams (contract in common/block_team.h): a team is one thread, so for_range is a plain loop the
// compiler can vectorise, sync() is nothing and all_reduce returns the thread's own value; the blocks are spread
// over threads with at::parallel_for, each thread reusing one scratch buffer for its blocks.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "common/block_team.h"

namespace fastoptim::cpu {

struct BlockTeam {
  template <typename F>
  void for_range(int lo, int hi, const F& f) const {
    for (int i = lo; i < hi; ++i) f(i);
  }
  void sync() const {}
  template <typename T, typename Op>
  T all_reduce(const T& value, const Op&) const {
    return value;
  }
};

template <typename Body>
void for_each_block(int64_t blocks, int64_t scratch_floats, const Body& body) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_floats);
    const BlockTeam team;
    for (int64_t block = begin; block < end; ++block) body(team, block, scratch.data());
  });
}

}  // namespace fastoptim::cpu
