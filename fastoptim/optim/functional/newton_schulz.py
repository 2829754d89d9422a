"""Muon's and Scion's matrix-branch step: momentum, the quintic Newton–Schulz iteration on a batch of same-shape
matrices, and the decoupled update (benchmark-spec §1.7 steps 1–6, §1.8).

The native step is three kernel calls: the pass in (momentum, the cast to the iteration dtype, the stack and the
Frobenius norms), the iteration (batched GEMMs, symmetric products as upper-triangular tiles where that wins), and the
pass out (decoupled_update_ with the shape scaling). The pure step is the same math in torch ops.
"""

import torch
from torch import Tensor

from fastoptim import ops
from fastoptim.optim.functional.common import apply_update_
from fastoptim.optim.functional.momentum import momentum_

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def default_ns_dtype(device) -> torch.dtype:
    """The iteration dtype the hardware multiplies fastest: bfloat16 on GPUs with native bf16 (Ampere and later)
    and on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX, as oneDNN reports), else float32.
    bf16 operands accumulate in float32 in every GEMM the iteration runs."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def newton_schulz(x: Tensor, steps: int, eps: float, coefficients=NS_COEFFICIENTS) -> Tensor:
    """Approximately orthogonalise each matrix of `x` (shape (batch, m, n)), pure torch, in x's dtype; returns a new
    tensor of that shape.

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
    x = x / (torch.linalg.matrix_norm(x.float(), keepdim=True) + eps).to(x.dtype)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


def orthogonalized_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr,
                         beta: float, nesterov: bool, ema: bool, steps: int, eps: float, weight_decay: float,
                         scale: float, coefficients=NS_COEFFICIENTS, ns_dtype: torch.dtype | None = None,
                         fused: bool | None = None) -> None:
    """One Muon/Scion matrix-branch step over same-shape parameters (each read as (d_out, rest)): momentum
    (heavy ball, or EMA with ``ema``; Nesterov with ``nesterov``), Newton–Schulz in ``ns_dtype`` (default
    `default_ns_dtype` of the parameters' device), then w ← w − lr·(scale·O + λ·w)."""
    if not params:
        return
    ns_dtype = ns_dtype or default_ns_dtype(params[0].device)
    if ops.use_native(fused, "newton_schulz", params):
        directions, norms = torch.ops.fastoptim.newton_schulz_momentum_(momentum_buffers, grads, beta, nesterov, ema,
                                                                         ns_dtype)
        schedule = None if tuple(coefficients) == NS_COEFFICIENTS else torch.tensor(
            [coefficients] * steps, dtype=torch.float64)
        ortho = torch.ops.fastoptim.newton_schulz(directions, steps, eps, schedule, norms)
        if ortho.dtype not in (torch.float32, params[0].dtype):  # the update reads float32 or the params' dtype
            ortho = ortho.float()
        apply_update_(params, ortho.unbind(0), lr=lr, weight_decay=weight_decay, scale=scale, fused=True)
    else:
        directions = momentum_(grads, momentum_buffers, beta=beta, nesterov=nesterov, ema=ema, fused=False)
        rows = params[0].shape[0]
        stacked = torch.stack([d.reshape(rows, -1) for d in directions]).to(ns_dtype)
        ortho = newton_schulz(stacked, steps, eps, coefficients)
        apply_update_(params, [o.reshape(p.shape).to(p.dtype) for p, o in zip(params, ortho)], lr=lr,
                      weight_decay=weight_decay, scale=scale, fused=False)
