"""Muon's and Scion's orthogonalisation as native ops: the pass in (momentum, cast, stack, norms) and the quintic
Newton–Schulz iteration. The pass out is `decoupled_update_`; `orthogonalized_step_` chains the three."""

import math

import torch

from fastoptim.ops._checks import check_dense, check_float_dtype, check_symmetric_method, check_tensor_lists
from fastoptim.ops.update import decoupled_update_

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def iteration_dtype(device) -> torch.dtype:
    """The dtype Newton–Schulz iterates in: bfloat16 operands on the GPU (fp32 accumulation), float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def newton_schulz_momentum_(momentum_buffers, grads, beta, *, nesterov=True, ema=False, dtype=None):
    """Momentum in place over same-shape matrices; returns (directions (B, m, n) in `dtype`, norms (B,) float32).

    Heavy ball (Muon): buf ← β·buf + g. EMA (Scion, ``ema=True``): buf ← β·buf + (1−β)·g. The direction is
    β·buf + (that gradient term) with ``nesterov``, else buf. A tensor of shape (m, rest...) is read as
    m × prod(rest). dtype: default `iteration_dtype` of the buffers' device.
    """
    if not momentum_buffers and not grads:  # nothing to stack (the op needs a tensor to pick its device)
        return torch.empty(0, 0, 0, dtype=dtype or torch.float32), torch.empty(0, dtype=torch.float32)
    check_dense(momentum_buffers=momentum_buffers, grads=grads)
    device = (momentum_buffers or grads)[0].device
    dtype = iteration_dtype(device) if dtype is None else dtype
    return torch.ops.fastoptim.newton_schulz_momentum_(list(momentum_buffers), list(grads), float(beta),
                                                       bool(nesterov), bool(ema), dtype)


def newton_schulz(x, steps=5, eps=1e-7, *, coefficients=None, norms=None, method="auto"):
    """`steps` quintic Newton–Schulz steps on each matrix of x (B, m, n); returns a new (B, m, n) tensor.

    X = x/(‖x‖_F + eps) per matrix (``norms``, e.g. from `newton_schulz_momentum_`, saves recomputing them), then
    each step X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ, on the wide orientation. coefficients: None for
    (3.4445, −4.7750, 2.0315) every step, or a (steps, 3) schedule (tensor or nested sequence). method: "auto",
    "plain" (batched GEMMs) or "symmetric" (only the upper-triangular tiles of X·Xᵀ and A·A; the smaller side must
    be a multiple of 32 of at least 64).
    """
    check_dense(x=[x])
    if coefficients is not None and not isinstance(coefficients, torch.Tensor):
        coefficients = torch.tensor(coefficients, dtype=torch.float64).reshape(-1, 3)
    return torch.ops.fastoptim.newton_schulz(x, int(steps), float(eps), coefficients, norms, method)


def orthogonalized_step_(params, grads, momentum_buffers, *, lr, beta, nesterov, ema, steps, eps, weight_decay,
                         scale):
    """One Muon/Scion matrix-branch step over same-shape parameters, in three native calls:
    momentum in, Newton–Schulz, and w ← w·(1 − lr·λ) − lr·scale·O."""
    if not params:
        return
    directions, norms = newton_schulz_momentum_(momentum_buffers, grads, beta, nesterov=nesterov, ema=ema)
    ortho = newton_schulz(directions, steps, eps, norms=norms)
    if ortho.dtype not in (torch.float32, params[0].dtype):  # decoupled_update_ reads float32 or the params' dtype
        ortho = ortho.float()
    decoupled_update_(params, ortho.unbind(0), lr, weight_decay, scale)


def _stack_shape(momentum_buffers):
    first = momentum_buffers[0]
    if first.dim() < 2:
        raise RuntimeError(f"fastoptim: momentum_buffers[0] has {first.dim()} dims; Newton–Schulz needs matrices "
                           "(≥ 2 dims, read as (size(0), rest))")
    for i, t in enumerate(momentum_buffers):
        if t.shape != first.shape:
            raise RuntimeError(f"fastoptim: momentum_buffers[{i}] has shape {list(t.shape)} but momentum_buffers[0] "
                               f"has {list(first.shape)}; one call takes matrices of one shape")
    rows = first.size(0)
    return len(momentum_buffers), rows, (first.numel() // rows if rows else 0)


@torch.library.register_fake("fastoptim::newton_schulz_momentum_")
def _(momentum_buffers, grads, beta, nesterov, ema, dtype):
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"fastoptim: newton_schulz_momentum_: dtype is {dtype}; supported are float32, bfloat16 "
                           "and float16")
    device = check_tensor_lists(momentum_buffers=momentum_buffers, grads=grads)
    if device is None:
        return torch.empty(0, 0, 0, dtype=dtype), torch.empty(0, dtype=torch.float32)
    batch, rows, cols = _stack_shape(momentum_buffers)
    buffer_dtype = check_float_dtype("momentum_buffers", momentum_buffers)
    grad_dtype = check_float_dtype("grads", grads)
    if grad_dtype not in (torch.float32, buffer_dtype):
        raise RuntimeError(f"fastoptim: grads have dtype {grad_dtype}; expected float32 or the momentum buffers' "
                           f"dtype {buffer_dtype}")
    return (momentum_buffers[0].new_empty((batch, rows, cols), dtype=dtype),
            momentum_buffers[0].new_empty((batch,), dtype=torch.float32))


@torch.library.register_fake("fastoptim::newton_schulz")
def _(x, steps, eps, coefficients=None, norms=None, method="auto"):
    if x.dim() != 3:
        raise RuntimeError(f"fastoptim: newton_schulz: x has {x.dim()} dims; expected a batch of matrices "
                           "(batch, m, n)")
    check_float_dtype("x", [x])
    if steps < 0 or eps < 0 or not math.isfinite(eps):
        raise RuntimeError(f"fastoptim: newton_schulz: steps ({steps}) and eps ({eps}) must be ≥ 0")
    if coefficients is not None and tuple(coefficients.shape) != (steps, 3):
        raise RuntimeError(f"fastoptim: newton_schulz: coefficients has shape {list(coefficients.shape)}; expected "
                           f"(steps, 3) = ({steps}, 3), one (a, b, c) per step")
    if norms is not None and (tuple(norms.shape) != (x.size(0),) or norms.dtype != torch.float32):
        raise RuntimeError(f"fastoptim: newton_schulz: norms must be a float32 tensor of shape ({x.size(0)},), got "
                           f"dtype {norms.dtype} and shape {list(norms.shape)}")
    check_symmetric_method(method, min(x.shape[1:]), "newton_schulz")
    return x.new_empty(x.shape)
