"""Soap's math on a batch of same-shape blocks (benchmark-spec §1.10), pure torch.

Every tensor here is a batch: gradients and moments (n, *block); per block axis a Kronecker statistic GG and an
eigenbasis Q, each (n, b, b), or None for an axis that is not rotated. All updates are in place; a native op may
replace each function with the same signature.
"""

import math

import torch
from torch import Tensor

from fastoptim.optim.functional.blocks import along, unfold_gram


def _rotate(x: Tensor, qs: list[Tensor | None], back: bool = False) -> Tensor:
    """Qᵀ·x along every rotated axis (into the eigenbasis), or Q·x (`back`)."""
    for axis, q in enumerate(qs):
        if q is not None:
            x = along(x, axis, q, transpose=not back)
    return x


def soap_init_(grads: Tensor, ggs: list[Tensor | None], qs: list[Tensor | None], *, shampoo_beta: float,
               eps: float) -> None:
    """The first step: GG_i ← (1−shampoo_beta)·G_(i)G_(i)ᵀ and Q_i ← eigenvectors of GG_i + eps·I, by descending
    eigenvalue. (The step's update is zero; the moments are untouched.)"""
    for axis, (gg, q) in enumerate(zip(ggs, qs)):
        if gg is None:
            continue
        gg.copy_(unfold_gram(grads, axis) * (1 - shampoo_beta))
        eye = torch.eye(gg.shape[-1], dtype=torch.float32, device=gg.device)
        _, vectors = torch.linalg.eigh(gg.float() + eps * eye)
        q.copy_(vectors.flip(-1))


def soap_step_(grads: Tensor, exp_avgs: Tensor, exp_avg_sqs: Tensor, ggs: list[Tensor | None],
               qs: list[Tensor | None], *, step: int, beta1: float, beta2: float, shampoo_beta: float, eps: float,
               refresh: bool) -> Tensor:
    """One later step; returns the bias-corrected direction u (n, *block), in the original basis.

    m ← β1·m + (1−β1)·g (original basis); v ← β2·v + (1−β2)·(Qᵀg)² (eigenbasis);
    u = Q·(Qᵀm/(√v + ε))·√(1−β2^t)/(1−β1^t). Then, when `refresh`, each eigenbasis takes one power step from the
    statistics of before this step: columns sorted by diag(QᵀGG Q) descending (v permuted to match), Q ← QR(GG·Q).
    Finally GG_i ← lerp(GG_i, G_(i)G_(i)ᵀ, 1−shampoo_beta).
    """
    exp_avgs.lerp_(grads, 1 - beta1)
    rotated = _rotate(grads, qs)
    exp_avg_sqs.mul_(beta2).addcmul_(rotated, rotated, value=1 - beta2)
    direction = _rotate(exp_avgs, qs) / (exp_avg_sqs.sqrt() + eps)
    direction = _rotate(direction, qs, back=True)
    direction.mul_(math.sqrt(1 - beta2**step) / (1 - beta1**step))
    if refresh:
        _refresh_eigenbases_(exp_avg_sqs, ggs, qs)
    for axis, gg in enumerate(ggs):
        if gg is not None:
            gg.lerp_(unfold_gram(grads, axis), 1 - shampoo_beta)
    return direction


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
        q_new, _ = torch.linalg.qr(gg_q.gather(-1, columns).float())  # GG·Q with Q's columns sorted
        q.copy_(q_new)
