"""adam_mini_ against a float64 reference written from benchmark-spec §1.6: blocks of one row, of several rows (a
head), longer than a launcher chunk, many per chunk, and empty parameters."""

import pytest
import torch

import fastoptim.ops  # noqa: F401  (loads the native library)

from elementwise_cases import scalar, step_counters

adam_mini_ = torch.ops.fastoptim.adam_mini_

# (parameter shape, blocks): rows; heads of 3 rows; 2 blocks each longer than one 65536-element chunk; 1000 short
# blocks (several chunks of whole blocks); a single block; an empty parameter.
CASES = [((8, 33), 8), ((12, 17), 4), ((2, 70001), 2), ((1000, 130), 1000), ((5,), 1), ((0, 4), 0)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def reference(p, g, m, v, *, lr, t, beta1, beta2, eps, wd):
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    blocks = v.numel()
    m = beta1 * m + (1 - beta1) * g
    if blocks:
        v = beta2 * v + (1 - beta2) * g.reshape(blocks, -1).square().mean(dim=1)
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    u = (m_hat.reshape(blocks, -1) / (v_hat.sqrt() + eps).unsqueeze(1)).reshape(p.shape) if blocks else m_hat
    return p - lr * (u + wd * p), m, v


@pytest.mark.parametrize("param_dtype, state_dtype", DTYPES)
def test_matches_float64_reference(device, rng, param_dtype, state_dtype):
    def randn(shape, dtype):
        return torch.randn(shape, generator=rng).to(device, dtype)

    params = [randn(shape, param_dtype) for shape, _ in CASES]
    grads = [randn(shape, param_dtype) for shape, _ in CASES]
    m = [randn(shape, state_dtype) for shape, _ in CASES]
    v = [torch.rand(blocks, generator=rng).to(device, state_dtype) for _, blocks in CASES]
    counts = torch.randint(1, 20, (len(CASES),), generator=rng).tolist()  # each parameter at its own step count
    hp = dict(lr=0.03, beta1=0.9, beta2=0.98, eps=1e-10, wd=0.1)
    scale = 0.75
    expected = [reference(p, g.double() * scale, mi, vi, t=t, **hp)
                for p, g, mi, vi, t in zip(params, grads, m, v, counts)]
    adam_mini_(params, grads, m, v, scalar(hp["lr"], device), step_counters(counts, device), hp["beta1"], hp["beta2"],
               hp["eps"], hp["wd"], scalar(scale, device))
    for got, want in zip(zip(params, m, v), expected):
        for x, y in zip(got, want):
            tol = TOLERANCE[x.dtype]
            torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol)


def test_block_count_must_divide_the_parameter(rng):
    params = [torch.randn(6, 5, generator=rng)]
    before = params[0].clone()
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] has 4 blocks, which does not divide params\[0\]'s 30"):
        adam_mini_(params, [torch.randn(6, 5)], [torch.zeros(6, 5)], [torch.zeros(4)], scalar(0.1, "cpu"),
                   step_counters([1], "cpu"), 0.9, 0.99, 1e-8, 0.0, None)
    assert torch.equal(params[0], before)


def test_many_tensors_span_several_launches(device, rng):
    # More tensors than one CUDA launch's metadata holds for segment lists of depth 3 (30).
    shapes = [(int(torch.randint(1, 9, (), generator=rng)), 3) for _ in range(70)]
    params = [torch.randn(s, generator=rng).to(device) for s in shapes]
    grads = [torch.randn(s, generator=rng).to(device) for s in shapes]
    m = [torch.zeros(s, device=device) for s in shapes]
    v = [torch.zeros(s[0], device=device) for s in shapes]
    hp = dict(lr=0.1, t=1, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.0)
    expected = [reference(*a, **hp) for a in zip(params, grads, m, v)]
    adam_mini_(params, grads, m, v, scalar(0.1, device), step_counters([1] * len(params), device), 0.9, 0.99,
               1e-8, 0.0, None)
    for got, want in zip(zip(params, m, v), expected):
        for x, y in zip(got, want):
            torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-5)
