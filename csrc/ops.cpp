// Every fastoptim op's schema, declared once. Kernels register per backend in csrc/cpu and csrc/cuda; fake (meta)
// implementations for torch.compile and FakeTensor live in fastoptim/ops/.
//
// Conventions: ops ending in `_` update their `(a!)` lists in place and return nothing; step scalars (lr, bias
// corrections, ...) are 0-dim float32 tensors on the parameters' device, so a captured or compiled step reads their
// current values; hyperparameters that stay fixed over a run are plain floats.

#include <torch/library.h>

TORCH_LIBRARY(fastoptim, m) {
  // p ← p·(1 − lr·weight_decay) − lr·scale·u for each (p, u) of (params, updates).
  m.def("decoupled_update_(Tensor(a!)[] params, Tensor[] updates, Tensor lr, float weight_decay, float scale) -> ()");

  // --- Elementwise optimizer families (fused multi-tensor updates) ---

  // --- Newton–Schulz (Muon, Scion) ---

  // --- Soap and Kron preconditioners ---
  // Batches of same-shape blocks: data (B, m, n) float32; per rotated side of a Soap block a (B, m, m) / (B, n, n)
  // matrix, None for a side that is not rotated; per block axis of a Kron block a factor (B, b, b) (upper
  // triangular) or (B, b) (diagonal).

  // Soap statistics: GG_left ← keep·GG_left + add·G·Gᵀ, GG_right ← keep·GG_right + add·Gᵀ·G per block.
  m.def("soap_gram_(Tensor(a!)? gg_left, Tensor(b!)? gg_right, Tensor grads, float keep, float add) -> ()");
  // Soap's first step: q ← eigenvectors of gg + eps·I, by descending eigenvalue.
  m.def("soap_eigenbasis_(Tensor(a!) q, Tensor gg, float eps) -> ()");
  // A later Soap step: exp_avg ← lerp(exp_avg, G, 1−β1); exp_avg_sq ← β2·v + (1−β2)·(Q_LᵀGQ_R)²; returns
  // Q_L·(bias_correction·Q_Lᵀ·exp_avg·Q_R/(√v + eps))·Q_Rᵀ.
  m.def("soap_rotated_adam_(Tensor grads, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor? q_left, "
        "Tensor? q_right, Tensor bias_correction, float beta1, float beta2, float eps) -> Tensor");
  // Soap's eigenbasis refresh per rotated side: Q ← QR(GG·Q) with columns sorted by diag(QᵀGG Q), descending;
  // exp_avg_sq permuted to match.
  m.def("soap_refresh_(Tensor(a!) exp_avg_sq, Tensor(b!)? q_left, Tensor(c!)? q_right, Tensor? gg_left, "
        "Tensor? gg_right) -> ()");
  // Kron: (Q_1ᵀQ_1 ⊗ Q_2ᵀQ_2 ⊗ …)·G per block.
  m.def("kron_precondition(Tensor grads, Tensor[] factors) -> Tensor");
  // Kron: one normalised triangular (or diagonal) step of every factor, fitted on G + damping·noise.
  m.def("kron_update_preconditioner_(Tensor grads, Tensor(a!)[] factors, Tensor noise, Tensor damping, "
        "float precond_lr) -> ()");
  // Kron: each block's factors rescaled to the geometric mean of their max-abs norms.
  m.def("kron_balance_(Tensor(a!)[] factors) -> ()");
}
