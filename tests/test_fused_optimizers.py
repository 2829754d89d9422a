"""The fused path (fastoptim's kernels, fused=None) and the pure-torch path (fused=False) of every optimizer built
on the elementwise ops compute the same function: several steps on the same parameters and gradients agree,
tightly in float32 and within bfloat16 rounding for bfloat16 parameters."""

import pytest
import torch

from fastoptim.optim.functional.adam import adam_
from fastoptim.optim.functional.adam_mini import adam_mini_
from fastoptim.optim.functional.sophia import sophia_
from fastoptim.optim.registry import optimizer_class

# Muon and Scion: their momentum, their AdamW/signum branch and their update run on the elementwise ops.
ELEMENTWISE = ["adamw", "nadamw", "cautious", "mars", "lion", "mini", "sophia", "muon", "scion"]
# Shapes of a small model: matrices (the blocked branch of Adam-mini), a 3-D weight, vectors, one odd length.
SHAPES = [(16, 8), (8,), (3, 5, 7), (33,)]
STEPS = 4


def assert_paths_close(fused, pure, dtype):
    """float32: the paths agree to float32 rounding. bfloat16: the fused path rounds each element once per step and
    the pure path after each torch op, so per step they may differ by a bf16 spacing of the result (≤ 2^-7 of it)
    and half a spacing of an intermediate (≤ 2^-8 of the tensor's largest element, e.g. β·buf before g is added);
    these differences add up over the steps."""
    fused, pure = fused.float(), pure.float()
    if dtype == torch.float32:
        torch.testing.assert_close(fused, pure, rtol=1e-5, atol=1e-6)
    else:
        largest = pure.abs().max().item() if pure.numel() else 0.0
        torch.testing.assert_close(fused, pure, rtol=STEPS * 2**-7, atol=STEPS * 2**-8 * largest + 1e-6)


def make_params(dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in SHAPES]


# Gradients keep one sign per element over the steps, with magnitudes in [0.5, 1.5], so that no moment nearly cancels:
# the paths differ by an ulp of the terms summed, and a momentum that sums to almost zero turns that into a large
# relative error, which Sophia then divides by γ·h (with N(0, 1) gradients, 0.5% of seeds missed the float32
# tolerance: CI's seed 860185125 by 2.6e-6 in a parameter). Sophia's loss weights are small enough (2·w·p < 0.5)
# that its Hessian steps' gradients 2·w·p + g keep g's sign, and its γ makes γ·h the size of the momentum, so that
# the division is exercised and not only the clip. Muon and Scion run Newton–Schulz in float32 on both paths, so
# that these differ by the parameters' rounding only.
EXTRA_OPTIONS = {"muon": dict(ns_dtype=torch.float32), "scion": dict(ns_dtype=torch.float32),
                 "sophia": dict(gamma=100.0)}
SOPHIA_WEIGHT = 0.04


def run(name, fused, dtype, device, seed):
    params = make_params(dtype, device, seed)
    opt = optimizer_class(name)(params, lr=1e-2, fused=fused, **EXTRA_OPTIONS.get(name, {}))
    gen = torch.Generator().manual_seed(seed + 1)
    signs = [torch.randint(0, 2, p.shape, generator=gen) * 2 - 1 for p in params]
    for _ in range(STEPS):
        grads = [(s * (0.5 + torch.rand(p.shape, generator=gen))).to(device, dtype) for s, p in zip(signs, params)]
        if name == "sophia" and opt.hessian_due:
            weights = [(SOPHIA_WEIGHT * torch.rand(p.shape, generator=gen)).to(device, dtype) for p in params]
            loss = sum((w * p.float() ** 2).sum() + (g * p).sum() for w, g, p in zip(weights, grads, params))
            opt.update_hessian(loss, generator=torch.Generator(device=device).manual_seed(seed + 2))
        else:
            for p, g in zip(params, grads):
                p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_fused_and_pure_paths_agree(device, rng, name, dtype):
    seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))
    fused_params, fused_opt = run(name, None, dtype, device, seed)
    pure_params, pure_opt = run(name, False, dtype, device, seed)
    for f, p in zip(fused_params, pure_params):
        assert_paths_close(f.detach(), p.detach(), dtype)
    for f, p in zip(fused_params, pure_params):
        for key, value in fused_opt.state[f].items():
            assert_paths_close(value, pure_opt.state[p][key], dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("name", [n for n in ELEMENTWISE if n != "sophia"])
def test_fused_steps_never_wait_for_the_gpu(name):
    """A step queues its kernels and returns: no host synchronisation once the state exists (step scalars are
    filled on the device, clip scales stay device tensors)."""
    params = make_params(torch.float32, torch.device("cuda"), 0)
    opt = optimizer_class(name)(params, lr=torch.tensor(1e-2), fused=None)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("core", [adam_, adam_mini_, sophia_])
@pytest.mark.parametrize("fused", [None, True, False])
def test_empty_lists_are_a_no_op(core, fused):
    # A param group (or a distributed rank) that holds no parameters with gradients calls the core with empty lists.
    hp = dict(lr=0.1, beta1=0.9, eps=1e-8, weight_decay=0.0, fused=fused)
    if core is sophia_:
        hp.update(gamma=0.01, clip_threshold=1.0)
    else:
        hp.update(beta2=0.99)
    core([], [], [], [], [], **hp)
