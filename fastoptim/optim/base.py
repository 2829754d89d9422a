"""The base every fastoptim optimizer stands on: construction, validation, clipping and the fused switch.

A subclass declares its defaults, its state (``state_shapes``) and its update (``update``); the base does the rest
of a step, in an order that keeps bad input harmless:

1. ``prepare_step`` checks every group's hyperparameters, every gradient and every existing state tensor, and
   (optionally) that the gradients are finite. Any error is raised here, naming the parameter, before anything is
   written. Only then is state created for parameters that have none. Zero-size parameters are skipped.
2. ``update(work)`` (the subclass) computes clip scales with ``clip_scales`` where the spec puts the clip and calls
   its family's functional entries (fastoptim.optim.functional.<family>), passing ``fused=self.fused``; each entry
   picks the native kernel or the pure-torch core with one visible condition and updates parameters and state in
   place.

Hyperparameters live in param groups (torch convention); a group built from an nn.Module also carries
``names``, ``branch`` and ``weight_decay_mask`` (see routing.param_groups). Weight decay applies only where
``weight_decay_mask`` is True (the default for groups given as tensors), as ``w ← w − lr·(u + λ·w)``.

Step counters (state["step"], 0-dim float32) live on the parameter's device, so that the kernels read them there and
a step can be captured in a CUDA graph; optimizers whose schedule is decided on the host keep them on the CPU
(``host_steps``).
"""

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fastoptim import ops
from fastoptim.optim.functional.common import clip_scale
from fastoptim.optim.routing import param_groups

# Group keys that are not optimizer options: set by routing, by torch (param_names) or by LR schedulers.
GROUP_META_KEYS = frozenset({"params", "names", "branch", "weight_decay_mask", "param_names", "initial_lr"})


def _is_real_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_lr(value) -> str | None:
    """A python float or a 0-dim floating tensor (for graph capture); finite and ≥ 0.

    A tensor's value is checked only while it lives on the CPU: reading a device tensor would synchronise.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            return f"must be a float or a 0-dim floating tensor, got shape {tuple(value.shape)}, {value.dtype}"
        if value.device.type != "cpu":
            return None
        value = value.item()
    elif not _is_real_number(value):
        return f"must be a float or a 0-dim tensor, got {type(value).__name__}"
    if not math.isfinite(value) or value < 0:
        return "must be finite and ≥ 0"
    return None


def check_max_norm(value) -> str | None:
    if value is None:
        return None
    if not _is_real_number(value) or not math.isfinite(value) or value < 0:
        return "must be None (no clipping) or a finite number ≥ 0"
    return None


def check_nonnegative(value) -> str | None:
    if not _is_real_number(value) or not math.isfinite(value) or value < 0:
        return "must be a finite number ≥ 0"
    return None


def check_positive(value) -> str | None:
    if not _is_real_number(value) or not math.isfinite(value) or value <= 0:
        return "must be a finite number > 0"
    return None


def check_positive_int(value) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return "must be an integer ≥ 1"
    return None


def check_beta(value) -> str | None:
    if not _is_real_number(value) or not 0 <= value < 1:
        return "must be a number in [0, 1)"
    return None


def check_betas(value) -> str | None:
    if not isinstance(value, (tuple, list)) or not all(_is_real_number(b) and 0 <= b < 1 for b in value):
        return "must be a tuple of numbers, each in [0, 1)"
    return None


# Rules for the option names shared by the optimizers; subclasses extend ``hparam_rules`` with their own.
COMMON_HPARAM_RULES: Mapping[str, Callable] = {
    "lr": check_lr,
    "betas": check_betas,
    "eps": check_nonnegative,
    "weight_decay": check_nonnegative,
    "max_grad_norm": check_max_norm,
}


def decay_of(group: Mapping) -> float:
    """The group's weight decay where its mask allows decay, else 0."""
    return group["weight_decay"] if group.get("weight_decay_mask", True) else 0.0


@dataclass(frozen=True)
class RowShard:
    """A parameter that holds rows [first, first + its rows) of a whole tensor of `shape`, split over ranks."""

    shape: torch.Size
    first: int


@dataclass
class GroupWork:
    """One param group's share of a step: its parameters that have gradients, in group order."""

    group: dict
    index: int
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: list[dict]
    positions: list[int]  # each parameter's place in group["params"], for error messages

    def state_list(self, key: str) -> list[torch.Tensor]:
        return [s[key] for s in self.states]


class BaseOptimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer plus fastoptim's conventions; see the module docstring.

    Args (keyword-only, shared by every subclass):
        fused: None (default) runs each family's native kernels where they take its tensors, else pure torch; True
            requires the native kernels (a clear error naming the op otherwise, at construction where the parameters
            already tell); False always runs pure torch.
        check_finite: False (default), "warn" or "raise"/True: look for NaN/inf gradients before each step (one
            host sync) and warn, or raise before anything is written, naming the parameters.
        overrides: for an nn.Module, glob patterns over parameter names → kind (routing.named_kinds).
    """

    hparam_rules: Mapping[str, Callable] = COMMON_HPARAM_RULES
    # The benchmark's flat hyperparameter names (grid presets, paper_hparams) that differ from the constructor's:
    # name → argument, or (argument, index) for one entry of a tuple argument.
    flat_keys: Mapping[str, str | tuple[str, int]] = {"beta1": ("betas", 0), "beta2": ("betas", 1)}
    # The torch.ops.fastoptim ops this optimizer's native path calls; fused=True checks them at construction.
    native_ops: tuple[str, ...] = ()
    # Whether state["step"] stays on the CPU (a schedule decided on the host) instead of the parameter's device.
    host_steps: bool = False
    # Capabilities the trainer reads instead of optimizer names:
    # which branches max_grad_norm clips (None: every group; split optimizers clip their elementwise branch only);
    clipped_branches: frozenset[str] | None = None
    # the branches whose update of each row (dim-0 slice) of a parameter reads only that row, its rows of the state,
    # the global clip factor and per-tensor means that whole_tensor_means sums over ranks, so that row shards step on
    # their own (ZeRO-1 and FSDP2 split them over ranks; a state tensor has a row per parameter row: shaped like it,
    # or one value per row; see row_axes);
    row_local_branches: frozenset[str] = frozenset()
    # whether a step needs a Hessian-vector product (``update_hessian(loss)`` on the steps where ``hessian_due``);
    needs_hvp: bool = False
    # whether a whole step() can be captured in a CUDA graph and replayed (given lr as a device tensor): no host read
    # of a device value and the same kernels every step.
    capturable: bool = True
    # Set by a wrapper that steps each rank's share of the parameters (fastoptim.optim.distributed): the clip factor
    # per max_grad_norm from the global norm over every rank's share. None: this process holds every clipped tensor.
    global_clip_scales: Mapping[float, torch.Tensor] | None = None
    # Set likewise while parameters step as row shards: (a group's work, this rank's int64 count per tensor of it) →
    # the float32 mean of each count over the whole tensor, every rank's rows summed (Cautious's mask mean). It is a
    # collective: every rank calls it once per group and step. None: each tensor is whole in this process.
    whole_tensor_means: Callable[["GroupWork", torch.Tensor], torch.Tensor] | None = None
    # Set likewise: sum or max a tensor over the ranks in place (Soap's and Kron's sums over the rows of a
    # row-sharded tensor). Collectives: every rank calls them alike. None: each tensor is whole in this process.
    sum_over_ranks: Callable[[torch.Tensor], None] | None = None
    max_over_ranks: Callable[[torch.Tensor], None] | None = None

    def __init__(self, params, defaults: dict, *, fused=None, check_finite=False, overrides=None, **unknown):
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown option(s) {', '.join(map(repr, sorted(unknown)))}; its options are "
                f"{', '.join(sorted(defaults))}, fused, check_finite, overrides"
            )
        if fused not in (None, True, False):
            raise ValueError(f"fused: expected None, True or False, got {fused!r}")
        if check_finite not in (False, True, "warn", "raise"):
            raise ValueError(f"check_finite: expected False, True, 'warn' or 'raise', got {check_finite!r}")
        self.fused = fused
        self.check_finite = "raise" if check_finite is True else check_finite
        # A row shard in the param groups (placed there by ZeRO-1 or FSDP2's stepping) → which rows of which whole
        # shape it is, for optimizers whose state layout or noise depends on it (Soap's and Kron's blocks).
        self.shard_of: dict[torch.Tensor, RowShard] = {}
        super().__init__(param_groups(params, self.branch_of, overrides), defaults)
        if fused:
            self.check_native([p for g in self.param_groups for p in g["params"]])

    def check_native(self, params: list[torch.Tensor]) -> None:
        """fused=True: raise now, naming the op, if a native op of this optimizer cannot take these parameters."""
        for op in self.native_ops:
            ops.use_native(True, op, params)

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def branch_of(cls, kind: str) -> str:
        """The branch a parameter kind goes to (routing.KINDS); split optimizers override it."""
        return "default"

    @classmethod
    def clips_kind(cls, kind: str) -> bool:
        """Whether max_grad_norm's global norm covers parameters of this routing kind."""
        return cls.clipped_branches is None or cls.branch_of(kind) in cls.clipped_branches

    def add_param_group(self, param_group: dict) -> None:
        index = len(self.param_groups)
        unknown = sorted(set(param_group) - set(self.defaults) - GROUP_META_KEYS)
        if unknown:
            raise ValueError(
                f"param_groups[{index}]: unknown option(s) {', '.join(map(repr, unknown))} for "
                f"{type(self).__name__}; its options are {', '.join(sorted(self.defaults))}"
            )
        if "branch" not in param_group:  # a group added after construction: route it like the constructor does
            for routed in param_groups([param_group], self.branch_of):
                self.add_param_group(routed)
            return
        param_group.setdefault("weight_decay_mask", True)
        self._check_hparams({**self.defaults, **param_group}, index)  # before the group joins the optimizer
        super().add_param_group(param_group)

    def _check_hparams(self, group: dict, index: int) -> None:
        for key, rule in self.hparam_rules.items():
            if key in group and (problem := rule(group[key])) is not None:
                raise ValueError(f"{self._group_label(group, index)}: {key}={group[key]!r} {problem}")

    # ---- naming ----------------------------------------------------------------------------------------------
    def _group_label(self, group: dict, index: int) -> str:
        return f"param_groups[{index}] (branch {group.get('branch', 'default')!r})"

    def param_label(self, group: dict, index: int, position: int) -> str:
        """How errors name a parameter: its module path when known, else its place in the groups."""
        names = group.get("names")
        shape = tuple(group["params"][position].shape)
        if names and position < len(names):
            return f"parameter {names[position]!r} (shape {shape})"
        return f"param_groups[{index}]['params'][{position}] (shape {shape})"

    # ---- state -----------------------------------------------------------------------------------------------
    def state_shapes(self, group: dict, param: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """Every state tensor of `param` and its shape. Key "step" is the step count: a 0-dim float32 CPU tensor;
        other tensors have the parameter's dtype and device and start at zero."""
        raise NotImplementedError

    def row_axes(self, group: dict, param: torch.Tensor) -> dict[str, int | None] | None:
        """How `param` steps as row shards (ZeRO-1 and FSDP2 then split it over the ranks by rows): for each state
        tensor but the step counter, its axis that holds one entry per parameter row, or None for a tensor that
        every rank holds whole and alike (sum_over_ranks keeps it so). None: the parameter steps whole, on one
        owner. Here: the row-local branches, whose state tensors are shaped like the parameter or hold one value
        per row."""
        if group["branch"] not in self.row_local_branches or param.ndim == 0 or not param.numel():
            return None
        shapes = self.state_shapes(group, param)
        rows = (tuple(param.shape), (param.shape[0],))
        if not all(key == "step" or tuple(shape) in rows for key, shape in shapes.items()):
            return None
        return {key: 0 for key in shapes if key != "step"}

    def check_row_shards(self, work: list[GroupWork]) -> None:
        """Raise, naming the parameter, if a row shard (shard_of) would step without the collectives that sum its
        whole tensor's statistics over the ranks: outside ZeroRedundancy or OwnerStepper's step."""
        if self.sum_over_ranks is not None and self.max_over_ranks is not None:
            return
        for item in work:
            for param, position in zip(item.params, item.positions):
                if param in self.shard_of:
                    raise RuntimeError(
                        f"{type(self).__name__}: {self.param_label(item.group, item.index, position)} is rows of a "
                        f"{tuple(self.shard_of[param].shape)} tensor, whose statistics sum over the ranks, but no "
                        f"sum_over_ranks is set: step row shards through ZeroRedundancy or OwnerStepper")

    def step_device(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.host_steps else param.device

    def init_state(self, group: dict, param: torch.Tensor) -> dict:
        return {
            key: torch.zeros((), dtype=torch.float32, device=self.step_device(param))
            if key == "step"
            else torch.zeros(shape, dtype=param.dtype, device=param.device)
            for key, shape in self.state_shapes(group, param).items()
        }

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # torch keeps a loaded "step" where it was saved (usually the CPU); ours belong beside their parameters.
        for group in self.param_groups:
            for param in group["params"]:
                step = self.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor):
                    self.state[param]["step"] = step.to(device=self.step_device(param), dtype=torch.float32)

    def check_state(self, group: dict, param: torch.Tensor, state: dict, label: str) -> None:
        """Raise if an existing state does not fit `param` (a state loaded for another model, a moved parameter)."""
        for key, shape in self.state_shapes(group, param).items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{label}: state[{key!r}] is missing or not a tensor")
            if key == "step":
                if value.ndim != 0:
                    raise ValueError(f"{label}: state['step'] must be a 0-dim tensor, got shape {tuple(value.shape)}")
                continue
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{label}: state[{key!r}] has shape {tuple(value.shape)}, expected {tuple(shape)}")
            if value.device != param.device or value.dtype != param.dtype:
                raise ValueError(
                    f"{label}: state[{key!r}] is {value.dtype} on {value.device} but the parameter is "
                    f"{param.dtype} on {param.device}; move the optimizer state with the parameter"
                )

    # ---- a step ----------------------------------------------------------------------------------------------
    def check_grad(self, param: torch.Tensor, grad: torch.Tensor, label: str) -> None:
        if grad.is_sparse or grad.layout != torch.strided:
            raise ValueError(f"{label}: sparse gradients are not supported ({type(self).__name__})")
        if grad.is_complex() or param.is_complex():
            raise ValueError(f"{label}: complex parameters or gradients are not supported")
        if not param.is_floating_point():
            raise ValueError(f"{label}: parameter dtype {param.dtype} is not floating point")
        if grad.shape != param.shape or grad.dtype != param.dtype or grad.device != param.device:
            raise ValueError(
                f"{label}: gradient is {grad.dtype} {tuple(grad.shape)} on {grad.device} but the parameter is "
                f"{param.dtype} {tuple(param.shape)} on {param.device}"
            )

    def prepare_step(self) -> list[GroupWork]:
        """Check everything, then create missing state; return each group's parameters that have gradients."""
        work = []
        for index, group in enumerate(self.param_groups):
            self._check_hparams(group, index)
            item = GroupWork(group, index, [], [], [], [])
            for position, param in enumerate(group["params"]):
                if param.grad is None or param.numel() == 0:  # nothing to update in a zero-size parameter
                    continue
                label = self.param_label(group, index, position)
                self.check_grad(param, param.grad, label)
                if self.state.get(param):
                    self.check_state(group, param, self.state[param], label)
                item.params.append(param)
                item.grads.append(param.grad)
                item.positions.append(position)
            work.append(item)
        if self.check_finite:
            self._check_finite(work)
        for item in work:
            for param in item.params:
                if not self.state.get(param):
                    self.state[param] = self.init_state(item.group, param)
            item.states = [self.state[p] for p in item.params]
        return work

    def _check_finite(self, work: list[GroupWork]) -> None:
        flags = [torch.isfinite(g).all() for item in work for g in item.grads]
        if not flags:
            return
        finite = torch.stack([f.cpu() for f in flags]).tolist()
        labels = [self.param_label(item.group, item.index, pos) for item in work for pos in item.positions]
        bad = [label for label, ok in zip(labels, finite) if not ok]
        if bad:
            message = f"non-finite gradient in {', '.join(bad)}"
            if self.check_finite == "raise":
                raise FloatingPointError(message + "; nothing was updated")
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def clip_scales(self, work: list[GroupWork], tensors_of=None) -> dict[int, torch.Tensor | None]:
        """Global-norm clip scale per group index (None: not clipped).

        The norm runs over the clipped branches' tensors (``tensors_of(item)``, by default the gradients); groups
        that share a max_grad_norm share one global norm, so the usual single value clips the whole set together.
        """
        tensors_of = tensors_of or (lambda item: item.grads)
        scales = {}
        for limit, items in self.clip_sets(work).items():
            # The native reduction wherever it takes the tensors, also under fused=True: the clip is not one of the
            # optimizer's own ops, and either path gives the same factor up to float rounding.
            if self.global_clip_scales is not None:
                scale = self.global_clip_scales[limit]
            else:
                scale = clip_scale([t for item in items for t in tensors_of(item)], limit,
                                   fused=None if self.fused is not False else False)
            scales.update((item.index, scale) for item in items)
        return scales

    def clip_tensors(self, items: list[GroupWork]) -> list[torch.Tensor]:
        """The tensors of one clip set whose global norm max_grad_norm bounds (a sharded step sums their squares over
        ranks): the gradients; an optimizer that clips something else says so here."""
        return [g for item in items for g in item.grads]

    def clip_sets(self, work: list[GroupWork]) -> dict[float, list[GroupWork]]:
        """The clipped groups by their max_grad_norm: each set shares one global norm (off: None or 0)."""
        by_limit: dict[float, list[GroupWork]] = {}
        for item in work:
            limit = item.group.get("max_grad_norm")
            if limit and (self.clipped_branches is None or item.group["branch"] in self.clipped_branches):
                by_limit.setdefault(limit, []).append(item)
        return by_limit

    def update(self, work: list[GroupWork]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update(self.prepare_step())
        return loss

