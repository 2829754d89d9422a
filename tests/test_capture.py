"""Capture and determinism: every optimizer that declares itself capturable runs a whole step() without reading a
tensor's value on the host (on the CPU, where that is checked by watching the dispatcher; on the GPU, by capturing
the step in a CUDA graph and replaying it while lr changes and the step counters advance, against eager steps), and
two identical steps give bitwise identical results."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastoptim

CAPTURABLE = [name for name in fastoptim.OPTIMIZER_NAMES if fastoptim.optimizer_class(name).capturable]
SHAPES = [(16, 8), (8, 24), (33,), (4, 3, 5)]
# Muon and Scion iterate in float32 here, so that eager and replayed steps compare at float32 rounding.
OPTIONS = {"muon": dict(ns_dtype=torch.float32), "scion": dict(ns_dtype=torch.float32),
           "soap": dict(block_size=4), "kron": dict(block_size=4), "mars": dict(max_grad_norm=1.0),
           "adamw": dict(max_grad_norm=1.0)}


class NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a tensor's value back to the host (what .item(), bool() and .tolist() do)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"step() read a tensor's value on the host ({func})")
        return func(*args, **(kwargs or {}))


def make(name, device, seed, lr=1e-2):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]
    return params, fastoptim.optimizer_class(name)(params, lr=lr, **OPTIONS.get(name, {}))


def set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def first_step(name, opt, params, gen):
    set_grads(params, gen)
    if opt.needs_hvp:  # Sophia's first step refreshes h from a loss; the steps after it are plain steps
        probes = torch.Generator(device=params[0].device).manual_seed(7)
        opt.update_hessian(sum((p * p).sum() for p in params), generator=probes)
    opt.step()


@pytest.mark.parametrize("name", CAPTURABLE)
def test_a_step_reads_no_tensor_value_on_the_host(name, rng):
    params, opt = make(name, "cpu", 0)
    first_step(name, opt, params, rng)  # creates the state
    set_grads(params, rng)
    with NoHostReads():
        opt.step()


@pytest.mark.parametrize("name", fastoptim.OPTIMIZER_NAMES)
def test_two_identical_steps_are_bitwise_identical(device, name, rng):
    seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))
    runs = []
    for _ in range(2):
        params, opt = make(name, device, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        first_step(name, opt, params, gen)
        for _ in range(2):
            set_grads(params, gen)
            opt.step()
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


@pytest.mark.cuda
@pytest.mark.parametrize("name", CAPTURABLE)
def test_a_captured_step_replays_like_eager_steps_while_lr_changes(name):
    """torch.cuda.graph captures one whole step; replaying it with a new lr filled into the device lr each time and
    fresh gradients copied into the captured grad tensors gives the parameters and state of eager steps."""
    device = torch.device("cuda")
    lrs = [1e-2 * (0.8**k) for k in range(6)]
    grads = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(len(lrs) + 1):
        grads.append([torch.randn(s, generator=gen).to(device) for s in SHAPES])

    eager_params, eager = make(name, device, 0, lr=torch.tensor(lrs[0], device=device))
    graph_params, captured = make(name, device, 0, lr=torch.tensor(lrs[0], device=device))
    for params, opt in ((eager_params, eager), (graph_params, captured)):  # state exists before capture
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
        if opt.needs_hvp:
            opt.update_hessian(sum((p * p).sum() for p in params))
            for p, g in zip(params, grads[0]):
                p.grad = g.clone()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
        snapshot = copy.deepcopy(captured.state_dict()), [p.detach().clone() for p in graph_params]
        captured.step()
    torch.cuda.current_stream().wait_stream(side)
    captured.load_state_dict(snapshot[0])
    with torch.no_grad():
        for p, saved in zip(graph_params, snapshot[1]):
            p.copy_(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()

    for lr, step_grads in zip(lrs, grads[1:]):
        for group in eager.param_groups:
            group["lr"].fill_(lr)
        for group in captured.param_groups:
            group["lr"].fill_(lr)
        for p, q, g in zip(eager_params, graph_params, step_grads):
            p.grad = g.clone()
            q.grad.copy_(g)
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager_params, graph_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for key, value in eager.state[p].items():
            torch.testing.assert_close(captured.state[q][key], value, rtol=1e-6, atol=1e-7)
