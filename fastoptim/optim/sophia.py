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
from fastoptim.optim.functional.sophia import sophia_, sophia_hessian_


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
        lr: 1e-4 (the Sophia authors' reference default). betas: (0.96, 0.99) = (β1 of m, β2 of h).
        eps: 1e-12. weight_decay: 0.1. gamma: 0.01. update_interval: 10 (all groups must share it).
        clip_threshold: 1.0 (Levanter's Sophia-H defaults, benchmark-spec §1.11).
        max_grad_norm: None (no clipping); a number clips the gradients to that global norm before the update.
        fused, check_finite, overrides: see BaseOptimizer.

    Capturable (CUDA graphs): ``step()`` is; ``update_hessian`` (autograd twice) is not, so capture the steps
    between Hessian refreshes.
    """

    native_ops = ("sophia_", "sophia_hessian_")
    needs_hvp = True
    hparam_rules = {
        **BaseOptimizer.hparam_rules,
        "gamma": check_nonnegative,
        "update_interval": check_positive_int,
        "clip_threshold": check_positive,
    }

    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.96, 0.99),
        eps=1e-12,
        weight_decay=0.1,
        gamma=0.01,
        update_interval=10,
        clip_threshold=1.0,
        max_grad_norm=None,
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
        self.steps_done = 0  # host-side count of step() calls: hessian_due must not read a device tensor

    def state_shapes(self, group, param):
        return {"step": (), "exp_avg": param.shape, "hessian": param.shape}

    @property
    def hessian_due(self) -> bool:
        intervals = {group["update_interval"] for group in self.param_groups}
        if len(intervals) != 1:
            raise ValueError(f"update_interval: all param groups must share one value, got {sorted(intervals)}")
        return self.steps_done % intervals.pop() == 0

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.steps_done = max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)

    def update_hessian(self, loss, generator: torch.Generator | None = None) -> None:
        """`loss`: the step's loss, or an iterable of its micro-batch losses (each already divided by the number of
        micro-batches, so that they sum to the step's loss), produced one at a time so that one micro-batch's graph
        is alive at once. Gradients and H·u are summed over the micro-batches with one probe u per step, drawn at
        the first micro-batch; the estimate u⊙(Σ H_i·u) is that of the whole step's loss."""
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        grads, hvps, probes = {}, {}, {}
        for micro_loss in [loss] if isinstance(loss, torch.Tensor) else loss:
            grads_i = torch.autograd.grad(micro_loss, params, create_graph=True, allow_unused=True)
            reached = [(p, g) for p, g in zip(params, grads_i) if g is not None]
            for p, _ in reached:
                if p not in probes:
                    probes[p] = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
            curved = [(p, g) for p, g in reached if g.requires_grad]  # g constant in p: H·u = 0
            products = torch.autograd.grad(
                [g for _, g in curved], [p for p, _ in curved], [probes[p] for p, _ in curved]
            ) if curved else ()
            with torch.no_grad():
                for p, g in reached:
                    grads[p] = g.detach() if p not in grads else grads[p] + g.detach()
                for (p, _), product in zip(curved, products):
                    hvps[p] = product if p not in hvps else hvps[p] + product
        estimates = {p: u * hvps[p] if p in hvps else torch.zeros_like(u) for p, u in probes.items()}
        with torch.no_grad():
            for p in params:
                p.grad = grads.get(p)
            for item in self.prepare_step():
                sophia_hessian_(item.state_list("hessian"), [estimates[p] for p in item.params],
                                beta2=item.group["betas"][1], fused=self.fused)

    def update(self, work: list[GroupWork]) -> None:
        scales = self.clip_scales(work)
        for item in work:
            group = item.group
            sophia_(item.params, item.grads, item.state_list("exp_avg"), item.state_list("hessian"),
                    item.state_list("step"), lr=group["lr"], beta1=group["betas"][0], gamma=group["gamma"],
                    eps=group["eps"], clip_threshold=group["clip_threshold"], weight_decay=decay_of(group),
                    grad_scale=scales.get(item.index), fused=self.fused)
        self.steps_done += 1
