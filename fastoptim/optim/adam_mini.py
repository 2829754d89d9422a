"""Adam-mini (benchmark-spec §1.6): one second-moment value per parameter block instead of per element."""

import torch
from torch import nn

from fastoptim.optim.base import BaseOptimizer, GroupWork, decay_of
from fastoptim.optim.functional.adam import adam_
from fastoptim.optim.functional.adam_mini import adam_mini_

_ADAMW_KINDS = frozenset({"norm", "bias", "other"})


def head_blocks(model: nn.Module) -> dict[torch.Tensor, int]:
    """Block counts of attention projections whose blocks are heads: q_proj and k_proj of every module that has
    an int ``head_dim`` (the model contract; else ``n_heads`` with head_dim = q_proj rows / n_heads). Weights are
    out-first, head h owning rows h·head_dim … (h+1)·head_dim, so k_proj of a GQA model gets its kv-head count."""
    counts = {}
    for name, module in model.named_modules():
        head_dim, n_heads = getattr(module, "head_dim", None), getattr(module, "n_heads", None)
        query = getattr(module, "q_proj", None)
        if not isinstance(head_dim, int) and isinstance(n_heads, int) and isinstance(query, nn.Linear):
            head_dim = query.weight.shape[0] // n_heads
        if not isinstance(head_dim, int) or head_dim <= 0:
            continue
        for proj in ("q_proj", "k_proj"):
            linear = getattr(module, proj, None)
            if isinstance(linear, nn.Linear):
                rows = linear.weight.shape[0]
                if rows % head_dim:
                    raise ValueError(f"{name}.{proj}.weight: {rows} rows is not a multiple of head_dim={head_dim}")
                counts[linear.weight] = rows // head_dim
    return counts


class AdamMini(BaseOptimizer):
    """Adam-mini: Adam's first moment; the second moment is an EMA of the block mean of g², broadcast over the
    block; both bias-corrected, u = m̂/(√v̂ + ε), then decoupled decay and −lr (benchmark-spec §1.6).

    Blocks (out-first weights), for an nn.Module:

    ======================================  ===============================================
    q_proj, k_proj (module with head_dim)   per head (rows // head_dim blocks; or n_heads)
    v_proj, o_proj, MLP linears, other 2-D  per output row
    embeddings, lm_head                     per row (token)
    norm weights, biases, other 1-D         plain AdamW branch (per-element v)
    ======================================  ===============================================

    For plain tensors without names: 2-D-or-more tensors are blocked per output row (dim 0), 1-D tensors go to the
    AdamW branch. Only the AdamW branch is clipped (max_grad_norm over that branch's gradients); the blocked
    branch never is.

    Args:
        params: an nn.Module (routing by kind and name) or torch params/groups.
        lr: 1e-3. betas: (0.9, 0.999). eps: 1e-8. weight_decay: 0.0 (the defaults of the Adam-mini authors'
            reference implementation). max_grad_norm: None (no clipping).
        fused, check_finite, overrides: see BaseOptimizer.
    """

    native_ops = ("adamw_", "adam_mini_")
    clipped_branches = frozenset({"adamw"})
    row_local_branches = frozenset({"adamw", "mini"})  # the per-row blocks of the mini branch shard by rows

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=None,
                 **options):
        self.block_counts = head_blocks(params) if isinstance(params, nn.Module) else {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, **options)

    @classmethod
    def branch_of(cls, kind: str) -> str:
        return "adamw" if kind in _ADAMW_KINDS else "mini"

    def n_blocks(self, param: torch.Tensor) -> int:
        return self.block_counts.get(param, param.shape[0] if param.ndim else 1)

    def state_shapes(self, group, param):
        v_shape = (self.n_blocks(param),) if group["branch"] == "mini" else param.shape
        return {"step": (), "exp_avg": param.shape, "exp_avg_sq": v_shape}

    def update(self, work: list[GroupWork]) -> None:
        scales = self.clip_scales(work)
        for item in work:
            group = item.group
            beta1, beta2 = group["betas"]
            core = adam_mini_ if group["branch"] == "mini" else adam_
            core(item.params, item.grads, item.state_list("exp_avg"), item.state_list("exp_avg_sq"),
                 item.state_list("step"), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                 weight_decay=decay_of(group), grad_scale=scales.get(item.index), fused=self.fused)
