"""A Soap and a Kron step over a whole model's parameters (the spec's 130M and 520M sets on a GPU, small sets on a
CPU): fastoptim on its ops (fused=None: the native op of every family that has one) and on pure torch (fused=False), beside heavyball's SOAP and PSGD-Kron and
kron-torch's Kron where installed. Matrix-bound: the reference is a matmul of the step's matrix FLOPs; extra_info
also holds the optimizer-state memory of each backend and the configuration it ran.

The peers run with their own defaults except for the shared settings below (no step of theirs is the same function
as ours: heavyball's SOAP does not cut blocks, kron-torch samples its update schedule), so the comparison is of the
work each library does for "a Soap/Kron step", as a user meets it.
"""

import pytest
import torch

from bench.backends import require_optimizer, require_peer
from bench.tensors import param_model
from bench.work import matmul_flops

# The best configs of benchmark-spec §1.9/§1.10 (block sizes 512 for Soap, 256 for Kron); a CPU runs the small
# sets with smaller blocks so that a step (and Soap's initialising eigh) takes seconds.
SOAP = dict(lr=8e-3, betas=(0.95, 0.99), shampoo_beta=0.95, eps=1e-10, weight_decay=0.1, precondition_frequency=10)
KRON = dict(lr=1e-3, betas=(0.95, 0.0), weight_decay=0.5, normalize_grads=True, precond_lr=0.2,
            precond_update_prob_min=0.1, precond_update_flat_start=2000)
BLOCK = {"soap": {"cuda": 512, "cpu": 128}, "kron": {"cuda": 256, "cpu": 128}}
pytestmark = pytest.mark.shape_sets("130m", "520m")


def state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (nested containers included)."""
    def walk(value):
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return sum(walk(s) for s in optimizer.state.values())


def side_flops(layout, numel_block, sides) -> list[int]:
    """Per preconditioned block axis of size d: the FLOPs of one product along it, 2·d·(block numel)."""
    return [matmul_flops(d, d, numel_block // d) for d, rotated in zip(layout.block, sides) if rotated]


def soap_flops(model, block_size) -> int:
    """Per block and rotated side: G and m into the eigenbasis, the direction back, and the statistics G·Gᵀ: four
    products along that side (the periodic refresh is amortised away)."""
    from fastoptim.optim.soap import soap_layout

    total = 0
    for p in model.parameters():
        lay = soap_layout(tuple(p.shape), block_size, 2048, 10000)
        numel_block = 1
        for d in lay.block:
            numel_block *= d
        total += lay.num_blocks * 4 * sum(side_flops(lay, numel_block, [not s for s in lay.special]))
    return total


def kron_flops(model, block_size) -> int:
    """Per block and triangular side of size d, on a step that updates the preconditioner (each step early on):
    QᵀQ and its application; A = Q·G; the triangular solve (half a product); the two Gram terms; triu(·)·Q."""
    from fastoptim.optim.kron import kron_layout

    total = 0
    for p in model.parameters():
        lay = kron_layout(tuple(p.shape), block_size, 8192, 25000)
        numel_block = 1
        for d in lay.block:
            numel_block *= d
        along = side_flops(lay, numel_block, [not s for s in lay.special])
        cubes = [2 * matmul_flops(d, d, d) for d, s in zip(lay.block, lay.special) if not s]
        total += lay.num_blocks * (sum(cubes) + sum(along) * 9 // 2)
    return total


def ours(name, fused):
    def build(model, device):
        cls = require_optimizer(name)
        config = SOAP if name == "soap" else KRON
        return cls(model, block_size=BLOCK[name][device.type], fused=fused, **config)

    return build


def heavyball_soap(model, device):
    heavyball = require_peer("heavyball")
    return heavyball.SOAP(model.parameters(), lr=SOAP["lr"], betas=SOAP["betas"], shampoo_beta=SOAP["shampoo_beta"],
                          eps=SOAP["eps"], weight_decay=SOAP["weight_decay"],
                          precondition_frequency=SOAP["precondition_frequency"], max_precond_dim=10000,
                          compile_step=device.type == "cuda")


def heavyball_kron(model, device):
    heavyball = require_peer("heavyball")
    return heavyball.PSGDKron(model.parameters(), lr=KRON["lr"], betas=(KRON["betas"][0], 0.0),
                              weight_decay=KRON["weight_decay"], precond_lr=KRON["precond_lr"],
                              max_size_triangular=25000, compile_step=device.type == "cuda")


def kron_torch_kron(model, device):
    kron_torch = require_peer("kron-torch")
    return kron_torch.Kron(model.parameters(), lr=KRON["lr"], b1=KRON["betas"][0], weight_decay=KRON["weight_decay"],
                           precond_lr=KRON["precond_lr"], max_size_triangular=25000)


BACKENDS = {
    "soap": {"fastoptim": ours("soap", None), "fastoptim-torch": ours("soap", False), "heavyball": heavyball_soap},
    "kron": {"fastoptim": ours("kron", None), "fastoptim-torch": ours("kron", False), "heavyball": heavyball_kron,
             "kron-torch": kron_torch_kron},
}
FLOPS = {"soap": soap_flops, "kron": kron_flops}


@pytest.mark.parametrize("optimizer, backend", [(o, b) for o, backends in BACKENDS.items() for b in backends])
def test_step(measure, benchmark, model_set, bench_device, optimizer, backend):
    model = param_model(model_set, bench_device)
    opt = BACKENDS[optimizer][backend](model, bench_device)
    opt.step()  # Soap's first step only initialises its eigenbases; every optimizer allocates its state here
    measure(opt.step, family=f"step-{optimizer}", shapes=model_set, backend=backend, bound="matrix",
            work=FLOPS[optimizer](model, BLOCK[optimizer][bench_device.type]))
    benchmark.extra_info.update(state_bytes=state_bytes(opt), param_bytes=sum(p.numel() * p.element_size()
                                                                              for p in model.parameters()),
                                block_size=BLOCK[optimizer][bench_device.type])
