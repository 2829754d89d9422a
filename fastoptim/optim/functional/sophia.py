"""Sophia-H (benchmark-spec §1.11): momentum preconditioned by a clipped diagonal-Hessian EMA."""

import torch

from fastoptim import ops
from fastoptim.optim.functional.common import advance, apply_update_, bias_corrections, scaled


def sophia_(params, grads, exp_avgs, hessians, steps, *, lr, beta1: float, gamma: float, eps: float,
            clip_threshold: float, weight_decay: float, grad_scale=None, fused: bool | None = None) -> None:
    """m ← β1·m + (1−β1)·g;  u = clip(m̂ / max(γ·h, ε), −c, c) with m̂ = m/(1−β1^t);  w ← w − lr·(u + λ·w)."""
    if not params:
        return
    advance(steps)
    if ops.use_native(fused, "sophia_", params):
        torch.ops.fastoptim.sophia_(params, grads, exp_avgs, hessians, ops.device_scalar(lr, params[0].device), steps,
                                    beta1, gamma, eps, clip_threshold, weight_decay, grad_scale)
    else:
        _sophia_torch(params, grads, exp_avgs, hessians, steps, lr, beta1, gamma, eps, clip_threshold, weight_decay,
                      grad_scale)


def _sophia_torch(params, grads, exp_avgs, hessians, steps, lr, beta1, gamma, eps, clip_threshold, weight_decay,
                  grad_scale):
    grads = scaled(grads, grad_scale)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    denominators = torch._foreach_mul(hessians, gamma)
    torch._foreach_clamp_min_(denominators, eps)
    torch._foreach_mul_(denominators, bias_corrections(beta1, steps))  # folds the bias correction of m
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_clamp_min_(updates, -clip_threshold)
    torch._foreach_clamp_max_(updates, clip_threshold)
    apply_update_(params, updates, lr=lr, weight_decay=weight_decay, fused=False)


def sophia_hessian_(hessians, estimates, *, beta2: float, fused: bool | None = None) -> None:
    """h ← β2·h + (1−β2)·ĥ, no bias correction (h starts at 0); ĥ is the Hutchinson estimate u⊙(H·u)."""
    if not hessians:
        return
    if ops.use_native(fused, "sophia_hessian_", hessians):
        torch.ops.fastoptim.sophia_hessian_(hessians, estimates, beta2)
    else:
        torch._foreach_lerp_(hessians, estimates, 1 - beta2)
