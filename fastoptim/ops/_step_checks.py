"""Checks and argument helpers shared by the elementwise optimizer ops' wrappers and fakes; the fakes raise what
csrc/kernels/step_math.h raises, in the same words."""

import torch

from fastoptim.ops._checks import FLOAT_DTYPES, check_dense, check_float_dtype, check_scalar, check_tensor_lists
from fastoptim.ops._scalars import step_scalar


def device_of(**lists):
    """The device of the first tensor of the first non-empty list, or None when all are empty. Refuses sparse
    tensors by name first: the dispatcher has no kernel for them, so they would never reach the op's checks."""
    check_dense(**lists)
    return next((tensors[0].device for tensors in lists.values() if tensors), None)


def optional_scalar(value, device):
    """None stays None (no clip); a float or a tensor becomes a 0-dim float32 tensor on `device`."""
    return None if value is None else step_scalar(value, device)


def check_state_dtype(param_dtype, **lists):
    """Every non-empty state list has one dtype, float32 or the params' dtype; returns it (float32 if none)."""
    state_dtype = None
    for name, tensors in lists.items():
        if not tensors:
            continue
        dtype = check_float_dtype(name, tensors)
        if dtype not in (torch.float32, param_dtype):
            raise RuntimeError(
                f"fastoptim: {name} has dtype {dtype}; optimizer state must be float32 or the params' dtype {param_dtype}"
            )
        if state_dtype is not None and dtype != state_dtype:
            raise RuntimeError(
                f"fastoptim: {name} has dtype {dtype} but the other state lists have {state_dtype}; one call takes one "
                "state dtype"
            )
        state_dtype = dtype
    return state_dtype or torch.float32


def check_grads_like_params(grads, param_dtype):
    for i, g in enumerate(grads):
        if g.dtype != param_dtype:
            raise RuntimeError(f"fastoptim: grads[{i}] has dtype {g.dtype} but params have {param_dtype}")


def check_update_call(params, grads, state: dict, scalars: dict, grad_scale):
    """The checks of an op over (params, grads, state lists) with step scalars; returns the device or None."""
    device = check_tensor_lists(params=params, grads=grads, **state)
    if device is None:
        return None
    for name, value in scalars.items():
        check_scalar(name, value, device)
    param_dtype = check_float_dtype("params", params)
    check_grads_like_params(grads, param_dtype)
    check_state_dtype(param_dtype, **state)
    if grad_scale is not None:
        check_scalar("grad_scale", grad_scale, device)
    return device


__all__ = ["FLOAT_DTYPES", "check_grads_like_params", "check_state_dtype", "check_update_call", "device_of",
           "optional_scalar"]
