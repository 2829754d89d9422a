"""PSGD-Kron's preconditioner math on a batch of same-shape blocks (benchmark-spec §1.9).

A block batch is (n, *block), float32; per block axis the Kronecker factor is either upper triangular (n, b, b) or
diagonal (n, b) (`diagonal[axis]`; the native ops read it from the factor's shape). Factors are float32 whatever the
parameters' dtype, and are updated in place.
"""

import torch
from torch import Tensor

from fastoptim import ops
from fastoptim.optim.functional.blocks import along, unfold_gram


def _axis_view(q: Tensor, axis: int, ndim: int) -> Tensor:
    """A diagonal factor (n, b) shaped to broadcast along block axis `axis` of an (n, *block) batch."""
    shape = [q.shape[0]] + [1] * ndim
    shape[axis + 1] = q.shape[1]
    return q.reshape(shape)


def _axis_sum_of_squares(x: Tensor, axis: int) -> Tensor:
    """Σ x² over every block axis but `axis`: (n, b), the diagonal of x_(axis)·x_(axis)ᵀ."""
    return (x * x).movedim(axis + 1, 1).reshape(x.shape[0], x.shape[axis + 1], -1).sum(-1)


def norm_lower_bound(a: Tensor) -> Tensor:
    """A cheap lower bound of the spectral norm of each symmetric matrix of a (n, b, b) batch (Levanter's): the
    largest column x, then ‖(x·A/‖x·A‖)·Aᵀ‖, all scaled by max|A|. 0 for a zero matrix."""
    max_abs = a.abs().amax(dim=(-2, -1))
    nonzero = max_abs > 0
    scaled = a / torch.where(nonzero, max_abs, 1.0)[:, None, None]
    column = (scaled * scaled).sum(-2).argmax(-1)
    n, b, _ = a.shape
    x = scaled.gather(-1, column.view(n, 1, 1).expand(n, b, 1)).mT @ scaled  # (n, 1, b)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    bound = max_abs * torch.linalg.vector_norm(x @ scaled.mT, dim=(-2, -1))
    return torch.where(nonzero, bound, 0.0)


def _check_split(fused: bool | None, op: str, split: bool) -> None:
    if split and fused:
        raise ValueError(f"{op}: blocks split over ranks run in pure torch (the native op has no point for the "
                         f"collectives between its reductions and its update), so fused=True cannot take them")


def kron_balance_(qs: list[Tensor], *, fused: bool | None = None, max_over_ranks=None) -> None:
    """Rescale each block's factors to the geometric mean of their max-abs norms (the product is unchanged).
    `max_over_ranks(t)`, when given, takes the max of t over the ranks in place: the blocks are this rank's rows
    (block axis 0) of blocks split over ranks."""
    _check_split(fused, "kron_balance_", max_over_ranks is not None)
    if max_over_ranks is None and ops.use_native(fused, "kron_balance_", qs):
        torch.ops.fastoptim.kron_balance_(qs)
        return
    norms = torch.stack([q.abs().flatten(1).amax(-1) for q in qs])  # (factors, n)
    if max_over_ranks is not None:  # the row factor's norm over every rank's rows; the others are alike on all
        max_over_ranks(norms)
    target = norms.log().mean(0).exp()
    for q, norm in zip(qs, norms):
        q.mul_((target / norm).view(-1, *[1] * (q.ndim - 1)))


def kron_update_preconditioner_(grads: Tensor, qs: list[Tensor], diagonal: tuple[bool, ...], noise: Tensor,
                                damping: Tensor, *, precond_lr: float, fused: bool | None = None,
                                sum_over_ranks=None, max_over_ranks=None) -> None:
    """One preconditioner step from G (the momentum blocks) and V ~ N(0, I) (`noise`, like G).

    G ← G + damping·V (damping: one factor per block, (n,)); A = Q·G along every axis; conjB = V with each
    triangular Q_i solved against it (V·Q_i⁻¹ along axis i; V/q for a diagonal factor). Then per factor, from the
    old factors: term1 = A_(i)A_(i)ᵀ, term2 = conjB_(i)conjB_(i)ᵀ and
    Q_i ← Q_i − precond_lr/‖term1+term2‖·triu(term1−term2)·Q_i with ‖·‖ the spectral-norm lower bound
    (diagonal factors: the elementwise terms and max|term1+term2|).

    With `sum_over_ranks` and `max_over_ranks` (in-place collectives), the blocks are this rank's rows, block axis
    0 with a diagonal factor, of blocks split over ranks: the other axes' terms are sums over the rows, so they are
    summed over the ranks, and axis 0's normaliser is the max over them; every rank then takes the whole blocks'
    step, its own rows of the diagonal factor and the same other factors.
    """
    split = sum_over_ranks is not None
    _check_split(fused, "kron_update_preconditioner_", split)
    grads = grads.contiguous()
    if not split and ops.use_native(fused, "kron_update_preconditioner_", [grads]):
        torch.ops.fastoptim.kron_update_preconditioner_(grads, qs, noise.contiguous(), damping.contiguous(),
                                                        precond_lr)
        return
    ndim = grads.ndim - 1
    a = grads + damping.view(-1, *[1] * ndim) * noise
    conj = noise
    for axis, (q, diag) in enumerate(zip(qs, diagonal)):
        if diag:
            a = a * _axis_view(q, axis, ndim)
            conj = conj / _axis_view(q, axis, ndim)
        else:
            a = along(a, axis, q)
            moved = conj.movedim(axis + 1, -1)
            flat = moved.reshape(moved.shape[0], -1, moved.shape[-1])
            solved = torch.linalg.solve_triangular(q, flat, upper=True, left=False)
            conj = solved.reshape(moved.shape).movedim(-1, axis + 1)
    tiny = torch.finfo(grads.dtype).tiny
    for axis, (q, diag) in enumerate(zip(qs, diagonal)):
        terms = (torch.stack([_axis_sum_of_squares(a, axis), _axis_sum_of_squares(conj, axis)]) if diag else
                 torch.stack([unfold_gram(a, axis), unfold_gram(conj, axis)]))
        if split and axis > 0:
            sum_over_ranks(terms)
        term1, term2 = terms
        if diag:
            bound = (term1 + term2).abs().amax(-1, keepdim=True)
            if split and axis == 0:
                max_over_ranks(bound)
            q.sub_(precond_lr / (bound + tiny) * (term1 - term2) * q)
        else:
            step = precond_lr / (norm_lower_bound(term1 + term2) + tiny)
            q.sub_(step[:, None, None] * (torch.triu(term1 - term2) @ q))


def kron_precondition(grads: Tensor, qs: list[Tensor], diagonal: tuple[bool, ...], *,
                      fused: bool | None = None) -> Tensor:
    """(Q_1ᵀQ_1 ⊗ Q_2ᵀQ_2 ⊗ …)·G for each block (diagonal factors: q²·G along their axis)."""
    grads = grads.contiguous()
    if ops.use_native(fused, "kron_precondition", [grads]):
        return torch.ops.fastoptim.kron_precondition(grads, qs)
    ndim = grads.ndim - 1
    out = grads
    for axis, (q, diag) in enumerate(zip(qs, diagonal)):
        out = out * _axis_view(q * q, axis, ndim) if diag else along(out, axis, q.mT @ q)
    return out
