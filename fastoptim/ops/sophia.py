"""Sophia-H (benchmark-spec §1.11) as fused multi-tensor updates: the clipped, Hessian-preconditioned step and the
Hessian EMA of the refresh steps. Scalars and dtypes as in fastoptim.ops.adam."""

import torch

from fastoptim.ops._checks import check_float_dtype, check_tensor_lists
from fastoptim.ops._scalars import step_scalar
from fastoptim.ops._step_checks import check_state_dtype, check_update_call, device_of, optional_scalar


def sophia_(params, grads, exp_avgs, hessians, *, lr, step, beta1, gamma, eps, clip_threshold=1.0, weight_decay=0.0,
            grad_scale=None):
    """m ← β1·m + (1−β1)·g; u = clip(m̂ / max(γ·h, ε), −c, c) with m̂ = m/(1−β1^step); w ← w − lr·(u + λ·w)."""
    device = device_of(params=params, grads=grads, exp_avgs=exp_avgs, hessians=hessians)
    if device is None:
        return
    torch.ops.fastoptim.sophia_(
        list(params), list(grads), list(exp_avgs), list(hessians), step_scalar(lr, device), step_scalar(step, device),
        beta1, gamma, eps, clip_threshold, weight_decay, optional_scalar(grad_scale, device),
    )


def sophia_hessian_(hessians, estimates, *, beta2):
    """h ← β2·h + (1−β2)·ĥ (no bias correction); estimates have the parameters' dtype."""
    if device_of(hessians=hessians, estimates=estimates) is None:
        return
    torch.ops.fastoptim.sophia_hessian_(list(hessians), list(estimates), beta2)


@torch.library.register_fake("fastoptim::sophia_")
def _(params, grads, exp_avgs, hessians, lr, step, beta1, gamma, eps, clip_threshold, weight_decay, grad_scale):
    check_update_call(params, grads, dict(exp_avgs=exp_avgs, hessians=hessians), dict(lr=lr, step=step), grad_scale)


@torch.library.register_fake("fastoptim::sophia_hessian_")
def _(hessians, estimates, beta2):
    if check_tensor_lists(hessians=hessians, estimates=estimates) is not None:
        check_state_dtype(check_float_dtype("estimates", estimates), hessians=hessians)
