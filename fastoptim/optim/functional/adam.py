"""The Adam moments and the direction u = m̂/(√v̂ + ε), with the variants built around them: NAdamW (Nesterov
numerator), Cautious (sign-agreement mask) and Mars (variance-reduced input gradient). Benchmark-spec §1.1–§1.4.

Each entry (`adam_`, `mars_`, `mars_clip_scale`) picks the native kernel or the pure-torch core with one visible
condition; both compute the same function on the same state.
"""

from collections.abc import Callable

import torch

from fastoptim import ops
from fastoptim.optim.functional.common import advance, apply_update_, bias_corrections, clip_scale, scaled


def adam_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1: float, beta2: float, eps: float,
          weight_decay: float, grad_scale=None, nesterov: bool = False, cautious: bool = False,
          whole_mask_means: Callable[[torch.Tensor], torch.Tensor] | None = None, fused: bool | None = None) -> None:
    """One AdamW step (benchmark-spec §1.1), NAdamW with ``nesterov`` (§1.2), Cautious with ``cautious`` (§1.4).

    m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  u = m̂/(√v̂ + ε) with m̂ = m/(1−β1^t), v̂ = v/(1−β2^t).
    NAdamW's numerator: m̂ = β1·m/(1−β1^(t+1)) + (1−β1)·g/(1−β1^t).
    Cautious: u ← u·1[u·g > 0]/(mean(1[u·g > 0]) + ε), the mean taken per tensor. Tensors that are row shards of
    larger ones (ZeRO-1, FSDP2) pass ``whole_mask_means``: it maps the mask's count per tensor here (int64) to its
    mean over the whole tensor (float32). It may be a collective, so it is called once per call, with no tensors too.
    """
    if not params:
        if cautious and whole_mask_means is not None:
            whole_mask_means(torch.zeros(0, dtype=torch.int64))
        return
    advance(steps)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale,
                 nesterov=nesterov)
    if ops.use_native(fused, "cautious_adamw_" if cautious else "adamw_", params):
        _adam_native(params, grads, exp_avgs, exp_avg_sqs, steps, cautious=cautious,
                     whole_mask_means=whole_mask_means, **hyper)
    else:
        _adam_torch(params, grads, exp_avgs, exp_avg_sqs, steps, cautious=cautious,
                    whole_mask_means=whole_mask_means, **hyper)


def _adam_native(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, grad_scale,
                 nesterov, cautious, whole_mask_means):
    args = (params, grads, exp_avgs, exp_avg_sqs, ops.device_scalar(lr, params[0].device), steps, beta1, beta2, eps,
            weight_decay, nesterov, grad_scale)
    if not cautious:
        torch.ops.fastoptim.adamw_(*args)
    elif whole_mask_means is None:
        torch.ops.fastoptim.cautious_adamw_(*args)
    else:
        torch.ops.fastoptim.cautious_adamw_(*args, whole_mask_means(torch.ops.fastoptim.cautious_mask_counts(*args)))


def _adam_torch(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, grad_scale,
                nesterov, cautious, whole_mask_means=None):
    grads = scaled(grads, grad_scale)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)

    updates = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(updates, torch._foreach_sqrt(bias_corrections(beta2, steps)))
    torch._foreach_add_(updates, eps)
    bias1 = bias_corrections(beta1, steps)
    if nesterov:
        numerators = torch._foreach_div(torch._foreach_mul(exp_avgs, beta1), bias_corrections(beta1, steps, 1))
        torch._foreach_add_(numerators, torch._foreach_div(torch._foreach_mul(grads, 1 - beta1), bias1))
    else:
        numerators = torch._foreach_div(exp_avgs, bias1)
    torch._foreach_div_(numerators, updates)
    if cautious:
        _cautious_mask_(numerators, grads, eps, whole_mask_means)
    apply_update_(params, numerators, lr=lr, weight_decay=weight_decay, fused=False)


def _cautious_mask_(updates, grads, eps: float, whole_mask_means) -> None:
    """u ← u·mask/(mean(mask) + ε) with mask = 1[u·g > 0], per tensor (or per whole tensor: see adam_)."""
    masks = [torch.gt(ug, 0).to(ug.dtype) for ug in torch._foreach_mul(updates, grads)]
    if whole_mask_means is None:
        means = [mask.mean() for mask in masks]
    else:
        means = list(whole_mask_means(torch.stack([mask.sum(dtype=torch.int64) for mask in masks])).unbind())
    torch._foreach_mul_(updates, masks)
    torch._foreach_div_(updates, torch._foreach_add(means, eps))


# ---- Mars ------------------------------------------------------------------------------------------------------
def mars_clip_scale(grads, prev_grads, *, gamma: float, beta1: float, max_norm: float | None,
                    fused: bool | None = None):
    """The global-norm clip factor of Mars's corrected gradient c = g + γ·β1/(1−β1)·(g − g_prev) (its only clip),
    or None when there is nothing to clip."""
    if not max_norm or not grads:
        return None
    if ops.use_native(fused, "mars_clip_scale", grads):
        return torch.ops.fastoptim.mars_clip_scale(grads, prev_grads, gamma, beta1, max_norm)
    return clip_scale(mars_correction(grads, prev_grads, gamma, beta1), max_norm, fused=False)


def mars_(params, grads, prev_grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1: float, beta2: float, eps: float,
          gamma: float, weight_decay: float, grad_scale=None, fused: bool | None = None) -> None:
    """Mars (benchmark-spec §1.3): AdamW on c = grad_scale·(g + γ·β1/(1−β1)·(g − g_prev)), then g_prev ← g."""
    if not params:
        return
    advance(steps)
    if ops.use_native(fused, "mars_adamw_", params):
        torch.ops.fastoptim.mars_adamw_(params, grads, prev_grads, exp_avgs, exp_avg_sqs,
                                        ops.device_scalar(lr, params[0].device), steps, beta1, beta2, eps,
                                        weight_decay, gamma, grad_scale)
    else:
        corrected = mars_correction(grads, prev_grads, gamma, beta1)
        torch._foreach_copy_(prev_grads, grads)
        _adam_torch(params, corrected, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, grad_scale=grad_scale, nesterov=False, cautious=False)


def mars_correction(grads, prev_grads, gamma: float, beta1: float) -> list[torch.Tensor]:
    """c = g + γ·β1/(1−β1)·(g − g_prev), as new tensors."""
    corrected = torch._foreach_sub(grads, prev_grads)
    torch._foreach_mul_(corrected, gamma * beta1 / (1 - beta1))
    torch._foreach_add_(corrected, grads)
    return corrected
