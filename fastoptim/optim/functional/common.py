"""What every functional core shares: the global-norm clip, reading clipped gradients, step counts and their bias
corrections, and the decoupled-decay update that ends every step.

Conventions of the cores (each family's module holds its pure-torch core, its native core and the entry that picks
one with a visible `if`; ``fused`` is the optimizers' switch, see fastoptim.ops.use_native):
- ``lr`` is a Python float or a 0-dim tensor on the parameters' device (a step can then be graph-captured and a
  scheduler can fill it in place).
- ``weight_decay`` is already masked by the caller (0 for parameters the mask excludes); every update is
  w ← w − lr·(u + λ·w).
- ``grad_scale`` is the global-norm clip factor (a 0-dim tensor from ``clip_scale``) or None. It scales the gradient
  as the core reads it; ``p.grad`` itself is never modified.
- ``steps`` are per-parameter 0-dim float32 step counters on the parameters' device. A core that bias-corrects
  advances them first (1 on the first step), here, in one launch; the native ops only read them (one counter per
  parameter, so parameters at different counts share one call) and compute each parameter's corrections from its
  own counter in float64 on the device, never on the host.
"""

from functools import reduce

import torch

from fastoptim import ops


def clip_scale(tensors: list[torch.Tensor], max_norm: float | None, *, fused: bool | None = None):
    """min(1, max_norm/‖tensors‖₂) over the whole list as a 0-dim float32 tensor on their device (no host sync), or
    None when there is nothing to clip (max_norm None or 0, or no tensors).

    This is optax's clip_by_global_norm (the spec's clip): tensors are left alone while their global norm is below
    max_norm and scaled onto it otherwise. The native reduction takes any mix of float dtypes; the pure one computes
    in the widest dtype of the list (float64 gradients get a float64 factor).
    """
    if not max_norm or not tensors:
        return None
    if ops.use_native(fused, "clip_scale", tensors, mixed_dtypes=True):
        return torch.ops.fastoptim.clip_scale(tensors, max_norm)
    return _clip_scale_torch(tensors, max_norm)


def _clip_scale_torch(tensors: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))
    return (max_norm / total).clamp(max=1.0)


def scaled(grads: list[torch.Tensor], grad_scale: torch.Tensor | None) -> list[torch.Tensor]:
    """The gradients times the clip factor, as new tensors (p.grad stays as the caller left it)."""
    return grads if grad_scale is None else torch._foreach_mul(grads, grad_scale)


def advance(steps: list[torch.Tensor]) -> None:
    """Increment the step counters in place (one launch for the list)."""
    torch._foreach_add_(steps, 1)


def bias_corrections(beta: float, steps: list[torch.Tensor], offset: int = 0) -> list[torch.Tensor]:
    """1 − β^(t + offset) per step counter, computed in float64 on the counters' device (as the kernels compute it,
    so that 1 − β^t keeps its digits for β near 1)."""
    counts = torch.stack(steps).double() + offset
    return list((1 - torch.pow(beta, counts)).unbind())


def apply_update_(params: list[torch.Tensor], updates: list[torch.Tensor], *, lr, weight_decay: float,
                  scale: float = 1.0, fused: bool | None = None) -> None:
    """w ← w·(1 − lr·λ) − lr·scale·u for each (w, u). `updates` may be overwritten (pure path)."""
    if not params:
        return
    if ops.use_native(fused, "decoupled_update_", params):
        # Updates are read once, so a strided one (a transposed Newton–Schulz output) costs one copy, not a fallback.
        torch.ops.fastoptim.decoupled_update_(params, [u.contiguous() for u in updates],
                                              ops.device_scalar(lr, params[0].device), weight_decay, scale)
    else:
        _apply_update_torch(params, updates, lr, weight_decay, scale)


def _apply_update_torch(params, updates, lr, weight_decay, scale):
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    step = lr * scale
    if isinstance(step, torch.Tensor):
        torch._foreach_mul_(updates, step)
        torch._foreach_sub_(params, updates)
    else:
        torch._foreach_add_(params, updates, alpha=-step)
