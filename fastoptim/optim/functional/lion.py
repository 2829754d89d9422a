"""Lion (benchmark-spec §1.5): the sign of an interpolation of momentum and gradient."""

import torch

from fastoptim import ops
from fastoptim.optim.functional.common import apply_update_, scaled


def lion_(params, grads, exp_avgs, *, lr, beta1: float, beta2: float, weight_decay: float, grad_scale=None,
          fused: bool | None = None) -> None:
    """u = sign(β1·m + (1−β1)·g); then m ← β2·m + (1−β2)·g; w ← w − lr·(u + λ·w)."""
    if not params:
        return
    if ops.use_native(fused, "lion_", params):
        torch.ops.fastoptim.lion_(params, grads, exp_avgs, ops.device_scalar(lr, params[0].device), beta1, beta2,
                                  weight_decay, grad_scale)
    else:
        grads = scaled(grads, grad_scale)
        updates = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
        torch._foreach_sign_(updates)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
        apply_update_(params, updates, lr=lr, weight_decay=weight_decay, fused=False)
