"""Newton–Schulz (Muon, Scion): the iteration alone on single matrices, and Muon's matrix-branch step over the
hidden matrices of the spec's models, side by side with the plain matmul chain (written here, as in the reference
Muon), torch.optim.Muon, and heavyball's / emerging-optimizers' Muon where installed.

Work is the plain FLOP count of the iteration (bench/work.py); extra_info adds the floor that exploits symmetry
(only the upper triangles of X·Xᵀ and A·A): `symmetric_flops`, and `symmetric_floor_pct`, the share of the in-run
matmul rate the symmetric count reaches in the measured time (the issue's "% of the symmetric FLOP floor"), and the
achieved `tflops` (plain count / time). The forced methods ("plain" / "symmetric" batched products) are timed too,
under their own family, so that the size threshold of method="auto" (csrc/cpu/newton_schulz.cpp,
csrc/cuda/newton_schulz.cu) can be set from them.
"""

import pytest
import torch

from fastoptim.bench.backends import require_attr, require_op, require_optimizer, require_peer
from fastoptim.bench.tensors import make_tensors
from fastoptim.bench.work import newton_schulz_flops

NS_STEPS, NS_EPS, MOMENTUM, LR, WEIGHT_DECAY = 5, 1e-7, 0.95, 0.02, 0.1
QUINTIC = (3.4445, -4.7750, 2.0315)


def iteration_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def plain_chain(x: torch.Tensor, steps: int = NS_STEPS, eps: float = NS_EPS) -> torch.Tensor:
    """The plain implementation: one matmul per product, elementwise combinations in between (reference Muon)."""
    a, b, c = QUINTIC
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.mT if tall else x


def record_floors(benchmark, shapes_2d, steps: int) -> None:
    info = benchmark.extra_info
    symmetric = sum(newton_schulz_flops(r, c, steps, symmetric=True) for r, c in shapes_2d)
    info["symmetric_flops"] = symmetric
    info["tflops"] = info["work"] / info["time_s"] / 1e12
    info["symmetric_floor_pct"] = 100.0 * symmetric / info["reference_rate"] / info["time_s"]


# --- the iteration on one matrix ------------------------------------------------------------------------------

@pytest.mark.shape_sets("512x512", "1024x1024", "4096x4096", "4096x11008")
@pytest.mark.parametrize("backend", ["fastoptim", "plain-torch"])
def test_newton_schulz(benchmark, measure, matrix_set, bench_device, backend):
    shape = matrix_set.params[0].shape
    x = make_tensors(matrix_set, bench_device, iteration_dtype(bench_device))[0].unsqueeze(0)
    if backend == "fastoptim":
        newton_schulz = require_op("newton_schulz")

        def run():
            newton_schulz(x, NS_STEPS, NS_EPS)
    else:
        def run():
            plain_chain(x)

    measure(run, family="newton-schulz", shapes=matrix_set, backend=backend, bound="matrix",
            work=newton_schulz_flops(*shape, NS_STEPS))
    record_floors(benchmark, [shape], NS_STEPS)


# Plain batched GEMMs against the symmetric products in strips, on the sets where method="auto" must choose: single
# matrices and the batches one batched call takes (csrc/cpu/newton_schulz.cpp and csrc/cuda/newton_schulz.cu set
# its thresholds from this table).
@pytest.mark.shape_sets("512x512", "2048x2048", "4096x4096", "128x512x512", "64x512x2048", "8x4096x4096")
@pytest.mark.parametrize("method", ["plain", "symmetric"])
def test_newton_schulz_method(benchmark, measure, matrix_set, bench_device, method):
    newton_schulz = require_op("newton_schulz")
    shape = matrix_set.params[0].shape
    x = torch.stack(make_tensors(matrix_set, bench_device, iteration_dtype(bench_device)))
    measure(lambda: newton_schulz(x, NS_STEPS, NS_EPS, method=method), family=f"newton-schulz-{method}",
            shapes=matrix_set, backend="fastoptim", bound="matrix",
            work=len(x) * newton_schulz_flops(*shape, NS_STEPS))
    benchmark.extra_info["method"] = method
    record_floors(benchmark, [shape] * len(x), NS_STEPS)


# --- Muon's matrix branch over a model's hidden matrices ------------------------------------------------------

def _plain_muon(hidden):
    """Reference Muon, per matrix: Nesterov momentum, the plain chain in the iteration dtype, the update."""
    buffers = [torch.zeros_like(p) for p in hidden]
    dtype = iteration_dtype(hidden[0].device)

    def step():
        grads = [p.grad for p in hidden]
        torch._foreach_mul_(buffers, MOMENTUM)
        torch._foreach_add_(buffers, grads)
        directions = torch._foreach_add(torch._foreach_mul(buffers, MOMENTUM), grads)
        with torch.no_grad():
            for p, u in zip(hidden, directions):
                ortho = plain_chain(u.to(dtype).unsqueeze(0))[0]
                p.mul_(1 - LR * WEIGHT_DECAY).add_(ortho.to(p.dtype), alpha=-LR * max(1, p.size(0) / p.size(1)) ** 0.5)

    return step


def _fastoptim_muon(hidden, fused):
    muon = require_optimizer("muon")(hidden, lr=LR, momentum=MOMENTUM, nesterov=True, ns_steps=NS_STEPS,
                                     weight_decay=WEIGHT_DECAY, fused=fused)
    return muon.step


def _torch_muon(hidden):
    muon = require_attr(torch.optim, "Muon", "torch.optim.Muon arrived in torch 2.9")
    return muon(hidden, lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, nesterov=True, ns_steps=NS_STEPS,
                adjust_lr_fn="original").step


def _heavyball_muon(hidden):
    heavyball = require_peer("heavyball")
    heavyball.utils.compile_mode = None  # eager, like every other backend (see bench_optimizer_step.py)
    muon = require_attr(heavyball, "Muon", "this heavyball version has no Muon class")
    return muon(hidden, lr=LR, weight_decay=WEIGHT_DECAY, compile_step=False).step


def _emerging_muon(hidden):
    require_peer("emerging-optimizers")
    try:
        from emerging_optimizers.orthogonalized_optimizers import Muon
    except ImportError as err:
        pytest.skip(f"emerging-optimizers has no orthogonalized_optimizers.Muon here: {err}")
    return Muon(hidden, lr=LR, momentum_beta=MOMENTUM, use_nesterov=True, weight_decay=WEIGHT_DECAY).step


MUON_BACKENDS = {
    # fused=None: the ops wherever one exists (the matrix branch's do; fused=True would also demand the AdamW
    # branch's native op, which this hidden-matrix set never calls).
    "fastoptim": lambda hidden: _fastoptim_muon(hidden, fused=None),
    "fastoptim-torch": lambda hidden: _fastoptim_muon(hidden, fused=False),
    "plain-torch": _plain_muon,
    "torch": _torch_muon,
    "heavyball": _heavyball_muon,
    "emerging-optimizers": _emerging_muon,
}


@pytest.mark.shape_sets("130m", "1.2b")
@pytest.mark.parametrize("backend", list(MUON_BACKENDS))
def test_muon_matrix_step(benchmark, measure, model_set, bench_device, backend):
    hidden = [torch.nn.Parameter(t) for t in make_tensors(model_set, bench_device, kinds=("matrix",))]
    for p, g in zip(hidden, make_tensors(model_set, bench_device, kinds=("matrix",), offset=1)):
        p.grad = g
    step = MUON_BACKENDS[backend](hidden)
    grads = [p.grad for p in hidden]

    def restore_grads():  # untimed; some peers drop p.grad after their step
        for p, g in zip(hidden, grads):
            p.grad = g

    shapes_2d = [tuple(p.shape) for p in hidden]
    measure(step, family="muon-matrix-step", shapes=model_set, backend=backend, bound="matrix",
            work=sum(newton_schulz_flops(r, c, NS_STEPS) for r, c in shapes_2d), setup=restore_grads)
    record_floors(benchmark, shapes_2d, NS_STEPS)
