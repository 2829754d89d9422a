// PSGD-Kron's preconditioner math on a batch of same-shape blocks (benchmark-spec §1.9): momentum blocks
// (B, *block) and per block axis one Kronecker factor, upper triangular (B, b, b) (its strictly lower triangle
// zero) or diagonal (B, b) (its shape says which). Every product is a batched ATen call over all blocks of the
// batch, so the same code runs on CPU and CUDA; a multiplication along the first or last block axis runs on the
// blocks in place, without a transposed copy. 1-D blocks with a triangular factor (every hidden matrix of a small
// model, once Kron merges its dims) take O(b²) custom kernels instead (kernels/kron_vector_block.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "kernels/kron_vector_block.h"
#include "kernels/soap_kron_checks.h"

namespace fastoptim {

namespace kron_detail {

inline std::string factor_name(size_t axis) { return "factors[" + std::to_string(axis) + "]"; }

inline bool is_diagonal(const at::Tensor& factor) { return factor.dim() == 2; }

// One factor per block axis of `grads`, each (B, b) or (B, b, b) with b that axis' size.
inline void check_factors(const at::Tensor& grads, at::TensorList factors) {
  const int64_t axes = grads.dim() - 1;
  TORCH_CHECK(static_cast<int64_t>(factors.size()) == axes, "fastoptim: factors has ", factors.size(),
              " tensors but grads ", grads.sizes(), " has ", axes, " block axes; one factor per axis");
  for (size_t axis = 0; axis < factors.size(); ++axis) {
    const std::string name = factor_name(axis);
    check_block_tensor(name, factors[axis], grads.device());
    const int64_t batch = grads.size(0), b = grads.size(axis + 1);
    if (is_diagonal(factors[axis])) {
      check_shape(name, factors[axis], {batch, b});
    } else {
      TORCH_CHECK(factors[axis].dim() == 3, "fastoptim: ", name, " must be (B, b) (diagonal) or (B, b, b) "
                  "(triangular), got shape ", factors[axis].sizes());
      check_shape(name, factors[axis], {batch, b, b});
    }
  }
}

// A diagonal factor (B, b) shaped to broadcast along block axis `axis` of `x`.
inline at::Tensor axis_view(const at::Tensor& diag, const at::Tensor& x, int64_t axis) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = diag.size(0);
  shape[axis + 1] = diag.size(1);
  return diag.view(shape);
}

// out[.., i, ..] = Σ_j M[i, j]·x[.., j, ..] along block axis `axis`, per block.
inline at::Tensor along(const at::Tensor& x, int64_t axis, const at::Tensor& mats) {
  const int64_t batch = x.size(0), b = x.size(axis + 1);
  if (axis == 0) return at::bmm(mats, x.reshape({batch, b, -1})).view(x.sizes());
  if (axis == x.dim() - 2) return at::bmm(x.reshape({batch, -1, b}), mats.mT()).view(x.sizes());
  const at::Tensor moved = x.movedim(axis + 1, -1);
  return at::bmm(moved.reshape({batch, -1, b}), mats.mT()).view(moved.sizes()).movedim(-1, axis + 1);
}

// x with Q⁻¹ applied from the right along block axis `axis` (x·Q⁻¹ on the axis-last unfolding), Q upper triangular.
inline at::Tensor solve_along(const at::Tensor& x, int64_t axis, const at::Tensor& q) {
  const int64_t batch = x.size(0), b = x.size(axis + 1);
  if (axis == 0) {  // (x_(0)ᵀ·Q⁻¹)ᵀ = Q⁻ᵀ·x_(0): a left solve with the lower triangular Qᵀ
    return at::linalg_solve_triangular(q.mT(), x.reshape({batch, b, -1}), /*upper=*/false).view(x.sizes());
  }
  const at::Tensor moved = x.movedim(axis + 1, -1);
  const at::Tensor solved = at::linalg_solve_triangular(q, moved.reshape({batch, -1, b}), /*upper=*/true,
                                                        /*left=*/false);
  return solved.view(moved.sizes()).movedim(-1, axis + 1);
}

// QᵀQ·x along block axis `axis`. With r = (block size)/b < b, the two products Qᵀ·(Q·x) (2b²r FLOPs each) cost less
// than forming QᵀQ (2b³) and applying it (2b²r).
inline at::Tensor gram_along(const at::Tensor& x, int64_t axis, const at::Tensor& q) {
  const int64_t b = x.size(axis + 1), rest = c10::multiply_integers(x.sizes().slice(1)) / std::max<int64_t>(b, 1);
  if (rest < b) return along(along(x, axis, q), axis, q.mT());
  return along(x, axis, at::bmm(q.mT(), q));
}

// A batch of 1-D blocks with a triangular factor small enough for the O(b²) kernels.
inline bool is_triangular_vector(const at::Tensor& grads, at::TensorList factors) {
  return grads.dim() == 2 && !is_diagonal(factors[0]) && grads.size(1) <= kron_vector::kMaxBlock;
}

// x_(axis)·x_(axis)ᵀ per block: (B, b, b).
inline at::Tensor unfold_gram(const at::Tensor& x, int64_t axis) {
  const int64_t batch = x.size(0), b = x.size(axis + 1);
  if (axis == x.dim() - 2) {
    const at::Tensor rows = x.reshape({batch, -1, b});
    return at::bmm(rows.mT(), rows);
  }
  const at::Tensor rows = x.movedim(axis + 1, 1).reshape({batch, b, -1});
  return at::bmm(rows, rows.mT());
}

// Σ x² over every block axis but `axis`: (B, b), the diagonal of unfold_gram.
inline at::Tensor axis_sum_of_squares(const at::Tensor& x, int64_t axis) {
  const int64_t batch = x.size(0), b = x.size(axis + 1);
  return (x * x).movedim(axis + 1, 1).reshape({batch, b, -1}).sum(-1);
}

// A cheap lower bound of the spectral norm of each symmetric matrix of a (B, b, b) batch (Levanter's): the
// largest column x of A/max|A|, then ‖(x·A/‖x·A‖)·Aᵀ‖, scaled back by max|A|; 0 for a zero matrix.
inline at::Tensor norm_lower_bound(const at::Tensor& a) {
  const int64_t batch = a.size(0), b = a.size(1);
  const at::Tensor max_abs = a.abs().amax({-2, -1});
  const at::Tensor nonzero = max_abs > 0;
  const at::Tensor scaled = a / at::where(nonzero, max_abs, 1.0).view({batch, 1, 1});
  const at::Tensor column = (scaled * scaled).sum(-2).argmax(-1);
  at::Tensor x = at::bmm(scaled.gather(-1, column.view({batch, 1, 1}).expand({batch, b, 1})).mT(), scaled);
  x = x / at::linalg_vector_norm(x, 2, at::IntArrayRef{-1}, /*keepdim=*/true).clamp_min(std::numeric_limits<float>::min());
  const at::Tensor bound = max_abs * at::linalg_vector_norm(at::bmm(x, scaled.mT()), 2, at::IntArrayRef{-2, -1});
  return at::where(nonzero, bound, 0.0);
}

}  // namespace kron_detail

// (Q_1ᵀQ_1 ⊗ Q_2ᵀQ_2 ⊗ …)·G per block; a diagonal factor q scales its axis by q².
template <typename Backend>
at::Tensor kron_precondition(const at::Tensor& grads, at::TensorList factors) {
  check_block_batch(grads, 1, 8);
  kron_detail::check_factors(grads, factors);
  if (kron_detail::is_triangular_vector(grads, factors)) {
    const at::Tensor out = at::empty_like(grads);
    const int b = static_cast<int>(grads.size(1));
    const kron_vector::TriangularVectorPrecondition body{factors[0].data_ptr<float>(), grads.data_ptr<float>(),
                                                         out.data_ptr<float>(), b};
    Backend::for_each_block(grads.device(), grads.size(0), body.kScratchPerEntry * b, body);
    return out;
  }
  at::Tensor out = grads;
  for (size_t axis = 0; axis < factors.size(); ++axis) {
    const at::Tensor& q = factors[axis];
    out = kron_detail::is_diagonal(q) ? out * kron_detail::axis_view(q * q, out, axis)
                                      : kron_detail::gram_along(out, axis, q);
  }
  return out.is_same(grads) ? out.clone() : out.contiguous();
}

// One preconditioner update fitted on the momentum blocks G with the noise V ~ N(0, I) (like G) and one damping
// factor per block (B,): G ← G + damping·V; A = Q·G along every axis; conjB = V·Q_i⁻¹ along every axis (V/q for a
// diagonal factor). Then each factor, from the old ones: term1 = A_(i)A_(i)ᵀ, term2 = conjB_(i)conjB_(i)ᵀ,
// Q_i ← Q_i − precond_lr/‖term1 + term2‖·triu(term1 − term2)·Q_i with ‖·‖ the spectral-norm lower bound; a
// diagonal factor uses the diagonals of the terms and max|term1 + term2|.
template <typename Backend>
void kron_update_preconditioner_(const at::Tensor& grads, at::TensorList factors, const at::Tensor& noise,
                                 const at::Tensor& damping, double precond_lr) {
  const at::Device device = check_block_batch(grads, 1, 8);
  kron_detail::check_factors(grads, factors);
  check_block_tensor("noise", noise, device);
  check_shape("noise", noise, grads.sizes());
  check_block_tensor("damping", damping, device);
  check_shape("damping", damping, {grads.size(0)});
  if (kron_detail::is_triangular_vector(grads, factors)) {
    const int b = static_cast<int>(grads.size(1));
    const kron_vector::TriangularVectorUpdate body{factors[0].data_ptr<float>(), grads.data_ptr<float>(),
                                                  noise.data_ptr<float>(), damping.data_ptr<float>(),
                                                  static_cast<float>(precond_lr), b};
    Backend::for_each_block(device, grads.size(0), body.kScratchPerEntry * b, body);
    return;
  }

  std::vector<int64_t> per_block(grads.dim(), 1);
  per_block[0] = grads.size(0);
  at::Tensor a = at::addcmul(grads, damping.view(per_block), noise);
  at::Tensor conj = noise;
  for (size_t axis = 0; axis < factors.size(); ++axis) {
    const at::Tensor& q = factors[axis];
    if (kron_detail::is_diagonal(q)) {
      const at::Tensor scale = kron_detail::axis_view(q, a, axis);
      a = a * scale;
      conj = conj / scale;
    } else {
      a = kron_detail::along(a, axis, q);
      conj = kron_detail::solve_along(conj, axis, q);
    }
  }
  const double tiny = std::numeric_limits<float>::min();
  for (size_t axis = 0; axis < factors.size(); ++axis) {
    const at::Tensor& q = factors[axis];
    if (kron_detail::is_diagonal(q)) {
      const at::Tensor term1 = kron_detail::axis_sum_of_squares(a, axis);
      const at::Tensor term2 = kron_detail::axis_sum_of_squares(conj, axis);
      const at::Tensor step = precond_lr / ((term1 + term2).abs().amax(-1, /*keepdim=*/true) + tiny);
      q.sub_(step * (term1 - term2) * q);
    } else {
      const at::Tensor term1 = kron_detail::unfold_gram(a, axis);
      const at::Tensor term2 = kron_detail::unfold_gram(conj, axis);
      const at::Tensor step = precond_lr / (kron_detail::norm_lower_bound(term1 + term2) + tiny);
      q.sub_(step.view({-1, 1, 1}) * at::bmm(at::triu(term1 - term2), q));
    }
  }
}

// Rescale each block's factors to the geometric mean of their max-abs norms; their product is unchanged.
inline void kron_balance_(at::TensorList factors) {
  TORCH_CHECK(!factors.empty(), "fastoptim: factors is empty; kron_balance_ needs at least one factor");
  const at::Device device = factors[0].device();
  const int64_t batch = factors[0].size(0);
  std::vector<at::Tensor> norms;
  for (size_t i = 0; i < factors.size(); ++i) {
    const std::string name = kron_detail::factor_name(i);
    check_block_tensor(name, factors[i], device);
    TORCH_CHECK((factors[i].dim() == 2 || factors[i].dim() == 3) && factors[i].size(0) == batch, "fastoptim: ",
                name, " has shape ", factors[i].sizes(), "; expected (", batch, ", b) or (", batch, ", b, b)");
    norms.push_back(factors[i].abs().flatten(1).amax(-1));
  }
  const at::Tensor target = at::stack(norms).log().mean(0).exp();
  for (size_t i = 0; i < factors.size(); ++i) {
    std::vector<int64_t> shape(factors[i].dim(), 1);
    shape[0] = batch;
    factors[i].mul_((target / norms[i]).view(shape));
  }
}

}  // namespace fastoptim
