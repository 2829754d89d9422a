"""Muon and Scion: orthogonalised momentum for hidden matrices, an elementwise optimizer for everything else.

benchmark-spec §1.7 (Muon) and §1.8 (Scion). Built from an nn.Module, the paper's routing sends hidden matrices
(q/k/v/o, gate/up/down) to the matrix branch and embeddings, the head, norms and biases to the elementwise branch
(AdamW for Muon, signum for Scion), whose learning rate is lr × its ratio and which alone is clipped. Built from
tensors or param groups (torch convention), tensors with ≥ 2 dims go to the matrix branch and the rest to the
elementwise branch; a group may name its branch explicitly (``{"params": ..., "branch": "adamw"}``).

Both are capturable in a CUDA graph (pass lr as a device tensor), as are their elementwise branches.
"""

import math
from collections import defaultdict

import torch

from fastoptim.optim.base import COMMON_HPARAM_RULES, BaseOptimizer, GroupWork, check_beta, check_nonnegative, decay_of
from fastoptim.optim.functional.adam import adam_
from fastoptim.optim.functional.momentum import signum_
from fastoptim.optim.functional.newton_schulz import NS_COEFFICIENTS, orthogonalized_step_

# torch.optim.Muon's names for the update's shape factor of a (d_out, d_in) matrix.
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_ns_steps(value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "must be an integer ≥ 0"
    return None


def _check_adjust_lr_fn(value):
    return None if value in ADJUST_LR_FNS else f"must be one of {ADJUST_LR_FNS}"


def _check_flag(value):
    return None if isinstance(value, bool) else "must be True or False"


def _check_coefficients(value):
    if not (isinstance(value, (tuple, list)) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        return "must be three finite numbers (a, b, c)"
    return None


def _check_ns_dtype(value):
    if value in NS_DTYPES or value in NS_DTYPES.values():
        return None
    return "must be None (the device's fast dtype) or torch.float32, bfloat16 or float16 (or its name)"


def shape_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """The update's shape factor for a (d_out, rest...) parameter: √max(1, d_out/d_in) ("original", the default),
    or Moonlight's 0.2·√max(d_out, d_in) that matches AdamW's update RMS ("match_rms_adamw")."""
    d_out, d_in = shape[0], math.prod(shape[1:])
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(d_out, d_in))
    return math.sqrt(max(1.0, d_out / d_in))


class _OrthogonalizedMomentum(BaseOptimizer):
    """The shared machinery: the split, the matrix branch, and the clipped elementwise branch."""

    matrix_branch: str
    elementwise_branch: str
    ns_eps_key: str  # the option name of the Newton–Schulz eps
    ema: bool  # Scion's EMA momentum instead of Muon's undampened one

    @classmethod
    def branch_of(cls, kind: str) -> str:
        return cls.matrix_branch if kind == "matrix" else cls.elementwise_branch

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
            if item.group["branch"] == self.matrix_branch:
                self._matrix_update(item)
            else:
                self.elementwise_update(item, scales.get(item.index))

    def _matrix_update(self, item: GroupWork) -> None:
        group = item.group
        by_shape = defaultdict(list)  # same shape, dtype and device: one batched Newton–Schulz
        for i, p in enumerate(item.params):
            by_shape[(p.shape, p.dtype, p.device)].append(i)
        for (shape, _, _), idx in by_shape.items():
            orthogonalized_step_(
                [item.params[i] for i in idx], [item.grads[i] for i in idx],
                [item.states[i]["momentum_buffer"] for i in idx], lr=group["lr"], beta=group["momentum"],
                nesterov=group.get("nesterov", False), ema=self.ema, steps=group["ns_steps"],
                eps=group[self.ns_eps_key], weight_decay=decay_of(group),
                scale=shape_scale(shape, group.get("adjust_lr_fn")),
                coefficients=group.get("ns_coefficients", NS_COEFFICIENTS),
                ns_dtype=NS_DTYPES.get(group["ns_dtype"], group["ns_dtype"]),  # a name or the dtype itself
                fused=self.fused)

    def elementwise_state_shapes(self, param):
        raise NotImplementedError

    def elementwise_update(self, item: GroupWork, clip_scale) -> None:
        raise NotImplementedError


class Muon(_OrthogonalizedMomentum):
    """Muon (benchmark-spec §1.7): Newton–Schulz-orthogonalised momentum for hidden matrices, AdamW for the rest.

    A drop-in for torch.optim.Muon: its arguments (lr, weight_decay, momentum, nesterov, ns_coefficients, eps,
    ns_steps, adjust_lr_fn) mean what they mean there, with its defaults, and on 2-D parameters give its result
    within the rounding of the Newton–Schulz dtype.

    Matrix branch, per 2-D weight (d_out, d_in) (parameters with more dims are treated as (d_out, rest)):
    buf ← β·buf + g; u = β·buf + g (Nesterov) or buf; X = u/(‖u‖_F + eps), transposed when tall;
    ns_steps quintic Newton–Schulz steps X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ; then w ← w − lr·(s·X + λ·w) with
    s = √max(1, d_out/d_in) ("original") or 0.2·√max(d_out, d_in) ("match_rms_adamw"). Never clipped.
    torch's EMA momentum (buf ← β·buf + (1−β)·g) is this heavy-ball buffer times (1−β): the normalisation makes
    the two the same step.

    AdamW branch (embeddings, lm_head, norms, biases; empty for a list of matrices): AdamW with bias correction at
    lr·adam_lr_ratio, adam_betas and adam_eps, the same weight decay (not applied to embeddings, norms and biases
    when built from a module); clipped to max_grad_norm by the global norm of this branch's gradients only.

    Args:
        params: torch params/groups, or an nn.Module (the paper's split and decay mask).
        lr: 1e-3. weight_decay: 0.1. momentum: 0.95. nesterov: True. ns_coefficients: (3.4445, −4.775, 2.0315).
        eps: 1e-7 (of the Frobenius normalisation). ns_steps: 5. adjust_lr_fn: None (= "original") or
            "match_rms_adamw" — all torch.optim.Muon's defaults.
        adam_lr_ratio: AdamW-branch lr / lr (the spec's muon_to_adam_lr), 0.2. adam_betas: (0.9, 0.999).
            adam_eps: 1e-8 (torch.optim.AdamW's). max_grad_norm: None (no clipping of the AdamW branch).
        ns_dtype: the iteration dtype: None (default) picks bfloat16 where the hardware multiplies it natively
            (GPUs; CPUs with AVX512-BF16/AMX), else float32 (functional.newton_schulz.default_ns_dtype); or
            torch.float32 / bfloat16 / float16, or its name ("float32", as a config file or the CLI gives it).
        fused, check_finite, overrides: see BaseOptimizer.
    """

    matrix_branch, elementwise_branch = "muon", "adamw"
    ns_eps_key, ema = "eps", False
    native_ops = ("newton_schulz_momentum_", "newton_schulz", "decoupled_update_", "adamw_")
    clipped_branches = frozenset({"adamw"})
    row_local_branches = frozenset({"adamw"})
    # The benchmark's flat hyperparameter names (grid presets, paper_hparams) that differ from the arguments.
    flat_keys = {"muon_eps": "eps", "eps": "adam_eps", "beta1": ("adam_betas", 0), "beta2": ("adam_betas", 1)}
    hparam_rules = {
        **COMMON_HPARAM_RULES,
        "momentum": check_beta,
        "nesterov": _check_flag,
        "ns_coefficients": _check_coefficients,
        "ns_steps": _check_ns_steps,
        "adjust_lr_fn": _check_adjust_lr_fn,
        "adam_lr_ratio": check_nonnegative,
        "adam_betas": COMMON_HPARAM_RULES["betas"],
        "adam_eps": check_nonnegative,
        "ns_dtype": _check_ns_dtype,
    }

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None, *, adam_lr_ratio=0.2,
                 adam_betas=(0.9, 0.999), adam_eps=1e-8, max_grad_norm=None, ns_dtype=None, fused=None,
                 check_finite=False, overrides=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        adam_lr_ratio=adam_lr_ratio, adam_betas=adam_betas, adam_eps=adam_eps,
                        max_grad_norm=max_grad_norm, ns_dtype=ns_dtype)
        super().__init__(params, defaults, fused=fused, check_finite=check_finite, overrides=overrides)

    def elementwise_state_shapes(self, param):
        return {"step": (), "exp_avg": param.shape, "exp_avg_sq": param.shape}

    def elementwise_update(self, item, clip_scale):
        group = item.group
        beta1, beta2 = group["adam_betas"]
        adam_(item.params, item.grads, item.state_list("exp_avg"), item.state_list("exp_avg_sq"),
              item.state_list("step"), lr=group["lr"] * group["adam_lr_ratio"], beta1=beta1, beta2=beta2,
              eps=group["adam_eps"], weight_decay=decay_of(group), grad_scale=clip_scale, fused=self.fused)


class Scion(_OrthogonalizedMomentum):
    """Scion (benchmark-spec §1.8): Muon's split with EMA momentum on matrices and signum for the rest.

    Scion branch, per matrix: buf ← β·buf + (1−β)·g (no Nesterov); Newton–Schulz as Muon with scion_eps and
    ns_steps; w ← w − lr·(√max(1, d_out/d_in)·X + λ·w). Never clipped.

    Signum branch (embeddings, lm_head, norms, biases): clip (global norm over this branch, if max_grad_norm is
    set), then buf ← β1·buf + (1−β1)·g; w ← w − lr·signum_lr_ratio·(sign(buf) + λ·w).

    Args (the benchmark's Scion, Levanter's, has no standalone reference implementation: the defaults are Muon's
    where they coincide and Levanter's where Scion differs):
        params: torch params/groups, or an nn.Module (the paper's split and decay mask).
        lr: 0.02 (Scion-branch learning rate). momentum: 0.95. ns_steps: 10 (Levanter's Scion).
        scion_eps: 1e-7 (of the Frobenius normalisation).
        betas: (β1, β2); β1 is the signum momentum, β2 is unused and accepted so that the flat beta1/beta2 keys of
            the benchmark's configs apply (default (0.95, 0.98)).
        weight_decay: 0.1 (both branches). max_grad_norm: None (no clipping of the signum branch).
        signum_lr_ratio: signum lr / Scion lr (the spec's scion_to_signum_lr), 0.1.
        ns_dtype: as Muon's.
        fused, check_finite, overrides: see BaseOptimizer.
    """

    matrix_branch, elementwise_branch = "scion", "signum"
    ns_eps_key, ema = "scion_eps", True
    native_ops = ("newton_schulz_momentum_", "newton_schulz", "decoupled_update_", "signum_")
    clipped_branches = frozenset({"signum"})
    row_local_branches = frozenset({"signum"})
    hparam_rules = {
        **COMMON_HPARAM_RULES,
        "momentum": check_beta,
        "ns_steps": _check_ns_steps,
        "scion_eps": check_nonnegative,
        "signum_lr_ratio": check_nonnegative,
        "ns_dtype": _check_ns_dtype,
    }

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=10, scion_eps=1e-7, betas=(0.95, 0.98),
                 weight_decay=0.1, max_grad_norm=None, signum_lr_ratio=0.1, *, ns_dtype=None, fused=None,
                 check_finite=False, overrides=None):
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, scion_eps=scion_eps, betas=betas,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm, signum_lr_ratio=signum_lr_ratio,
                        ns_dtype=ns_dtype)
        super().__init__(params, defaults, fused=fused, check_finite=check_finite, overrides=overrides)

    def elementwise_state_shapes(self, param):
        return {"momentum_buffer": param.shape}

    def elementwise_update(self, item, clip_scale):
        group = item.group
        signum_(item.params, item.grads, item.state_list("momentum_buffer"),
                lr=group["lr"] * group["signum_lr_ratio"], beta=group["betas"][0], weight_decay=decay_of(group),
                grad_scale=clip_scale, fused=self.fused)
