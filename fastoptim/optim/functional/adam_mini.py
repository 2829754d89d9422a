"""Adam-mini (benchmark-spec §1.6): Adam's first moment, one second moment per block of a parameter."""

import torch

from fastoptim import ops
from fastoptim.optim.functional.common import advance, apply_update_, bias_corrections, scaled


def adam_mini_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, grad_scale=None, fused: bool | None = None) -> None:
    """Adam with a blockwise v. ``exp_avg_sqs[i]`` has shape (n_blocks,): params[i], flattened row-major, is cut
    into n_blocks equal contiguous blocks (rows of an out-first matrix, or groups of rows such as one head).

    m ← β1·m + (1−β1)·g;  v_b ← β2·v_b + (1−β2)·mean_{block b}(g²);  u = m̂/(√v̂_b + ε) broadcast over block b.
    """
    if not params:
        return
    advance(steps)
    if ops.use_native(fused, "adam_mini_", params):
        torch.ops.fastoptim.adam_mini_(params, grads, exp_avgs, exp_avg_sqs, ops.device_scalar(lr, params[0].device),
                                       steps, beta1, beta2, eps, weight_decay, grad_scale)
    else:
        _adam_mini_torch(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                         grad_scale)


def _adam_mini_torch(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, grad_scale):
    grads = scaled(grads, grad_scale)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    block_means = [_blocks(g, v.shape[0]).square().mean(dim=1) for g, v in zip(grads, exp_avg_sqs)]
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_add_(exp_avg_sqs, block_means, alpha=1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, torch._foreach_sqrt(bias_corrections(beta2, steps)))
    torch._foreach_add_(denominators, eps)
    torch._foreach_mul_(denominators, bias_corrections(beta1, steps))  # folds the bias correction of m
    updates = [(_blocks(m, d.shape[0]) / d.unsqueeze(1)).reshape(m.shape) for m, d in zip(exp_avgs, denominators)]
    apply_update_(params, updates, lr=lr, weight_decay=weight_decay, fused=False)


def _blocks(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """x as (n_blocks, block size); a 0-size tensor gives a 0-size matrix."""
    return x.reshape(n_blocks, x.numel() // max(n_blocks, 1))
