// PSGD-Kron on 1-D blocks with an upper triangular factor (benchmark-spec §1.9) in O(b²) per block. Kron's layout
// merges small dims, so on small models every hidden matrix becomes a vector cut into blocks of b, each with its
// own b×b factor Q. There the Gram terms of kernels/kron.h are outer products and its b³ products collapse:
//   x = g + d·v, a = Q·x (a triangular matvec), c = Q⁻ᵀ·v (V·Q⁻¹ of a 1-D block: a forward substitution),
//   M = a·aᵀ + c·cᵀ has rank 2, so its norm bound needs only a and c;
//   row i of triu(a·aᵀ)·Q is a_i·Σ_{j≥i} a_j·Q[j,:], so Q ← Q − s·triu(a·aᵀ − c·cᵀ)·Q is one sweep from the last
//   row up, with running suffix sums that have read every row below before it is overwritten.
// Each body runs one block on a team (common/block_team.h); only the upper triangle of Q is read or written.
#pragma once

#include <c10/macros/Macros.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common/block_team.h"

namespace fastoptim::kron_vector {

// 5·b floats of scratch stay under a CUDA block's 48 KB of shared memory; larger blocks take the generic path.
constexpr int64_t kMaxBlock = 2048;

// A column of M and its squared norm; the larger norm wins, the first index on ties (torch.argmax's rule).
struct Column {
  float norm_sq;
  int index;
};

struct Larger {
  C10_HOST_DEVICE Column operator()(const Column& x, const Column& y) const {
    return y.norm_sq > x.norm_sq || (y.norm_sq == x.norm_sq && y.index < x.index) ? y : x;
  }
};

// Σ u_j·w_j over j < n in kLanes interleaved partial sums: a CPU compiler may not reorder one float sum, but it
// vectorises independent lanes.
C10_HOST_DEVICE inline float dot(const float* u, const float* w, int n) {
  constexpr int kLanes = 8;
  float lanes[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += u[j + l] * w[j + l];
  }
  for (; j < n; ++j) lanes[0] += u[j] * w[j];
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// y = Q·x over the upper triangle, one row per worker.
template <typename Team>
C10_HOST_DEVICE void upper_matvec(const Team& team, const float* q, const float* x, float* y, int b) {
  team.for_range(0, b, [&](int i) { y[i] = dot(q + static_cast<int64_t>(i) * b + i, x + i, b - i); });
}

// c ← Q⁻ᵀ·c (solves Qᵀ·c' = c, Qᵀ lower triangular) as a sweep over the rows of Q: once c_j is final, row j removes
// its part from every later entry. The owner of j has applied every earlier row to c_j itself, so one barrier per
// row publishes c_j.
template <typename Team>
C10_HOST_DEVICE void solve_upper_transposed(const Team& team, const float* q, float* c, int b) {
  for (int j = 0; j < b; ++j) {
    const float* row = q + static_cast<int64_t>(j) * b;
    team.for_range(j, j + 1, [&](int) { c[j] /= row[j]; });
    team.sync();
    const float cj = c[j];
    team.for_range(j + 1, b, [&](int k) { c[k] -= row[k] * cj; });
  }
}

// kron_detail::norm_lower_bound(a·aᵀ + c·cᵀ) from a and c in O(b), the same steps on M̂ = M/max|M| = â·âᵀ + ĉ·ĉᵀ
// (â = a/√max|M|, ĉ likewise, all entries ≤ 1 in size): M is positive semidefinite, so max|M| is its largest
// diagonal entry; column j of M̂ is â·â_j + ĉ·ĉ_j, its squared norm a quadratic form in the Gram of â, ĉ; with j the
// largest column, x = M̂·(column j) = α·â + γ·ĉ and the bound is max|M|·‖M̂·x/‖x‖‖. Every worker gets the bound.
template <typename Team>
C10_HOST_DEVICE float rank_two_norm_lower_bound(const Team& team, const float* a, const float* c, int b) {
  float largest = 0.0f;
  team.for_range(0, b, [&](int k) { largest = Max{}(largest, a[k] * a[k] + c[k] * c[k]); });
  const float max_abs = team.all_reduce(largest, Max{});
  if (!(max_abs > 0.0f)) return 0.0f;
  const float scale = 1.0f / std::sqrt(max_abs);

  Sums<3> gram{};
  team.for_range(0, b, [&](int k) {
    const float ak = a[k] * scale, ck = c[k] * scale;
    gram.v[0] += ak * ak;
    gram.v[1] += ak * ck;
    gram.v[2] += ck * ck;
  });
  gram = team.all_reduce(gram, Add{});
  const float aa = gram.v[0], ac = gram.v[1], cc = gram.v[2];

  Column best{-1.0f, 0};  // loses to every real column (norms are ≥ 0)
  team.for_range(0, b, [&](int j) {
    const float aj = a[j] * scale, cj = c[j] * scale;
    best = Larger{}(best, Column{aj * aj * aa + 2.0f * aj * cj * ac + cj * cj * cc, j});
  });
  best = team.all_reduce(best, Larger{});
  const float aj = a[best.index] * scale, cj = c[best.index] * scale;
  const float alpha = aa * aj + ac * cj, gamma = ac * aj + cc * cj;

  Sums<3> xs{};  // ‖x‖², â·x, ĉ·x
  team.for_range(0, b, [&](int k) {
    const float ak = a[k] * scale, ck = c[k] * scale, xk = alpha * ak + gamma * ck;
    xs.v[0] += xk * xk;
    xs.v[1] += ak * xk;
    xs.v[2] += ck * xk;
  });
  xs = team.all_reduce(xs, Add{});
  float norm = std::sqrt(xs.v[0]);
  norm = norm < FLT_MIN ? FLT_MIN : norm;  // clamp_min, NaN kept
  const float p = xs.v[1] / norm, r = xs.v[2] / norm;  // M̂·x̂ = â·p + ĉ·r

  Sums<1> squares{};
  team.for_range(0, b, [&](int k) {
    const float yk = a[k] * scale * p + c[k] * scale * r;
    squares.v[0] += yk * yk;
  });
  squares = team.all_reduce(squares, Add{});
  return max_abs * std::sqrt(squares.v[0]);
}

// kron_update_preconditioner_ for a batch of 1-D blocks (B, b) with factors (B, b, b), in place.
struct TriangularVectorUpdate {
  static constexpr int64_t kScratchPerEntry = 5;  // x, a, c, and the suffix sums of a and c

  float* factors;
  const float* grads;
  const float* noise;
  const float* damping;
  float precond_lr;
  int b;

  template <typename Team>
  C10_HOST_DEVICE void operator()(const Team& team, int64_t block, float* scratch) const {
    float* q = factors + block * b * b;
    const float* g = grads + block * b;
    const float* v = noise + block * b;
    float* x = scratch;
    float* a = x + b;
    float* c = a + b;
    float* sum_a = c + b;
    float* sum_c = sum_a + b;
    const float d = damping[block];
    team.for_range(0, b, [&](int k) {
      x[k] = g[k] + d * v[k];
      c[k] = v[k];
      sum_a[k] = 0.0f;
      sum_c[k] = 0.0f;
    });
    team.sync();
    upper_matvec(team, q, x, a, b);
    solve_upper_transposed(team, q, c, b);
    team.sync();  // a and c are complete for every worker, and every read of Q across columns is done
    const float bound = rank_two_norm_lower_bound(team, a, c, b);
    const float step = precond_lr / (bound + FLT_MIN);
    // Q[i,k] ← Q[i,k] − s·(a_i·Σ_{j≥i} a_j·Q[j,k] − c_i·Σ_{j≥i} c_j·Q[j,k]): column k's owner carries its sums up.
    for (int i = b - 1; i >= 0; --i) {
      const float ai = a[i], ci = c[i];
      float* row = q + static_cast<int64_t>(i) * b;
      team.for_range(i, b, [&](int k) {
        const float qik = row[k];
        sum_a[k] += ai * qik;
        sum_c[k] += ci * qik;
        row[k] = qik - step * (ai * sum_a[k] - ci * sum_c[k]);
      });
    }
  }
};

// kron_precondition for a batch of 1-D blocks: out = Qᵀ·(Q·g), two triangular matvecs instead of forming QᵀQ.
struct TriangularVectorPrecondition {
  static constexpr int64_t kScratchPerEntry = 2;  // g (then the sums of Qᵀ·y), y = Q·g

  const float* factors;
  const float* grads;
  float* out;
  int b;

  template <typename Team>
  C10_HOST_DEVICE void operator()(const Team& team, int64_t block, float* scratch) const {
    const float* q = factors + block * b * b;
    float* x = scratch;
    float* y = x + b;
    team.for_range(0, b, [&](int k) { x[k] = grads[block * b + k]; });
    team.sync();
    upper_matvec(team, q, x, y, b);
    team.sync();  // y is complete, and every row dot has read x
    team.for_range(0, b, [&](int k) { x[k] = 0.0f; });
    // (Qᵀ·y)_k = Σ_{i≤k} Q[i,k]·y_i, row by row so that a team reads each row of Q once, coalesced.
    for (int i = 0; i < b; ++i) {
      const float yi = y[i];
      const float* row = q + static_cast<int64_t>(i) * b;
      team.for_range(i, b, [&](int k) { x[k] += row[k] * yi; });
    }
    team.for_range(0, b, [&](int k) { out[block * b + k] = x[k]; });
  }
};

}  // namespace fastoptim::kron_vector
