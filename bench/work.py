"""How much work a benchmark does: the bytes a memory-bound step must move, the FLOPs a matrix-bound one must do.

These numbers set the reference a benchmark is divided by (timing.py), so a count only has to be the same for the
baseline and the run it is compared with; it is written from the algorithm (what the fastest implementation must
read, write or multiply), never from what one implementation happens to do.
"""

from collections.abc import Iterable

import torch


def tensor_bytes(*tensor_lists: Iterable[torch.Tensor]) -> int:
    """Bytes of all tensors in the given lists (pass every list read, then every list written)."""
    return sum(t.numel() * t.element_size() for tensors in tensor_lists for t in tensors)


def matmul_flops(m: int, k: int, n: int) -> int:
    """(m×k)·(k×n): one multiply and one add per term."""
    return 2 * m * k * n


def newton_schulz_flops(rows: int, cols: int, steps: int, symmetric: bool = False) -> int:
    """FLOPs of `steps` quintic iterations X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ, on a rows×cols matrix.

    The iteration runs on the wide orientation (m = min side, n = max side): X·Xᵀ is m×n·n×m, A² is m×m·m×m, B·X
    is m×m·m×n. With `symmetric`, the two symmetric products count only their upper triangle (the floor of an
    implementation that exploits symmetry).
    """
    m, n = min(rows, cols), max(rows, cols)
    gram, square, apply = matmul_flops(m, n, m), matmul_flops(m, m, m), matmul_flops(m, m, n)
    if symmetric:
        gram, square = gram * (m + 1) // (2 * m), square * (m + 1) // (2 * m)
    return steps * (gram + square + apply)
