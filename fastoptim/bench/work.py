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


def _blocks(n: int, block: int) -> list[int]:
    """Sizes of the blocks a dimension of size n is cut into (full blocks, then the remainder)."""
    return [block] * (n // block) + ([n % block] if n % block else [])


def _block_sides(shape, block: int, max_dim: int):
    """(b1, b2, rotate1, rotate2) per block of a 2-D shape; a dimension above `max_dim` is not preconditioned."""
    rows, cols = shape
    return [(b1, b2, rows <= max_dim, cols <= max_dim) for b1 in _blocks(rows, block) for b2 in _blocks(cols, block)]


def soap_step_flops(shapes, block: int, frequency: int, max_dim: int) -> int:
    """Dense FLOPs of one SOAP step (benchmark-spec §1.10) per b1×b2 block and preconditioned side of size b:
    the statistics update G·Gᵀ (2·b²·b'), three rotations (g and m into the eigenbasis, u back: 2·b²·b' each),
    and the refresh every `frequency` steps (the power step GG·Q, 2·b³, and a QR, ~4/3·b³). 1-D tensors are
    elementwise and not counted. An estimate for the reference; the SOAP ops' own benchmarks count exactly."""
    total = 0
    for shape in shapes:
        if len(shape) != 2:
            continue
        for b1, b2, rot1, rot2 in _block_sides(shape, block, max_dim):
            for b, other, rotated in ((b1, b2, rot1), (b2, b1, rot2)):
                if rotated:
                    total += 4 * 2 * b * b * other + (2 * b**3 + 4 * b**3 // 3) // frequency
    return total


def kron_step_flops(shapes, block: int, max_triangular: int) -> int:
    """Dense FLOPs of one PSGD-Kron step (benchmark-spec §1.9) with the preconditioner updated (as early in
    training, p = 1) per b1×b2 block and triangular side of size b: applying (QᵀQ)·m (two products, 2·b²·b'
    each), the update's A = Q·G, the triangular solve for conjB (b²·b'), the two contractions (2·b²·b' each) and
    the factor step triu(·)·Q (b³). Diagonal sides are elementwise and not counted. An estimate for the reference."""
    total = 0
    for shape in shapes:
        if len(shape) != 2:
            continue
        for b1, b2, tri1, tri2 in _block_sides(shape, block, max_triangular):
            for b, other, triangular in ((b1, b2, tri1), (b2, b1, tri2)):
                if triangular:
                    total += (2 + 2 + 2 + 1 + 2 + 2) * b * b * other + b**3
    return total
