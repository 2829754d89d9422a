import math

import pytest
import torch

from fastoptim.train.schedule import lr_multiplier


def reference_cosine(step, total, warmup, min_ratio):
    """benchmark-spec §4: linear warmup from 0, then cosine over the post-warmup steps down to min_ratio."""
    if step < warmup:
        return step / warmup
    t = (step - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2


def reference_wsd(step, total, warmup, decay, min_ratio):
    """Warmup, constant, then a straight line from 1 at total - decay*total down to min_ratio at total."""
    if step < warmup:
        return step / warmup
    start = max(warmup, total - round(decay * total))
    if step < start:
        return 1.0
    return 1.0 + (min_ratio - 1.0) * (step - start) / (total - start)


@pytest.mark.parametrize("total,warmup,min_ratio", [(100, 10, 0.0), (57, 0, 0.1), (1000, 999, 0.0)])
def test_cosine_matches_reference(total, warmup, min_ratio):
    f = lr_multiplier(total, "cosine", warmup, min_lr_ratio=min_ratio)
    for step in range(total):
        assert f(step) == pytest.approx(reference_cosine(step, total, warmup, min_ratio), abs=1e-12), step
    assert f(0) == (0.0 if warmup else 1.0)


@pytest.mark.parametrize("total,warmup,decay", [(100, 0, 0.8), (100, 10, 0.2), (50, 0, 1.0), (50, 5, 0.0)])
def test_wsd_matches_reference(total, warmup, decay):
    f = lr_multiplier(total, "linear", warmup, decay=decay)
    values = [f(s) for s in range(total)]
    for step, value in enumerate(values):
        assert value == pytest.approx(reference_wsd(step, total, warmup, decay, 0.0), abs=1e-12), step
    stable = [v for s, v in enumerate(values) if warmup <= s < total - round(decay * total)]
    assert all(v == 1.0 for v in stable)
    if decay == 1.0 and warmup == 0:
        assert values[0] == 1.0 and values[-1] == pytest.approx(1 / total)


def test_multiplier_drives_lambdalr():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    f = lr_multiplier(20, "cosine", warmup=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * f(step))
        opt.step()
        sched.step()


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr_schedule="step"), "lr_schedule='step'"),
    (dict(warmup=11), "warmup=11"),
    (dict(decay=1.5), "decay=1.5"),
    (dict(min_lr_ratio=-0.1), "min_lr_ratio=-0.1"),
])
def test_bad_schedule_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_multiplier(10, **kwargs)
