"""Soap's preconditioner ops on batches of same-shape 2-D blocks (benchmark-spec §1.10), and their fakes.

Blocks are (B, m, n) float32; each side of a block has an eigenbasis Q and a statistic GG, (B, m, m) on the left
and (B, n, n) on the right, or None where that axis is not rotated (then Soap is plain Adam along it).
"""

import math

import torch

from fastoptim.ops._block_checks import check_axis_matrix, check_block_batch, check_block_tensor, check_shape
from fastoptim.ops._checks import check_scalar, check_symmetric_method
from fastoptim.ops._scalars import step_scalar


def soap_gram_(gg_left, gg_right, grads, keep, add, method="auto"):
    """In place, per block G: GG_left ← keep·GG_left + add·G·Gᵀ, GG_right ← keep·GG_right + add·Gᵀ·G (None: skip).

    The statistics EMA is keep = shampoo_beta, add = 1 − shampoo_beta; the initialising step uses keep = 0.
    method: "plain" (full products), "symmetric" (upper-triangular tiles only, then mirrored: a side must be a
    multiple of 32 of at least 64) or "auto" (symmetric for large sides).
    """
    torch.ops.fastoptim.soap_gram_(gg_left, gg_right, grads, keep, add, method)


def soap_eigenbasis_(q, gg, eps):
    """In place: q ← the eigenvectors of gg + eps·I per block, by descending eigenvalue."""
    torch.ops.fastoptim.soap_eigenbasis_(q, gg, eps)


def soap_rotated_adam_(grads, exp_avg, exp_avg_sq, q_left, q_right, *, step, beta1, beta2, eps):
    """One Soap step after the first; returns the bias-corrected direction (B, m, n) in the original basis.

    exp_avg ← lerp(exp_avg, G, 1−β1) (original basis); exp_avg_sq ← β2·v + (1−β2)·(Q_LᵀGQ_R)² (eigenbasis);
    u = Q_L·(Q_Lᵀ·exp_avg·Q_R/(√v + eps))·Q_Rᵀ·√(1−β2^step)/(1−β1^step). `step` counts the initialising step.
    """
    bias_correction = step_scalar(math.sqrt(1 - beta2**step) / (1 - beta1**step), grads.device)
    return torch.ops.fastoptim.soap_rotated_adam_(grads, exp_avg, exp_avg_sq, q_left, q_right, bias_correction,
                                                  beta1, beta2, eps)


def soap_refresh_(exp_avg_sq, q_left, q_right, gg_left, gg_right):
    """In place, per rotated side: Q ← QR(GG·Q) with columns sorted by diag(QᵀGG Q) descending, exp_avg_sq's
    entries along that axis permuted to match (one power step from the statistics GG)."""
    torch.ops.fastoptim.soap_refresh_(exp_avg_sq, q_left, q_right, gg_left, gg_right)


# ---- fakes ----------------------------------------------------------------------------------------------------
@torch.library.register_fake("fastoptim::soap_gram_")
def _(gg_left, gg_right, grads, keep, add, method="auto"):
    check_block_batch(grads, 2, 2)
    check_axis_matrix("gg_left", gg_left, grads, 0)
    check_axis_matrix("gg_right", gg_right, grads, 1)
    for gg in (gg_left, gg_right):
        if gg is not None:
            check_symmetric_method(method, gg.shape[-1], "soap_gram_")


@torch.library.register_fake("fastoptim::soap_eigenbasis_")
def _(q, gg, eps):
    check_block_tensor("gg", gg, gg.device)
    if gg.dim() != 3 or gg.shape[1] != gg.shape[2]:
        raise RuntimeError(f"fastoptim: gg must be a batch of square matrices (B, b, b), got shape {list(gg.shape)}")
    check_block_tensor("q", q, gg.device)
    check_shape("q", q, gg.shape)


@torch.library.register_fake("fastoptim::soap_rotated_adam_")
def _(grads, exp_avg, exp_avg_sq, q_left, q_right, bias_correction, beta1, beta2, eps):
    device = check_block_batch(grads, 2, 2)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_block_tensor(name, t, device)
        check_shape(name, t, grads.shape)
    check_axis_matrix("q_left", q_left, grads, 0)
    check_axis_matrix("q_right", q_right, grads, 1)
    check_scalar("bias_correction", bias_correction, device)
    return torch.empty_like(grads)


@torch.library.register_fake("fastoptim::soap_refresh_")
def _(exp_avg_sq, q_left, q_right, gg_left, gg_right):
    check_block_tensor("exp_avg_sq", exp_avg_sq, exp_avg_sq.device)
    if exp_avg_sq.dim() != 3:
        raise RuntimeError(f"fastoptim: exp_avg_sq must be a batch of blocks (B, m, n), got shape "
                           f"{list(exp_avg_sq.shape)}")
    for side, q, gg in (("left", q_left, gg_left), ("right", q_right, gg_right)):
        if (q is None) != (gg is None):
            raise RuntimeError(f"fastoptim: q_{side} and gg_{side} must both be given or both be None")
    check_axis_matrix("q_left", q_left, exp_avg_sq, 0)
    check_axis_matrix("gg_left", gg_left, exp_avg_sq, 0)
    check_axis_matrix("q_right", q_right, exp_avg_sq, 1)
    check_axis_matrix("gg_right", gg_right, exp_avg_sq, 1)
