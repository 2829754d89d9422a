"""Sophia-H (benchmark-spec §1.11), with the Hessian-vector-product API an ordinary training loop can call."""

import torch

from fastoptim.optim.base import (
    BaseOptimizer,
    GroupWork,
    check_nonnegative,
    check_positive,
    check_positive_int,
    decay_of,
)


class SophiaH(BaseOptimizer):
    """Sophia-H: u = clip(m̂ / max(γ·h, ε), −c, c) with m̂ the bias-corrected momentum and h an EMA of Hutchinson
    estimates of the Hessian diagonal, refreshed every ``update_interval`` steps; w ← w − lr·(u + λ·w).

    Hessian refresh: ``opt.hessian_due`` is True when the coming step should refresh h (steps 0, k, 2k, … counting
    from 0). Then call ``opt.update_hessian(loss)`` with the loss's graph alive and WITHOUT calling backward: it
    computes the gradients with create_graph=True, stores them (detached) in ``p.grad`` (overwriting, not
    accumulating; parameters the loss does not reach get ``p.grad = None``), draws a probe u ~ N(0, I) per parameter
    (``torch.randn`` in param-group order, from ``generator`` or the global RNG), and updates
    h ← β2·h + (1−β2)·u⊙(H·u) (no bias correction; h starts at 0). Then call ``opt.step()``::

        for x, y in loader:
            loss = loss_fn(model(x), y)
            if opt.hessian_due:
                opt.update_hessian(loss)      # gradients + Hessian estimate in one go
            else:
                loss.backward()
            opt.step()
            opt.zero_grad()

    Args:
        params: an nn.Module (the paper's decay mask) or torch params/groups.
        lr: 0.004 (our choice; the spec's grid is 2e-3 … 3.2e-2). betas: (0.96, 0.99) = (β1 of m, β2 of h).
        eps: 1e-12. weight_decay: 0.1. gamma: 0.01. update_interval: 10 (all groups must share it).
        clip_threshold: 1.0. max_grad_norm: 1.0 (global-norm clip of the gradients before the update; 0 = off).
            The others are the spec's defaults.
        fused, check_finite, overrides: see BaseOptimizer.
    """

    families = ("sophia", "sophia_hessian")
    hparam_rules = {
        **BaseOptimizer.hparam_rules,
        "gamma": check_nonnegative,
        "update_interval": check_positive_int,
        "clip_threshold": check_positive,
    }

    def __init__(
        self,
        params,
        lr=0.004,
        betas=(0.96, 0.99),
        eps=1e-12,
        weight_decay=0.1,
        gamma=0.01,
        update_interval=10,
        clip_threshold=1.0,
        max_grad_norm=1.0,
        **options,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            gamma=gamma,
            update_interval=update_interval,
            clip_threshold=clip_threshold,
            max_grad_norm=max_grad_norm,
        )
        super().__init__(params, defaults, **options)

    def state_shapes(self, group, param):
        return {"step": (), "exp_avg": param.shape, "hessian": param.shape}

    @property
    def hessian_due(self) -> bool:
        intervals = {group["update_interval"] for group in self.param_groups}
        if len(intervals) != 1:
            raise ValueError(f"update_interval: all param groups must share one value, got {sorted(intervals)}")
        steps = next((int(s["step"]) for s in self.state.values() if isinstance(s, dict) and "step" in s), 0)
        return steps % intervals.pop() == 0

    def update_hessian(self, loss: torch.Tensor, generator: torch.Generator | None = None) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        reached = [(p, g) for p, g in zip(params, grads) if g is not None]
        probes = [torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device) for p, _ in reached]
        curved = [(i, g) for i, (_, g) in enumerate(reached) if g.requires_grad]  # g constant in p: H·u = 0
        products = torch.autograd.grad(
            [g for _, g in curved], [reached[i][0] for i, _ in curved], [probes[i] for i, _ in curved]
        ) if curved else ()
        hvps = [torch.zeros_like(p) for p, _ in reached]
        for (i, _), product in zip(curved, products):
            hvps[i] = product
        estimates = {p: u * hu for (p, _), u, hu in zip(reached, probes, hvps)}
        with torch.no_grad():
            for p in params:
                p.grad = None
            for p, g in reached:
                p.grad = g.detach()
            for item in self.prepare_step():
                self.functional("sophia_hessian", item.params)(
                    item.state_list("hessian"), [estimates[p] for p in item.params], beta2=item.group["betas"][1]
                )

    def update(self, work: list[GroupWork]) -> None:
        scales = self.clip_scales(work)
        for item in work:
            group = item.group
            self.functional("sophia", item.params)(
                item.params,
                item.grads,
                item.state_list("exp_avg"),
                item.state_list("hessian"),
                item.state_list("step"),
                lr=group["lr"],
                beta1=group["betas"][0],
                gamma=group["gamma"],
                eps=group["eps"],
                clip_threshold=group["clip_threshold"],
                weight_decay=decay_of(group),
                grad_scale=scales.get(item.index),
            )
