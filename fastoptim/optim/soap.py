"""Soap: Adam in the eigenbasis of Shampoo's Kronecker statistics, on blocks of every parameter (spec §1.10)."""

from collections import defaultdict
from functools import lru_cache

import torch

from fastoptim.optim.base import COMMON_HPARAM_RULES, BaseOptimizer, GroupWork, check_beta, check_positive_int, decay_of
from fastoptim.optim.functional.blocks import BlockLayout, concat, packed_state
from fastoptim.optim.functional.common import apply_update_
from fastoptim.optim.functional.soap import soap_init_, soap_step_


def _check_merge_target(value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "must be an integer ≥ 0 (0: no merging)"
    return None


@lru_cache(maxsize=None)
def soap_layout(shape: tuple[int, ...], block_size: int, merge_dims_target: int, max_precond_dim: int) -> BlockLayout:
    """Blocks of a parameter; an axis of a ≥2-D parameter with size ≥ max_precond_dim (the vocab) is not rotated."""
    return BlockLayout.build(shape, block_size, merge_dims_target,
                             lambda s: [len(s) > 1 and d >= max_precond_dim for d in s])


class Soap(BaseOptimizer):
    """SOAP (benchmark-spec §1.10), applied to every parameter.

    Layout: small adjacent dims are merged towards `merge_dims_target`; dims larger than `block_size` are cut into
    blocks of that size (the last one zero-padded) and the blocks stacked; an axis of size ≥ `max_precond_dim` of a
    ≥2-D parameter is neither cut nor rotated (plain Adam along it).

    Step 1 only initialises: GG_i = (1−shampoo_beta)·G_(i)G_(i)ᵀ per rotated block axis, Q_i its eigenvectors
    (eigh of GG_i + eps·I, descending); the direction is zero (weight decay still applies, as in Levanter, where
    the decay transform follows Soap's zero output). Each later step t, per block:
    clip (global norm) → m ← β1 EMA of g → v ← β2 EMA of (Qᵀg)² → u = Q(Qᵀm/(√v+ε)) → u·√(1−β2^t)/(1−β1^t) →
    every `precondition_frequency` steps, from the statistics of before this step, Q ← QR(GG·Q) with Q's columns
    sorted by diag(QᵀGG Q) (v permuted to match) → GG_i ← lerp(GG_i, G_(i)G_(i)ᵀ, 1−shampoo_beta) →
    w ← w − lr·(u + λw). t counts the initial step.

    Args (defaults: the SOAP authors' reference implementation for what it shares, Levanter's blocked Soap, which the
    benchmark ran, for the blocks):
        params: an nn.Module (the paper's decay mask) or tensors / param groups.
        lr: learning rate (default 3e-3).
        betas: Adam (β1, β2) (default (0.95, 0.95)).
        shampoo_beta: EMA factor of the Kronecker statistics (default 0.95, the reference's β2).
        eps: ε of the Adam denominator and of the initial eigendecomposition (default 1e-8).
        weight_decay: decoupled decay λ (default 0.01).
        precondition_frequency: steps between eigenbasis refreshes (default 10).
        block_size: block size B (default 256).
        max_precond_dim: dims at least this large are not rotated (default 10000).
        merge_dims_target: target size of merged small dims, 0 = no merging (default 2048).
        max_grad_norm: global-norm clip over all parameters, None = off (default None).
        fused, check_finite, overrides: see BaseOptimizer.

    Not capturable in one CUDA graph: the first step and the refresh steps differ from the others, decided on the
    host.

    State per parameter, in the block layout (num_blocks, *block): exp_avg, exp_avg_sq, and per rotated block
    axis i: GG{i} and Q{i} (num_blocks, b_i, b_i).

    Under ZeRO-1 and FSDP2 a parameter whose axis 0 is not rotated (the vocabulary) steps as row shards
    (``row_axes``); every other parameter steps whole on its owner rank.
    """

    native_ops = ("soap_gram_", "soap_eigenbasis_", "soap_rotated_adam_", "soap_refresh_", "decoupled_update_")
    capturable = False
    host_steps = True  # the first step and the refresh steps are decided on the host
    hparam_rules = {
        **COMMON_HPARAM_RULES,
        "shampoo_beta": check_beta,
        "precondition_frequency": check_positive_int,
        "block_size": check_positive_int,
        "max_precond_dim": check_positive_int,
        "merge_dims_target": _check_merge_target,
    }

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, block_size=256, max_precond_dim=10000, merge_dims_target=2048,
                 max_grad_norm=None, *, fused=None, check_finite=False, overrides=None):
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, block_size=block_size,
                        max_precond_dim=max_precond_dim, merge_dims_target=merge_dims_target,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, fused=fused, check_finite=check_finite, overrides=overrides)

    def layout(self, group: dict, param: torch.Tensor) -> BlockLayout:
        """The blocks of `param`: those of the whole parameter cut to its rows, for a row shard (shard_of)."""
        shard = self.shard_of.get(param)
        layout = soap_layout(tuple(param.shape if shard is None else shard.shape), group["block_size"],
                             group["merge_dims_target"], group["max_precond_dim"])
        return layout if shard is None else layout.with_rows(param.shape[0])

    def row_axes(self, group, param):
        """A parameter whose rows are not rotated (the vocabulary axis of the embedding and the head, axis 0 a
        merged axis of its own) steps as row shards: the rotation of the other axes, the moments and the update of
        a row read that row only, and each rotated axis's Kronecker statistic, a sum over the rows, is summed over
        the ranks (sum_over_ranks), so that every rank holds, and refreshes, the same factors. The moments, in the
        layout (num_blocks, rows, ...), hold the rows on axis 1."""
        if not param.numel():
            return None
        layout = self.layout(group, param)
        if not layout.rows_apart:
            return None
        return {key: 1 if key.startswith("exp_avg") else None for key in self.state_shapes(group, param)
                if key != "step"}

    def state_shapes(self, group, param):
        layout = self.layout(group, param)
        shapes = {"step": (), "exp_avg": (layout.num_blocks, *layout.block),
                  "exp_avg_sq": (layout.num_blocks, *layout.block)}
        for axis, (b, unrotated) in enumerate(zip(layout.block, layout.special)):
            if not unrotated:
                shapes[f"GG{axis}"] = shapes[f"Q{axis}"] = (layout.num_blocks, b, b)
        return shapes

    def prepare_step(self) -> list[GroupWork]:
        work = super().prepare_step()
        self._check_factorisation_inputs(work)  # here, so that a sharded step agrees on it before any update
        return work

    def update(self, work: list[GroupWork]) -> None:
        self.check_row_shards(work)
        scales = self.clip_scales(work)
        for item in work:
            group, scale = item.group, scales.get(item.index)
            grads = item.grads if scale is None or not item.grads else torch._foreach_mul(item.grads, scale)
            # Same block shape, rotated axes and step: one batched call. Row shards batch by their whole shape, so
            # that every rank makes the same calls of sum_over_ranks, in the same order.
            batches = defaultdict(list)
            for i, p in enumerate(item.params):
                layout = self.layout(group, p)
                key = (layout.block, layout.special, p.dtype, p.device, int(item.states[i]["step"]))
                shard = self.shard_of.get(p)
                batches[(*key, None if shard is None else shard.shape)].append(i)
            for (block, special, _, _, done, whole), idx in batches.items():
                self._batch_step(item, grads, idx, len(block), done + 1,
                                 sum_grams=None if whole is None else self.sum_over_ranks)

    def _check_factorisation_inputs(self, work: list[GroupWork]) -> None:
        """Before anything is written: the eigendecomposition of the first step and the QR of a refresh step fail
        (or silently yield garbage) on non-finite input, which a NaN/inf gradient puts there. Check those inputs on
        the steps that factorise (one host sync on those steps only) and name the parameters."""
        checks = []  # (item, position, tensors to check, what they are)
        for item in work:
            freq = item.group["precondition_frequency"]
            for i, (grad, state) in enumerate(zip(item.grads, item.states)):
                step = int(state["step"]) + 1
                if step == 1:
                    checks.append((item, i, [grad], "gradient"))
                elif step % freq == 0:
                    checks.append((item, i, [v for k, v in state.items() if k.startswith("GG")], "statistics"))
        checks = [c for c in checks if c[2]]
        if not checks:
            return
        finite = torch.stack([torch.stack([t.isfinite().all() for t in tensors]).all().cpu()
                              for _, _, tensors, _ in checks]).tolist()
        bad = [(item, i, what) for (item, i, _, what), ok in zip(checks, finite) if not ok]
        if not bad:
            return
        for item in work:  # state made by this step's prepare_step did not exist before it: leave none behind
            for param, state in zip(item.params, item.states):
                if int(state["step"]) == 0:
                    del self.state[param]
        names = ", ".join(f"{self.param_label(item.group, item.index, item.positions[i])} (non-finite {what})"
                          for item, i, what in bad)
        raise FloatingPointError(
            f"Soap: {names}: the eigenbasis cannot be computed from non-finite values. Pass check_finite='raise' (or "
            "'warn') to stop at the first non-finite gradient; parameters and optimizer state are untouched")

    def _batch_step(self, item: GroupWork, grads: list[torch.Tensor], idx: list[int], ndim: int, step: int,
                    sum_grams=None) -> None:
        group = item.group
        params = [item.params[i] for i in idx]
        states = [item.states[i] for i in idx]
        layouts = [self.layout(group, p) for p in params]
        grad_batch = concat([lay.to_blocks(grads[i]) for lay, i in zip(layouts, idx)])
        keys = ["exp_avg", "exp_avg_sq"] + [f"{k}{a}" for a in range(ndim) for k in ("GG", "Q")]
        batched = {k: packed_state(states, k) for k in keys if k in states[0]}
        ggs = [batched.get(f"GG{a}") for a in range(ndim)]
        qs = [batched.get(f"Q{a}") for a in range(ndim)]
        if step == 1:
            soap_init_(grad_batch, ggs, qs, shampoo_beta=group["shampoo_beta"], eps=group["eps"], fused=self.fused,
                       sum_grams=sum_grams)
            directions = [torch.zeros_like(p) for p in params]
        else:
            beta1, beta2 = group["betas"]
            out = soap_step_(grad_batch, batched["exp_avg"], batched["exp_avg_sq"], ggs, qs, step=step, beta1=beta1,
                             beta2=beta2, shampoo_beta=group["shampoo_beta"], eps=group["eps"],
                             refresh=step % group["precondition_frequency"] == 0, fused=self.fused,
                             sum_grams=sum_grams)
            sizes = [lay.num_blocks for lay in layouts]
            directions = [lay.from_blocks(u) for lay, u in zip(layouts, out.split(sizes))]
        for s in states:
            s["step"] += 1
        apply_update_(params, directions, lr=group["lr"], weight_decay=decay_of(group), fused=self.fused)
