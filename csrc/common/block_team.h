// What the CPU and CUDA block-team launchers share (Backend::for_each_block): a batch of independent blocks, each
// worked on by one team, and the contract of the body that runs on it.
//
// Body: a small struct (plain pointers and scalars, copied to the device as a kernel argument) with
//   template <typename Team> C10_HOST_DEVICE void operator()(const Team& team, int64_t block, float* scratch) const
// called once per block with `scratch_floats` floats of scratch private to that block's team (CUDA: shared
// memory). Written once against the team below, a body computes the same function on both backends.
//
// Team: the workers of one block (CPU: one thread, cpu/block_team.h; CUDA: a thread block, cuda/block_team.cuh).
//   for_range(lo, hi, f)   f(i) for the indices i in [lo, hi) this worker owns. An index has one owner for the
//                          whole body, so scratch entry i may be read and written by its owner without a barrier.
//   sync()                 a barrier: every worker's writes before it are seen by every worker after it.
//   all_reduce(value, op)  every worker's value combined with op (associative and commutative), returned to every
//                          worker; it synchronises the team, so every worker must reach each call.
// Control flow that brackets a sync() or all_reduce() must be the same for every worker (branch only on values
// that all_reduce returned, or on the body's arguments).
#pragma once

#include <c10/macros/Macros.h>

namespace fastoptim {

// N float sums reduced together (one barrier for all of them).
template <int N>
struct Sums {
  float v[N];
};

struct Add {
  template <int N>
  C10_HOST_DEVICE Sums<N> operator()(const Sums<N>& x, const Sums<N>& y) const {
    Sums<N> out;
    for (int i = 0; i < N; ++i) out.v[i] = x.v[i] + y.v[i];
    return out;
  }
};

struct Max {
  C10_HOST_DEVICE float operator()(float x, float y) const { return x < y ? y : x; }
};

}  // namespace fastoptim
