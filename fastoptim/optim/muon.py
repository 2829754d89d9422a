"""Muon and Scion: orthogonalised momentum for hidden matrices, an elementwise optimizer for everything else.

benchmark-spec §1.7 (Muon) and §1.8 (Scion). Built from an nn.Module, the paper's routing sends hidden matrices
(q/k/v/o, gate/up/down) to the matrix branch and embeddings, the head, norms and biases to the elementwise branch
(AdamW for Muon, signum for Scion), whose learning rate is lr × its ratio and which alone is clipped. Built from
tensors or param groups (torch convention), tensors with ≥ 2 dims go to the matrix branch and the rest to the
elementwise branch; a group may name its branch explicitly (``{"params": ..., "branch": "adamw"}``).
"""

import math
from collections import defaultdict

import torch

from fastoptim.optim.base import (
    COMMON_HPARAM_RULES,
    BaseOptimizer,
    GroupWork,
    check_beta,
    check_nonnegative,
    check_positive_int,
    decay_of,
)

SCALES = ("spectral", "moonlight")


def _check_ns_steps(value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "must be an integer ≥ 0"
    return None


def _check_scale(value):
    return None if value in SCALES else f"must be one of {SCALES}"


def _check_nesterov(value):
    return None if isinstance(value, bool) else "must be True or False"


def shape_scale(shape: torch.Size, scale: str) -> float:
    """The update's shape factor for a (d_out, rest...) parameter: √max(1, d_out/d_in), or Moonlight's
    0.2·√max(d_out, d_in) that matches AdamW's update RMS."""
    d_out, d_in = shape[0], math.prod(shape[1:])
    if scale == "spectral":
        return math.sqrt(max(1.0, d_out / d_in))
    return 0.2 * math.sqrt(max(d_out, d_in))


class _OrthogonalizedMomentum(BaseOptimizer):
    """The shared machinery: the split, the matrix branch, and the clipped elementwise branch."""

    matrix_branch: str
    elementwise_branch: str
    eps_key: str  # the option name of the Newton–Schulz eps ("muon_eps" / "scion_eps")
    ratio_key: str  # the option name of the elementwise branch's lr ratio
    ema: bool  # Scion's EMA momentum instead of Muon's undampened one

    def branch_of(self, kind: str) -> str:
        return self.matrix_branch if kind == "matrix" else self.elementwise_branch

    def state_shapes(self, group, param):
        if group["branch"] == self.matrix_branch:
            return {"momentum_buffer": param.shape}
        return self.elementwise_state_shapes(param)

    def prepare_step(self):
        # A 1-D tensor routed to the matrix branch by hand is an input error: report it before any state exists.
        for index, group in enumerate(self.param_groups):
            if group["branch"] not in (self.matrix_branch, self.elementwise_branch):
                raise ValueError(f"param_groups[{index}]: branch {group['branch']!r} is not one of "
                                 f"{self.matrix_branch!r}, {self.elementwise_branch!r}")
            if group["branch"] == self.matrix_branch:
                for position, p in enumerate(group["params"]):
                    if p.grad is not None and p.ndim < 2:
                        raise ValueError(f"{self.param_label(group, index, position)}: the {self.matrix_branch} "
                                         f"branch needs ≥ 2 dims; route it to {self.elementwise_branch!r}")
        return super().prepare_step()

    def update(self, work: list[GroupWork]) -> None:
        scales = self.clip_scales(work)
        for item in work:
            if not item.params:
                continue
            if item.group["branch"] == self.matrix_branch:
                self._matrix_update(item)
            else:
                self.elementwise_update(item, scales.get(item.index))

    def _matrix_update(self, item: GroupWork) -> None:
        group = item.group
        by_shape = defaultdict(list)
        for i, p in enumerate(item.params):
            by_shape[(p.shape, p.dtype, p.device)].append(i)
        for (shape, _, _), idx in by_shape.items():
            params = [item.params[i] for i in idx]
            momentum = self.functional("momentum", params)
            directions = momentum([item.grads[i] for i in idx], [item.states[i]["momentum_buffer"] for i in idx],
                                  beta=group["momentum"], nesterov=group.get("nesterov", False), ema=self.ema)
            stacked = torch.stack([d.reshape(shape[0], -1) for d in directions]).float()
            newton_schulz = self.functional("newton_schulz", params)
            ortho = newton_schulz(stacked, group["ns_steps"], group[self.eps_key])
            ortho.mul_(shape_scale(shape, group.get("scale", "spectral")))
            apply_update = self.functional("apply_update", params)
            apply_update(params, [o.view_as(p).to(p.dtype) for p, o in zip(params, ortho)], lr=group["lr"],
                         weight_decay=decay_of(group))

    def elementwise_state_shapes(self, param):
        raise NotImplementedError

    def elementwise_update(self, item: GroupWork, clip_scale) -> None:
        raise NotImplementedError


class Muon(_OrthogonalizedMomentum):
    """Muon (benchmark-spec §1.7): Newton–Schulz-orthogonalised momentum for hidden matrices, AdamW for the rest.

    Matrix branch, per 2-D weight (d_out, d_in) (parameters with more dims are treated as (d_out, rest)):
    buf ← β·buf + g; u = β·buf + g (Nesterov) or buf; X = u/(‖u‖_F + muon_eps), transposed when tall;
    ns_steps quintic Newton–Schulz steps with (a, b, c) = (3.4445, −4.7750, 2.0315); then
    w ← w − lr·(s·X + λ·w) with s = √max(1, d_out/d_in) ("spectral") or 0.2·√max(d_out, d_in) ("moonlight").
    Never clipped.

    AdamW branch (embeddings, lm_head, norms, biases): AdamW with bias correction at lr·adam_lr_ratio, the same
    betas, eps and weight decay (not applied to embeddings, norms and biases); clipped to max_grad_norm by the
    global norm of this branch's gradients only.

    Args:
        params: an nn.Module (the paper's split and decay mask) or tensors / param groups.
        lr: matrix-branch learning rate (default 0.02).
        momentum: β of the matrix branch (default 0.95).
        nesterov: Nesterov momentum on the matrix branch (default True).
        ns_steps: Newton–Schulz steps (default 5; the paper's sweep probably ran 10, see the spec).
        muon_eps: ε of the Frobenius normalisation (default 1e-7).
        betas: AdamW (β1, β2) (default (0.9, 0.98)).
        eps: AdamW ε (default 1e-8).
        weight_decay: decoupled decay λ for both branches (default 0.1).
        max_grad_norm: global-norm clip of the AdamW branch, 0 = off (default 1.0).
        adam_lr_ratio: AdamW lr / matrix lr (the spec's muon_to_adam_lr; default 0.2).
        scale: "spectral" (default) or "moonlight" shape scaling.
        fused, check_finite, overrides: see BaseOptimizer.
    """

    matrix_branch, elementwise_branch = "muon", "adamw"
    eps_key, ratio_key, ema = "muon_eps", "adam_lr_ratio", False
    families = ("momentum", "newton_schulz", "apply_update", "adam")
    clipped_branches = frozenset({"adamw"})
    hparam_rules = {
        **COMMON_HPARAM_RULES,
        "momentum": check_beta,
        "nesterov": _check_nesterov,
        "ns_steps": _check_ns_steps,
        "muon_eps": check_nonnegative,
        "adam_lr_ratio": check_nonnegative,
        "scale": _check_scale,
    }

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, muon_eps=1e-7,
                 betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1, max_grad_norm=1.0, adam_lr_ratio=0.2,
                 scale="spectral", *, fused=None, check_finite=False, overrides=None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, muon_eps=muon_eps,
                        betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        adam_lr_ratio=adam_lr_ratio, scale=scale)
        super().__init__(params, defaults, fused=fused, check_finite=check_finite, overrides=overrides)

    def elementwise_state_shapes(self, param):
        return {"step": (), "exp_avg": param.shape, "exp_avg_sq": param.shape}

    def elementwise_update(self, item, clip_scale):
        group = item.group
        beta1, beta2 = group["betas"]
        adamw = self.functional("adam", item.params)
        adamw(item.params, item.grads, item.state_list("exp_avg"), item.state_list("exp_avg_sq"),
              item.state_list("step"), lr=group["lr"] * group["adam_lr_ratio"], beta1=beta1, beta2=beta2,
              eps=group["eps"], weight_decay=decay_of(group), grad_scale=clip_scale)


class Scion(_OrthogonalizedMomentum):
    """Scion (benchmark-spec §1.8): Muon's split with EMA momentum on matrices and signum for the rest.

    Scion branch, per matrix: buf ← β·buf + (1−β)·g (no Nesterov); Newton–Schulz as Muon with scion_eps and
    ns_steps (default 10); w ← w − lr·(√max(1, d_out/d_in)·X + λ·w). Never clipped.

    Signum branch (embeddings, lm_head, norms, biases): clip (global norm over this branch), then
    buf ← β1·buf + (1−β1)·g; w ← w − lr·signum_lr_ratio·(sign(buf) + λ·w).

    Args:
        params: an nn.Module (the paper's split and decay mask) or tensors / param groups.
        lr: Scion-branch learning rate (default 0.02).
        momentum: β of the Scion branch (default 0.95).
        ns_steps: Newton–Schulz steps (default 10, as Levanter's Scion).
        scion_eps: ε of the Frobenius normalisation (default 1e-7).
        betas: (β1, β2); β1 is the signum momentum, β2 is unused and accepted so that the flat beta1/beta2 keys of
            the benchmark's configs apply (default (0.95, 0.98)).
        weight_decay: decoupled decay λ for both branches (default 0.1).
        max_grad_norm: global-norm clip of the signum branch, 0 = off (default 1.0).
        signum_lr_ratio: signum lr / Scion lr (the spec's scion_to_signum_lr; default 0.1).
        fused, check_finite, overrides: see BaseOptimizer.
    """

    matrix_branch, elementwise_branch = "scion", "signum"
    eps_key, ratio_key, ema = "scion_eps", "signum_lr_ratio", True
    families = ("momentum", "newton_schulz", "apply_update", "signum")
    clipped_branches = frozenset({"signum"})
    hparam_rules = {
        **COMMON_HPARAM_RULES,
        "momentum": check_beta,
        "ns_steps": _check_ns_steps,
        "scion_eps": check_nonnegative,
        "signum_lr_ratio": check_nonnegative,
    }

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=10, scion_eps=1e-7, betas=(0.95, 0.98),
                 weight_decay=0.1, max_grad_norm=1.0, signum_lr_ratio=0.1, *, fused=None, check_finite=False,
                 overrides=None):
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, scion_eps=scion_eps, betas=betas,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm, signum_lr_ratio=signum_lr_ratio)
        super().__init__(params, defaults, fused=fused, check_finite=check_finite, overrides=overrides)

    def elementwise_state_shapes(self, param):
        return {"momentum_buffer": param.shape}

    def elementwise_update(self, item, clip_scale):
        group = item.group
        signum = self.functional("signum", item.params)
        signum(item.params, item.grads, item.state_list("momentum_buffer"),
               lr=group["lr"] * group["signum_lr_ratio"], beta=group["betas"][0], weight_decay=decay_of(group),
               grad_scale=clip_scale)
