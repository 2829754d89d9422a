"""AdamW and the scalar variants that share its moments: NAdamW, Cautious and Mars (benchmark-spec §1.1–§1.4).

AdamW, NAdamW and Cautious run the functional entry ``adam_`` (NAdamW and Cautious switch its numerator and mask);
Mars runs ``mars_`` on a corrected gradient. Defaults follow each optimizer's reference implementation, as each
docstring says; the paper's tuned settings are in ``fastoptim.paper_hparams``.
"""

from functools import partial

import torch

from fastoptim.optim.base import BaseOptimizer, GroupWork, check_nonnegative, decay_of
from fastoptim.optim.functional.adam import adam_, mars_, mars_clip_scale, mars_correction
from fastoptim.optim.functional.common import clip_scale


class AdamW(BaseOptimizer):
    """AdamW with decoupled decay w ← w − lr·(u + λ·w), u = m̂/(√v̂ + ε) (benchmark-spec §1.1).

    A drop-in for torch.optim.AdamW: the same arguments and defaults give its result within float32 rounding.
    Order within a step: global-norm clip of the gradients (only if max_grad_norm is set) → Adam direction →
    decay → −lr.

    Args:
        params: torch params/groups, or an nn.Module (then the paper's decay mask: no decay for norms, embeddings,
            biases).
        lr: 1e-3. betas: (0.9, 0.999). eps: 1e-8. weight_decay: 1e-2 (torch.optim.AdamW's defaults).
        max_grad_norm: None (no clipping); a number clips the gradients to that global norm first.
        fused, check_finite, overrides: see BaseOptimizer.
    """

    native_ops = ("adamw_",)
    row_local_branches = frozenset({"default"})
    nesterov = False
    cautious = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, max_grad_norm=None,
                 **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, **options)

    def state_shapes(self, group, param):
        return {"step": (), "exp_avg": param.shape, "exp_avg_sq": param.shape}

    def update(self, work: list[GroupWork]) -> None:
        scales = self.clip_scales(work)
        for item in work:
            group = item.group
            beta1, beta2 = group["betas"]
            adam_(item.params, item.grads, item.state_list("exp_avg"), item.state_list("exp_avg_sq"),
                  item.state_list("step"), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=decay_of(group), grad_scale=scales.get(item.index), nesterov=self.nesterov,
                  cautious=self.cautious, fused=self.fused,
                  whole_mask_means=None if self.whole_tensor_means is None else partial(self.whole_tensor_means, item))


class NAdamW(AdamW):
    """AdamW with a Nesterov numerator m̂ = β1·m/(1−β1^(t+1)) + (1−β1)·g/(1−β1^t) (benchmark-spec §1.2).

    Args and defaults: as AdamW (torch.optim.AdamW's), which NAdamW changes only in its numerator.
    """

    nesterov = True


class Cautious(AdamW):
    """Cautious AdamW (C-AdamW, benchmark-spec §1.4): the Adam direction u, masked where it disagrees in sign with
    the (clipped) gradient and renormalised per tensor: u ← u·1[u·g > 0]/(mean(1[u·g > 0]) + ε).

    The ε of the renormalisation is the optimizer's eps (the spec writes "mean(mask) + ε"). Under ZeRO-1 and FSDP2
    each rank steps row shards, and the mask's mean over each whole tensor comes from every rank's counts (one
    all-reduce per group and step: ``whole_tensor_means``).
    Args and defaults: as AdamW (the C-AdamW reference implementation is torch's AdamW with the mask).
    """

    native_ops = ("cautious_adamw_",)
    cautious = True


class Mars(BaseOptimizer):
    """Mars (benchmark-spec §1.3): Adam on the corrected gradient c = g + γ·β1/(1−β1)·(g − g_prev).

    g_prev is the previous raw gradient (0 on the first step). With max_grad_norm set, c is rescaled so its global
    norm is at most max_grad_norm; that is Mars's only clip (the raw gradient is not clipped separately).

    Args:
        params: as AdamW.
        lr: 3e-3. betas: (0.95, 0.99). eps: 1e-8. weight_decay: 0.0. gamma: 0.025 (the defaults of the MARS
            authors' reference implementation, MARS-AdamW). max_grad_norm: None (no rescale).
        fused, check_finite, overrides: see BaseOptimizer.
    """

    native_ops = ("mars_adamw_", "mars_clip_scale")
    row_local_branches = frozenset({"default"})
    hparam_rules = {**AdamW.hparam_rules, "gamma": check_nonnegative}

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0, gamma=0.025,
                 max_grad_norm=None, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, **options)

    def state_shapes(self, group, param):
        return {"step": (), "exp_avg": param.shape, "exp_avg_sq": param.shape, "prev_grad": param.shape}

    def update(self, work: list[GroupWork]) -> None:
        scales = {}
        for limit, items in self.clip_sets(work).items():
            scale = (self.global_clip_scales[limit] if self.global_clip_scales is not None
                     else self._clip_scale(items, limit))
            scales.update((item.index, scale) for item in items)
        for item in work:
            group = item.group
            beta1, beta2 = group["betas"]
            mars_(item.params, item.grads, item.state_list("prev_grad"), item.state_list("exp_avg"),
                  item.state_list("exp_avg_sq"), item.state_list("step"), lr=group["lr"], beta1=beta1, beta2=beta2,
                  eps=group["eps"], gamma=group["gamma"], weight_decay=decay_of(group),
                  grad_scale=scales.get(item.index), fused=self.fused)

    def clip_tensors(self, items: list[GroupWork]) -> list[torch.Tensor]:
        return [c for item in items for c in mars_correction(
            item.grads, item.state_list("prev_grad"), item.group["gamma"], item.group["betas"][0])]

    def _clip_scale(self, items: list[GroupWork], limit: float):
        """One factor for a clip set: the global norm of the corrected gradients of all its groups. The native
        reduction takes one (γ, β1); groups that differ in them (rare) get their corrections computed first."""
        fused = None if self.fused is not False else False
        settings = {(item.group["gamma"], item.group["betas"][0]) for item in items}
        if len(settings) == 1:
            (gamma, beta1), = settings
            return mars_clip_scale([g for item in items for g in item.grads],
                                   [p for item in items for p in item.state_list("prev_grad")],
                                   gamma=gamma, beta1=beta1, max_norm=limit, fused=fused)
        return clip_scale(self.clip_tensors(items), limit, fused=fused)
