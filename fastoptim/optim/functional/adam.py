"""The Adam moments and the direction u = m̂/(√v̂ + ε), with the variants built around them:
NAdamW (Nesterov numerator), Cautious (sign-agreement mask) and Mars (variance-reduced input gradient)."""

import math

import torch

from fastoptim.optim.functional.common import advance, apply_update_, scaled


def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
    nesterov: bool = False,
    cautious: bool = False,
) -> None:
    """One AdamW step (benchmark-spec §1.1), NAdamW with ``nesterov`` (§1.2), Cautious with ``cautious`` (§1.4).

    m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  u = m̂/(√v̂ + ε) with m̂ = m/(1−β1^t), v̂ = v/(1−β2^t).
    NAdamW's numerator: m̂ = β1·m/(1−β1^(t+1)) + (1−β1)·g/(1−β1^t).
    Cautious: u ← u·1[u·g > 0]/(mean(1[u·g > 0]) + ε), the mean taken per tensor.
    """
    if not params:
        return
    grads = scaled(grads, grad_scale)
    t = advance(steps)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)

    updates = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(updates, [math.sqrt(1 - beta2**k) for k in t])
    torch._foreach_add_(updates, eps)
    if nesterov:
        numerators = torch._foreach_mul(exp_avgs, [beta1 / (1 - beta1 ** (k + 1)) for k in t])
        torch._foreach_add_(numerators, torch._foreach_mul(grads, [(1 - beta1) / (1 - beta1**k) for k in t]))
    else:
        numerators = torch._foreach_div(exp_avgs, [1 - beta1**k for k in t])
    torch._foreach_div_(numerators, updates)
    updates = numerators
    if cautious:
        cautious_mask_(updates, grads, eps)
    apply_update_(params, updates, lr=lr, weight_decay=weight_decay)


def cautious_mask_(updates: list[torch.Tensor], grads: list[torch.Tensor], eps: float) -> None:
    """u ← u·mask/(mean(mask) + ε) with mask = 1[u·g > 0], per tensor."""
    masks = [torch.gt(ug, 0).to(ug.dtype) for ug in torch._foreach_mul(updates, grads)]
    means = [mask.mean() for mask in masks]
    torch._foreach_mul_(updates, masks)
    torch._foreach_div_(updates, torch._foreach_add(means, eps))


def mars_correction(
    grads: list[torch.Tensor], prev_grads: list[torch.Tensor], *, gamma: float, beta1: float
) -> list[torch.Tensor]:
    """Mars's corrected gradient c = g + γ·β1/(1−β1)·(g − g_prev) (§1.3), as new tensors; then g_prev ← g.

    The caller clips c by its global norm and feeds it to ``adam_`` as the gradient.
    """
    if not grads:
        return []
    corrected = torch._foreach_sub(grads, prev_grads)
    torch._foreach_mul_(corrected, gamma * beta1 / (1 - beta1))
    torch._foreach_add_(corrected, grads)
    torch._foreach_copy_(prev_grads, grads)
    return corrected
