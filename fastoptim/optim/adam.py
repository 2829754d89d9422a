"""AdamW and the scalar variants that share its moments: NAdamW, Cautious and Mars (benchmark-spec §1.1–§1.4).

All four run the functional core ``adam_``; NAdamW and Cautious switch its numerator and mask, Mars feeds it a
corrected gradient. Defaults are the spec's best configurations, as each docstring says.
"""

from fastoptim.optim.base import BaseOptimizer, GroupWork, check_nonnegative, decay_of


class AdamW(BaseOptimizer):
    """AdamW with decoupled decay w ← w − lr·(u + λ·w), u = m̂/(√v̂ + ε) (benchmark-spec §1.1).

    Order within a step: global-norm clip of the gradients → Adam direction → decay → −lr.

    Args:
        params: an nn.Module (the paper's decay mask: no decay for norms, embeddings, biases) or torch params/groups.
        lr: 0.008. betas: (0.9, 0.98). eps: 1e-20. weight_decay: 0.1. max_grad_norm: 1.0 (0 = no clipping).
            The defaults are the spec's best 130M 1× configuration; ε=1e-20 underflows in float16, so pick a
            larger eps for float16 parameters.
        fused, check_finite, overrides: see BaseOptimizer.
    """

    families = ("adam",)
    nesterov = False
    cautious = False

    def __init__(
        self, params, lr=0.008, betas=(0.9, 0.98), eps=1e-20, weight_decay=0.1, max_grad_norm=1.0, **options
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, **options)

    def state_shapes(self, group, param):
        return {"step": (), "exp_avg": param.shape, "exp_avg_sq": param.shape}

    def update(self, work: list[GroupWork]) -> None:
        scales = self.clip_scales(work)
        for item in work:
            self.adam_step(item, item.grads, scales.get(item.index))

    def adam_step(self, item: GroupWork, grads, grad_scale) -> None:
        run_moments_core(self, "adam", item, grads, grad_scale, nesterov=self.nesterov, cautious=self.cautious)


def run_moments_core(optimizer: BaseOptimizer, family: str, item: GroupWork, grads, grad_scale, **flags) -> None:
    """Call an Adam-moments core ("adam" or "adam_mini") on one group's work with the group's hyperparameters."""
    group = item.group
    beta1, beta2 = group["betas"]
    optimizer.functional(family, item.params)(
        item.params,
        grads,
        item.state_list("exp_avg"),
        item.state_list("exp_avg_sq"),
        item.state_list("step"),
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=decay_of(group),
        grad_scale=grad_scale,
        **flags,
    )


class NAdamW(AdamW):
    """AdamW with a Nesterov numerator m̂ = β1·m/(1−β1^(t+1)) + (1−β1)·g/(1−β1^t) (benchmark-spec §1.2).

    Args:
        lr: 0.008. betas: (0.95, 0.98). eps: 1e-10. weight_decay: 0.1. max_grad_norm: 1.0 (0 = no clipping).
            The defaults are the spec's best 300M configuration.
        params, fused, check_finite, overrides: as AdamW.
    """

    nesterov = True

    def __init__(
        self, params, lr=0.008, betas=(0.95, 0.98), eps=1e-10, weight_decay=0.1, max_grad_norm=1.0, **options
    ):
        super().__init__(params, lr, betas, eps, weight_decay, max_grad_norm, **options)


class Cautious(AdamW):
    """Cautious AdamW (C-AdamW, benchmark-spec §1.4): the Adam direction u, masked where it disagrees in sign with
    the (clipped) gradient and renormalised per tensor: u ← u·1[u·g > 0]/(mean(1[u·g > 0]) + ε).

    The ε of the renormalisation is the optimizer's eps (the spec writes "mean(mask) + ε").

    Args:
        lr: 0.008. betas: (0.98, 0.98). eps: 1e-25. weight_decay: 0.1. max_grad_norm: 1.0 (0 = no clipping).
            The defaults are the spec's best 300M/520M configuration.
        params, fused, check_finite, overrides: as AdamW.
    """

    cautious = True

    def __init__(
        self, params, lr=0.008, betas=(0.98, 0.98), eps=1e-25, weight_decay=0.1, max_grad_norm=1.0, **options
    ):
        super().__init__(params, lr, betas, eps, weight_decay, max_grad_norm, **options)


class Mars(AdamW):
    """Mars (benchmark-spec §1.3): Adam on the corrected gradient c = g + γ·β1/(1−β1)·(g − g_prev).

    g_prev is the previous raw gradient (0 on the first step). c is rescaled so its global norm is at most
    max_grad_norm; that is Mars's only clip (the raw gradient is not clipped separately).

    Args:
        lr: 0.008. betas: (0.95, 0.99). eps: 1e-8. weight_decay: 0.1. gamma: 0.025. max_grad_norm: 1.0
            (0 = no rescale). β1, β2, γ, λ are the spec's defaults; lr is its 520M best; eps is not given by the
            spec (its best runs use 1e-25 at 300M), 1e-8 is our choice.
        params, fused, check_finite, overrides: as AdamW.
    """

    families = ("mars_correction", "adam")
    hparam_rules = {**AdamW.hparam_rules, "gamma": check_nonnegative}

    def __init__(
        self,
        params,
        lr=0.008,
        betas=(0.95, 0.99),
        eps=1e-8,
        weight_decay=0.1,
        gamma=0.025,
        max_grad_norm=1.0,
        **options,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma, max_grad_norm=max_grad_norm
        )
        BaseOptimizer.__init__(self, params, defaults, **options)

    def state_shapes(self, group, param):
        return {**super().state_shapes(group, param), "prev_grad": param.shape}

    def update(self, work: list[GroupWork]) -> None:
        corrected = {
            item.index: self.functional("mars_correction", item.params)(
                item.grads, item.state_list("prev_grad"), gamma=item.group["gamma"], beta1=item.group["betas"][0]
            )
            for item in work
        }
        scales = self.clip_scales(work, lambda item: corrected[item.index])
        for item in work:
            self.adam_step(item, corrected[item.index], scales.get(item.index))
