"""PSGD-Kron: momentum preconditioned by learned Kronecker factors, on blocks of every parameter (spec §1.9)."""

import hashlib
import math
from collections import defaultdict
from functools import lru_cache

import torch

from fastoptim.optim.base import (
    COMMON_HPARAM_RULES,
    BaseOptimizer,
    GroupWork,
    check_nonnegative,
    check_positive_int,
    decay_of,
)
from fastoptim.optim.functional.blocks import BlockLayout, concat, packed_state
from fastoptim.optim.functional.common import apply_update_
from fastoptim.optim.functional.kron import kron_balance_, kron_precondition, kron_update_preconditioner_

DAMPING = math.sqrt(torch.finfo(torch.float32).eps)  # √eps of float32 (bf16's is too large)
BLOCK_RMS_LIMIT = 1.1
BALANCE_EVERY = 100  # preconditioner updates between factor rebalancings


def _check_merge_target(value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "must be an integer ≥ 0 (0: no merging)"
    return None


def _check_probability(value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        return "must be a number in (0, 1]"
    return None


def _check_flag(value):
    return None if isinstance(value, bool) else "must be True or False"


def _check_step(value):
    if not isinstance(value, int) or isinstance(value, bool):
        return "must be an integer"
    return None


@lru_cache(maxsize=None)
def kron_layout(shape: tuple[int, ...], block_size: int, merge_dims_target: int,
                max_size_triangular: int) -> BlockLayout:
    """Blocks of a parameter; a factor is diagonal for a 1-D parameter, a size-1 dim or a dim > max_size_triangular
    (decided on the parameter's own dims; a merged dim is diagonal when all its parts are)."""
    return BlockLayout.build(shape, block_size, merge_dims_target,
                             lambda s: [len(s) < 2 or d == 1 or d > max_size_triangular for d in s])


def update_probability(step: int, flat_start: int, p_min: float) -> float:
    """p_t = clip(exp(−0.001·(t − flat_start)), p_min, 1)."""
    return min(1.0, max(p_min, math.exp(-0.001 * (step - flat_start))))


def kron_noise_seed(seed: int, position: int, step: int) -> int:
    """The seed of the N(0, I) draw V of the parameter at `position` (its place in param-group order, torch's
    state_dict numbering) on optimizer step `step` (counted from 1): a hash, so that the draws are independent
    across parameters and steps, and that any rank stepping that parameter draws the same numbers."""
    digest = hashlib.blake2b(f"{seed}:{position}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Kron(BaseOptimizer):
    """PSGD-Kron (benchmark-spec §1.9), applied to every parameter.

    Layout: small adjacent dims merged towards `merge_dims_target`, dims cut into blocks of `block_size` (the last
    zero-padded), each block with its own Kronecker factors: upper triangular, or diagonal for 1-D parameters,
    size-1 dims and dims > `max_size_triangular`; initialised to init_scale^(1/ndim)·I in float32.

    Step t: (normalize_grads: g ← g/(‖g‖+1e-16) per tensor, and then no clipping; else the global-norm clip) →
    m ← β1 EMA of g, m̂ = m/(1−β1^t) → when the update counter reaches 1/p_t with
    p_t = clip(exp(−0.001·(t − precond_update_flat_start)), precond_update_prob_min, 1) (then it restarts), one
    preconditioner update fitted on m̂: draw V ~ N(0, I), damp G = m̂ + √eps_f32·mean|m̂|·V, A = Q·G,
    conjB = V·Q⁻¹, per factor the normalised triangular step (see functional.kron), and every 100 updates
    (before the update) the factor norms are balanced → u = (Q_1ᵀQ_1 ⊗ …)·m̂ with the updated factors →
    u ← u/max(1, rms(u)/1.1) per parameter → w ← w − lr·(u + λw).

    V is one N(0, I) draw of shape (num_blocks, *block) per parameter on update steps, from a generator seeded with
    ``kron_noise_seed(seed, position, step)``: a stream per parameter and step, so that under ZeRO-1 or FSDP2 the
    rank owning a parameter draws what one process would, and a resumed run what an uninterrupted one would (the
    seed, the step and the schedule's counters are in the state dict). The schedule advances once per step, at its
    first ``update`` (a sharded step updates group by group).

    Not capturable in one CUDA graph: whether a step updates the preconditioner is decided on the host.

    Under ZeRO-1 and FSDP2 a parameter whose axis 0 has a diagonal factor (the vocabulary) steps as row shards
    (``row_axes``; each rank draws the whole tensor's V and uses its rows); every other one steps whole on its
    owner rank.

    Args (defaults: Levanter's PSGD-Kron, which the benchmark ran, except no clipping):
        params: an nn.Module (the paper's decay mask) or tensors / param groups.
        lr: learning rate (default 1e-3).
        betas: (β1, β2): β1 is the momentum; β2 is unused and accepted so that the flat beta1/beta2 keys of the
            benchmark's configs apply (default (0.9, 0.0)).
        weight_decay: decoupled decay λ (default 0.1).
        block_size: block size B (default 256).
        normalize_grads: normalise each gradient to unit norm, replacing the clip (default False).
        precond_lr: the factors' step size (default 0.1).
        precond_update_prob_min: p_min (default 0.05).
        precond_update_flat_start: steps at p = 1 before the decay (default 500).
        init_scale: the factors' initial scale (default 1.0).
        max_size_triangular: larger dims get diagonal factors (default 25000).
        merge_dims_target: target size of merged small dims, 0 = no merging (default 8192).
        max_grad_norm: global-norm clip, None = off; skipped when normalize_grads (default None).
        seed: seed of the generators that draw V (default 0).
        fused, check_finite, overrides: see BaseOptimizer.
    """

    native_ops = ("kron_update_preconditioner_", "kron_precondition", "kron_balance_", "decoupled_update_")
    capturable = False
    host_steps = True  # the preconditioner schedule is decided on the host
    hparam_rules = {
        **COMMON_HPARAM_RULES,
        "block_size": check_positive_int,
        "normalize_grads": _check_flag,
        "precond_lr": check_nonnegative,
        "precond_update_prob_min": _check_probability,
        "precond_update_flat_start": _check_step,
        "init_scale": check_nonnegative,
        "max_size_triangular": check_positive_int,
        "merge_dims_target": _check_merge_target,
    }

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.0), weight_decay=0.1, block_size=256, normalize_grads=False,
                 precond_lr=0.1, precond_update_prob_min=0.05, precond_update_flat_start=500, init_scale=1.0,
                 max_size_triangular=25000, merge_dims_target=8192, max_grad_norm=None, *, seed=0, fused=None,
                 check_finite=False, overrides=None):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed: must be an integer, got {seed!r}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, block_size=block_size,
                        normalize_grads=normalize_grads, precond_lr=precond_lr,
                        precond_update_prob_min=precond_update_prob_min,
                        precond_update_flat_start=precond_update_flat_start, init_scale=init_scale,
                        max_size_triangular=max_size_triangular, merge_dims_target=merge_dims_target,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, fused=fused, check_finite=check_finite, overrides=overrides)
        self.seed = seed
        self.schedule = {"step": 0, "update_counter": 0, "balance_counter": 0}
        self.generators: dict[str, torch.Generator] = {}  # one per device, reseeded for each draw
        self.step_plan: tuple[bool, bool] | None = None  # this step's (update the factors, balance them first)

    # ---- state -------------------------------------------------------------------------------------------------
    def whole_layout(self, group: dict, param: torch.Tensor) -> BlockLayout:
        """The blocks of `param`, or of the whole tensor a row shard of it is part of (shard_of)."""
        shard = self.shard_of.get(param)
        return kron_layout(tuple(param.shape if shard is None else shard.shape), group["block_size"],
                           group["merge_dims_target"], group["max_size_triangular"])

    def layout(self, group: dict, param: torch.Tensor) -> BlockLayout:
        """The blocks of `param`: for a row shard, the whole tensor's cut to its rows."""
        layout = self.whole_layout(group, param)
        return layout.with_rows(param.shape[0]) if param in self.shard_of else layout

    def row_axes(self, group, param):
        """A parameter whose axis 0 has a diagonal factor and is a merged axis of its own (the vocabulary axis of
        the embedding and the head) steps as row shards: a row's momentum, direction and diagonal-factor entries
        are its own, and what sums over the rows comes from all-reduces (the other factors' terms, the per-tensor
        norms of normalize_grads, the damping and the RMS clip; the diagonal factor's normaliser, a max), so that
        every rank holds and updates the same other factors and draws the whole tensor's noise for its rows. Not
        with fused=True: the native preconditioner update has no point for those all-reduces, so row shards run it
        in pure torch."""
        if self.fused or not param.numel():
            return None
        layout = self.layout(group, param)
        if not layout.rows_apart:
            return None
        return {"exp_avg": 0, "Q0": 1, **{f"Q{axis}": None for axis in range(1, len(layout.block))}}

    def state_shapes(self, group, param):
        layout = self.layout(group, param)
        shapes = {"step": (), "exp_avg": tuple(param.shape)}
        for axis, (b, diag) in enumerate(zip(layout.block, layout.special)):
            shapes[f"Q{axis}"] = (layout.num_blocks, b) if diag else (layout.num_blocks, b, b)
        return shapes

    def init_state(self, group, param):
        state = super().init_state(group, param)
        layout = self.layout(group, param)
        scale = group["init_scale"] ** (1 / len(layout.block))
        for axis, (b, diag) in enumerate(zip(layout.block, layout.special)):
            eye = torch.ones(b, device=param.device) if diag else torch.eye(b, device=param.device)
            state[f"Q{axis}"] = (scale * eye).expand(state[f"Q{axis}"].shape).contiguous()  # float32, as the spec
        return state

    def check_state(self, group, param, state, label):
        for key, shape in self.state_shapes(group, param).items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{label}: state[{key!r}] is missing or not a tensor")
            if key == "step":
                continue
            dtype = torch.float32 if key.startswith("Q") else param.dtype
            if tuple(value.shape) != tuple(shape) or value.dtype != dtype or value.device != param.device:
                raise ValueError(f"{label}: state[{key!r}] is {value.dtype} {tuple(value.shape)} on {value.device}, "
                                 f"expected {dtype} {tuple(shape)} on {param.device}")

    def state_dict(self):
        out = super().state_dict()
        out["kron"] = {**self.schedule, "seed": self.seed}
        return out

    def load_state_dict(self, state_dict):
        if "kron" not in state_dict:
            raise ValueError("state_dict: missing 'kron' (the step, counters and seed of a Kron optimizer)")
        extra = state_dict["kron"]
        if "generators" in extra:
            raise ValueError("state_dict: saved by a Kron that drew all its noise from one shared generator (before "
                             "per-parameter streams); a run resumed from it would draw other numbers, so it is "
                             "refused")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "kron"})
        # torch casts loaded state to the parameter's dtype; the factors stay float32 (a bf16 model keeps them exact)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for saved_id, param in zip(saved_group["params"], group["params"]):
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if key.startswith("Q"):
                        self.state[param][key] = value.to(device=param.device, dtype=torch.float32, copy=True)
        self.schedule = {k: int(extra[k]) for k in ("step", "update_counter", "balance_counter")}
        self.seed = int(extra["seed"])

    def _noise(self, shape: tuple[int, ...], device: torch.device, position: int) -> torch.Tensor:
        if str(device) not in self.generators:
            self.generators[str(device)] = torch.Generator(device=device)
        generator = self.generators[str(device)]
        generator.manual_seed(kron_noise_seed(self.seed, position, self.schedule["step"]))
        return torch.randn(shape, generator=generator, device=device)

    # ---- a step ------------------------------------------------------------------------------------------------
    def _schedule_step(self, group: dict) -> bool:
        """Advance the step and the update counter; whether this step updates the preconditioner."""
        schedule = self.schedule
        schedule["step"] += 1
        schedule["update_counter"] += 1
        p = update_probability(schedule["step"], group["precond_update_flat_start"], group["precond_update_prob_min"])
        if schedule["update_counter"] < 1 / p:
            return False
        schedule["update_counter"] = 0
        schedule["balance_counter"] += 1
        return True

    def prepare_step(self) -> list[GroupWork]:
        work = super().prepare_step()
        self.step_plan = None  # decided by this step's first update
        return work

    def update(self, work: list[GroupWork]) -> None:
        self.check_row_shards(work)
        scales = self.clip_scales([item for item in work if not item.group["normalize_grads"]])
        if self.step_plan is None:
            # One schedule for the whole optimizer (as Levanter's single counter), read from the first group.
            due = self._schedule_step(self.param_groups[0])
            balance = due and self.schedule["balance_counter"] >= BALANCE_EVERY
            if balance:
                self.schedule["balance_counter"] = 0
            self.step_plan = due, balance
        due, balance = self.step_plan
        for item in work:
            if item.params:
                self._group_step(item, scales.get(item.index), due, balance)

    def _group_step(self, item: GroupWork, scale, due: bool, balance: bool) -> None:
        # Per-parameter scalars (bias corrections, damping, the block-RMS clip) are computed for the whole group in
        # a few foreach launches rather than a handful of launches per parameter.
        group = item.group
        grads = item.grads if scale is None else torch._foreach_mul(item.grads, scale)
        if group["normalize_grads"]:
            grads = torch._foreach_div(grads, torch._foreach_add(self._whole_norms(item, grads, 2), 1e-16))
        exp_avgs, steps = item.state_list("exp_avg"), item.state_list("step")
        beta1 = group["betas"][0]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_add_(steps, 1)
        layouts = [self.layout(group, p) for p in item.params]
        corrections = [1 / (1 - beta1 ** s.item()) for s in steps]  # m̂ = m·correction
        blocks = [lay.to_blocks(m).float() for lay, m in zip(layouts, exp_avgs)]
        if due:
            first = sum(len(group["params"]) for group in self.param_groups[:item.index])
            noise = [self._noise_of(group, p, b, first + position)
                     for p, b, position in zip(item.params, blocks, item.positions)]
            # √eps·mean|m̂| over each parameter's blocks (its zero padding included)
            whole_sizes = [math.prod(self.whole_layout(group, p).block) * lay.num_blocks
                           for p, lay in zip(item.params, layouts)]
            damping = torch._foreach_mul(self._whole_norms(item, blocks, 1),
                                         [DAMPING * c / max(n, 1) for c, n in zip(corrections, whole_sizes)])
        # Same block shape and factor kinds: one batched call. Row shards batch by their whole shape, so that every
        # rank makes the same collective calls, in the same order.
        batches = defaultdict(list)
        for i, (p, lay) in enumerate(zip(item.params, layouts)):
            shard = self.shard_of.get(p)
            batches[(lay.block, lay.special, p.device, None if shard is None else shard.shape)].append(i)
        directions = [None] * len(item.params)
        for (block, diagonal, device, whole), idx in batches.items():
            collectives = {} if whole is None else {"sum_over_ranks": self.sum_over_ranks,
                                                    "max_over_ranks": self.max_over_ranks}
            qs = [packed_state([item.states[i] for i in idx], f"Q{axis}") for axis in range(len(block))]
            m = concat([blocks[i] for i in idx]) * _per_block([corrections[i] for i in idx],
                                                             [blocks[i].shape[0] for i in idx], len(block), device)
            if due:
                if balance:
                    kron_balance_(qs, fused=self.fused, max_over_ranks=collectives.get("max_over_ranks"))
                kron_update_preconditioner_(m, qs, diagonal, concat([noise[i] for i in idx]),
                                            torch.cat([damping[i].expand(blocks[i].shape[0]) for i in idx]),
                                            precond_lr=group["precond_lr"], fused=self.fused, **collectives)
            out = kron_precondition(m, qs, diagonal, fused=self.fused)
            for i, u in zip(idx, out.split([layouts[i].num_blocks for i in idx])):
                directions[i] = layouts[i].from_blocks(u).to(item.params[i].dtype)
        # u ← u/max(1, rms(u)/1.1) per parameter
        sizes = [math.prod(self.shard_of[p].shape) if p in self.shard_of else p.numel() for p in item.params]
        limits = torch._foreach_mul(self._whole_norms(item, directions, 2),
                                    [1 / (BLOCK_RMS_LIMIT * math.sqrt(max(n, 1))) for n in sizes])
        torch._foreach_clamp_min_(limits, 1.0)
        torch._foreach_div_(directions, limits)
        apply_update_(item.params, directions, lr=group["lr"], weight_decay=decay_of(group), fused=self.fused)

    def _whole_norms(self, item: GroupWork, tensors: list[torch.Tensor], order: int) -> list[torch.Tensor]:
        """The L1 or L2 norm (`order`) of each tensor of the group; for a row shard, of the whole tensor: one
        all-reduce of the row shards' sums (of |x| or x²) for the group, which every rank makes alike, since
        every rank holds rows of each of them."""
        norms = torch._foreach_norm(tensors, order)
        sharded = [i for i, p in enumerate(item.params) if p in self.shard_of]
        if not sharded:
            return list(norms)
        sums = torch.stack([norms[i].float() ** order for i in sharded])
        self.sum_over_ranks(sums)
        whole = list(norms)
        for j, i in enumerate(sharded):
            whole[i] = (sums[j] if order == 1 else sums[j].sqrt()).to(norms[i].dtype)
        return whole

    def _noise_of(self, group: dict, param: torch.Tensor, blocks: torch.Tensor, position: int) -> torch.Tensor:
        """V for the parameter's blocks: for a row shard, its rows of the whole tensor's draw (what one process
        draws, whatever the split)."""
        shard = self.shard_of.get(param)
        if shard is None:
            return self._noise(blocks.shape, blocks.device, position)
        whole = self.whole_layout(group, param)
        drawn = self._noise((whole.num_blocks, *whole.block), blocks.device, position)
        return drawn[:, shard.first:shard.first + blocks.shape[1]]


def _per_block(values: list[float], counts: list[int], block_ndim: int, device: torch.device):
    """Per-parameter factors for a batch of blocks: a float where all parameters share one (the usual case: equal
    step counts), else one value per block shaped to broadcast over the blocks."""
    if len(set(values)) == 1:
        return values[0]
    per_block = torch.cat([torch.full((n,), v, device=device) for v, n in zip(values, counts)])
    return per_block.view(-1, *[1] * block_ndim)
