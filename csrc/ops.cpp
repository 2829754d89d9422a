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
}
