"""Pieces every core shares: reading clipped gradients, counting steps, and the decoupled-decay update."""

import torch


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
