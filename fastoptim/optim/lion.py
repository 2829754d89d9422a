"""Lion (benchmark-spec §1.5)."""

from fastoptim.optim.base import BaseOptimizer, GroupWork, decay_of


class Lion(BaseOptimizer):
    """Lion: u = sign(β1·m + (1−β1)·g), then m ← β2·m + (1−β2)·g; w ← w − lr·(u + λ·w).

    Order within a step: global-norm clip of the gradients → sign update → decay → −lr.

    Args:
        params: an nn.Module (the paper's decay mask) or torch params/groups.
        lr: 0.002. betas: (0.9, 0.95). weight_decay: 0.7. max_grad_norm: 1.0 (0 = no clipping).
            The defaults are the spec's best 130M 1× configuration.
        fused, check_finite, overrides: see BaseOptimizer.
    """

    families = ("lion",)

    def __init__(self, params, lr=0.002, betas=(0.9, 0.95), weight_decay=0.7, max_grad_norm=1.0, **options):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, **options)

    def state_shapes(self, group, param):
        return {"exp_avg": param.shape}

    def update(self, work: list[GroupWork]) -> None:
        scales = self.clip_scales(work)
        for item in work:
            beta1, beta2 = item.group["betas"]
            self.functional("lion", item.params)(
                item.params,
                item.grads,
                item.state_list("exp_avg"),
                lr=item.group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=decay_of(item.group),
                grad_scale=scales.get(item.index),
            )
