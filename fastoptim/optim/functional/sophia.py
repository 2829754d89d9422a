"""Sophia-H (benchmark-spec §1.11): momentum preconditioned by a clipped diagonal-Hessian EMA."""

import torch

from fastoptim.optim.functional.common import advance, apply_update_, scaled


def sophia_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    hessians: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr,
    beta1: float,
    gamma: float,
    eps: float,
    clip_threshold: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """m ← β1·m + (1−β1)·g;  u = clip(m̂ / max(γ·h, ε), −c, c) with m̂ = m/(1−β1^t);  w ← w − lr·(u + λ·w)."""
    if not params:
        return
    grads = scaled(grads, grad_scale)
    t = advance(steps)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    denominators = torch._foreach_mul(hessians, gamma)
    torch._foreach_clamp_min_(denominators, eps)
    torch._foreach_mul_(denominators, [1 - beta1**k for k in t])  # folds the bias correction of m
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_clamp_min_(updates, -clip_threshold)
    torch._foreach_clamp_max_(updates, clip_threshold)
    apply_update_(params, updates, lr=lr, weight_decay=weight_decay)


def sophia_hessian_(hessians: list[torch.Tensor], estimates: list[torch.Tensor], *, beta2: float) -> None:
    """h ← β2·h + (1−β2)·ĥ, no bias correction (h starts at 0); ĥ is the Hutchinson estimate u⊙(H·u)."""
    if hessians:
        torch._foreach_lerp_(hessians, estimates, 1 - beta2)
