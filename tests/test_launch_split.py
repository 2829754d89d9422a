"""One tensor longer than a CUDA launch: the multi-tensor launcher fills its 320 blocks and splits the launch in the
middle of the tensor (every model over about 21 M parameters goes through that path). Apply, reduce and segment
launchers, each with a tensor of more than 321 chunks between small ones, against float64 references."""

import math

import pytest
import torch

import fastoptim.ops  # noqa: F401  (loads the native library)

from elementwise_cases import scalar, step_counters

CHUNK = 65536
LONG = 330 * CHUNK + 17  # 331 chunks, the last one partial


def randn(shape, rng, device):
    return torch.randn(shape, generator=rng).to(device)


def test_apply_splits_inside_a_tensor(device, rng):
    shapes = [(3, 5), (LONG,), (CHUNK + 1,)]
    params = [randn(s, rng, device) for s in shapes]
    updates = [randn(s, rng, device) for s in shapes]
    lr, wd, scale = 0.03, 0.1, 1.5
    expected = [p.double() * (1 - lr * wd) - lr * scale * u.double() for p, u in zip(params, updates)]
    torch.ops.fastoptim.decoupled_update_(params, updates, scalar(lr, device), wd, scale)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-6)


def test_reduce_splits_inside_a_tensor(device, rng):
    # Each chunk holds about 1/331 of the sum of squares: a chunk lost or counted twice at the split moves the
    # norm by far more than the tolerance.
    tensors = [randn(s, rng, device) for s in [(7,), (LONG,), (5, 9)]]
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in tensors))
    got = torch.ops.fastoptim.clip_scale(tensors, 1.0)
    torch.testing.assert_close(float(got), 1.0 / norm, rtol=1e-5, atol=0)


def test_segment_apply_splits_inside_a_tensor(device, rng):
    # Rows of 1024 elements, 64 to a chunk: 20800 rows are 325 chunks of whole segments.
    shapes = [(4, 3), (20800, 1024)]
    params = [randn(s, rng, device) for s in shapes]
    grads = [randn(s, rng, device) for s in shapes]
    exp_avgs = [randn(s, rng, device) for s in shapes]
    exp_avg_sqs = [torch.rand(s[0], generator=rng).to(device) for s in shapes]
    lr, beta1, beta2, eps, wd, t = 0.01, 0.9, 0.95, 1e-8, 0.1, 3
    expected = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p, g, m, v = p.double(), g.double(), m.double(), v.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g.square().mean(dim=1)
        u = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps).unsqueeze(1)
        expected.append((p - lr * (u + wd * p), m, v))
    torch.ops.fastoptim.adam_mini_(params, grads, exp_avgs, exp_avg_sqs, scalar(lr, device),
                                   step_counters([t, t], device), beta1, beta2, eps, wd, None)
    for got, want in zip(zip(params, exp_avgs, exp_avg_sqs), expected):
        for x, y in zip(got, want):
            torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("tensors_before", [0, 2])
def test_reduce_partials_follow_list_order_across_the_split(device, rng, tensors_before):
    # The per-chunk partials are numbered over the whole call and summed in that order, whichever launch wrote
    # them: two identical calls give identical bits.
    tensors = [randn((CHUNK * 2 + 3,), rng, device) for _ in range(tensors_before)] + [randn((LONG,), rng, device)]
    first = torch.ops.fastoptim.clip_scale(tensors, 1.0)
    second = torch.ops.fastoptim.clip_scale(tensors, 1.0)
    assert torch.equal(first, second)


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_apply_on_views_off_the_vector_boundary_equals_fresh_tensors(device, rng, offset):
    """On CUDA a chunk whose lists all start on a 4-element boundary moves as vector loads and stores, any other as
    scalars: views at element offsets 1 to 3 (bfloat16 params, float32 state) take the scalar path, fresh tensors
    the vector one and its scalar tail, and the two agree bit for bit."""
    shapes = [(2 * CHUNK + 3,), (5, 7)]

    def lists(dtype_of):
        return [[randn(s, rng, "cpu").to(dtype) for s in shapes] for dtype in dtype_of]

    fresh = [[t.to(device) for t in tensors] for tensors in lists([torch.bfloat16, torch.bfloat16, torch.float32])]
    fresh.append([torch.rand(s, generator=rng).to(device) for s in shapes])  # exp_avg_sq ≥ 0

    def shifted(t):
        buffer = torch.empty(t.numel() + offset, dtype=t.dtype, device=device)
        view = buffer[offset:].view(t.shape)
        view.copy_(t)
        return view

    views = [[shifted(t) for t in tensors] for tensors in fresh]
    for args in (fresh, views):
        torch.ops.fastoptim.adamw_(*args, scalar(0.01, device), step_counters([3, 3], device), 0.9, 0.99, 1e-8, 0.1,
                                   False, scalar(0.5, device))
    for a, b in zip(fresh, views):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
