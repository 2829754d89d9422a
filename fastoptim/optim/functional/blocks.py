"""How Soap and Kron cut a parameter into same-shape blocks (benchmark-spec §1.9, §1.10).

Small adjacent dims are merged towards a target size, every dim larger than the block size (and not flagged as
special: Soap's unrotated or Kron's diagonal axes) is split into pieces of block_size with the last piece
zero-padded, and the pieces are stacked along a new leading dim. The preconditioner math then runs batched over
that dim, and over every parameter whose blocks have the same shape.

Unsplit dims keep their size (Levanter also pads them up to a multiple of the block size; those extra rows are
zeros that only cost memory and time).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _merge_cost(d: int, target: int) -> float:
    """Levanter's heuristic cost of a merged dim of size d: least at the target, steep far below or above it."""
    if d < target:
        cost = math.log2(target / d)
        if d < target / 8:
            cost += 100 * math.log2(target / 8 / d)
        return cost
    cost = 10 * math.log2(d / target)
    if d > 8 * target:
        cost += 1000 * math.log2(d / (8 * target))
    return cost


def merge_groups(shape: Sequence[int], target: int) -> list[list[int]]:
    """The grouping of adjacent axes of `shape` with the least total cost (target 0: no merging)."""
    n = len(shape)
    if target <= 0 or n <= 1:
        return [[i] for i in range(n)]
    best, best_cost = None, math.inf
    for cuts in range(1 << (n - 1)):  # bit k set: a group boundary after axis k
        groups, current = [], [0]
        for axis in range(1, n):
            if cuts >> (axis - 1) & 1:
                groups.append(current)
                current = []
            current.append(axis)
        groups.append(current)
        cost = sum(_merge_cost(math.prod(shape[i] for i in g), target) for g in groups)
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


@dataclass(frozen=True)
class BlockLayout:
    shape: tuple[int, ...]  # the parameter's
    merged: tuple[int, ...]  # after merging small dims
    special: tuple[bool, ...]  # per merged axis: the optimizer's flag (Soap: not rotated; Kron: diagonal factor)
    block: tuple[int, ...]  # the shape of one block
    grid: tuple[int, ...]  # blocks along each merged axis

    @classmethod
    def build(cls, shape: Sequence[int], block_size: int, merge_target: int,
              special_of: Callable[[tuple[int, ...]], list[bool]]) -> "BlockLayout":
        """`special_of(shape)` flags the parameter's own axes; a merged axis is special when all its parts are."""
        shape = tuple(shape)
        base = shape or (1,)
        flags = special_of(base)
        if all(d == 1 for d in base):
            merged, special = (1,), (True,)
        else:
            groups = merge_groups(base, merge_target)
            merged = tuple(math.prod(base[i] for i in g) for g in groups)
            special = tuple(all(flags[i] for i in g) for g in groups)
        block = tuple(block_size if block_size < d and not s else d for d, s in zip(merged, special))
        grid = tuple(-(-d // b) for d, b in zip(merged, block))
        return cls(shape, merged, special, block, grid)

    @property
    def rows_apart(self) -> bool:
        """Whether the parameter's rows stay apart in its blocks: axis 0 (of a ≥2-D parameter) is a merged axis of its
        own and special, so never cut and without a b×b factor. Then the blocks of some of its rows are the whole
        tensor's blocks cut to those rows (with_rows), and each row is preconditioned on its own."""
        return len(self.shape) >= 2 and self.merged[0] == self.shape[0] and self.special[0]

    def with_rows(self, rows: int) -> "BlockLayout":
        """This layout for `rows` of the parameter's rows (a row shard of it; needs rows_apart)."""
        if not self.rows_apart:
            raise ValueError(f"blocks of shape {self.block} of a {self.shape} tensor do not keep its rows apart")
        return BlockLayout((rows, *self.shape[1:]), (rows, *self.merged[1:]), self.special, (rows, *self.block[1:]),
                           self.grid)

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid)

    def to_blocks(self, t: Tensor) -> Tensor:
        """(num_blocks, *block) blocks of `t`, row-major over the block grid, zero-padded."""
        x = t.reshape(self.merged)
        pad = []
        for d, b, g in reversed(list(zip(self.merged, self.block, self.grid))):
            pad += [0, g * b - d]
        if any(pad):
            x = F.pad(x, pad)
        n = len(self.merged)
        x = x.reshape([s for gb in zip(self.grid, self.block) for s in gb])
        x = x.permute(list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2)))
        return x.reshape(self.num_blocks, *self.block)

    def from_blocks(self, blocks: Tensor) -> Tensor:
        """The inverse of to_blocks: a tensor of the parameter's shape."""
        n = len(self.merged)
        x = blocks.reshape(*self.grid, *self.block)
        x = x.permute([k for i in range(n) for k in (i, n + i)])
        x = x.reshape([g * b for g, b in zip(self.grid, self.block)])
        x = x[tuple(slice(0, d) for d in self.merged)]
        return x.reshape(self.shape).contiguous()  # contiguous for the native update ops


def concat(per_param: list[Tensor]) -> Tensor:
    """Stack several parameters' block stacks into one batch (no copy for a single parameter)."""
    return per_param[0] if len(per_param) == 1 else torch.cat(per_param)


def _consecutive_slices(tensors: list[Tensor]) -> bool:
    """Whether the tensors are back-to-back contiguous slices of one storage, in order."""
    storage = tensors[0].untyped_storage().data_ptr()
    end = tensors[0].data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage or t.data_ptr() != end:
            return False
        end += t.numel() * t.element_size()
    return True


def packed_state(states: list[dict], key: str) -> Tensor:
    """The batch (sum of blocks, *block) of the per-parameter state tensors states[i][key], kept between steps.

    The first call (and the first after a load_state_dict or a change of the batch's members) copies them into one
    tensor and replaces each entry by its slice of it; every later call returns a view of that tensor. So the batched
    ops update the optimizer's state in place, with no gather before a step and no scatter after it.
    """
    tensors = [s[key] for s in states]
    if len(tensors) == 1:
        return tensors[0]
    if _consecutive_slices(tensors):
        first = tensors[0]
        return first.as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]),
                                (math.prod(first.shape[1:]), *first.stride()[1:]))
    batch = torch.cat(tensors)
    for s, view in zip(states, batch.split([t.shape[0] for t in tensors])):
        s[key] = view
    return batch


def along(x: Tensor, axis: int, mats: Tensor, transpose: bool = False) -> Tensor:
    """Multiply a batch of blocks x (n, *block) along block axis `axis` by per-block matrices mats (n, b, b):
    out[.., i, ..] = Σ_j M[i, j]·x[.., j, ..] with M = mats, or M = matsᵀ when `transpose`."""
    moved = x.movedim(axis + 1, -1)
    flat = moved.reshape(x.shape[0], -1, moved.shape[-1])
    out = flat @ (mats if transpose else mats.mT)
    return out.reshape(moved.shape).movedim(-1, axis + 1)


def unfold_gram(x: Tensor, axis: int) -> Tensor:
    """G_(axis)·G_(axis)ᵀ for each block: (n, b, b), b the size of block axis `axis`."""
    rows = x.movedim(axis + 1, 1).reshape(x.shape[0], x.shape[axis + 1], -1)
    return rows @ rows.mT
