"""A Soap and a Kron step over a whole model's parameters, and their preconditioner math alone (the spec's 130M and 520M sets on a GPU, small sets on a
CPU): fastoptim on its ops (fused=None: the native op of every family that has one) and on pure torch (fused=False), beside heavyball's SOAP and PSGD-Kron and
kron-torch's Kron where installed. Matrix-bound: the reference is a matmul of the step's matrix FLOPs; extra_info
also holds the optimizer-state memory of each backend and the configuration it ran.

The preconditioner benchmarks time the per-step math on every same-shape block batch of the model (state made
by one optimizer step): the native ops against the pure-torch cores they replace, with FLOPs counted for exactly
what both compute.

The peers run with their own defaults except for the shared settings below (no step of theirs is the same function
as ours: heavyball's SOAP does not cut blocks, kron-torch samples its update schedule), so the comparison is of the
work each library does for "a Soap/Kron step", as a user meets it.
"""

import math

import pytest
import torch

from fastoptim.bench.backends import require_op, require_optimizer, require_peer
from fastoptim.bench.tensors import param_model
from fastoptim.bench.work import matmul_flops

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


def kron_block_flops(block, diagonal) -> int:
    """One Kron block's FLOPs on a step that updates the preconditioner (each step early on). A 1-D block with a
    triangular factor takes the O(b²) kernels: Q·x, the forward substitution, the suffix-sum sweep of Q (two running
    sums and the update) and Qᵀ·(Q·g), 8·b² in all. Otherwise, per triangular side of size d: A = Q·G, the
    triangular solve (half a product), the two Gram terms and triu(·)·Q, then the direction by (QᵀQ)·G, or by
    Qᵀ·(Q·G) where the rest of the block is smaller than d."""
    if len(block) == 1 and not diagonal[0]:
        return 8 * block[0] ** 2
    numel = math.prod(block)
    total = 0
    for d, diag in zip(block, diagonal):
        if diag:
            continue
        along, cube = matmul_flops(d, d, numel // d), matmul_flops(d, d, d)
        total += along * 7 // 2 + cube + (2 * along if numel // d < d else cube + along)
    return total


def kron_flops(model, block_size) -> int:
    from fastoptim.optim.kron import kron_layout

    layouts = [kron_layout(tuple(p.shape), block_size, 8192, 25000) for p in model.parameters()]
    return sum(lay.num_blocks * kron_block_flops(lay.block, lay.special) for lay in layouts)


def ours(name, fused):
    def build(model, device):
        cls = require_optimizer(name)
        config = SOAP if name == "soap" else KRON
        return cls(model, block_size=BLOCK[name][device.type], fused=fused, **config)

    return build


def _heavyball(device):
    heavyball = require_peer("heavyball")
    if device.type != "cuda":  # its default torch.compile takes minutes per shape set on a CPU
        heavyball.utils.compile_mode = None
    return heavyball


def heavyball_soap(model, device):
    heavyball = _heavyball(device)
    return heavyball.SOAP(model.parameters(), lr=SOAP["lr"], betas=SOAP["betas"], shampoo_beta=SOAP["shampoo_beta"],
                          eps=SOAP["eps"], weight_decay=SOAP["weight_decay"],
                          precondition_frequency=SOAP["precondition_frequency"], max_precond_dim=10000,
                          compile_step=device.type == "cuda")


def heavyball_kron(model, device):
    heavyball = _heavyball(device)
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
    grads = [(p, p.grad) for p in model.parameters()]

    def restore_grads():  # untimed; heavyball drops p.grad after its step
        for p, g in grads:
            p.grad = g

    opt = BACKENDS[optimizer][backend](model, bench_device)
    opt.step()  # Soap's first step only initialises its eigenbases; every optimizer allocates its state here
    measure(opt.step, family=f"{optimizer}-step-and-state", shapes=model_set, backend=backend, bound="matrix",
            work=FLOPS[optimizer](model, BLOCK[optimizer][bench_device.type]), setup=restore_grads)
    benchmark.extra_info.update(state_bytes=state_bytes(opt), param_bytes=sum(p.numel() * p.element_size()
                                                                              for p in model.parameters()),
                                block_size=BLOCK[optimizer][bench_device.type])


# ---- the preconditioner math alone, on every block batch of a model -------------------------------------------------
def block_batches(optimizer, model_set, device):
    """(core arguments per same-shape block batch, preconditioner-state bytes): the state of one optimizer step
    (fused=False) over the model, batched as the optimizer batches it."""
    from fastoptim.optim.functional.blocks import concat

    model = param_model(model_set, device)
    opt = ours(optimizer, False)(model, device)
    opt.step()
    opt.step()
    batches = {}
    for group in opt.param_groups:
        for p in group["params"]:
            layout = opt.layout(group, p)
            batches.setdefault((layout.block, layout.special), []).append((layout, p, opt.state[p]))
    out = []
    for (block, special), members in batches.items():
        grads = concat([lay.to_blocks(p.grad).float() for lay, p, _ in members])
        # block-shaped state: Soap's moments, statistics and eigenbases; Kron's factors (its momentum is not blocked)
        keys = sorted(k for k in members[0][2] if k.startswith(("Q", "GG")) or (optimizer == "soap" and k != "step"))
        state = {k: concat([s[k] for _, _, s in members]) for k in keys}
        out.append((block, special, grads, state))
    return out, state_bytes(opt)


def symmetric_tileable(m):
    """Whether an m × m symmetric result can be cut into upper-triangular tiles (csrc/common/symmetric_tiles.h)."""
    return any(m % tile == 0 and m // tile >= 2 for tile in (512, 256, 128, 64, 32))


def soap_core(native):
    from fastoptim.optim.functional.soap import soap_step_

    if native:
        require_op("soap_rotated_adam_")

    def run(batches):
        for block, _, grads, state in batches:
            ggs = [state.get(f"GG{a}") for a in range(len(block))]
            qs = [state.get(f"Q{a}") for a in range(len(block))]
            soap_step_(grads, state["exp_avg"], state["exp_avg_sq"], ggs, qs, step=5, beta1=0.95, beta2=0.99,
                       shampoo_beta=0.95, eps=1e-10, refresh=False, fused=native)

    return run


def kron_core(native):
    from fastoptim.optim.functional.kron import kron_precondition, kron_update_preconditioner_

    if native:
        require_op("kron_precondition")

    def run(batches):
        for block, diagonal, grads, state in batches:
            qs = [state[f"Q{a}"] for a in range(len(block))]
            noise = torch.randn_like(grads)
            damping = torch.full((grads.shape[0],), 1e-6, device=grads.device)
            kron_update_preconditioner_(grads, qs, diagonal, noise, damping, precond_lr=0.2, fused=native)
            kron_precondition(grads, qs, diagonal, fused=native)

    return run


def core_flops(optimizer, batches) -> int:
    """Soap: per block and rotated side of size b (the other axes holding numel/b), four products along it (g and m
    in, the direction back, the statistics), 2·b·numel each. Kron: kron_block_flops per block."""
    total = 0
    for block, special, grads, _ in batches:
        if optimizer == "kron":
            total += grads.shape[0] * kron_block_flops(block, special)
            continue
        numel = grads[0].numel()
        total += grads.shape[0] * sum(4 * matmul_flops(b, b, numel // b) for b, flag in zip(block, special) if not flag)
    return total


CORES = {"soap": soap_core, "kron": kron_core}


@pytest.mark.parametrize("optimizer", CORES)
@pytest.mark.parametrize("backend", ["fastoptim", "fastoptim-torch"])
def test_preconditioner(measure, benchmark, model_set, bench_device, optimizer, backend):
    require_optimizer(optimizer)
    batches, bytes_of_state = block_batches(optimizer, model_set, bench_device)
    run = CORES[optimizer](backend == "fastoptim")
    measure(lambda: run(batches), family=f"{optimizer}-preconditioner", shapes=model_set, backend=backend,
            bound="matrix", work=core_flops(optimizer, batches))
    benchmark.extra_info.update(state_bytes=bytes_of_state, block_size=BLOCK[optimizer][bench_device.type],
                                batches=[[list(b), g.shape[0]] for b, _, g, _ in batches])


@pytest.mark.parametrize("method", ["plain", "symmetric"])
def test_soap_gram_method(measure, benchmark, model_set, bench_device, method):
    """Soap's statistics update alone over the model's block batches, by full products or on upper-triangular tiles
    (sides that cannot be tiled run plain under both), so that the threshold of method="auto" (csrc/cpu/soap.cpp,
    csrc/cuda/soap.cu) can be set from it. Work is the full-product count."""
    soap_gram_ = require_op("soap_gram_")

    batches, _ = block_batches("soap", model_set, bench_device)
    calls, work = [], 0
    for block, _, grads, state in batches:
        if len(block) != 2:
            continue
        for axis in range(2):
            gg = state.get(f"GG{axis}")
            if gg is not None:
                how = method if symmetric_tileable(gg.shape[-1]) else "plain"
                calls.append(((gg, None) if axis == 0 else (None, gg), grads, how))
                work += grads.shape[0] * matmul_flops(gg.shape[-1], grads[0].numel() // gg.shape[-1], gg.shape[-1])

    def run():
        for (left, right), grads, how in calls:
            soap_gram_(left, right, grads, 0.95, 0.05, how)

    measure(run, family=f"soap-gram-{method}", shapes=model_set, backend="fastoptim", bound="matrix", work=work)
    benchmark.extra_info["method"] = method
