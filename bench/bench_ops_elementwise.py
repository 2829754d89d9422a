"""The elementwise optimizer ops (issue 4): one step over a model's whole parameter list per family, side by side
with torch.optim.AdamW (foreach and fused) and with our pure-torch cores, each against a device-to-device copy of
the same bytes measured in the same run (extra_info: ratio, floor_pct, achieved_rate).

The bytes are what the fastest step must move: every parameter, gradient and state element read once, every
parameter and state element written once (float32, except for AdamW's low-precision cases).
"""

import pytest
import torch

from fastoptim.bench.backends import require_op, require_peer
from fastoptim.bench.tensors import make_tensors
from fastoptim.bench.work import tensor_bytes

HP = dict(lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)


def lists(shapes, device, n, offset=0):
    """n parameter-shaped float32 lists; the second-moment-like ones (odd positions) kept positive."""
    made = [make_tensors(shapes, device, offset=offset + i) for i in range(n)]
    for tensors in made[3::2]:
        for t in tensors:
            t.abs_()
    return made


def family_step(family, shapes, device, fused):
    """(step function, bytes read and written) for one family over `shapes`, on our kernels (fused=True) or our
    torch path (fused=False): the functional entries the optimizers call."""
    from fastoptim.optim.functional.adam import adam_, mars_, mars_clip_scale
    from fastoptim.optim.functional.adam_mini import adam_mini_
    from fastoptim.optim.functional.common import clip_scale
    from fastoptim.optim.functional.lion import lion_
    from fastoptim.optim.functional.momentum import momentum_, signum_
    from fastoptim.optim.functional.sophia import sophia_

    p, g, m, v = lists(shapes, device, 4)
    steps = [torch.zeros((), device=device) for _ in p]
    if family in ("adamw", "nadamw", "cautious"):
        flags = dict(nesterov=family == "nadamw", cautious=family == "cautious")
        return (lambda: adam_(p, g, m, v, steps, **HP, **flags, fused=fused)), tensor_bytes(p, g, m, v, p, m, v)
    if family == "mars":
        prev = make_tensors(shapes, device, offset=10)

        def step():
            scale = mars_clip_scale(g, prev, gamma=0.025, beta1=HP["beta1"], max_norm=1.0, fused=fused)
            mars_(p, g, prev, m, v, steps, **HP, gamma=0.025, grad_scale=scale, fused=fused)
        return step, tensor_bytes(p, g, prev, m, v, p, prev, m, v)
    if family == "adam_mini":
        blocks = [torch.rand(t.shape[0], device=device) for t in v]
        return (lambda: adam_mini_(p, g, m, blocks, steps, **HP, fused=fused)), tensor_bytes(
            p, g, m, blocks, p, m, blocks)
    if family == "lion":
        return (lambda: lion_(p, g, m, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, fused=fused)), tensor_bytes(
            p, g, m, p, m)
    if family == "signum":
        return (lambda: signum_(p, g, m, lr=1e-3, beta=0.95, weight_decay=0.1, fused=fused)), tensor_bytes(
            p, g, m, p, m)
    if family == "momentum":
        return (lambda: momentum_(g, m, beta=0.95, nesterov=True, fused=fused)), tensor_bytes(g, m, m, p)
    if family == "sophia":
        return (lambda: sophia_(p, g, m, v, steps, lr=1e-3, beta1=0.96, gamma=0.01, eps=1e-12, clip_threshold=1.0,
                                weight_decay=0.1, fused=fused)), tensor_bytes(p, g, m, v, p, m)
    if family == "clip":
        return (lambda: clip_scale(g, 1.0, fused=fused)), tensor_bytes(g)
    raise ValueError(family)


def adamw_step(shapes, device, backend, dtype=torch.float32):
    """(step function, bytes read and written) of torch.optim.AdamW (backend "torch-foreach" or "torch-fused") or
    fastoptim.AdamW ("fastoptim", its default path) over parameters of `dtype` with gradients of `dtype`."""
    import fastoptim

    params = [torch.nn.Parameter(t) for t in make_tensors(shapes, device, dtype)]
    for param, grad in zip(params, make_tensors(shapes, device, dtype, offset=1)):
        param.grad = grad
    hp = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    if backend == "fastoptim":
        opt = fastoptim.AdamW(params, **hp)
    else:
        opt = torch.optim.AdamW(params, **hp, foreach=backend == "torch-foreach", fused=backend == "torch-fused")
    opt.step()  # creates the state outside the timed rounds
    grads = [p.grad for p in params]
    state = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    return opt.step, tensor_bytes(params, grads, state, params, state)


FAMILIES = ["adamw", "nadamw", "cautious", "mars", "adam_mini", "lion", "signum", "momentum", "sophia", "clip"]
# Every family on our kernels and our torch path; torch.optim.AdamW (foreach and fused) beside our AdamW. The other
# families compare with the copy of their own bytes (extra_info), not with an optimizer that moves other bytes.
CASES = [(family, backend) for family in FAMILIES for backend in ("fastoptim", "fastoptim-torch")]
CASES += [("adamw", "torch-foreach"), ("adamw", "torch-fused")]


@pytest.mark.shape_sets("130m")
@pytest.mark.parametrize("family, backend", CASES)
def test_elementwise_step(measure, model_set, bench_device, family, backend):
    if backend.startswith("torch-"):
        require_peer(backend)
        step, work = adamw_step(model_set, bench_device, backend)
    else:
        require_op("adamw_")
        step, work = family_step(family, model_set, bench_device, fused=backend == "fastoptim")
    measure(step, family=f"elementwise-{family}", shapes=model_set, backend=backend, bound="memory", work=work)


# Low-precision parameters: both optimizers keep the state in the parameters' dtype and compute in float32, so they
# move the same bytes; what differs is the cost of the conversions (fp16 on x86: F16C, cpu/half_conversion.cpp).
@pytest.mark.shape_sets("130m")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["fastoptim", "torch-fused"])
def test_adamw_low_precision_step(measure, model_set, bench_device, dtype, backend):
    if backend == "torch-fused":
        require_peer(backend)
    else:
        require_op("adamw_")
    step, work = adamw_step(model_set, bench_device, backend, dtype)
    measure(step, family=f"elementwise-adamw-{str(dtype).removeprefix('torch.')}", shapes=model_set, backend=backend,
            bound="memory", work=work)
