"""Muon's and Scion's orthogonalisation: the quintic Newton–Schulz iteration on a batch of same-shape matrices.

This is the pure-torch core; `fastoptim.ops.newton_schulz` (a native kernel) computes the same function and replaces
it when the optimizer's fused switch allows (benchmark-spec §1.7, step 3–4).
"""

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    x: Tensor, steps: int, eps: float, coefficients: tuple[float, float, float] = NS_COEFFICIENTS
) -> Tensor:
    """Approximately orthogonalise each matrix of `x` (shape (batch, m, n)); returns a new tensor of that shape.

    X ← X/(‖X‖_F + eps) per matrix, transposed so that rows ≤ columns (A = X·Xᵀ is then the smaller Gram matrix),
    then `steps` times X ← a·X + (b·A + c·A²)·X, and transposed back. Singular values of the result lie near
    [0.7, 1.1] rather than at 1: the coefficients trade exactness for a steep slope at zero.
    """
    if x.ndim != 3:
        raise ValueError(f"x: expected a batch of matrices (batch, m, n), got shape {tuple(x.shape)}")
    a, b, c = coefficients
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x
