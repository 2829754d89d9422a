"""The native cores of Soap and Kron: the pure cores' signatures (functional/soap.py, functional/kron.py) over the
batched ops of fastoptim.ops, one call per op for all same-shape blocks of a batch.

Soap's ops take 2-D blocks (B, m, n); a 1-D block is the matrix (B, m, 1) whose unit axis is not rotated. Blocks
of more than two axes (never met in the paper's models) run on the pure core.
"""

import torch

import fastoptim.ops as ops
from fastoptim.optim.functional import register_fused
from fastoptim.optim.functional import soap as pure_soap


def _on_native_device(tensors) -> bool:
    return all(t.device.type == "cpu" or (t.device.type == "cuda" and ops.CUDA_KERNELS_BUILT) for t in tensors)


def _soap_supports(params) -> bool:
    """Soap keeps its state in the parameters' dtype; the ops compute in float32 on float32 state."""
    return _on_native_device(params) and all(p.dtype == torch.float32 for p in params)


def _as_matrices(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(-1) if x.ndim == 2 else x


def _sides(per_axis: list) -> tuple:
    """(left, right) of a per-block-axis list of one or two entries."""
    return per_axis[0], per_axis[1] if len(per_axis) > 1 else None


def soap_init_(grads, ggs, qs, *, shampoo_beta, eps):
    if grads.ndim > 3:
        return pure_soap.soap_init_(grads, ggs, qs, shampoo_beta=shampoo_beta, eps=eps)
    gg_left, gg_right = _sides(ggs)
    ops.soap_gram_(gg_left, gg_right, _as_matrices(grads).contiguous(), 0.0, 1 - shampoo_beta)
    for gg, q in zip(ggs, qs):
        if gg is not None:
            ops.soap_eigenbasis_(q, gg, eps)


def soap_step_(grads, exp_avgs, exp_avg_sqs, ggs, qs, *, step, beta1, beta2, shampoo_beta, eps, refresh):
    if grads.ndim > 3:
        return pure_soap.soap_step_(grads, exp_avgs, exp_avg_sqs, ggs, qs, step=step, beta1=beta1, beta2=beta2,
                                    shampoo_beta=shampoo_beta, eps=eps, refresh=refresh)
    g = _as_matrices(grads).contiguous()
    exp_avg_sq = _as_matrices(exp_avg_sqs)
    (q_left, q_right), (gg_left, gg_right) = _sides(qs), _sides(ggs)
    direction = ops.soap_rotated_adam_(g, _as_matrices(exp_avgs), exp_avg_sq, q_left, q_right, step=step,
                                       beta1=beta1, beta2=beta2, eps=eps)
    if refresh:  # from the statistics of before this step
        ops.soap_refresh_(exp_avg_sq, q_left, q_right, gg_left, gg_right)
    ops.soap_gram_(gg_left, gg_right, g, shampoo_beta, 1 - shampoo_beta)
    return direction.view(grads.shape)


def kron_precondition(grads, qs, diagonal):
    # A factor's shape says whether it is diagonal, so `diagonal` (the layout's flags) is implied.
    return ops.kron_precondition(grads.contiguous(), qs)


def kron_update_preconditioner_(grads, qs, diagonal, noise, damping, *, precond_lr):
    ops.kron_update_preconditioner_(grads.contiguous(), qs, noise.contiguous(), damping.contiguous(),
                                    precond_lr=precond_lr)


def kron_balance_(qs):
    ops.kron_balance_(qs)


register_fused("soap_init", soap_init_, _soap_supports)
register_fused("soap_step", soap_step_, _soap_supports)
# Kron's factors are float32 whatever the parameters' dtype, and its cores see float32 momentum blocks.
register_fused("kron_precondition", kron_precondition, _on_native_device)
register_fused("kron_update_preconditioner", kron_update_preconditioner_, _on_native_device)
register_fused("kron_balance", kron_balance_, _on_native_device)
