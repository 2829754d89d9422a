"""The Adam family as fused multi-tensor updates (benchmark-spec §1.1–§1.4): AdamW and NAdamW, Cautious, Mars.

Every op updates params and state in place in one pass over memory: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g²,
u = m̂/(√v̂ + ε) with the bias corrections of step count ``step`` (1 on the first step), w ← w − lr·(u + λ·w).
Math is float32; params are float32, bfloat16 or float16, grads have their dtype, state is float32 or their dtype.
``lr`` and ``step`` are Python numbers or 0-dim tensors (kept on the device, a step can be graph-captured without
recompiling); ``grad_scale`` (optional) is the clip factor from ``clip_scale``, folded into the gradient read.
"""

import torch

from fastoptim.ops._scalars import step_scalar
from fastoptim.ops._step_checks import check_update_call, device_of, optional_scalar


def moments_op(op, params, grads, exp_avgs, exp_avg_sqs, lr, step, *hyper, grad_scale):
    """Call an op of the Adam moments (AdamW, Cautious, Adam-mini): the four lists, lr and step as device scalars,
    the op's own scalars `hyper` in schema order, then the optional clip factor. Nothing to do for empty lists."""
    device = device_of(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if device is None:
        return
    op(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), step_scalar(lr, device), step_scalar(step, device),
       *hyper, optional_scalar(grad_scale, device))


def adamw_(params, grads, exp_avgs, exp_avg_sqs, *, lr, step, beta1, beta2, eps, weight_decay=0.0, nesterov=False,
           grad_scale=None):
    """AdamW; with ``nesterov``, NAdamW's numerator β1·m/(1−β1^(t+1)) + (1−β1)·g/(1−β1^t)."""
    moments_op(torch.ops.fastoptim.adamw_, params, grads, exp_avgs, exp_avg_sqs, lr, step, beta1, beta2, eps,
               weight_decay, nesterov, grad_scale=grad_scale)


def cautious_adamw_(params, grads, exp_avgs, exp_avg_sqs, *, lr, step, beta1, beta2, eps, weight_decay=0.0,
                    nesterov=False, grad_scale=None):
    """Cautious AdamW: u ← u·1[u·g > 0]/(mean(1[u·g > 0]) + ε), the mean per tensor (g clipped); ``nesterov`` masks
    NAdamW's direction instead."""
    moments_op(torch.ops.fastoptim.cautious_adamw_, params, grads, exp_avgs, exp_avg_sqs, lr, step, beta1, beta2,
               eps, weight_decay, nesterov, grad_scale=grad_scale)


def mars_adamw_(params, grads, prev_grads, exp_avgs, exp_avg_sqs, *, lr, step, beta1, beta2, eps, gamma,
                weight_decay=0.0, grad_scale=None):
    """Mars: AdamW on c = grad_scale·(g + γ·β1/(1−β1)·(g − g_prev)), then g_prev ← g. Its clip factor comes from
    ``mars_clip_scale`` (the norm of c, not of g)."""
    device = device_of(params=params, grads=grads, prev_grads=prev_grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if device is None:
        return
    torch.ops.fastoptim.mars_adamw_(
        list(params), list(grads), list(prev_grads), list(exp_avgs), list(exp_avg_sqs), step_scalar(lr, device),
        step_scalar(step, device), beta1, beta2, eps, weight_decay, gamma, optional_scalar(grad_scale, device),
    )


@torch.library.register_fake("fastoptim::adamw_")
@torch.library.register_fake("fastoptim::cautious_adamw_")
def _(params, grads, exp_avgs, exp_avg_sqs, lr, step, beta1, beta2, eps, weight_decay, nesterov, grad_scale):
    check_update_call(params, grads, dict(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs), dict(lr=lr, step=step),
                      grad_scale)


@torch.library.register_fake("fastoptim::mars_adamw_")
def _(params, grads, prev_grads, exp_avgs, exp_avg_sqs, lr, step, beta1, beta2, eps, weight_decay, gamma, grad_scale):
    check_update_call(params, grads, dict(prev_grads=prev_grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs),
                      dict(lr=lr, step=step), grad_scale)
