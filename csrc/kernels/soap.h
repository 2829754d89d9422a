// Soap's preconditioner math on a batch of same-shape 2-D blocks (benchmark-spec §1.10): grads, moments (B, m, n);
// per rotated side a Kronecker statistic GG and an eigenbasis Q, (B, m, m) on the left, (B, n, n) on the right. An
// absent side (an axis of size ≥ max_precond_dim, or the unit axis of a 1-D block seen as (B, m, 1)) is not
// rotated: plain Adam along it. The matrix products are batched ATen GEMMs over all blocks; the elementwise middle
// of a step is one pass of a custom kernel, written once below for both backends.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>

#include "common/multi_tensor.h"
#include "common/symmetric_tiles.h"
#include "kernels/soap_kron_checks.h"

namespace fastoptim {

// The rotated Adam middle, in place over m': v ← β2·v + (1−β2)·g'², m' ← bc·m'/(√v + ε). Folding the bias
// correction bc here is exact in exact arithmetic (the rotation back is linear) and spares a pass.
struct SoapRotatedAdam {
  const float* bias_correction;
  float beta2;
  float eps;

  struct Math {
    float beta2, one_minus_beta2, eps, bias_correction;
    C10_HOST_DEVICE void operator()(float& v, const float& g, float& m) const {
      v = beta2 * v + one_minus_beta2 * (g * g);
      m = bias_correction * m / (sqrtf(v) + eps);
    }
  };

  C10_HOST_DEVICE Math load(const ChunkContext&) const { return {beta2, 1.0f - beta2, eps, *bias_correction}; }
};

namespace soap_detail {

using OptionalTensor = std::optional<at::Tensor>;

inline void check_side(const char* name, const OptionalTensor& t, const at::Tensor& grads, int64_t axis) {
  if (t) check_axis_matrix(name, *t, grads, axis);
}

inline void check_blocks_like(const char* name, const at::Tensor& t, const at::Tensor& grads) {
  check_block_tensor(name, t, grads.device());
  check_shape(name, t, grads.sizes());
}

// l·x per block. On the CPU a single column (a 1-D block) goes through (xᵀ·lᵀ)ᵀ: its BLAS runs a batch of row
// vector × matrix products at memory speed and matrix × column vector ones 1.3-4x slower (512 blocks of 256, one
// thread of this project's CI machine kind: 7.9 ms for xᵀ·Q against 33 ms for Qᵀ·x). cuBLAS is unmeasured: as is.
inline at::Tensor left_product(const at::Tensor& l, const at::Tensor& x) {
  return x.size(2) == 1 && x.is_cpu() ? at::bmm(x.mT(), l.mT()).mT() : at::bmm(l, x);
}

// Q_Lᵀ·x·Q_R, always a new tensor (the caller may write into it).
inline at::Tensor rotate_in(const at::Tensor& x, const OptionalTensor& q_left, const OptionalTensor& q_right) {
  if (!q_left && !q_right) return x.clone();
  at::Tensor out = q_left ? left_product(q_left->mT(), x) : x;
  return q_right ? at::bmm(out, *q_right) : out;
}

// Q_L·x·Q_Rᵀ; may return x itself.
inline at::Tensor rotate_out(const at::Tensor& x, const OptionalTensor& q_left, const OptionalTensor& q_right) {
  at::Tensor out = q_left ? left_product(*q_left, x) : x;
  return q_right ? at::bmm(out, q_right->mT()) : out;
}

}  // namespace soap_detail

// GG_L ← keep·GG_L + add·G·Gᵀ and GG_R ← keep·GG_R + add·Gᵀ·G per block (keep = shampoo_beta, add = 1 − shampoo_beta;
// keep = 0 on the initialising step): one batched GEMM per side with the EMA in its alpha/beta epilogue, on the
// upper-triangular tiles only (common/symmetric_tiles.h) where `method` says so ("auto": sides of AutoMinRows and
// more).
template <typename Tiles, int64_t AutoMinRows>
void soap_gram_(const std::optional<at::Tensor>& gg_left, const std::optional<at::Tensor>& gg_right,
                const at::Tensor& grads, double keep, double add, c10::string_view method) {
  check_block_batch(grads, 2, 2);
  soap_detail::check_side("gg_left", gg_left, grads, 0);
  soap_detail::check_side("gg_right", gg_right, grads, 1);
  const std::pair<const std::optional<at::Tensor>*, at::Tensor> sides[] = {{&gg_left, grads}, {&gg_right, grads.mT()}};
  for (const auto& [gg, x] : sides) {
    if (!*gg) continue;
    at::Tensor out = **gg;
    symmetric_gram_<Tiles>(out, x, keep, add, resolve_symmetric_tile(method, x.size(1), AutoMinRows, "soap_gram_"));
  }
}

// Q ← the eigenvectors of GG + eps·I, by descending eigenvalue (Soap's initialising step).
inline void soap_eigenbasis_(const at::Tensor& q, const at::Tensor& gg, double eps) {
  check_block_tensor("gg", gg, gg.device());
  TORCH_CHECK(gg.dim() == 3 && gg.size(1) == gg.size(2), "fastoptim: gg must be a batch of square matrices "
              "(B, b, b), got shape ", gg.sizes());
  check_block_tensor("q", q, gg.device());
  check_shape("q", q, gg.sizes());
  const at::Tensor eye = at::eye(gg.size(1), gg.options());
  q.copy_(std::get<1>(at::linalg_eigh(gg + eye * eps)).flip(-1));
}

// One Soap step after the first: m ← lerp(m, g, 1−β1); v ← β2·v + (1−β2)·(Q_LᵀGQ_R)²; returns the direction
// u = Q_L·(bc·Q_LᵀmQ_R/(√v + ε))·Q_Rᵀ, bc = √(1−β2^t)/(1−β1^t) read from a device scalar.
template <typename Backend>
at::Tensor soap_rotated_adam_(const at::Tensor& grads, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                              const std::optional<at::Tensor>& q_left, const std::optional<at::Tensor>& q_right,
                              const at::Tensor& bias_correction, double beta1, double beta2, double eps) {
  const at::Device device = check_block_batch(grads, 2, 2);
  soap_detail::check_blocks_like("exp_avg", exp_avg, grads);
  soap_detail::check_blocks_like("exp_avg_sq", exp_avg_sq, grads);
  soap_detail::check_side("q_left", q_left, grads, 0);
  soap_detail::check_side("q_right", q_right, grads, 1);
  check_scalar("bias_correction", bias_correction, device);

  exp_avg.lerp_(grads, 1 - beta1);
  const at::Tensor g_rot = soap_detail::rotate_in(grads, q_left, q_right);
  const at::Tensor m_rot = soap_detail::rotate_in(exp_avg, q_left, q_right);
  const SoapRotatedAdam functor{bias_correction.data_ptr<float>(), static_cast<float>(beta2),
                                static_cast<float>(eps)};
  Backend::template multi_tensor_apply<float, const float, float>({exp_avg_sq, g_rot, m_rot}, functor);
  return soap_detail::rotate_out(m_rot, q_left, q_right);
}

// The periodic eigenbasis refresh, from the statistics GG of before this step's update, per rotated side: one
// power step GG·Q, its columns sorted by the estimated eigenvalues diag(QᵀGG Q) descending (v's entries along that
// axis permuted to match), then Q ← the Q factor of QR(GG·Q). The Q factor comes from geqrf's reflectors, written
// straight into Q: linalg_qr would also form R, which is not needed (the same Q bit for bit, and on 512 blocks of
// 256 on one thread of this project's CI machine kind 694 ms instead of 820).
inline void soap_refresh_(const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& q_left,
                          const std::optional<at::Tensor>& q_right, const std::optional<at::Tensor>& gg_left,
                          const std::optional<at::Tensor>& gg_right) {
  const at::Tensor& v = exp_avg_sq;
  check_block_tensor("exp_avg_sq", v, v.device());
  TORCH_CHECK(v.dim() == 3, "fastoptim: exp_avg_sq must be a batch of blocks (B, m, n), got shape ", v.sizes());
  TORCH_CHECK(q_left.has_value() == gg_left.has_value(), "fastoptim: q_left and gg_left must both be given or both "
              "be None");
  TORCH_CHECK(q_right.has_value() == gg_right.has_value(), "fastoptim: q_right and gg_right must both be given or "
              "both be None");
  soap_detail::check_side("q_left", q_left, v, 0);
  soap_detail::check_side("gg_left", gg_left, v, 0);
  soap_detail::check_side("q_right", q_right, v, 1);
  soap_detail::check_side("gg_right", gg_right, v, 1);
  const std::optional<at::Tensor>* qs[] = {&q_left, &q_right};
  const std::optional<at::Tensor>* ggs[] = {&gg_left, &gg_right};
  for (int64_t axis = 0; axis < 2; ++axis) {
    if (!*qs[axis]) continue;
    const at::Tensor& q = **qs[axis];
    const at::Tensor gg_q = at::bmm(**ggs[axis], q);
    const at::Tensor order = at::argsort((q * gg_q).sum(-2), -1, /*descending=*/true);
    const int64_t batch = order.size(0), b = order.size(1);
    const at::Tensor along_axis = axis == 0 ? order.view({batch, b, 1}) : order.view({batch, 1, b});
    v.copy_(v.gather(axis + 1, along_axis.expand_as(v)));
    const auto [reflectors, tau] = at::geqrf(gg_q.gather(-1, order.view({batch, 1, b}).expand({batch, b, b})));
    at::Tensor q_out = q;  // a handle on the same storage, for the out= signature
    at::linalg_householder_product_out(q_out, reflectors, tau);
  }
}

}  // namespace fastoptim
