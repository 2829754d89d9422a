"""clip_scale and mars_clip_scale against float64 norms: mixed dtypes, empty tensors, several chunks and launches,
the no-clip side of the min, and a zero norm."""

import math

import pytest
import torch

from fastoptim.optim.functional.common import clip_scale


def factor64(tensors, max_norm):
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in tensors))
    return min(1.0, max_norm / norm) if norm > 0 else 1.0


def test_clip_scale_matches_float64_norm(device, rng):
    shapes = [(3 * 65536 + 7,), (0,), (33, 65), (1,)] + [(int(torch.randint(1, 50, (), generator=rng)),)] * 120
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    tensors = [torch.randn(s, generator=rng).to(device, dtypes[i % 3]) for i, s in enumerate(shapes)]
    max_norm = 3.0
    got = torch.ops.fastoptim.clip_scale(tensors, max_norm)
    assert got.shape == () and got.dtype == torch.float32 and got.device == tensors[0].device
    assert float(got) < 1  # the norm (hundreds) is far above max_norm, so this is the clipping side of the min
    torch.testing.assert_close(float(got), factor64(tensors, max_norm), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale, expected", [(1e-3, 1.0), (0.0, 1.0)])
def test_clip_scale_is_one_below_the_threshold_and_for_zero(device, rng, scale, expected):
    tensors = [torch.randn(100, generator=rng).to(device) * scale]
    assert float(torch.ops.fastoptim.clip_scale(tensors, 1.0)) == expected


def test_clip_off_gives_none(device):
    for fused in (None, False):
        assert clip_scale([torch.ones(3, device=device)], 0.0, fused=fused) is None
        assert clip_scale([torch.ones(3, device=device)], None, fused=fused) is None
        assert clip_scale([], 1.0, fused=fused) is None


def test_bad_max_norm_is_refused():
    with pytest.raises(RuntimeError, match="max_norm must be finite and > 0"):
        torch.ops.fastoptim.clip_scale([torch.ones(2)], -1.0)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_mars_clip_scale_matches_float64_norm(device, rng, state_dtype):
    shapes = [(3 * 65536 + 7,), (0,), (33, 65)]
    grads = [torch.randn(s, generator=rng).to(device, torch.bfloat16) for s in shapes]
    prev = [torch.randn(s, generator=rng).to(device, state_dtype) for s in shapes]
    gamma, beta1, max_norm = 0.05, 0.98, 10.0
    corrected = [g.double() + gamma * beta1 / (1 - beta1) * (g.double() - q.double()) for g, q in zip(grads, prev)]
    got = torch.ops.fastoptim.mars_clip_scale(grads, prev, gamma, beta1, max_norm)
    torch.testing.assert_close(float(got), factor64(corrected, max_norm), rtol=1e-5, atol=0)
