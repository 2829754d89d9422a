"""Global-norm clipping as the fused ops take it: the factor min(1, max_norm/‖tensors‖₂) (optax's
clip_by_global_norm, the spec's clip) computed into a 0-dim float32 device tensor by one multi-tensor reduction and
a one-block finish, never read back to the host. The update ops multiply each gradient by it as they read it."""

import math

import torch

from fastoptim.ops._checks import FLOAT_DTYPES, check_dense, check_float_dtype, check_tensor_lists
from fastoptim.ops._step_checks import check_state_dtype


def clip_scale(tensors, max_norm):
    """The clip factor over all ``tensors`` (float32, bfloat16 and float16 may mix), or None when there is nothing
    to clip (``max_norm`` 0 or no tensors)."""
    if max_norm == 0 or not tensors:
        return None
    check_dense(tensors=tensors)
    return torch.ops.fastoptim.clip_scale(list(tensors), max_norm)


def mars_clip_scale(grads, prev_grads, *, gamma, beta1, max_norm):
    """The clip factor of Mars's corrected gradient c = g + γ·β1/(1−β1)·(g − g_prev), or None (as clip_scale)."""
    if max_norm == 0 or not grads:
        return None
    check_dense(grads=grads, prev_grads=prev_grads)
    return torch.ops.fastoptim.mars_clip_scale(list(grads), list(prev_grads), gamma, beta1, max_norm)


def _check_max_norm(op, max_norm):
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise RuntimeError(f"fastoptim: {op}: max_norm must be finite and > 0, got {max_norm}")


@torch.library.register_fake("fastoptim::clip_scale")
def _(tensors, max_norm):
    _check_max_norm("clip_scale", max_norm)
    device = check_tensor_lists(tensors=tensors)
    if device is None:
        raise RuntimeError("fastoptim: clip_scale: tensors is empty; there is no device to put the factor on")
    for i, t in enumerate(tensors):
        if t.dtype not in FLOAT_DTYPES:
            raise RuntimeError(f"fastoptim: tensors[{i}] has dtype {t.dtype}; supported are float32, bfloat16 and "
                               "float16")
    return torch.empty((), dtype=torch.float32, device=device)


@torch.library.register_fake("fastoptim::mars_clip_scale")
def _(grads, prev_grads, gamma, beta1, max_norm):
    _check_max_norm("mars_clip_scale", max_norm)
    device = check_tensor_lists(grads=grads, prev_grads=prev_grads)
    if device is None:
        raise RuntimeError("fastoptim: mars_clip_scale: grads is empty; there is no device to put the factor on")
    check_state_dtype(check_float_dtype("grads", grads), prev_grads=prev_grads)
    return torch.empty((), dtype=torch.float32, device=device)
