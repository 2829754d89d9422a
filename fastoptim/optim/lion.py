"""Lion (benchmark-spec §1.5)."""

from fastoptim.optim.base import BaseOptimizer, GroupWork, decay_of
from fastoptim.optim.functional.lion import lion_


class Lion(BaseOptimizer):
    """Lion: u = sign(β1·m + (1−β1)·g), then m ← β2·m + (1−β2)·g; w ← w − lr·(u + λ·w).

    Order within a step: global-norm clip of the gradients (if max_grad_norm is set) → sign update → decay → −lr.

    Args:
        params: torch params/groups, or an nn.Module (the paper's decay mask).
        lr: 1e-4. betas: (0.9, 0.99). weight_decay: 0.0 (the defaults of the authors' reference implementation,
            google/automl's lion_pytorch). max_grad_norm: None (no clipping).
        fused, check_finite, overrides: see BaseOptimizer.
    """

    native_ops = ("lion_",)
    row_local_branches = frozenset({"default"})

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, max_grad_norm=None, **options):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, **options)

    def state_shapes(self, group, param):
        return {"exp_avg": param.shape}

    def update(self, work: list[GroupWork]) -> None:
        scales = self.clip_scales(work)
        for item in work:
            beta1, beta2 = item.group["betas"]
            lion_(item.params, item.grads, item.state_list("exp_avg"), lr=item.group["lr"], beta1=beta1,
                  beta2=beta2, weight_decay=decay_of(item.group), grad_scale=scales.get(item.index),
                  fused=self.fused)
