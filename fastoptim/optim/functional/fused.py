"""Native (fused) cores from fastoptim.ops, registered under the families of the pure cores they replace.

Imported on first use by ``functional.select``; an ImportError here (no native library built) means every family
runs pure torch. Each entry wraps an op in the pure core's signature and says which tensors the op takes.
"""

import torch

from fastoptim import ops
from fastoptim.optim.functional import register_fused

_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _op_supports(tensors) -> bool:
    """Dense, contiguous float32/bfloat16/float16 tensors of one dtype on one device, CUDA only if built."""
    if not tensors:
        return True
    first = tensors[0]
    if first.device.type == "cuda" and not ops.CUDA_KERNELS_BUILT:
        return False
    return first.device.type in ("cpu", "cuda") and all(
        t.dtype == first.dtype and t.dtype in _OP_DTYPES and t.device == first.device and t.is_contiguous()
        for t in tensors
    )


def apply_update_(params, updates, *, lr, weight_decay):
    # Updates are read once, so a strided one (a transposed Newton–Schulz output) costs one copy, not a fallback.
    ops.decoupled_update_(params, [u.contiguous() for u in updates], lr, weight_decay)


register_fused("apply_update", apply_update_, _op_supports)


# Muon's / Scion's matrix-branch step: momentum in, Newton–Schulz (bfloat16 operands on the GPU, float32 on the CPU),
# decoupled update out, as three native calls.
register_fused("orthogonalized_step", ops.orthogonalized_step_, _op_supports)
