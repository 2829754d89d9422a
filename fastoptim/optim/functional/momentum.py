"""Momentum buffers: signum (Scion's elementwise branch, benchmark-spec §1.8) and the heavy-ball/EMA momentum
that feeds Muon's and Scion's Newton–Schulz iteration on the pure path (§1.7, §1.8)."""

import torch

from fastoptim import ops
from fastoptim.optim.functional.common import apply_update_, scaled


def signum_(params, grads, momentum_buffers, *, lr, beta: float, weight_decay: float, grad_scale=None,
            fused: bool | None = None) -> None:
    """buf ← β·buf + (1−β)·g;  u = sign(buf);  w ← w − lr·(u + λ·w)."""
    if not params:
        return
    if ops.use_native(fused, "signum_", params):
        torch.ops.fastoptim.signum_(params, grads, momentum_buffers, ops.device_scalar(lr, params[0].device), beta,
                                    weight_decay, grad_scale)
    else:
        torch._foreach_lerp_(momentum_buffers, scaled(grads, grad_scale), 1 - beta)
        apply_update_(params, torch._foreach_sign(momentum_buffers), lr=lr, weight_decay=weight_decay, fused=False)


def momentum_(grads, momentum_buffers, *, beta: float, nesterov: bool = False, ema: bool = False,
              grad_scale=None, fused: bool | None = None) -> list[torch.Tensor]:
    """Update the buffers and return the directions; parameters are not touched.

    Heavy ball (Muon): buf ← β·buf + g, and u = β·buf + g with ``nesterov``, else u = buf.
    EMA (Scion, ``ema=True``): buf ← β·buf + (1−β)·g, u = buf (or β·buf + (1−β)·g with ``nesterov``).
    Without ``nesterov`` the returned tensors ARE the buffers: read them, don't write them.
    """
    if not grads:
        return []
    if ops.use_native(fused, "momentum_", grads):
        directions = [torch.empty_like(b) for b in momentum_buffers] if nesterov else []
        torch.ops.fastoptim.momentum_(grads, momentum_buffers, directions, beta, nesterov, ema, grad_scale)
        return directions if nesterov else momentum_buffers
    grads = scaled(grads, grad_scale)
    if ema:
        torch._foreach_lerp_(momentum_buffers, grads, 1 - beta)
    else:
        torch._foreach_mul_(momentum_buffers, beta)
        torch._foreach_add_(momentum_buffers, grads)
    if not nesterov:
        return momentum_buffers
    if ema:
        return torch._foreach_lerp(momentum_buffers, grads, 1 - beta)
    directions = torch._foreach_mul(momentum_buffers, beta)
    torch._foreach_add_(directions, grads)
    return directions
