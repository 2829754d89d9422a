"""One full optimizer step (`opt.step()` with the gradients in place) for each of the benchmark's 11 optimizers,
built through fastoptim's registry on a model's parameter list (with the paper's routing), on the default path
(fused=None: kernels wherever they exist) and the pure-torch path (fused=False), next to the peers that compute the
same function, configured as close to the spec as their options allow. Peers run eagerly like our backends.

Elementwise optimizers are divided by a copy of the bytes their step must move (parameters, gradients and state
read once, parameters and state written once); Muon, Scion, Soap and Kron by a matmul of their step's FLOPs
(bench/work.py). Gradients stay fixed across steps; every optimizer makes one step before timing (Soap's first step
only initialises its preconditioner).
"""

import pytest
import torch

from fastoptim.bench.backends import OURS, require_attr, require_optimizer, require_peer
from fastoptim.bench.tensors import param_model
from fastoptim.bench.work import kron_step_flops, newton_schulz_flops, soap_step_flops

LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, 0.1, 1.0
MUON_NS_STEPS, SCION_NS_STEPS = 5, 10
BLOCK, SOAP_FREQUENCY = 256, 10
# Vocabulary axes are never preconditioned (spec: Kron diagonal above 25000, Soap unrotated from 10000). The CPU
# sets' vocabularies are 8192/16384, so there the cut-off is 4096 to keep that structure.
LARGE_DIM = {"cuda": {"kron": 25000, "soap": 10000}, "cpu": {"kron": 4096, "soap": 4096}}

# Passes over a parameter-sized fp32 tensor that an elementwise step cannot avoid: reads, then writes.
ELEMENTWISE_PASSES = {
    "adamw": 4 + 3,  # p, g, m, v; p, m, v
    "nadamw": 4 + 3,
    "cautious": 4 + 3,
    "mars": 5 + 4,  # + the previous gradient, read and replaced
    "lion": 3 + 2,  # p, g, m; p, m
    "mini": 3 + 2,  # the second moment is one value per block
    "sophia": 4 + 2,  # p, g, m, h; p, m (h only changes on Hessian steps)
}
OPTIMIZER_NAMES = ("adamw", "nadamw", "mars", "cautious", "lion", "mini", "muon", "scion", "kron", "soap", "sophia")


def _hparams(name: str, device: torch.device) -> dict:
    """The options every backend of `name` gets: the spec's structure, the class defaults otherwise."""
    large = LARGE_DIM[device.type]
    return {
        "muon": {"ns_steps": MUON_NS_STEPS},
        "scion": {"ns_steps": SCION_NS_STEPS},
        "soap": {"block_size": BLOCK, "precondition_frequency": SOAP_FREQUENCY, "max_precond_dim": large["soap"]},
        "kron": {"block_size": BLOCK, "max_size_triangular": large["kron"]},
    }.get(name, {})


def _work(name: str, model, device: torch.device) -> tuple[str, float]:
    shapes = [tuple(p.shape) for p in model.parameters()]
    if name in ELEMENTWISE_PASSES:
        return "memory", ELEMENTWISE_PASSES[name] * sum(p.numel() * p.element_size() for p in model.parameters())
    large = LARGE_DIM[device.type]
    if name in ("muon", "scion"):
        steps = MUON_NS_STEPS if name == "muon" else SCION_NS_STEPS
        hidden = [p.shape for n, p in model.named_parameters() if ".attn." in n or ".mlp." in n]
        return "matrix", sum(newton_schulz_flops(r, c, steps) for r, c in hidden)
    if name == "soap":
        return "matrix", soap_step_flops(shapes, BLOCK, SOAP_FREQUENCY, large["soap"])
    return "matrix", kron_step_flops(shapes, BLOCK, large["kron"])


def _decay_groups(model, only=None, **options) -> list[dict]:
    """torch-style param groups with the paper's weight-decay mask (no decay for embeddings, norms, biases), over
    the parameters in `only` (all when None)."""
    from fastoptim.optim.routing import NO_DECAY_KINDS, named_kinds

    kinds = [(n, p, kind) for n, p, kind in named_kinds(model) if only is None or any(p is q for q in only)]
    decayed = [p for _, p, kind in kinds if kind not in NO_DECAY_KINDS]
    plain = [p for _, p, kind in kinds if kind in NO_DECAY_KINDS]
    return [{"params": decayed, **options}, {"params": plain, **options, "weight_decay": 0.0}]


def _hidden_and_rest(model):
    hidden = [p for n, p in model.named_parameters() if ".attn." in n or ".mlp." in n]
    ids = {id(p) for p in hidden}
    return hidden, [p for p in model.parameters() if id(p) not in ids]


def _clipped(params, *optimizers):
    """One step of `optimizers` after global-norm clipping of `params`' gradients (the spec's clip → update)."""

    def step():
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
        for opt in optimizers:
            opt.step()

    return step


def _torch_adamw(model, **impl):
    groups = _decay_groups(model, lr=LR, betas=(0.9, 0.98), eps=1e-20, weight_decay=WEIGHT_DECAY)
    return _clipped(list(model.parameters()), torch.optim.AdamW(groups, **impl))


def _torch_muon(model):
    muon_cls = require_attr(torch.optim, "Muon", "torch.optim.Muon arrived in torch 2.9")
    hidden, rest = _hidden_and_rest(model)
    muon = muon_cls(hidden, lr=LR, weight_decay=WEIGHT_DECAY, momentum=0.95, nesterov=True, ns_steps=MUON_NS_STEPS,
                    adjust_lr_fn="original")
    adamw = torch.optim.AdamW(_decay_groups(model, rest, lr=LR * 0.2, betas=(0.9, 0.98)), foreach=True)
    return _clipped(rest, muon, adamw)


def _pytorch_optimizer_muon(model):
    po = require_peer("pytorch-optimizer")
    hidden, rest = _hidden_and_rest(model)
    opt = po.Muon([{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}], lr=LR,
                  weight_decay=WEIGHT_DECAY, momentum=0.95, nesterov=True, ns_steps=MUON_NS_STEPS,
                  adamw_lr=LR * 0.2, adamw_betas=(0.9, 0.98), adamw_wd=WEIGHT_DECAY)
    return _clipped(rest, opt)


def _heavyball(cls_name, options):
    def build(model, device):
        heavyball = require_peer("heavyball")
        # Eager, like every other backend: heavyball's default torch.compile (max-autotune) spends minutes compiling
        # per shape set, far beyond a benchmark's budget on a CPU.
        heavyball.utils.compile_mode = None
        opt = getattr(heavyball, cls_name)(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, compile_step=False,
                                            **options(device))
        return _clipped(list(model.parameters()), opt)

    return build


def _kron_torch(model, device):
    kron_torch = require_peer("kron-torch")
    if device.type == "cpu":
        pytest.skip("kron-torch: its eager step takes seconds on a CPU (its speed comes from torch.compile); "
                    "benchmarked on CUDA")
    opt = kron_torch.Kron(model.parameters(), lr=LR, b1=0.9, weight_decay=WEIGHT_DECAY,
                          preconditioner_update_probability=1.0, max_size_triangular=LARGE_DIM[device.type]["kron"])
    step = _clipped(list(model.parameters()), opt)

    def eager_step():  # kron-torch torch.compiles its helpers; eager like every other backend (see heavyball)
        with torch.compiler.set_stance("force_eager"):
            step()

    return eager_step


def _pytorch_optimizer_soap(model, device):
    po = require_peer("pytorch-optimizer")
    opt = po.SOAP(model.parameters(), lr=LR, betas=(0.95, 0.99), shampoo_beta=0.95, weight_decay=WEIGHT_DECAY,
                  precondition_frequency=SOAP_FREQUENCY, max_precondition_dim=LARGE_DIM[device.type]["soap"])
    return _clipped(list(model.parameters()), opt)


def _pytorch_optimizer_lion(model):
    po = require_peer("pytorch-optimizer")
    groups = _decay_groups(model, lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
    return _clipped(list(model.parameters()), po.Lion(groups, weight_decouple=True, foreach=True))


# optimizer -> {peer backend: build(model, device) -> step}
PEERS = {
    "adamw": {
        "torch-foreach": lambda model, device: _torch_adamw(model, foreach=True),
        "torch-fused": lambda model, device: _torch_adamw(model, fused=True),
    },
    "lion": {"pytorch-optimizer": lambda model, device: _pytorch_optimizer_lion(model)},
    "muon": {
        "torch": lambda model, device: _torch_muon(model),
        "pytorch-optimizer": lambda model, device: _pytorch_optimizer_muon(model),
    },
    "soap": {
        "heavyball": _heavyball("SOAP", lambda device: dict(
            betas=(0.95, 0.99), shampoo_beta=0.95, precondition_frequency=SOAP_FREQUENCY,
            max_precond_dim=LARGE_DIM[device.type]["soap"], use_precond_schedule=False)),
        "pytorch-optimizer": _pytorch_optimizer_soap,
    },
    "kron": {
        "heavyball": _heavyball("PSGDKron", lambda device: dict(
            betas=(0.9, 0.999), preconditioner_update_probability=1.0,
            max_size_triangular=LARGE_DIM[device.type]["kron"])),
        "kron-torch": _kron_torch,
    },
}


def _ours(name: str, backend: str, model, device):
    require_optimizer(name)
    from fastoptim.optim.registry import build_optimizer

    # "fastoptim" is what a user gets by default (fused=None: the kernels wherever an op exists for the tensors),
    # so it runs before every kernel has landed, and a kernel's speed-up or regression shows in it.
    fused = None if backend == "fastoptim" else False
    opt = build_optimizer(name, model, {"fused": fused, **_hparams(name, device)})
    opt.step()  # first step: state allocation (and Soap's initialisation)
    return opt.step


CASES = [(name, backend) for name in OPTIMIZER_NAMES for backend in (*OURS, *PEERS.get(name, {}))]


def _stepper(optimizer: str, backend: str, model, device):
    """(one step after a first one, restore the gradients: some peers (heavyball) drop p.grad after their step)."""
    grads = [(p, p.grad) for p in model.parameters()]

    def restore_grads():
        for p, g in grads:
            p.grad = g

    if backend in OURS:
        return _ours(optimizer, backend, model, device), restore_grads
    step = PEERS[optimizer][backend](model, device)
    step()
    return step, restore_grads


@pytest.mark.shape_sets("130m", "520m", "1.2b")
@pytest.mark.parametrize(("optimizer", "backend"), CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_optimizer_step(measure, model_set, bench_device, optimizer, backend):
    model = param_model(model_set, bench_device)
    step, restore_grads = _stepper(optimizer, backend, model, bench_device)
    bound, work = _work(optimizer, model, bench_device)
    measure(step, family=f"step-{optimizer}", shapes=model_set, backend=backend, bound=bound, work=work,
            setup=restore_grads)


SOAP_BACKENDS = (*OURS, *PEERS["soap"])


@pytest.mark.shape_sets("130m", "520m", "1.2b")
@pytest.mark.parametrize("backend", SOAP_BACKENDS)
def test_soap_refresh_cycle(measure, model_set, bench_device, backend):
    """SOAP_FREQUENCY Soap steps as one round, the eigenbasis refresh (a QR of every factor) among them: what a run
    pays per step, which the fastest round of test_optimizer_step leaves out. Divided by the cycle's steps' work."""
    model = param_model(model_set, bench_device)
    step, restore_grads = _stepper("soap", backend, model, bench_device)

    def cycle():
        for _ in range(SOAP_FREQUENCY):
            restore_grads()
            step()

    bound, work = _work("soap", model, bench_device)
    measure(cycle, family="cycle-soap", shapes=model_set, backend=backend, bound=bound, work=work * SOAP_FREQUENCY)
