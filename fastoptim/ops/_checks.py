"""Argument checks of the fake (meta) kernels: the same rules, in the same words, as csrc/common/checks.h, so that a
bad call fails the same way under torch.compile / FakeTensor as it does eagerly."""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dense(**lists):
    """Sparse tensors never reach a kernel (the dispatcher has none for them), so wrappers refuse them by name."""
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.layout != torch.strided:
                raise RuntimeError(f"fastoptim: {name}[{i}] is sparse; only dense tensors are supported")


def check_tensor_lists(**lists):
    """Lists of equal length, dense, contiguous, on one device, i-th tensors of equal numel; returns the device."""
    (first_name, first), *_ = lists.items()
    for name, tensors in lists.items():
        if len(tensors) != len(first):
            raise RuntimeError(f"fastoptim: {name} has {len(tensors)} tensors but {first_name} has {len(first)}")
    if not first:
        return None
    check_dense(**lists)
    device = first[0].device
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.device != device:
                raise RuntimeError(f"fastoptim: {name}[{i}] is on {t.device} but {first_name}[0] is on {device}")
            if not t.is_contiguous():
                raise RuntimeError(f"fastoptim: {name}[{i}] is not contiguous; call .contiguous() first")
            if t.numel() != first[i].numel():
                raise RuntimeError(
                    f"fastoptim: {name}[{i}] has {t.numel()} elements but {first_name}[{i}] has {first[i].numel()}"
                )
    return device


def check_float_dtype(name, tensors, allowed=FLOAT_DTYPES):
    dtype = tensors[0].dtype
    if dtype not in allowed:
        raise RuntimeError(f"fastoptim: {name} has dtype {dtype}; supported are {', '.join(map(str, allowed))}")
    for i, t in enumerate(tensors):
        if t.dtype != dtype:
            raise RuntimeError(f"fastoptim: {name}[{i}] has dtype {t.dtype} but {name}[0] has {dtype}")
    return dtype


def check_scalar(name, t, device):
    if t.dim() != 0 or t.dtype != torch.float32:
        raise RuntimeError(f"fastoptim: {name} must be a 0-dim float32 tensor, got dtype {t.dtype} with {t.dim()} dims")
    if t.device != device:
        raise RuntimeError(f"fastoptim: {name} is on {t.device} but the tensors are on {device}")


SYMMETRIC_METHODS = ("auto", "plain", "symmetric")


def symmetric_tileable(m):
    """Whether an m × m symmetric result can be cut into upper-triangular tiles (csrc/common/symmetric_tiles.h)."""
    return any(m % tile == 0 and m // tile >= 2 for tile in (512, 256, 128, 64, 32))


def check_symmetric_method(method, m, op):
    """The rules of csrc/common/symmetric_tiles.h: a known method, and a tileable side for "symmetric"."""
    if method not in SYMMETRIC_METHODS:
        raise RuntimeError(f"fastoptim: {op}: method is '{method}'; expected 'auto', 'plain' or 'symmetric'")
    if method == "symmetric" and not symmetric_tileable(m):
        raise RuntimeError(f"fastoptim: {op}: method='symmetric' needs the symmetric side to be a multiple of 32 of "
                           f"at least 64, got {m}")
