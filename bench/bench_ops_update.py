"""The decoupled update p ← p·(1 − lr·λ) − lr·u over a whole model's parameter list: the last stage of every
optimizer step, memory-bound (reads p and u, writes p)."""

import pytest
import torch

from fastoptim.bench.backends import require_op
from fastoptim.bench.tensors import make_tensors
from fastoptim.bench.work import tensor_bytes

LR, WEIGHT_DECAY = 1e-3, 0.1


def _fastoptim(params, updates):
    op = require_op("decoupled_update_")
    lr = torch.tensor(LR, device=params[0].device)
    return lambda: op(params, updates, lr, WEIGHT_DECAY, 1.0)


def _torch_foreach(params, updates):
    return lambda: (torch._foreach_mul_(params, 1 - LR * WEIGHT_DECAY), torch._foreach_add_(params, updates, alpha=-LR))


BACKENDS = {"fastoptim": _fastoptim, "torch-foreach": _torch_foreach}


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoupled_update(measure, model_set, bench_device, backend):
    params = make_tensors(model_set, bench_device)
    updates = make_tensors(model_set, bench_device, offset=1)
    step = BACKENDS[backend](params, updates)
    measure(step, family="decoupled-update", shapes=model_set, backend=backend, bound="memory",
            work=tensor_bytes(params, updates, params))
