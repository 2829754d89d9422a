"""sophia_ and sophia_hessian_ against float64 references written from benchmark-spec §1.11."""

import pytest
import torch

from elementwise_cases import scalar, step_counters

SHAPES = [(1,), (7, 3), (0,), (33, 65), (3 * 65536 + 5,)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close(got, want):
    tol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("param_dtype, state_dtype", DTYPES)
def test_sophia_matches_float64_reference(device, rng, param_dtype, state_dtype):
    def randn(dtype):
        return [torch.randn(s, generator=rng).to(device, dtype) for s in SHAPES]

    params, grads, m = randn(param_dtype), randn(param_dtype), randn(state_dtype)
    # Hessian diagonals of both signs and near zero, so that both the ε floor and the clip are exercised.
    hessians = [(10 * torch.randn(s, generator=rng)).to(device, state_dtype) for s in SHAPES]
    lr, beta1, gamma, eps, clip, wd, scale = 0.004, 0.96, 0.01, 1e-3, 1.0, 0.1, 0.6
    counts = torch.randint(1, 30, (len(SHAPES),), generator=rng).tolist()  # each parameter at its own step count
    expected = []
    for p, g, mi, h, t in zip(params, grads, m, hessians, counts):
        m64 = beta1 * mi.double() + (1 - beta1) * g.double() * scale
        ratio = (m64 / (1 - beta1**t)) / torch.clamp(gamma * h.double(), min=eps)
        u = ratio.clamp(-clip, clip)
        expected.append((p.double() - lr * (u + wd * p.double()), m64))
    torch.ops.fastoptim.sophia_(params, grads, m, hessians, scalar(lr, device), step_counters(counts, device), beta1, gamma,
                                eps, clip, wd, scalar(scale, device))
    for got, want in zip(zip(params, m), expected):
        for x, y in zip(got, want):
            assert_close(x, y)


@pytest.mark.parametrize("param_dtype, state_dtype", DTYPES)
def test_hessian_ema_matches_float64_reference(device, rng, param_dtype, state_dtype):
    hessians = [torch.randn(s, generator=rng).to(device, state_dtype) for s in SHAPES]
    estimates = [torch.randn(s, generator=rng).to(device, param_dtype) for s in SHAPES]
    beta2 = 0.99
    expected = [beta2 * h.double() + (1 - beta2) * e.double() for h, e in zip(hessians, estimates)]
    torch.ops.fastoptim.sophia_hessian_(hessians, estimates, beta2)
    for h, want in zip(hessians, expected):
        assert_close(h, want)
