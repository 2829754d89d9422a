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
}
