"""Valid calls of every elementwise optimizer op, for the tests that run them all the same way (opcheck, FakeTensor,
torch.compile, bad input). Each case is the argument tuple of torch.ops.fastoptim.<op> on fresh random tensors."""

import torch

import fastoptim.ops  # noqa: F401  (loads the native library: torch.ops.fastoptim)

# One 2-D and one 1-D tensor: enough to exercise list handling without slowing opcheck down.
SHAPES = [(5, 4), (17,)]


def randn(shapes, dtype, device, gen):
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def rand(shapes, dtype, device, gen):
    return [torch.rand(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def scalar(value, device):
    return torch.tensor(float(value), device=device)


def step_counters(counts, device):
    """One 0-dim float32 step counter per parameter, as the bias-correcting ops take them."""
    return [scalar(t, device) for t in counts]


def build(op, device, gen, shapes=SHAPES, dtype=torch.float32, state_dtype=torch.float32):
    """Arguments of a valid call of `op`; list arguments come first, in the op's order."""
    p, g = randn(shapes, dtype, device, gen), randn(shapes, dtype, device, gen)
    m, v = randn(shapes, state_dtype, device, gen), rand(shapes, state_dtype, device, gen)
    lr, gs = scalar(0.01, device), scalar(0.5, device)
    step = step_counters(range(3, 3 + len(shapes)), device)  # parameters at different counts
    if op == "adamw_":
        return (p, g, m, v, lr, step, 0.9, 0.99, 1e-8, 0.1, True, gs)
    if op in ("cautious_adamw_", "cautious_mask_counts"):
        return (p, g, m, v, lr, step, 0.9, 0.99, 1e-8, 0.1, False, gs)
    if op == "mars_adamw_":
        prev = randn(shapes, state_dtype, device, gen)
        return (p, g, prev, m, v, lr, step, 0.95, 0.99, 1e-8, 0.1, 0.025, gs)
    if op == "adam_mini_":
        blocks = rand([(s[0],) for s in shapes], state_dtype, device, gen)
        return (p, g, m, blocks, lr, step, 0.9, 0.99, 1e-8, 0.1, gs)
    if op == "lion_":
        return (p, g, m, lr, 0.9, 0.99, 0.1, gs)
    if op == "signum_":
        return (p, g, m, lr, 0.9, 0.1, gs)
    if op == "momentum_":
        return (g, m, randn(shapes, state_dtype, device, gen), 0.9, True, False, gs)
    if op == "sophia_":
        return (p, g, m, v, lr, step, 0.96, 0.01, 1e-12, 1.0, 0.1, gs)
    if op == "sophia_hessian_":
        return (v, g, 0.99)
    if op == "clip_scale":
        return (g, 1.0)
    if op == "mars_clip_scale":
        return (g, m, 0.025, 0.95, 1.0)
    raise ValueError(op)


UPDATE_OPS = ["adamw_", "cautious_adamw_", "mars_adamw_", "adam_mini_", "lion_", "signum_", "momentum_", "sophia_",
              "sophia_hessian_"]
NORM_OPS = ["clip_scale", "mars_clip_scale"]  # → a 0-dim float32 factor
COUNT_OPS = ["cautious_mask_counts"]  # → an int64 count per tensor
ALL_OPS = UPDATE_OPS + NORM_OPS + COUNT_OPS


def tensor_lists(args):
    """(position, list) of each tensor-list argument."""
    return [(i, a) for i, a in enumerate(args) if isinstance(a, list)]
