"""Pieces every core shares: the global-norm clip, reading clipped gradients, counting steps, and the
decoupled-decay update."""

from functools import reduce

import torch


def clip_scale(tensors: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """min(1, max_norm/‖tensors‖₂) over the whole list as a 0-dim tensor (no host sync), or None when off.

    This is optax's clip_by_global_norm (the spec's clip): tensors are left alone while their global norm is below
    max_norm and scaled onto it otherwise. The norm is computed in the widest dtype of the list.
    """
    if max_norm == 0 or not tensors:
        return None
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    device = tensors[0].device
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=dtype) for n in norms]))
    return (max_norm / total).clamp(max=1.0)


def scaled(grads: list[torch.Tensor], grad_scale: torch.Tensor | None) -> list[torch.Tensor]:
    """The gradients times the clip factor, as new tensors (p.grad stays as the caller left it)."""
    return grads if grad_scale is None else torch._foreach_mul(grads, grad_scale)


def advance(steps: list[torch.Tensor]) -> list[float]:
    """Increment the step counters; return the new counts t (1 on the first step)."""
    torch._foreach_add_(steps, 1)
    return [s.item() for s in steps]


def apply_update_(params: list[torch.Tensor], updates: list[torch.Tensor], *, lr, weight_decay: float) -> None:
    """w ← w − lr·(u + λ·w), computed as w·(1 − lr·λ) − lr·u. `updates` may be overwritten."""
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if isinstance(lr, torch.Tensor):
        torch._foreach_mul_(updates, lr)
        torch._foreach_sub_(params, updates)
    else:
        torch._foreach_add_(params, updates, alpha=-lr)
