"""Momentum-buffer optimizers as fused multi-tensor updates: Lion (benchmark-spec §1.5), signum (Scion's elementwise
branch, §1.8), and the heavy-ball/EMA momentum, plain or Nesterov, that feeds Muon's and Scion's Newton–Schulz.

Math is float32; params/grads are float32, bfloat16 or float16, state is float32 or their dtype; ``lr`` is a Python
number or a 0-dim tensor; ``grad_scale`` (optional) is the clip factor from ``clip_scale``.
"""

import torch

from fastoptim.ops._checks import check_float_dtype, check_scalar, check_tensor_lists
from fastoptim.ops._scalars import step_scalar
from fastoptim.ops._step_checks import check_state_dtype, check_update_call, device_of, optional_scalar


def lion_(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay=0.0, grad_scale=None):
    """u = sign(β1·m + (1−β1)·g); m ← β2·m + (1−β2)·g; w ← w − lr·(u + λ·w)."""
    device = device_of(params=params, grads=grads, exp_avgs=exp_avgs)
    if device is None:
        return
    torch.ops.fastoptim.lion_(list(params), list(grads), list(exp_avgs), step_scalar(lr, device), beta1, beta2,
                              weight_decay, optional_scalar(grad_scale, device))


def signum_(params, grads, momentum_buffers, *, lr, beta, weight_decay=0.0, grad_scale=None):
    """buf ← β·buf + (1−β)·g; u = sign(buf); w ← w − lr·(u + λ·w)."""
    device = device_of(params=params, grads=grads, momentum_buffers=momentum_buffers)
    if device is None:
        return
    torch.ops.fastoptim.signum_(list(params), list(grads), list(momentum_buffers), step_scalar(lr, device), beta,
                                weight_decay, optional_scalar(grad_scale, device))


def momentum_(grads, momentum_buffers, directions=(), *, beta, nesterov=False, ema=False, grad_scale=None):
    """Heavy ball buf ← β·buf + g (EMA with ``ema``: buf ← β·buf + (1−β)·g); the direction u = β·buf + g (EMA:
    β·buf + (1−β)·g) with ``nesterov``, else u = buf, is written to ``directions`` when given (one tensor per grad,
    the buffers' dtype). Parameters are not touched."""
    device = device_of(grads=grads, momentum_buffers=momentum_buffers, directions=directions)
    if device is None:
        return
    torch.ops.fastoptim.momentum_(list(grads), list(momentum_buffers), list(directions), beta, nesterov, ema,
                                  optional_scalar(grad_scale, device))


@torch.library.register_fake("fastoptim::lion_")
def _(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, grad_scale):
    check_update_call(params, grads, dict(exp_avgs=exp_avgs), dict(lr=lr), grad_scale)


@torch.library.register_fake("fastoptim::signum_")
def _(params, grads, momentum_buffers, lr, beta, weight_decay, grad_scale):
    check_update_call(params, grads, dict(momentum_buffers=momentum_buffers), dict(lr=lr), grad_scale)


@torch.library.register_fake("fastoptim::momentum_")
def _(grads, momentum_buffers, directions, beta, nesterov, ema, grad_scale):
    state = dict(momentum_buffers=momentum_buffers, directions=directions) if directions else dict(
        momentum_buffers=momentum_buffers)
    device = check_tensor_lists(grads=grads, **state)
    if device is None:
        return
    check_state_dtype(check_float_dtype("grads", grads), **state)
    if grad_scale is not None:
        check_scalar("grad_scale", grad_scale, device)
