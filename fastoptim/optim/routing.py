"""The paper's parameter routing: which parameters are hidden matrices, embeddings, the head, norms or biases.

Split optimizers (Muon, Scion, Adam-mini) send each kind to a different branch, and every optimizer uses the
same weight-decay mask: no decay for norms, embeddings and biases; everything else, the head included, is decayed
(benchmark-spec §1, "Conventions").
"""

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn

KINDS = ("matrix", "embedding", "head", "norm", "bias", "other")
NO_DECAY_KINDS = frozenset({"embedding", "norm", "bias"})
# Name fragments by which the paper's masks recognise parameters (Levanter module paths and their torch twins).
_EMBEDDING_NAMES = ("embed", "wte", "wpe")
_HEAD_NAMES = ("lm_head",)
_NORM_NAMES = ("norm", "ln_")


def classify(name: str, module: nn.Module | None, param: torch.Tensor) -> str:
    """The kind of one parameter, from its module's type first and its dotted name second."""
    lowered = name.lower()
    leaf = lowered.rsplit(".", 1)[-1]
    if isinstance(module, nn.Embedding) or any(s in lowered for s in _EMBEDDING_NAMES):
        return "embedding"
    if leaf == "bias":  # before the head: the spec exempts every bias from decay, lm_head's too
        return "bias"
    if any(s in lowered for s in _HEAD_NAMES):
        return "head"
    if _is_norm(module) or any(s in lowered for s in _NORM_NAMES):
        return "norm"
    if param.ndim >= 2:
        return "matrix"
    return "other"


def _is_norm(module: nn.Module | None) -> bool:
    if module is None:
        return False
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm) + tuple(nn.modules.batchnorm._BatchNorm.__subclasses__())
    return isinstance(module, norms) or "norm" in type(module).__name__.lower()


def named_kinds(model: nn.Module, overrides: Mapping[str, str] | None = None) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, kind) for every trainable parameter of `model`, in registration order.

    `overrides` maps glob patterns over dotted names (e.g. ``"blocks.*.gate"``) to a kind and wins over `classify`.
    """
    overrides = dict(overrides or {})
    for pattern, kind in overrides.items():
        if kind not in KINDS:
            raise ValueError(f"overrides[{pattern!r}]: unknown kind {kind!r}; expected one of {KINDS}")
    owners = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), module)
    result = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = next((k for pat, k in overrides.items() if fnmatch.fnmatchcase(name, pat)), None)
        result.append((name, param, kind or classify(name, owners.get(id(param)), param)))
    return result


def param_groups(
    params,
    branch_of=None,
    overrides: Mapping[str, str] | None = None,
) -> list[dict]:
    """Param groups for an optimizer, from a module or from the usual torch `params` argument.

    From an nn.Module, parameters are classified (`named_kinds`), then grouped by branch (``branch_of(kind)``, a
    string; one branch "default" when `branch_of` is None) and by the decay mask; each group carries
    ``branch``, ``kind`` names and ``weight_decay_mask`` (False for norms, embeddings, biases) so the optimizer can
    apply per-branch rules. From tensors or dicts (torch's convention) nothing is renamed or masked: groups keep
    their own options, and a group without ``branch`` gets ``branch_of("matrix")`` for 2-D-or-more tensors and
    ``branch_of("other")`` otherwise, split per tensor rank where that changes the branch.
    """
    branch_of = branch_of or (lambda kind: "default")
    if isinstance(params, nn.Module):
        grouped: dict[tuple[str, bool], dict] = {}
        for name, param, kind in named_kinds(params, overrides):
            key = (branch_of(kind), kind not in NO_DECAY_KINDS)
            group = grouped.setdefault(key, {"params": [], "names": [], "branch": key[0], "weight_decay_mask": key[1]})
            group["params"].append(param)
            group["names"].append(name)
        return list(grouped.values())
    if overrides:
        raise ValueError("overrides: only meaningful when params is an nn.Module (names are needed to match patterns)")
    if isinstance(params, torch.Tensor):
        raise TypeError("params: expected an iterable of Tensors or dicts, or an nn.Module, got a single Tensor")
    groups = list(params)
    if not groups:
        raise ValueError("params: the optimizer got an empty parameter list")
    if not isinstance(groups[0], Mapping):
        groups = [{"params": groups}]
    result = []
    for group in groups:
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        if "branch" in group:
            result.append({**group, "params": tensors})
            continue
        by_branch: dict[str, list] = {}
        for t in tensors:
            by_branch.setdefault(branch_of("matrix" if t.ndim >= 2 else "other"), []).append(t)
        result.extend({**group, "params": ts, "branch": b} for b, ts in by_branch.items())
    return result
