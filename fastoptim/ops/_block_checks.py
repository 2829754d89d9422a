"""Argument checks of the Soap and Kron fakes: the rules of csrc/kernels/soap_kron_checks.h, in the same words.

Their tensors are batches of same-shape blocks: float32, dense, contiguous, on the device of `grads`.
"""

import torch


def check_block_tensor(name, t, device):
    if t.layout != torch.strided:
        raise RuntimeError(f"fastoptim: {name} is sparse; only dense tensors are supported")
    if t.device != device:
        raise RuntimeError(f"fastoptim: {name} is on {t.device} but grads is on {device}; all tensors of one call "
                           "must share a device")
    if t.dtype != torch.float32:
        raise RuntimeError(f"fastoptim: {name} has dtype {t.dtype}; it must be float32")
    if not t.is_contiguous():
        raise RuntimeError(f"fastoptim: {name} is not contiguous; call .contiguous() first")


def check_block_batch(grads, min_axes, max_axes):
    check_block_tensor("grads", grads, grads.device)
    if not 1 + min_axes <= grads.dim() <= 1 + max_axes:
        raise RuntimeError(f"fastoptim: grads must be a batch of blocks (B, *block) with {min_axes} to {max_axes} "
                           f"block axes, got shape {list(grads.shape)}")
    return grads.device


def check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"fastoptim: {name} has shape {list(t.shape)} but the blocks need {list(shape)}")


def check_axis_matrix(name, t, grads, axis):
    if t is None:
        return
    check_block_tensor(name, t, grads.device)
    b = grads.shape[axis + 1]
    check_shape(name, t, (grads.shape[0], b, b))
