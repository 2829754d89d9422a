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
  // Each reads g, p and state once and writes p and state once, for the whole list. `steps` holds one step counter
  // per parameter (0-dim float32 on the params' device; t = 1 on a parameter's first step), from which each kernel
  // computes that parameter's bias corrections in float64 on the device. The ops only read the counters: the caller
  // (the functional core) advances them before the call, so parameters at different counts share one launch and a
  // step reads nothing on the host; `grad_scale` is the global-norm clip factor
  // (from clip_scale) that multiplies the gradient as it is read; every update is w ← w − lr·(u + λ·w). Params are
  // float32, bfloat16 or float16, grads have the params' dtype, state is float32 or the params' dtype.

  // AdamW (NAdamW's numerator with nesterov): u = m̂/(√v̂ + ε).
  m.def("adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor lr, "
        "Tensor[] steps, float beta1, float beta2, float eps, float weight_decay, bool nesterov, Tensor? grad_scale) -> ()");
  // Cautious AdamW (of NAdamW's direction with nesterov): u ← u·1[u·g > 0]/(mean(1[u·g > 0]) + ε), the mean per
  // tensor (two launches for the list).
  // mask_means, when given, replaces the per-tensor mean (a tensor stepped in parts: the mean over the whole tensor
  // from cautious_mask_counts, which takes cautious_adamw_'s arguments and counts 1[u·g > 0] per tensor).
  m.def("cautious_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor lr, Tensor[] steps, float beta1, float beta2, float eps, float weight_decay, bool nesterov, "
        "Tensor? grad_scale, Tensor? mask_means=None) -> ()");
  m.def("cautious_mask_counts(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor lr, "
        "Tensor[] steps, float beta1, float beta2, float eps, float weight_decay, bool nesterov, Tensor? grad_scale) "
        "-> Tensor");
  // Mars: AdamW on c = grad_scale·(g + γ·β1/(1−β1)·(g − g_prev)); then g_prev ← g.
  m.def("mars_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] prev_grads, Tensor(c!)[] exp_avgs, "
        "Tensor(d!)[] exp_avg_sqs, Tensor lr, Tensor[] steps, float beta1, float beta2, float eps, float weight_decay, "
        "float gamma, Tensor? grad_scale) -> ()");
  // Adam-mini: exp_avg_sqs[i] has one value per equal contiguous block of params[i].
  m.def("adam_mini_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor lr, "
        "Tensor[] steps, float beta1, float beta2, float eps, float weight_decay, Tensor? grad_scale) -> ()");
  // Lion: u = sign(β1·m + (1−β1)·g); m ← β2·m + (1−β2)·g.
  m.def("lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor lr, float beta1, float beta2, "
        "float weight_decay, Tensor? grad_scale) -> ()");
  // Signum: buf ← β·buf + (1−β)·g; u = sign(buf).
  m.def("signum_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor lr, float beta, "
        "float weight_decay, Tensor? grad_scale) -> ()");
  // Momentum without a parameter update: heavy ball (buf ← β·buf + g) or EMA (ema), plain or Nesterov; the
  // direction goes to `directions` (empty: buffers only).
  m.def("momentum_(Tensor[] grads, Tensor(a!)[] momentum_buffers, Tensor(b!)[] directions, float beta, bool nesterov, "
        "bool ema, Tensor? grad_scale) -> ()");
  // Sophia-H: u = clip(m̂ / max(γ·h, ε), −clip_threshold, clip_threshold).
  m.def("sophia_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] hessians, Tensor lr, "
        "Tensor[] steps, float beta1, float gamma, float eps, float clip_threshold, float weight_decay, "
        "Tensor? grad_scale) -> ()");
  // Sophia's Hessian EMA h ← β2·h + (1−β2)·ĥ.
  m.def("sophia_hessian_(Tensor(a!)[] hessians, Tensor[] estimates, float beta2) -> ()");
  // min(1, max_norm/‖tensors‖₂) over the whole list as a 0-dim float32 tensor: the grad_scale of the ops above.
  m.def("clip_scale(Tensor[] tensors, float max_norm) -> Tensor");
  // The same factor for Mars's corrected gradient c = g + γ·β1/(1−β1)·(g − g_prev).
  m.def("mars_clip_scale(Tensor[] grads, Tensor[] prev_grads, float gamma, float beta1, float max_norm) -> Tensor");

  // --- Newton–Schulz (Muon, Scion) ---
  // The orthogonalised step is three calls: newton_schulz_momentum_ (pass in), newton_schulz (the iteration),
  // decoupled_update_ (pass out, with the shape scaling as its `scale`).

  // For a list of same-shape matrices (a tensor of shape (m, rest...) is read as m × prod(rest)): buf ← β·buf + w·g
  // with w = 1 (heavy ball, Muon) or 1 − β (ema=True, Scion); direction u = β·buf + w·g if nesterov else buf.
  // Returns the directions stacked as (B, m, n) in `dtype`, and their Frobenius norms (B,) in float32.
  m.def("newton_schulz_momentum_(Tensor(a!)[] momentum_buffers, Tensor[] grads, float beta, bool nesterov, "
        "bool ema, ScalarType dtype) -> (Tensor, Tensor)");

  // X = x/(‖x‖_F + eps) per matrix (`norms` when given, else computed), then per step (a, b, c):
  // A = X·Xᵀ, X ← a·X + (b·A + c·A²)·X, iterating on the wide orientation (tall matrices transposed internally).
  // x: (B, m, n) float32/bfloat16/float16, the iteration's dtype (fp32 accumulation). coefficients: a (steps, 3)
  // CPU tensor, default (3.4445, −4.7750, 2.0315) each step. method: "auto" | "plain" | "symmetric" (CUDA only:
  // upper-triangular tiles for the symmetric products). Returns a new (B, m, n) tensor.
  m.def("newton_schulz(Tensor x, int steps, float eps, Tensor? coefficients=None, Tensor? norms=None, "
        "str method=\"auto\") -> Tensor");

  // --- Soap and Kron preconditioners ---
  // Batches of same-shape blocks: data (B, m, n) float32; per rotated side of a Soap block a (B, m, m) / (B, n, n)
  // matrix, None for a side that is not rotated; per block axis of a Kron block a factor (B, b, b) (upper
  // triangular) or (B, b) (diagonal).

  // Soap statistics: GG_left ← keep·GG_left + add·G·Gᵀ, GG_right ← keep·GG_right + add·Gᵀ·G per block.
  m.def("soap_gram_(Tensor(a!)? gg_left, Tensor(b!)? gg_right, Tensor grads, float keep, float add, str method=\"auto\") -> ()");
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
