"""Native counterparts of the pure-torch functional cores: the same signatures, the same function, each a handful
of fused multi-tensor launches of fastoptim.ops (one read and one write of every element). ``functional.select``
picks them for ``fused=None``/``True`` where ``supports`` accepts the tensors; ``fused=False`` keeps the pure cores.

Per-parameter step counters are the base's 0-dim CPU tensors: a core advances them as the pure one does and calls
its op once per distinct count (once in practice: parameters step together), handing the count to the kernel as a
device scalar from which it computes the bias corrections.
"""

from collections import defaultdict

import torch

from fastoptim import ops
from fastoptim.ops._checks import FLOAT_DTYPES
from fastoptim.optim.functional import register_fused
from fastoptim.optim.functional.common import advance


def supports(tensors, one_dtype: bool = True) -> bool:
    """Dense, contiguous float32/bfloat16/float16 tensors of one dtype (unless `one_dtype` is False) on one device:
    the CPU, or a GPU when the CUDA kernels are built."""
    if not tensors:
        return True
    first = tensors[0]
    if first.device.type == "cuda" and not ops.CUDA_KERNELS_BUILT:
        return False
    return first.device.type in ("cpu", "cuda") and all(
        t.layout == torch.strided and t.is_contiguous() and (t.dtype == first.dtype or not one_dtype)
        and t.dtype in FLOAT_DTYPES and t.device == first.device
        for t in tensors
    )


def by_step(steps, *lists):
    """Advance the counters; yield (t, the lists restricted to the parameters at count t). Nothing for no
    parameters (a rank or group that owns none), as the pure cores."""
    if not steps:
        return
    groups = defaultdict(list)
    for i, t in enumerate(advance(steps)):
        groups[t].append(i)
    for t, indices in groups.items():
        yield t, [[tensors[i] for i in indices] for tensors in lists]


def adam_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, grad_scale=None,
          nesterov=False, cautious=False):
    op = ops.cautious_adamw_ if cautious else ops.adamw_
    for t, lists in by_step(steps, params, grads, exp_avgs, exp_avg_sqs):
        op(*lists, lr=lr, step=t, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, nesterov=nesterov,
           grad_scale=grad_scale)


def adam_mini_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
               grad_scale=None):
    for t, lists in by_step(steps, params, grads, exp_avgs, exp_avg_sqs):
        ops.adam_mini_(*lists, lr=lr, step=t, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       grad_scale=grad_scale)


def lion_(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, grad_scale=None):
    ops.lion_(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
              grad_scale=grad_scale)


def signum_(params, grads, momentum_buffers, *, lr, beta, weight_decay, grad_scale=None):
    ops.signum_(params, grads, momentum_buffers, lr=lr, beta=beta, weight_decay=weight_decay, grad_scale=grad_scale)


def momentum_(grads, momentum_buffers, *, beta, nesterov=False, ema=False, grad_scale=None):
    directions = [torch.empty_like(b) for b in momentum_buffers] if nesterov else []
    ops.momentum_(grads, momentum_buffers, directions, beta=beta, nesterov=nesterov, ema=ema, grad_scale=grad_scale)
    return directions if nesterov else momentum_buffers


def sophia_(params, grads, exp_avgs, hessians, steps, *, lr, beta1, gamma, eps, clip_threshold, weight_decay,
            grad_scale=None):
    for t, lists in by_step(steps, params, grads, exp_avgs, hessians):
        ops.sophia_(*lists, lr=lr, step=t, beta1=beta1, gamma=gamma, eps=eps, clip_threshold=clip_threshold,
                    weight_decay=weight_decay, grad_scale=grad_scale)


def sophia_hessian_(hessians, estimates, *, beta2):
    ops.sophia_hessian_(hessians, estimates, beta2=beta2)


def apply_update_(params, updates, *, lr, weight_decay):
    # Updates are read once, so a strided one (a transposed Newton–Schulz output) costs one copy, not a fallback.
    ops.decoupled_update_(params, [u.contiguous() for u in updates], lr, weight_decay)


for _family, _core in {
    "adam": adam_,
    "adam_mini": adam_mini_,
    "lion": lion_,
    "signum": signum_,
    "momentum": momentum_,
    "sophia": sophia_,
    "sophia_hessian": sophia_hessian_,
    "apply_update": apply_update_,
    # Muon's / Scion's matrix-branch step: momentum in, Newton–Schulz (bfloat16 operands on the GPU, float32 on the
    # CPU), decoupled update out, as three native calls.
    "orthogonalized_step": ops.orthogonalized_step_,
}.items():
    register_fused(_family, _core, supports)
# One reduction over all gradients, whatever mix of float dtypes they have.
register_fused("clip_scale", ops.clip_scale, lambda tensors: supports(tensors, one_dtype=False))


# Soap's and Kron's block-batched cores live in their own module, registered the same way.
from fastoptim.optim.functional import fused_soap_kron  # noqa: E402,F401
