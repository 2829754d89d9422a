"""Soap's math on a batch of same-shape blocks (benchmark-spec §1.10).

Every tensor here is a batch: gradients and moments (n, *block); per block axis a Kronecker statistic GG and an
eigenbasis Q, each (n, b, b), or None for an axis that is not rotated. All updates are in place.

The native ops take float32 batches of 2-D blocks (B, m, n); a 1-D block is the matrix (B, m, 1) whose unit axis is
not rotated. Blocks of more than two axes (never met in the paper's models) and other dtypes run on the pure core.
"""

import math

import torch
from torch import Tensor

from fastoptim import ops
from fastoptim.optim.functional.blocks import along, unfold_gram


def _use_native(fused: bool | None, op: str, grads: Tensor) -> bool:
    unsupported = None if grads.dtype == torch.float32 and grads.ndim <= 3 else (
        f"takes float32 batches of 1-D or 2-D blocks, not {grads.dtype} blocks of shape {tuple(grads.shape[1:])}")
    return ops.use_native(fused, op, [grads], unsupported=unsupported)


def _as_matrices(x: Tensor) -> Tensor:
    return x.unsqueeze(-1) if x.ndim == 2 else x


def _sides(per_axis: list) -> tuple:
    """(left, right) of a per-block-axis list of one or two entries."""
    return per_axis[0], per_axis[1] if len(per_axis) > 1 else None


def _rotate(x: Tensor, qs: list[Tensor | None], back: bool = False) -> Tensor:
    """Qᵀ·x along every rotated axis (into the eigenbasis), or Q·x (`back`)."""
    for axis, q in enumerate(qs):
        if q is not None:
            x = along(x, axis, q, transpose=not back)
    return x


def _grams(grads: Tensor, ggs: list[Tensor | None], native: bool) -> list[Tensor | None]:
    """G_(i)G_(i)ᵀ of each block, per rotated axis i (None where `ggs` has None)."""
    if not native:
        return [None if gg is None else unfold_gram(grads, axis) for axis, gg in enumerate(ggs)]
    grams = [None if gg is None else torch.zeros_like(gg) for gg in ggs]
    torch.ops.fastoptim.soap_gram_(*_sides(grams), _as_matrices(grads), 0.0, 1.0)
    return grams


def _fold_grams_(grads: Tensor, ggs: list[Tensor | None], shampoo_beta: float, native: bool, sum_grams) -> None:
    """GG_i ← lerp(GG_i, G_(i)G_(i)ᵀ, 1−shampoo_beta); with `sum_grams` (rows of a tensor split over ranks), the
    Gram summed over every rank's rows."""
    if native and sum_grams is None:
        torch.ops.fastoptim.soap_gram_(*_sides(ggs), _as_matrices(grads), shampoo_beta, 1 - shampoo_beta)
        return
    for gg, gram in zip(ggs, _grams(grads, ggs, native)):
        if gg is not None:
            if sum_grams is not None:
                sum_grams(gram)
            gg.lerp_(gram, 1 - shampoo_beta)


def soap_init_(grads: Tensor, ggs: list[Tensor | None], qs: list[Tensor | None], *, shampoo_beta: float,
               eps: float, fused: bool | None = None, sum_grams=None) -> None:
    """The first step: GG_i ← (1−shampoo_beta)·G_(i)G_(i)ᵀ and Q_i ← eigenvectors of GG_i + eps·I, by descending
    eigenvalue. (The step's update is zero; the moments are untouched.) `sum_grams(t)`, when given, sums t over the
    ranks in place: `grads` are this rank's rows of the blocks, and every rank ends with the same GG_i and Q_i."""
    grads = grads.contiguous()
    native = _use_native(fused, "soap_eigenbasis_", grads)
    for gg, q, gram in zip(ggs, qs, _grams(grads, ggs, native)):
        if gg is None:
            continue
        if sum_grams is not None:
            sum_grams(gram)
        gg.copy_(gram.mul_(1 - shampoo_beta))
        if native:
            torch.ops.fastoptim.soap_eigenbasis_(q, gg, eps)
        else:
            eye = torch.eye(gg.shape[-1], dtype=torch.float32, device=gg.device)
            _, vectors = torch.linalg.eigh(gg.float() + eps * eye)
            q.copy_(vectors.flip(-1))


def soap_step_(grads: Tensor, exp_avgs: Tensor, exp_avg_sqs: Tensor, ggs: list[Tensor | None],
               qs: list[Tensor | None], *, step: int, beta1: float, beta2: float, shampoo_beta: float, eps: float,
               refresh: bool, fused: bool | None = None, sum_grams=None) -> Tensor:
    """One later step; returns the bias-corrected direction u (n, *block), in the original basis.

    m ← β1·m + (1−β1)·g (original basis); v ← β2·v + (1−β2)·(Qᵀg)² (eigenbasis);
    u = Q·(Qᵀm/(√v + ε))·√(1−β2^t)/(1−β1^t). Then, when `refresh`, each eigenbasis takes one power step from the
    statistics of before this step: columns sorted by diag(QᵀGG Q) descending (v permuted to match), Q ← QR(GG·Q).
    Finally GG_i ← lerp(GG_i, G_(i)G_(i)ᵀ, 1−shampoo_beta), the Gram summed over the ranks by `sum_grams` when
    given (as in soap_init_).
    """
    grads = grads.contiguous()
    if _use_native(fused, "soap_rotated_adam_", grads):
        direction = _soap_step_native(grads, exp_avgs, exp_avg_sqs, qs, ggs, step, beta1, beta2, eps, refresh)
        _fold_grams_(grads, ggs, shampoo_beta, True, sum_grams)
        return direction
    exp_avgs.lerp_(grads, 1 - beta1)
    rotated = _rotate(grads, qs)
    exp_avg_sqs.mul_(beta2).addcmul_(rotated, rotated, value=1 - beta2)
    direction = _rotate(exp_avgs, qs) / (exp_avg_sqs.sqrt() + eps)
    direction = _rotate(direction, qs, back=True)
    direction.mul_(math.sqrt(1 - beta2**step) / (1 - beta1**step))
    if refresh:
        _refresh_eigenbases_(exp_avg_sqs, ggs, qs)
    _fold_grams_(grads, ggs, shampoo_beta, False, sum_grams)
    return direction


def _soap_step_native(grads, exp_avgs, exp_avg_sqs, qs, ggs, step, beta1, beta2, eps, refresh):
    g = _as_matrices(grads)
    exp_avg_sq = _as_matrices(exp_avg_sqs)
    (q_left, q_right), (gg_left, gg_right) = _sides(qs), _sides(ggs)
    bias_correction = ops.device_scalar(math.sqrt(1 - beta2**step) / (1 - beta1**step), grads.device)
    direction = torch.ops.fastoptim.soap_rotated_adam_(g, _as_matrices(exp_avgs), exp_avg_sq, q_left, q_right,
                                                       bias_correction, beta1, beta2, eps)
    if refresh:  # from the statistics of before this step
        torch.ops.fastoptim.soap_refresh_(exp_avg_sq, q_left, q_right, gg_left, gg_right)
    return direction.view(grads.shape)


def _refresh_eigenbases_(exp_avg_sqs: Tensor, ggs: list[Tensor | None], qs: list[Tensor | None]) -> None:
    for axis, (gg, q) in enumerate(zip(ggs, qs)):
        if gg is None:
            continue
        gg_q = gg @ q
        estimated = (q * gg_q).sum(-2)  # diag(Qᵀ·GG·Q)
        order = estimated.argsort(dim=-1, descending=True)
        n, b = order.shape
        columns = order[:, None, :].expand(n, b, b)
        view = [n] + [1] * (exp_avg_sqs.ndim - 1)
        view[axis + 1] = b
        exp_avg_sqs.copy_(exp_avg_sqs.gather(axis + 1, order.reshape(view).expand_as(exp_avg_sqs)))
        # The Q factor of QR(GG·Q) with Q's columns sorted, from geqrf's reflectors (as the native op: no R formed)
        q.copy_(torch.linalg.householder_product(*torch.geqrf(gg_q.gather(-1, columns).float())))
