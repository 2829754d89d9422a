"""Adam-mini (benchmark-spec §1.6): Adam's first moment, one second moment per block of a parameter."""

import math

import torch

from fastoptim.optim.functional.common import advance, apply_update_, scaled


def adam_mini_(
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
) -> None:
    """Adam with a blockwise v. ``exp_avg_sqs[i]`` has shape (n_blocks,): params[i], flattened row-major, is cut
    into n_blocks equal contiguous blocks (rows of an out-first matrix, or groups of rows such as one head).

    m ← β1·m + (1−β1)·g;  v_b ← β2·v_b + (1−β2)·mean_{block b}(g²);  u = m̂/(√v̂_b + ε) broadcast over block b.
    """
    if not params:
        return
    grads = scaled(grads, grad_scale)
    t = advance(steps)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    block_means = [_blocks(g, v.shape[0]).square().mean(dim=1) for g, v in zip(grads, exp_avg_sqs)]
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_add_(exp_avg_sqs, block_means, alpha=1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, [math.sqrt(1 - beta2**k) for k in t])
    torch._foreach_add_(denominators, eps)
    torch._foreach_mul_(denominators, [1 - beta1**k for k in t])  # folds the bias correction of m
    updates = [
        (_blocks(m, d.shape[0]) / d.unsqueeze(1)).reshape(m.shape) for m, d in zip(exp_avgs, denominators)
    ]
    apply_update_(params, updates, lr=lr, weight_decay=weight_decay)


def _blocks(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """x as (n_blocks, block size); a 0-size tensor gives a 0-size matrix."""
    return x.reshape(n_blocks, x.numel() // max(n_blocks, 1))
