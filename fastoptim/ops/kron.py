"""PSGD-Kron's preconditioner ops on batches of same-shape blocks (benchmark-spec §1.9), and their fakes.

Blocks are (B, *block) float32; per block axis one factor, upper triangular (B, b, b) or diagonal (B, b).
"""

import torch

from fastoptim.ops._block_checks import check_block_batch, check_block_tensor, check_shape


def kron_precondition(grads, factors):
    """(Q_1ᵀQ_1 ⊗ Q_2ᵀQ_2 ⊗ …)·G per block, as a new tensor; a diagonal factor q scales its axis by q²."""
    return torch.ops.fastoptim.kron_precondition(grads, list(factors))


def kron_update_preconditioner_(grads, factors, noise, damping, *, precond_lr):
    """One preconditioner step of every factor (in place), fitted on G + damping·noise (damping: (B,)).

    A = Q·(G + damping·V), conjB = V·Q⁻¹ along every axis; per factor, from the old factors,
    Q ← Q − precond_lr/‖term1 + term2‖·triu(term1 − term2)·Q with term1 = A_(i)A_(i)ᵀ, term2 = conjB_(i)conjB_(i)ᵀ
    and ‖·‖ the spectral-norm lower bound (diagonal factors: the diagonals and max|·|).
    """
    torch.ops.fastoptim.kron_update_preconditioner_(grads, list(factors), noise, damping, precond_lr)


def kron_balance_(factors):
    """In place: each block's factors rescaled to the geometric mean of their max-abs norms."""
    torch.ops.fastoptim.kron_balance_(list(factors))


def check_factors(grads, factors):
    axes = grads.dim() - 1
    if len(factors) != axes:
        raise RuntimeError(f"fastoptim: factors has {len(factors)} tensors but grads {list(grads.shape)} has {axes} "
                           "block axes; one factor per axis")
    for axis, q in enumerate(factors):
        name = f"factors[{axis}]"
        check_block_tensor(name, q, grads.device)
        batch, b = grads.shape[0], grads.shape[axis + 1]
        if q.dim() == 2:
            check_shape(name, q, (batch, b))
        elif q.dim() == 3:
            check_shape(name, q, (batch, b, b))
        else:
            raise RuntimeError(f"fastoptim: {name} must be (B, b) (diagonal) or (B, b, b) (triangular), got shape "
                               f"{list(q.shape)}")


@torch.library.register_fake("fastoptim::kron_precondition")
def _(grads, factors):
    check_block_batch(grads, 1, 8)
    check_factors(grads, factors)
    return torch.empty_like(grads)


@torch.library.register_fake("fastoptim::kron_update_preconditioner_")
def _(grads, factors, noise, damping, precond_lr):
    device = check_block_batch(grads, 1, 8)
    check_factors(grads, factors)
    check_block_tensor("noise", noise, device)
    check_shape("noise", noise, grads.shape)
    check_block_tensor("damping", damping, device)
    check_shape("damping", damping, (grads.shape[0],))


@torch.library.register_fake("fastoptim::kron_balance_")
def _(factors):
    if not factors:
        raise RuntimeError("fastoptim: factors is empty; kron_balance_ needs at least one factor")
    device, batch = factors[0].device, factors[0].shape[0]
    for i, q in enumerate(factors):
        check_block_tensor(f"factors[{i}]", q, device)
        if q.dim() not in (2, 3) or q.shape[0] != batch:
            raise RuntimeError(f"fastoptim: factors[{i}] has shape {list(q.shape)}; expected ({batch}, b) or "
                               f"({batch}, b, b)")
