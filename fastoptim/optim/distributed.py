"""ZeRO-1 under data parallelism: each rank holds, and steps, the optimizer state of its share of the parameters.

    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = fastoptim.ZeroRedundancy(fastoptim.Muon(model.module, lr=0.02, max_grad_norm=1.0), model=model)
    for x, y in batches:
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()

`ZeroRedundancy` wraps a constructed fastoptim optimizer that every rank builds over the same parameters (so the
param groups, LR schedulers and state_dict keep torch's conventions) and that holds no state yet:

- Ownership (``ownership_spans``): the parameters of row-local branches (AdamW, NAdamW, Cautious, Mars, Lion; the
  AdamW and signum branches of Muon, Scion and Adam-mini; Adam-mini's per-row blocks) and Soap's and Kron's tensors
  whose axis 0 has no b×b factor (the vocabulary of the embedding and the head) are split by rows over every rank,
  torch.chunk's split, which is DTensor's Shard(0): each rank steps its rows, through a view put in the parameter's
  place in the param group (``BaseOptimizer.row_axes`` says how each state tensor splits; ``shard_of`` which rows a
  view holds). What a row's update reads beyond its row comes from all-reduces: Cautious's mask mean over each
  whole tensor (the ranks' counts per group, ``whole_tensor_means``); Soap's and Kron's sums over the rows
  (``sum_over_ranks``, ``max_over_ranks``: the other axes' statistics, Kron's per-tensor norms and diagonal
  normaliser), after which every rank holds and updates the same factors. Every other parameter has one owner rank
  that steps the whole tensor, assigned greedily (largest first onto the least-loaded rank) by the bytes of the
  state it will hold (``state_shapes``): whole tensors keep every per-tensor computation exact (Soap's and Kron's
  other blocks, Adam-mini's per-head blocks, Muon's and Scion's Newton–Schulz), and an owner's matrices of one
  shape are orthogonalised in one batched call, as in one process.
- Gradients: given the DDP model, a comm hook reduce-scatters each DDP bucket (each rank receives the average of
  the elements it owns; uneven parts, as ownership falls), overlapped with the backward pass as DDP's all-reduce is.
- A step: the wrapped optimizer checks the owned gradients, state and hyperparameters (``prepare_step``); one
  all-reduce carries every rank's failure flag and its partial squared norm of each clipped set, so that bad input on
  any rank raises on every rank before anything is written, and the clip uses the global norm. Reading the failure
  flag is one host synchronisation per step. Then the owners step group by group, row-local branches first; after
  each group one all-gather per dtype (each rank's updated elements, padded to the longest share) starts, and runs
  while the next groups step (on a GPU, Muon's Newton–Schulz overlaps the all-gather of the embeddings).
- ``state_dict()`` is the consolidated state, equal to the wrapped optimizer's in one process, so checkpoints do not
  depend on the number of ranks; ``load_state_dict`` takes such a state (from any number of ranks, or one process)
  and keeps each rank's share. ``local_state_dict()`` is this rank's share alone, and ``sharded_state`` maps each
  row-sharded position to the DTensor its share is a part of (checkpoints through DCP that reshard).

Every optimizer shards but those that need a Hessian-vector product (SophiaH: autograd.grad bypasses DDP's gradient
averaging), which are refused at construction, on every rank. (Kron draws each parameter's noise from its own
stream, so its owner draws what one process would.)
"""

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastoptim.optim.base import BaseOptimizer, GroupWork, RowShard


def assign_owners(costs: list[int], world_size: int, load: list[int] | None = None) -> list[int]:
    """An owner rank per item: largest cost first onto the least-loaded rank (starting from `load`; ties: the lower
    index, the lower rank), so every rank computes the same assignment."""
    load = list(load) if load is not None else [0] * world_size
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
    """Raise, naming the optimizer and why, if its parameters cannot be stepped by their owner ranks."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, BaseOptimizer):
        raise TypeError(f"{how}: expected a fastoptim optimizer, got {name}")
    if getattr(optimizer, "needs_hvp", False):
        raise ValueError(f"{how}: {name} takes a Hessian-vector product through autograd.grad, which bypasses the "
                         f"data-parallel gradient averaging: run it on one process")


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

    def __init__(self, optimizer: BaseOptimizer, held: Iterable[int], row_axes: dict[int, dict], group=None):
        self.optimizer, self.group, self.held = optimizer, group, frozenset(held)
        self.row_axes = row_axes  # Ownership.row_axes: how the state of each row-sharded position is split

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step_owned(self, device: torch.device, after_group: Callable[[int], None] | None = None) -> None:
        """prepare_step, the one agreement all-reduce (failures and clip norms), then the owners' update: group by
        group, the row-local branches first, calling ``after_group(index)`` after each (so that a group's
        communication overlaps the next groups' update; Muon's Newton–Schulz comes last)."""
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
        optimizer.whole_tensor_means = functools.partial(self._whole_tensor_means, device)
        optimizer.sum_over_ranks = functools.partial(dist.all_reduce, group=self.group)
        optimizer.max_over_ranks = functools.partial(dist.all_reduce, op=dist.ReduceOp.MAX, group=self.group)
        try:
            for item in sorted(work, key=lambda item: item.group["branch"] not in optimizer.row_local_branches):
                optimizer.update([item])
                if after_group is not None:
                    after_group(item.index)
        finally:
            optimizer.global_clip_scales = optimizer.whole_tensor_means = None
            optimizer.sum_over_ranks = optimizer.max_over_ranks = None

    def _whole_tensor_means(self, device: torch.device, item: GroupWork, counts: torch.Tensor) -> torch.Tensor:
        """``BaseOptimizer.whole_tensor_means``: (count, elements) of each of the group's positions summed over the
        ranks (rows of a row-sharded tensor, or all of a tensor held whole by its owner), in one all-reduce that
        every rank joins, also with no tensor of the group; returns count/elements for this rank's tensors."""
        totals = torch.zeros(len(item.group["params"]), 2, dtype=torch.float64, device=device)
        index = torch.tensor(item.positions, dtype=torch.int64, device=device)
        sizes = torch.tensor([param.numel() for param in item.params], dtype=torch.float64, device=device)
        totals[index] = torch.stack([counts.to(device, torch.float64), sizes], dim=1)
        dist.all_reduce(totals, group=self.group)
        whole = totals[index]
        return (whole[:, 0] / whole[:, 1]).to(counts.device, torch.float32)

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

    def state_bytes(self) -> int:
        return held_state_bytes(self.optimizer)


class ZeroRedundancy(OwnedShareStepper):
    """ZeRO-1 over a constructed fastoptim optimizer (see the module docstring).

    Args:
        optimizer: a fastoptim optimizer without state, built identically on every rank over the replicated
            parameters (e.g. ``model.module`` of a DDP model). The wrapper then owns it: the places of row-sharded
            parameters in its param groups hold this rank's rows (views, so a step writes the parameters).
        process_group: the data-parallel group (default: the world).
        model: the DistributedDataParallel model, whose gradients are then reduce-scattered (a DDP comm hook)
            instead of all-reduced: afterwards each rank's ``.grad`` is the average only where that rank owns the
            state, and its local gradient elsewhere (``grad_norm()`` is the global norm). Without it DDP
            all-reduces, and the step is the same.
    """

    def __init__(self, optimizer: BaseOptimizer, process_group=None, model=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroRedundancy: torch.distributed is not initialised (init_process_group first)")
        if optimizer.state:
            raise ValueError("ZeroRedundancy: wrap the optimizer before its first step (it already holds state); "
                             "load a saved state through the wrapper's load_state_dict")
        check_shardable(optimizer, "ZeroRedundancy")
        _check_replicated_and_contiguous(optimizer)
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.params = params_in_order(optimizer)  # the model's tensors, at torch's state_dict positions
        self.device = self.params[0].device
        _check_same_parameters(self.params, process_group, self.device)
        ownership = ownership_spans(optimizer, self.world_size)
        self.spans = ownership.spans
        self.position = {param: k for k, param in enumerate(self.params)}
        self.shards, self.sharded_state = self._place_shards(optimizer, process_group, ownership.owners)
        super().__init__(optimizer, [k for k, spans in enumerate(self.spans) if _size(spans[self.rank])],
                         ownership.row_axes, process_group)
        self.gather_plans = self._gather_plans(optimizer)
        if model is not None:
            self._hook_into(model)

    def __repr__(self):
        return f"ZeroRedundancy(rank {self.rank} of {self.world_size}, {self.optimizer!r})"

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def state(self):
        return self.optimizer.state

    # ---- who holds what -------------------------------------------------------------------------------------------
    def _place_shards(self, optimizer: BaseOptimizer, process_group, owners: dict[int, int]):
        """Put this rank's rows of each row-sharded parameter (those without an owner) in its place in the param
        groups. Returns (position → shard, position → the DTensor that shard is a part of, for checkpoints that
        reshard)."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        row_sharded = len(owners) < len(self.params)
        mesh = DeviceMesh.from_group(process_group or dist.group.WORLD, self.device.type) if row_sharded else None
        shards, templates = {}, {}
        for group in optimizer.param_groups:
            for i, param in enumerate(group["params"]):
                k = self.position[param]
                if k in owners:
                    continue
                first, end = (e // _row_numel(param) for e in self.spans[k][self.rank])
                shard = torch.nn.Parameter(param.detach()[first:end], requires_grad=param.requires_grad)
                group["params"][i] = shards[k] = shard
                optimizer.shard_of[shard] = RowShard(param.shape, first)
                templates[k] = DTensor.from_local(shard.detach(), mesh, [Shard(0)], run_check=False,
                                                  shape=param.shape, stride=param.stride())
        return shards, templates

    def _gather_plans(self, optimizer: BaseOptimizer) -> dict[int, list[tuple[torch.dtype, int, list]]]:
        """Per group index, one entry per dtype: (dtype, segment size, [per rank: its (position, first, end)
        spans]). One all-gather of each rank's updated elements, padded to the segment size, per entry."""
        plans = {}
        first_position = [0]
        for group in optimizer.param_groups:
            first_position.append(first_position[-1] + len(group["params"]))
        for g in range(len(optimizer.param_groups)):
            by_dtype: dict[torch.dtype, list[list]] = {}
            for k in range(first_position[g], first_position[g + 1]):
                per_rank = by_dtype.setdefault(self.params[k].dtype, [[] for _ in range(self.world_size)])
                for rank, span in enumerate(self.spans[k]):
                    if _size(span):
                        per_rank[rank].append((k, *span))
            plans[g] = []
            for dtype, per_rank in by_dtype.items():
                size = max(sum(end - first for _, first, end in spans) for spans in per_rank)
                if size:
                    plans[g].append((dtype, size, per_rank))
        return plans

    def _hook_into(self, model) -> None:
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"ZeroRedundancy: model must be the DistributedDataParallel model whose gradients are "
                            f"to be reduce-scattered, got {type(model).__name__}")
        unknown = [name for name, p in model.module.named_parameters() if p.requires_grad and p not in self.position]
        if unknown:
            raise ValueError(f"ZeroRedundancy: the DDP model's parameter {unknown[0]!r} is not in the optimizer: "
                             f"every gradient DDP reduces needs an owner")
        self.reduce_scatter_has_future = dist.get_backend(self.group) != "gloo"
        model.register_comm_hook(None, self._reduce_scatter_hook)

    def _reduce_scatter_hook(self, state, bucket):
        """DDP's comm hook: each rank receives the sum of the elements it owns only (one reduce-scatter per bucket:
        uneven parts, as ownership falls), divided by the world size as DDP's all-reduce would."""
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        for param, grad in zip(bucket.parameters(), bucket.gradients()):  # views of bucket.buffer()
            flat = grad.view(-1)
            for rank, (first, end) in enumerate(self.spans[self.position[param]]):
                if end > first:
                    parts[rank].append(flat[first:end])
        buffer = bucket.buffer()
        inputs = [torch.cat(views) if views else buffer.new_empty(0) for views in parts]
        mine = parts[self.rank]
        received = torch.empty_like(inputs[self.rank])
        work = dist.reduce_scatter(received, inputs, group=self.group, async_op=True)

        def average_into_place(_=None):
            if mine:
                torch._foreach_copy_(mine, received.div_(self.world_size).split([v.numel() for v in mine]))
            return buffer

        if self.reduce_scatter_has_future:
            return work.get_future().then(average_into_place)
        work.wait()  # gloo's reduce-scatter has no future: wait here, inside the backward pass
        done = torch.futures.Future()
        done.set_result(average_into_place())
        return done

    # ---- a step ---------------------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hidden = {}  # the gradients of whole tensors other ranks own: this rank does not step them
        for k, param in enumerate(self.params):
            if k in self.shards:
                first, end = self.spans[k][self.rank]
                self.shards[k].grad = None if param.grad is None else param.grad.view(-1)[first:end].view(
                    self.shards[k].shape)
            elif k not in self.held and param.grad is not None:
                hidden[k], param.grad = param.grad, None
        pending = []
        try:
            self.step_owned(self.device, after_group=lambda g: pending.extend(self._start_gathers(g)))
        finally:
            for k, grad in hidden.items():
                self.params[k].grad = grad
            for shard in self.shards.values():
                shard.grad = None
            for handle, finish in pending:
                handle.wait()
                finish()
        return loss

    def _start_gathers(self, group_index: int) -> list:
        """Issue the all-gathers of one group's updated elements (asynchronous: the next groups step meanwhile);
        return (handle, copy-out) pairs."""
        started = []
        for dtype, size, per_rank in self.gather_plans[group_index]:
            views = [self.params[k].view(-1)[first:end] for k, first, end in per_rank[self.rank]]
            sizes = [v.numel() for v in views]
            segment = torch.zeros(size, dtype=dtype, device=self.device)
            if views:
                torch._foreach_copy_(list(segment[:sum(sizes)].split(sizes)), views)
            gathered = segment.new_empty(size * self.world_size)
            handle = dist.all_gather_single(gathered, segment, group=self.group, async_op=True)
            started.append((handle, functools.partial(self._copy_out, gathered, size, per_rank)))
        return started

    def _copy_out(self, gathered: torch.Tensor, size: int, per_rank: list) -> None:
        for rank, spans in enumerate(per_rank):
            if rank == self.rank or not spans:
                continue
            targets = [self.params[k].view(-1)[first:end] for k, first, end in spans]
            sizes = [t.numel() for t in targets]
            torch._foreach_copy_(targets, list(gathered[rank * size:rank * size + sum(sizes)].split(sizes)))

    def grad_norm(self) -> float:
        """The global L2 norm of the averaged gradients, from the parts each rank owns (one all-reduce, read back):
        after a reduce-scatter, the only parts that hold the average."""
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for k in self.held:
            grad = self.params[k].grad
            if grad is not None:
                first, end = self.spans[k][self.rank]
                squares += torch.linalg.vector_norm(grad.view(-1)[first:end], dtype=torch.float64).square()
        dist.all_reduce(squares, group=self.group)
        return squares.sqrt().item()

    # ---- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The consolidated state (a collective call): every rank's share merged, row shards joined, as one process
        holds it."""
        own = self.optimizer.state_dict()
        parts = [None] * self.world_size
        dist.all_gather_object(parts, _to_cpu(own["state"]), group=self.group)
        merged = {}
        for k in range(len(self.params)):
            shares = [part[k] for part in parts if k in part]  # in rank order; none for a parameter never stepped
            if shares:
                axes = self.row_axes.get(k, {})  # a row-sharded state joined on its row axis; the rest alike
                merged[k] = {key: value if axes.get(key) is None else
                             torch.cat([share[key] for share in shares], dim=axes[key])
                             for key, value in shares[0].items()}
        return {**own, "state": merged}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a consolidated state (from any number of ranks, or one process); keep this rank's share."""
        share = {}
        for k, entries in state_dict["state"].items():
            if k not in self.held:
                continue
            if k in self.shards:
                first, end = (e // _row_numel(self.params[k]) for e in self.spans[k][self.rank])
                axes = self.row_axes[k]
                entries = {key: value if axes.get(key) is None else value.narrow(axes[key], first, end - first).clone()
                           for key, value in entries.items()}
            share[k] = entries
        self.optimizer.load_state_dict({**state_dict, "state": share})


def row_shards(rows: int, world_size: int) -> list[tuple[int, int]]:
    """Each rank's rows [first, end) of a dim 0 of `rows`: torch.chunk's split (ceil(rows / world) each, the last
    shorter or empty), which is DTensor's Shard(0) and FSDP2's, so that checkpoints reshard across world sizes."""
    size = -(-rows // world_size)
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world_size)]


@dataclass(frozen=True)
class Ownership:
    """Who holds and steps what (``ownership_spans``), by parameter position (group order)."""

    spans: list[list[tuple[int, int]]]  # per position and rank: the elements [first, end) of the flat parameter
    owners: dict[int, int]  # position → owner rank, for the parameters held whole
    row_axes: dict[int, dict[str, int | None]]  # position → BaseOptimizer.row_axes, for the row-sharded ones


def ownership_spans(optimizer: BaseOptimizer, world_size: int) -> Ownership:
    """Per parameter (group order) and rank, the elements [first, end) of the flattened parameter whose state that
    rank holds and steps; the owner rank of each parameter held whole; the row axes of the state of the others.

    A parameter that ``BaseOptimizer.row_axes`` allows is split by rows over every rank: each row's update reads
    that row only (and per-tensor sums over ranks). Any other parameter is whole on one owner, assigned by state
    bytes on top of the row shards' load, so that per-tensor computations (Muon's and Scion's Newton–Schulz, Soap's
    rotated blocks, Adam-mini's per-head blocks) stay exact, and same-shape matrices end up batched on each owner.
    """
    costs = state_bytes_of(optimizer)
    spans: list = []
    whole, row_axes = [], {}
    load = [0] * world_size
    for group in optimizer.param_groups:
        for param in group["params"]:
            k = len(spans)
            axes = optimizer.row_axes(group, param)
            shards = row_shards(param.shape[0], world_size) if axes is not None else []
            # A state summed over the ranks needs rows on every rank: a rank with none would skip the parameter
            # (nothing to update) and so miss the collective.
            if axes is not None and (None not in axes.values() or all(end > first for first, end in shards)):
                row = _row_numel(param)
                spans.append([(first * row, end * row) for first, end in shards])
                row_axes[k] = axes
                for rank, span in enumerate(spans[k]):
                    load[rank] += costs[k] * _size(span) // param.numel()
            else:
                spans.append(None)
                whole.append(k)
    params = params_in_order(optimizer)
    owners = dict(zip(whole, assign_owners([costs[k] for k in whole], world_size, load)))
    for k, owner in owners.items():
        spans[k] = [(0, params[k].numel() if rank == owner else 0) for rank in range(world_size)]
    return Ownership(spans, owners, row_axes)


def _size(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def _row_numel(param: torch.Tensor) -> int:
    """Elements per row of a row-sharded parameter (``row_axes``: at least one dim, not empty)."""
    return param.numel() // param.shape[0]


def _check_replicated_and_contiguous(optimizer: BaseOptimizer) -> None:
    """Before any collective, on every rank alike: each parameter a plain contiguous tensor (its row shards are
    views of its memory), not a DTensor (whose shards FSDP2's owner stepping steps)."""
    from torch.distributed.tensor import DTensor

    for index, group in enumerate(optimizer.param_groups):
        for position, param in enumerate(group["params"]):
            label = optimizer.param_label(group, index, position)
            if isinstance(param, DTensor):
                raise ValueError(f"ZeroRedundancy: {label} is a DTensor on mesh {tuple(param.device_mesh.shape)}: "
                                 f"ZeroRedundancy shards the state of replicated (DDP) parameters; an FSDP2 model "
                                 f"steps its shards through fastoptim.train.distributed.OwnerStepper")
            if not param.is_contiguous():
                raise ValueError(f"ZeroRedundancy: {label} is not contiguous (strides {param.stride()}): its row "
                                 f"shards are views of its memory")


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
