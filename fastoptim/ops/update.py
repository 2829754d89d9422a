"""The decoupled parameter update p ← p·(1 − lr·λ) − lr·scale·u, the last stage of every optimizer step."""

import torch

from fastoptim.ops._checks import check_dense, check_float_dtype, check_scalar, check_tensor_lists
from fastoptim.ops._scalars import step_scalar


def decoupled_update_(params, updates, lr, weight_decay=0.0, scale=1.0):
    """In place, for each (p, u): p ← p·(1 − lr·weight_decay) − lr·scale·u.

    params: float32, bfloat16 or float16 tensors, contiguous, on one device. updates: one per param, same number of
    elements, float32 or the params' dtype. lr: a float or a 0-dim tensor. Math is float32.
    """
    if not params and not updates:
        return
    check_dense(params=params, updates=updates)
    device = params[0].device if params else updates[0].device
    torch.ops.fastoptim.decoupled_update_(list(params), list(updates), step_scalar(lr, device), weight_decay, scale)


@torch.library.register_fake("fastoptim::decoupled_update_")
def _(params, updates, lr, weight_decay, scale):
    device = check_tensor_lists(params=params, updates=updates)
    if device is None:
        return
    check_scalar("lr", lr, device)
    param_dtype = check_float_dtype("params", params)
    update_dtype = check_float_dtype("updates", updates)
    if update_dtype not in (torch.float32, param_dtype):
        raise RuntimeError(f"fastoptim: decoupled_update_: updates have dtype {update_dtype}; expected float32 or the "
                           f"parameters' dtype {param_dtype}")
