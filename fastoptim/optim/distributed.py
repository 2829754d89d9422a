"""ZeRO-1 under data parallelism: each rank holds, and steps, the optimizer state of its share of the parameters.

    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = fastoptim.ZeroRedundancy(fastoptim.Muon(model.module, lr=0.02, max_grad_norm=1.0))
    for x, y in batches:
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()

`ZeroRedundancy` wraps a constructed fastoptim optimizer that every rank builds over the same parameters (so the
param groups, LR schedulers and state_dict keep torch's conventions) and that holds no state yet:

- Ownership is by whole tensors: each parameter has one owner rank, assigned greedily (largest first onto the
  least-loaded rank) by the bytes of the state it will hold (``state_shapes``). Whole tensors, not flat slices, keep
  every per-tensor computation exact: Cautious' mask normalisation, Mars' correction clip, Adam-mini's blocks, Soap's
  blocks and Muon's and Scion's whole matrices. An owner's matrices of one shape are orthogonalised in one batched
  Newton–Schulz call, as in one process; a matrix's momentum bytes are proportional to its Newton–Schulz work within
  one model width, so the assignment spreads both.
- Gradients are all-reduced by DDP, not reduce-scattered: each rank reads the averaged gradients of the parameters it
  owns and ignores the rest. (A reduce-scatter halves the gradient traffic but needs ownership aligned to DDP's
  buckets; not done.)
- A step: the wrapped optimizer checks the owned gradients, state and hyperparameters (``prepare_step``); one
  all-reduce carries every rank's failure flag and its partial squared norm of each clipped set, so that bad input on
  any rank raises on every rank before anything is written, and the clip uses the global norm; the owners step;
  each owner broadcasts its updated parameters (flattened: one broadcast per owner and dtype). Reading the failure
  flag is one host synchronisation per step.
- ``state_dict()`` is the consolidated state, equal to the wrapped optimizer's in one process, so checkpoints do not
  depend on the number of ranks; ``load_state_dict`` takes such a state (from any number of ranks, or one process)
  and keeps each rank's share. ``local_state_dict()`` is this rank's share alone (for sharded checkpoints).

Optimizers that cannot shard are refused at construction, on every rank: those whose ``shardable`` is False (Kron
draws its preconditioner noise from one generator across all parameters, so a share would draw other numbers) and
those that need a Hessian-vector product (SophiaH: autograd.grad bypasses DDP's gradient averaging).
"""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fastoptim.optim.base import BaseOptimizer


def assign_owners(costs: list[int], world_size: int) -> list[int]:
    """An owner rank per item: largest cost first onto the least-loaded rank (ties: the lower index, the lower
    rank), so every rank computes the same assignment."""
    load = [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owners[i] = min(range(world_size), key=lambda r: (load[r], r))
        load[owners[i]] += costs[i]
    return owners


def params_in_order(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in param-group order: the positions torch's state_dict numbers them by."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def state_bytes_of(optimizer: BaseOptimizer) -> list[int]:
    """Per parameter (in group order), the bytes of the state it will hold: its cost for the owner assignment."""
    costs = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            shapes = optimizer.state_shapes(group, param) if param.numel() else {}
            costs.append(sum(4 if key == "step" else _numel(shape) * param.element_size()
                             for key, shape in shapes.items()))
    return costs


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def held_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of the state tensors this process holds."""
    return sum(value.nbytes for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))


def check_shardable(optimizer, how: str) -> None:
    """Raise, naming the optimizer and why, if its parameters cannot each be stepped by one owner rank."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, BaseOptimizer):
        raise TypeError(f"{how}: expected a fastoptim optimizer, got {name}")
    if getattr(optimizer, "needs_hvp", False):
        raise ValueError(f"{how}: {name} takes a Hessian-vector product through autograd.grad, which bypasses the "
                         f"data-parallel gradient averaging: run it on one process")
    if not optimizer.shardable:
        raise ValueError(f"{how}: {name} cannot shard its state by parameter (its random draws or schedule span "
                         f"all parameters, so one rank's share would draw other numbers): run it without sharding")


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class OwnedShareStepper:
    """Steps a fastoptim optimizer on the parameters this rank owns; the shared core of ZeRO-1 and FSDP2's owner
    stepping. The caller leaves gradients only on owned parameters; ``held`` lists their positions (group order)."""

    def __init__(self, optimizer: BaseOptimizer, held: Iterable[int], group=None, how: str = "ZeroRedundancy"):
        check_shardable(optimizer, how)
        self.optimizer, self.group, self.held = optimizer, group, frozenset(held)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step_owned(self, device: torch.device) -> None:
        """prepare_step, the one agreement all-reduce (failures and clip norms), then the owners' update."""
        optimizer = self.optimizer
        had_state = {p for p in params_in_order(optimizer) if optimizer.state.get(p)}
        failure, work, partial = None, None, {}
        try:
            work = optimizer.prepare_step()
            partial = self._partial_squares(work)
        except Exception as error:  # every rank learns of it below; this rank re-raises it
            failure = error
        limits = sorted(self._clip_limits().items())
        squares = [partial.get(limit, torch.zeros((), dtype=torch.float64, device=device)).to(device, torch.float64)
                   for limit, _ in limits]
        agreed = torch.stack([torch.tensor(float(failure is not None), dtype=torch.float64, device=device), *squares])
        dist.all_reduce(agreed, group=self.group)
        if agreed[0].item():
            self._raise_everywhere(failure, had_state)
        optimizer.global_clip_scales = {limit: (limit / agreed[1 + i].sqrt()).clamp(max=1.0).to(dtype)
                                        for i, (limit, dtype) in enumerate(limits)}
        try:
            optimizer.update(work)
        finally:
            optimizer.global_clip_scales = None

    def _clip_limits(self) -> dict[float, torch.dtype]:
        """Every max_grad_norm a clipped group uses, with the dtype of its factor (float32, or the widest of its
        parameters', as in one process): the same on every rank, whatever it owns."""
        optimizer, limits = self.optimizer, {}
        for group in optimizer.param_groups:
            limit = group.get("max_grad_norm")
            if limit and (optimizer.clipped_branches is None or group["branch"] in optimizer.clipped_branches):
                for param in group["params"]:
                    limits[limit] = torch.promote_types(limits.get(limit, torch.float32), param.dtype)
        return limits

    def _partial_squares(self, work) -> dict[float, torch.Tensor]:
        """This rank's sum of squares over each clip set's tensors (clip_tensors), in float64."""
        partial = {}
        for limit, items in self.optimizer.clip_sets(work).items():
            tensors = self.optimizer.clip_tensors(items)
            if tensors:
                norms = torch._foreach_norm(tensors)
                partial[limit] = torch.stack([n.double() for n in norms]).square().sum()
        return partial

    def _raise_everywhere(self, failure: Exception | None, had_state: set) -> None:
        for param in params_in_order(self.optimizer):  # state this step's prepare_step created: leave none behind
            if param not in had_state:
                self.optimizer.state.pop(param, None)
        messages = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(messages, None if failure is None else f"{type(failure).__name__}: {failure}",
                               group=self.group)
        if failure is not None:
            raise failure
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise RuntimeError(f"rank {rank} refused the optimizer step ({message}); no rank updated anything")

    # ---- state ---------------------------------------------------------------------------------------------------
    def local_state_dict(self) -> dict:
        """This rank's share: the wrapped optimizer's state_dict (torch's numbering), state for held positions only."""
        return self.optimizer.state_dict()

    def state_dict(self) -> dict:
        """The consolidated state: every rank's share merged (a collective call on every rank)."""
        own = self.optimizer.state_dict()
        parts = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, _to_cpu(own["state"]), group=self.group)
        merged = {}
        for part in parts:
            merged.update(part)
        return {**own, "state": dict(sorted(merged.items()))}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a consolidated state (or a share holding at least this rank's positions); keep this rank's share."""
        self.optimizer.load_state_dict(
            {**state_dict, "state": {k: s for k, s in state_dict["state"].items() if k in self.held}})

    def state_bytes(self) -> int:
        return held_state_bytes(self.optimizer)


class ZeroRedundancy(OwnedShareStepper):
    """ZeRO-1 over a constructed fastoptim optimizer (see the module docstring).

    Args:
        optimizer: a fastoptim optimizer without state, built identically on every rank over the replicated
            parameters (e.g. ``model.module`` of a DDP model).
        process_group: the data-parallel group (default: the world).
    """

    def __init__(self, optimizer: BaseOptimizer, process_group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroRedundancy: torch.distributed is not initialised (init_process_group first)")
        if optimizer.state:
            raise ValueError("ZeroRedundancy: wrap the optimizer before its first step (it already holds state); "
                             "load a saved state through the wrapper's load_state_dict")
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        params = params_in_order(optimizer)
        self.device = params[0].device
        _check_same_parameters(params, process_group, self.device)
        self.owners = assign_owners(state_bytes_of(optimizer), self.world_size)
        super().__init__(optimizer, [i for i, owner in enumerate(self.owners) if owner == self.rank], process_group)
        # One broadcast per (owner, dtype): that owner's parameters flattened together.
        self.buckets: list[tuple[int, list[torch.Tensor]]] = []
        for owner in range(self.world_size):
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for param, param_owner in zip(params, self.owners):
                if param_owner == owner and param.numel():
                    by_dtype.setdefault(param.dtype, []).append(param)
            self.buckets.extend((owner, bucket) for bucket in by_dtype.values())

    def __repr__(self):
        return f"ZeroRedundancy(rank {self.rank} of {self.world_size}, {self.optimizer!r})"

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = params_in_order(self.optimizer)
        others = {i: params[i].grad for i in range(len(params)) if i not in self.held}
        for i in others:
            params[i].grad = None
        try:
            self.step_owned(self.device)
        finally:
            for i, grad in others.items():
                params[i].grad = grad
        self._broadcast_params()
        return loss

    def _broadcast_params(self) -> None:
        pending = []
        for owner, bucket in self.buckets:
            flat = _flatten_dense_tensors(bucket) if owner == self.rank else torch.empty(
                sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
            source = owner if self.group is None else dist.get_global_rank(self.group, owner)
            pending.append((owner, bucket, flat, dist.broadcast(flat, source, group=self.group, async_op=True)))
        for owner, bucket, flat, handle in pending:
            handle.wait()
            if owner != self.rank:
                for param, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    param.copy_(value)


def _check_same_parameters(params: list[torch.Tensor], group, device: torch.device) -> None:
    """Every rank must wrap the same parameters: compare their count and shapes (one all-reduce of a fingerprint)."""
    shapes = [tuple(p.shape) for p in params]
    fingerprint = torch.tensor([len(shapes), sum(p.numel() for p in params),
                                hash(tuple(shapes)) % (1 << 52)], dtype=torch.float64, device=device)
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise ValueError(f"ZeroRedundancy: the ranks wrap different parameters (this rank: {len(shapes)} tensors, "
                         f"{int(fingerprint[1])} elements); every rank must build the same optimizer over the "
                         f"same model")
