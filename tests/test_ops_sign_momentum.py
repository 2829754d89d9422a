"""lion_, signum_ and momentum_ against float64 references written from benchmark-spec §1.5, §1.7 and §1.8."""

import pytest
import torch

from elementwise_cases import scalar

SHAPES = [(1,), (7, 3), (0,), (33, 65), (3 * 65536 + 5,)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def lists(shapes, dtype, device, rng):
    return [torch.randn(s, generator=rng).to(device, dtype) for s in shapes]


def assert_close(got, want):
    tol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def sign_step(p, u, lr, wd):
    return p.double() - lr * (u + wd * p.double())


def assert_sign_step_close(got, want, signed, lr):
    """Parameters after a sign step: where the value whose sign was taken is within float32 rounding of zero, the
    kernel (float32) and the reference (float64) may pick different signs, so there the step may differ by 2·lr."""
    tol = TOLERANCE[got.dtype]
    ambiguous = signed.abs() < 1e-5
    torch.testing.assert_close(got.double()[~ambiguous], want[~ambiguous], rtol=tol, atol=tol)
    assert ((got.double() - want)[ambiguous].abs() <= 2 * lr + tol * (1 + want[ambiguous].abs())).all()


@pytest.mark.parametrize("param_dtype, state_dtype", DTYPES)
def test_lion_matches_float64_reference(device, rng, param_dtype, state_dtype):
    params, grads = lists(SHAPES, param_dtype, device, rng), lists(SHAPES, param_dtype, device, rng)
    m = lists(SHAPES, state_dtype, device, rng)
    lr, beta1, beta2, wd, scale = 0.002, 0.9, 0.95, 0.7, 0.5
    expected = []
    for p, g, mi in zip(params, grads, m):
        g64, m64 = g.double() * scale, mi.double()
        signed = beta1 * m64 + (1 - beta1) * g64
        expected.append((sign_step(p, torch.sign(signed), lr, wd), beta2 * m64 + (1 - beta2) * g64, signed))
    torch.ops.fastoptim.lion_(params, grads, m, scalar(lr, device), beta1, beta2, wd, scalar(scale, device))
    for p, mi, (want_p, want_m, signed) in zip(params, m, expected):
        assert_sign_step_close(p, want_p, signed, lr)
        assert_close(mi, want_m)


@pytest.mark.parametrize("param_dtype, state_dtype", DTYPES)
def test_signum_matches_float64_reference(device, rng, param_dtype, state_dtype):
    params, grads = lists(SHAPES, param_dtype, device, rng), lists(SHAPES, param_dtype, device, rng)
    bufs = lists(SHAPES, state_dtype, device, rng)
    lr, beta, wd = 0.01, 0.95, 0.1
    expected = []
    for p, g, b in zip(params, grads, bufs):
        b64 = beta * b.double() + (1 - beta) * g.double()
        expected.append((sign_step(p, torch.sign(b64), lr, wd), b64))
    torch.ops.fastoptim.signum_(params, grads, bufs, scalar(lr, device), beta, wd, None)
    for p, b, (want_p, want_b) in zip(params, bufs, expected):
        assert_sign_step_close(p, want_p, want_b, lr)
        assert_close(b, want_b)


@pytest.mark.parametrize("grad_dtype, state_dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("with_directions", [False, True])
def test_momentum_matches_float64_reference(device, rng, grad_dtype, state_dtype, nesterov, ema, with_directions):
    grads, bufs = lists(SHAPES, grad_dtype, device, rng), lists(SHAPES, state_dtype, device, rng)
    directions = [torch.empty_like(b) for b in bufs] if with_directions else []
    beta, scale = 0.95, 0.8
    grad_weight = 1 - beta if ema else 1.0
    expected_bufs, expected_dirs = [], []
    for g, b in zip(grads, bufs):
        g64 = g.double() * scale
        b64 = beta * b.double() + grad_weight * g64
        expected_bufs.append(b64)
        expected_dirs.append(beta * b64 + grad_weight * g64 if nesterov else b64)
    torch.ops.fastoptim.momentum_(grads, bufs, directions, beta, nesterov, ema, scalar(scale, device))
    for b, want in zip(bufs, expected_bufs):
        assert_close(b, want)
    for d, want in zip(directions, expected_dirs):
        assert_close(d, want)


def test_signum_sign_of_zero_is_zero(device):
    params, grads, bufs = [torch.ones(3, device=device)], [torch.zeros(3, device=device)], [torch.zeros(3, device=device)]
    torch.ops.fastoptim.signum_(params, grads, bufs, scalar(0.5, device), 0.9, 0.0, None)
    torch.testing.assert_close(params[0].cpu(), torch.ones(3))
