"""Adam-mini (benchmark-spec §1.6) as a fused multi-tensor update: Adam's first moment, one second moment per block.

``exp_avg_sqs[i]`` holds one value per block of ``params[i]``, the blocks being equal contiguous runs of the
flattened parameter (rows of an out-first matrix, or whole heads): v_b ← β2·v_b + (1−β2)·mean_b(g²), then
u = m̂/(√v̂_b + ε) over block b and w ← w − lr·(u + λ·w). The block mean is computed in the same kernel as the
update. Scalars and dtypes as in fastoptim.ops.adam.
"""

import torch

from fastoptim.ops._step_checks import check_state_dtype, check_update_call
from fastoptim.ops.adam import moments_op


def adam_mini_(params, grads, exp_avgs, exp_avg_sqs, *, lr, step, beta1, beta2, eps, weight_decay=0.0,
               grad_scale=None):
    moments_op(torch.ops.fastoptim.adam_mini_, params, grads, exp_avgs, exp_avg_sqs, lr, step, beta1, beta2, eps,
               weight_decay, grad_scale=grad_scale)


@torch.library.register_fake("fastoptim::adam_mini_")
def _(params, grads, exp_avgs, exp_avg_sqs, lr, step, beta1, beta2, eps, weight_decay, grad_scale):
    device = check_update_call(params, grads, dict(exp_avgs=exp_avgs), dict(lr=lr, step=step), grad_scale)
    if device is None:
        return
    if len(exp_avg_sqs) != len(params):
        raise RuntimeError(f"fastoptim: exp_avg_sqs has {len(exp_avg_sqs)} tensors but params has {len(params)}")
    for i, (p, v) in enumerate(zip(params, exp_avg_sqs)):
        if v.layout != torch.strided:
            raise RuntimeError(f"fastoptim: exp_avg_sqs[{i}] is sparse; only dense tensors are supported")
        if not v.is_contiguous():
            raise RuntimeError(f"fastoptim: exp_avg_sqs[{i}] is not contiguous; call .contiguous() first")
        if v.device != device:
            raise RuntimeError(f"fastoptim: exp_avg_sqs[{i}] is on {v.device} but params[0] is on {device}")
        if (p.numel() % v.numel() != 0) if v.numel() > 0 else p.numel() != 0:
            raise RuntimeError(
                f"fastoptim: exp_avg_sqs[{i}] has {v.numel()} blocks, which does not divide params[{i}]'s "
                f"{p.numel()} elements"
            )
    state_dtype = check_state_dtype(params[0].dtype, exp_avgs=exp_avgs)
    if check_state_dtype(params[0].dtype, exp_avg_sqs=exp_avg_sqs) != state_dtype:
        raise RuntimeError("fastoptim: exp_avg_sqs and exp_avgs must share a dtype")
