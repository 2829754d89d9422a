"""torchrun support: process group setup, the three modes, and the tensors a checkpoint holds under each.

Under torchrun (WORLD_SIZE > 1) each rank gets batch_size / world_size sequences of every global batch (see
data/loader.py), so the run computes the same global-batch gradient as a single process. Modes:

- ddp: DistributedDataParallel; every rank holds and steps the whole optimizer.
- zero1: DDP plus fastoptim.ZeroRedundancy: gradients reduce-scattered, each rank holds and steps its share of the
  optimizer state (row shards of the row-local branches, whole tensors by state bytes for the rest), parameters
  all-gathered back (fastoptim/optim/distributed.py).
- fsdp: FSDP2 (`fully_shard` per transformer block, then the root) shards parameters and gradients. Optimizers step
  through `OwnerStepper`, with ZeRO-1's ownership: row-shardable parameters step on their local shards; every other
  parameter has one owner rank, which receives the whole gradient, runs the optimizer on the whole tensor (Muon and
  Scion need whole matrices for Newton–Schulz) and sends the result back into the shards. The clip uses the global
  norm over all shards and owners.

SophiaH, whose Hessian-vector product bypasses the gradient reduction, runs on one process only.
"""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastoptim.optim.base import RowShard
from fastoptim.optim.distributed import (OwnedShareStepper, ZeroRedundancy, check_shardable, held_state_bytes,
                                         ownership_spans, row_shards)
from fastoptim.train import checkpoint as ckpt

MODES = ("single", "ddp", "zero1", "fsdp")

@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} but CUDA is not available here")
    return device


def init_distributed(requested_device: str) -> DistEnv:
    """The process group from torchrun's environment (a no-op for a single process)."""
    device = resolve_device(requested_device)
    world_size = world_size_from_env()
    if world_size == 1:
        return DistEnv(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def shutdown_distributed(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool, param_dtype: torch.dtype = torch.float32) -> nn.Module:
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Parameters are all-gathered in param_dtype; gradients are reduced in float32 whatever it is.
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sum_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def min_over_ranks(value: int, env: DistEnv) -> int:
    if not env.distributed:
        return value
    tensor = torch.tensor(value, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor)


def global_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of all `tensors` together, read back to the host (one sync); FSDP2's sharded DTensors are reduced
    over their mesh."""
    if not tensors:
        return 0.0
    norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float32) for t in tensors]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms)).item()


def gradient_norm(model: nn.Module, optimizer) -> float:
    """The global norm of the step's averaged gradients, read back (one sync). Under ZeRO-1 they are averaged only
    where each rank owns the state (a reduce-scatter), so the optimizer sums the owners' parts."""
    if isinstance(optimizer, ZeroRedundancy):
        return optimizer.grad_norm()
    return global_norm([p.grad for p in unwrap(model).parameters() if p.grad is not None])


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def run_mode(world_size: int, zero1: bool, fsdp: bool) -> str:
    if zero1 and fsdp:
        raise ValueError("zero1 and fsdp: choose one (FSDP2 already shards the optimizer state)")
    if world_size == 1:
        return "single"
    return "fsdp" if fsdp else "zero1" if zero1 else "ddp"


def check_mode(mode: str, optimizer) -> None:
    """Before any work, on every rank: refuse an optimizer that cannot run in `mode`, saying why."""
    if mode in ("zero1", "fsdp"):
        check_shardable(optimizer, f"mode {mode}")


def per_rank(value: int, env: DistEnv) -> list[int]:
    """`value` of every rank, in rank order."""
    if not env.distributed:
        return [value]
    values = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


def optimizer_state_bytes(optimizer) -> int:
    return optimizer.state_bytes() if isinstance(optimizer, OwnedShareStepper) else held_state_bytes(optimizer)


def build_sharded_optimizer(mode: str, model: nn.Module, optimizer_of: Callable[[nn.Module], torch.optim.Optimizer],
                            make_shadow: Callable[[], nn.Module], env: DistEnv):
    """The optimizer of `mode` over the wrapped `model`."""
    if mode == "fsdp":
        return OwnerStepper(model, make_shadow, optimizer_of, env)
    optimizer = optimizer_of(unwrap(model))
    return ZeroRedundancy(optimizer, model=model) if mode == "zero1" else optimizer


class OwnerStepper(OwnedShareStepper):
    """An optimizer over an FSDP2 model (1-D mesh, parameters sharded on dim 0).

    Parameters that step as row shards (``BaseOptimizer.row_axes``: AdamW, NAdamW, Cautious, Mars and Lion whole;
    the AdamW/signum branches of Muon, Scion and Adam-mini; Adam-mini's per-row blocks; Soap's and Kron's tensors
    whose vocabulary axis has no b×b factor) step in place on the local shards: no gather, and each rank holds
    1/world of their state. Every other parameter (matrices of Muon and Scion, Adam-mini's per-head blocks; Soap's
    and Kron's other tensors, whose updates read whole blocks) has one owner rank,
    assigned by state bytes on top of the shards' load (``ownership_spans``, as under ZeRO-1): its gradient's shards
    go to the owner alone (one all-to-all per bucket of same-shape parameters, all issued together), the owner steps
    the whole tensor, and its new value goes back into the shards (one all-to-all per bucket). The optimizer is built
    over a "shadow" module holding the local shards (sharing the model's storage), the owned whole tensors and, for
    parameters owned elsewhere, meta tensors (no memory; no gradient, so skipped).
    The clip is the global norm over all shards and owners (one all-reduce).
    """

    def __init__(self, model: nn.Module, make_shadow: Callable[[], nn.Module],
                 build: Callable[[nn.Module], torch.optim.Optimizer], env: DistEnv):
        self.model, self.env = model, env
        self.params = list(model.named_parameters())
        mesh = check_fsdp_params(self.params)
        self.process_group = mesh.get_group()
        with torch.device("meta"):
            self.shadow = make_shadow()
        probe = build(self.shadow)  # over meta tensors: the routing and the state shapes, for free
        check_shardable(probe, "mode fsdp")
        # ZeRO-1's ownership: its row shards are FSDP2's dim-0 shards, stepped where they lie
        ownership = ownership_spans(probe, env.world_size)
        names = [name for group in probe.param_groups for name in group["names"]]
        self.owner = {names[k]: rank for k, rank in ownership.owners.items()}
        self.local = set(names) - set(self.owner)
        self.buckets = self._shape_buckets()
        gathered = self._gather_to_owners({name: param.to_local() for name, param in self.params
                                           if name not in self.local})
        for name, param in self.params:
            module_name, _, leaf = name.rpartition(".")
            if name in self.local:  # the same storage as the model's shard: a step writes the model directly
                value = nn.Parameter(param.to_local(), requires_grad=param.requires_grad)
            elif name in gathered:
                value = nn.Parameter(gathered[name], requires_grad=param.requires_grad)
            else:
                continue
            setattr(self.shadow.get_submodule(module_name), leaf, value)
        shadow_params = dict(self.shadow.named_parameters())
        self.shadow_params = [shadow_params[name] for name, _ in self.params]
        optimizer = build(self.shadow)
        positions = [name for group in optimizer.param_groups for name in group["names"]]
        params = dict(self.params)
        optimizer.shard_of.update((shadow_params[name], RowShard(params[name].shape, _first_row(params[name])))
                                  for name in self.local)
        # torch position → the model's DTensor, for state held as local shards (checkpoints wrap it as DTensors)
        self.sharded_state = {k: params[name] for k, name in enumerate(positions) if name in self.local}
        held = [k for k, name in enumerate(positions) if name in self.local or self.owner[name] == env.rank]
        super().__init__(optimizer, held, {k: ownership.row_axes[k] for k in self.sharded_state})

    def _shape_buckets(self) -> list[list[str]]:
        """The owned-whole parameters grouped by shape and dtype (model order): same-shape shards are equal, so one
        all-to-all moves a bucket each way."""
        buckets: dict[tuple, list[str]] = {}
        for name, param in self.params:
            if name not in self.local:
                buckets.setdefault((tuple(param.shape), param.dtype), []).append(name)
        return list(buckets.values())

    def _gather_to_owners(self, shards: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each named local shard gathered into its whole tensor on its owner (every rank calls it, with the same
        names): one all-to-all per shape bucket, in which every rank sends each shard to that tensor's owner alone.
        Returns name → whole tensor, for the names this rank owns."""
        world, me, params = self.env.world_size, self.env.rank, dict(self.params)
        pending = []
        for bucket in self.buckets:
            names = [name for name in bucket if name in shards]
            if not names:
                continue
            shape = params[names[0]].shape
            rows = -(-shape[0] // world)  # FSDP2's dim-0 chunk; the last shards may be shorter or empty
            by_owner = [[name for name in names if self.owner[name] == rank] for rank in range(world)]
            send = torch.cat([_padded_rows(shards[name], rows).reshape(-1) for owned in by_owner for name in owned])
            block = send.numel() // len(names)
            received = send.new_empty(len(by_owner[me]) * block * world)
            handle = dist.all_to_all_single(received, send, output_split_sizes=[len(by_owner[me]) * block] * world,
                                            input_split_sizes=[len(owned) * block for owned in by_owner],
                                            group=self.process_group, async_op=True)
            pending.append((by_owner[me], shape, rows, received, handle))
        wholes = {}
        for mine, shape, rows, received, handle in pending:
            handle.wait()
            parts = received.view(world, len(mine), rows, *shape[1:])  # [from rank][owned tensor][its rows]
            for j, name in enumerate(mine):
                wholes[name] = parts[:, j].reshape(world * rows, *shape[1:])[:shape[0]]
        return wholes

    def _scatter_from_owners(self) -> None:
        """Each owner's updated whole tensors back into every rank's shards (every rank calls it): one all-to-all
        per shape bucket, the reverse of the gather."""
        world, me = self.env.world_size, self.env.rank
        position = {name: i for i, (name, _) in enumerate(self.params)}
        params = dict(self.params)
        pending = []
        for bucket in self.buckets:
            shape = params[bucket[0]].shape
            rows = -(-shape[0] // world)
            by_owner = [[name for name in bucket if self.owner[name] == rank] for rank in range(world)]
            mine = [_padded_rows(self.shadow_params[position[name]].detach(), rows * world) for name in by_owner[me]]
            # [to rank][owned tensor][its rows]: rank d's rows of every tensor this rank owns, in order
            send = (torch.stack(mine).view(len(mine), world, -1).transpose(0, 1).reshape(-1) if mine
                    else params[bucket[0]].to_local().new_empty(0))
            block = rows * math.prod(shape[1:])
            received = send.new_empty(len(bucket) * block)
            handle = dist.all_to_all_single(received, send,
                                            output_split_sizes=[len(owned) * block for owned in by_owner],
                                            input_split_sizes=[len(mine) * block] * world,
                                            group=self.process_group, async_op=True)
            pending.append(([name for owned in by_owner for name in owned], rows, received, handle))
        for names, rows, received, handle in pending:
            handle.wait()
            for name, part in zip(names, received.view(len(names), rows, -1)):
                local = params[name].to_local()
                local.copy_(part[:local.shape[0]].view(local.shape))

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """The shadow's tensors := the model's (after the model loaded a checkpoint)."""
        gathered = self._gather_to_owners({name: param.to_local() for name, param in self.params
                                           if name not in self.local})
        for i, (name, param) in enumerate(self.params):
            if name in self.local:
                self.shadow_params[i].copy_(param.to_local())
            elif name in gathered:
                self.shadow_params[i].copy_(gathered[name])

    @torch.no_grad()
    def step(self) -> None:
        for i, (name, param) in enumerate(self.params):
            if name in self.local and param.grad is not None:
                self.shadow_params[i].grad = param.grad.to_local()
        gathered = self._gather_to_owners({name: param.grad.to_local() for name, param in self.params
                                           if name not in self.local and param.grad is not None})
        for i, (name, _) in enumerate(self.params):
            if name in gathered:
                self.shadow_params[i].grad = gathered[name]
        try:
            self.step_owned(self.env.device)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        for i, (name, param) in enumerate(self.params):
            if name in self.local and param.to_local().data_ptr() != self.shadow_params[i].data_ptr():
                param.to_local().copy_(self.shadow_params[i])  # FSDP2 moved the shard's storage
        self._scatter_from_owners()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        raise NotImplementedError("OwnerStepper holds state as local shards: save it through DCP "
                                  "(fastoptim.train.distributed.checkpoint_tensors), not as one state_dict")

    def load_state_dict(self, state_dict: dict) -> None:
        raise NotImplementedError("OwnerStepper loads its state through DCP (restore_checkpoint)")


def check_fsdp_params(params: list[tuple[str, torch.Tensor]]):
    """The one 1-D device mesh every parameter is sharded over on dim 0; a clear error naming the first parameter
    that is not (on every rank alike: the model is the same)."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = None
    for name, param in params:
        if not isinstance(param, DTensor):
            raise ValueError(f"parameter {name!r} is not a DTensor: fully_shard every parameter of the model")
        if param.device_mesh.ndim != 1:
            raise ValueError(f"parameter {name!r} is on a {param.device_mesh.ndim}-D device mesh "
                             f"{tuple(param.device_mesh.shape)}: mode fsdp steps 1-D meshes only (no HSDP or "
                             f"tensor parallelism)")
        if tuple(param.placements) != (Shard(0),):
            raise ValueError(f"parameter {name!r} has placements {tuple(param.placements)}: mode fsdp expects "
                             f"FSDP2's (Shard(dim=0),)")
        if mesh is None:
            mesh = param.device_mesh
        elif param.device_mesh != mesh:
            raise ValueError(f"parameter {name!r} is on another device mesh than {params[0][0]!r}: one optimizer "
                             f"steps over one mesh")
    return mesh


def _model_tensors(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The model's state dict as this rank holds it: FSDP2's DTensor shards, else the whole (replicated) tensors."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model)
    return unwrap(model).state_dict()


def _local_optimizer(optimizer) -> tuple[torch.optim.Optimizer, dict]:
    """(the optimizer that holds this rank's state, its state_dict: this rank's share, torch's numbering)."""
    if isinstance(optimizer, OwnedShareStepper):
        return optimizer.optimizer, optimizer.local_state_dict()
    return optimizer, optimizer.state_dict()


def _position_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [name for group in optimizer.param_groups for name in group["names"]]


def checkpoint_tensors(model: nn.Module, optimizer, fsdp: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """(this rank's tensors under rank-independent names, the optimizer's non-tensor rest: param groups and extras)."""
    tensors = {f"model.{name}": value for name, value in _model_tensors(model, fsdp).items()}
    local, state = _local_optimizer(optimizer)
    names = _position_names(local)
    for position, entries in state["state"].items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {names[position]!r}[{key!r}] is not a tensor: DCP checkpoints "
                                f"hold tensor state only")
            tensors[f"optimizer.{names[position]}.{key}"] = _as_saved(optimizer, position, key, value)
    return tensors, {key: value for key, value in state.items() if key != "state"}


def _row_sharded(optimizer, position: int, key: str):
    """(the parameter's DTensor, the state tensor's row axis) for a state tensor that holds this rank's rows of a
    row-sharded parameter (FSDP2's and ZeRO-1's), else None (the tensor is whole here)."""
    if not isinstance(optimizer, OwnedShareStepper) or position not in optimizer.sharded_state:
        return None
    axis = optimizer.row_axes[position].get(key)
    return None if axis is None else (optimizer.sharded_state[position], axis)


def _local_part(value: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def _as_saved(optimizer, position: int, key: str, value: torch.Tensor) -> torch.Tensor:
    """A state tensor as DCP must see it: this rank's rows as the DTensor they are a shard of, split on the state's
    row axis (so that it reshards); a tensor whole here (an owner's, a step counter, a factor every rank holds
    alike) as itself."""
    sharded = _row_sharded(optimizer, position, key)
    if sharded is None:
        return value
    from torch.distributed.tensor import DTensor, Shard

    param, axis = sharded
    shape = (*value.shape[:axis], param.shape[0], *value.shape[axis + 1:])
    return DTensor.from_local(value, param.device_mesh, [Shard(axis)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def check_model_fits(saved: dict[str, tuple], model: nn.Module, fsdp: bool, path) -> None:
    """Raise, naming what differs, unless the checkpoint's model tensors are this model's (names and shapes)."""
    ours = {f"model.{name}": tuple(value.shape) for name, value in _model_tensors(model, fsdp).items()}
    theirs = {name: shape for name, (shape, _) in saved.items() if name.startswith("model.")}
    problems = [f"{name[6:]} is {theirs[name]} there, {shape} here" for name, shape in ours.items()
                if name in theirs and theirs[name] != shape]
    problems += [f"{name[6:]} is missing there" for name in ours if name not in theirs]
    problems += [f"{name[6:]} is not in this model" for name in theirs if name not in ours]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"checkpoint {path} holds another model: {shown}. Nothing was loaded")


def restore_checkpoint(checkpoint: dict, model: nn.Module, optimizer, fsdp: bool) -> None:
    """Load the model and this rank's optimizer share from a checkpoint of any world size and mode (a collective
    call). The model's fit is checked first, so a checkpoint of another model changes nothing."""
    path, saved = checkpoint["path"], checkpoint["tensors"]
    check_model_fits(saved, model, fsdp, path)
    model_tensors = _model_tensors(model, fsdp)
    local, _ = _local_optimizer(optimizer)
    held = optimizer.held if isinstance(optimizer, OwnedShareStepper) else range(len(_position_names(local)))
    names = _position_names(local)
    wanted = {}  # torch position → {key: empty tensor of the saved shape}
    for position in held:
        prefix = f"optimizer.{names[position]}."
        for name, (shape, dtype) in saved.items():
            key = name[len(prefix):]
            if name.startswith(prefix) and "." not in key:
                sharded = _row_sharded(optimizer, position, key)
                if sharded is None:
                    empty = torch.empty(shape, dtype=dtype, device="cpu")
                else:
                    param, axis = sharded
                    local_shape = (*shape[:axis], param.to_local().shape[0], *shape[axis + 1:])
                    empty = torch.empty(local_shape, dtype=dtype, device=param.device)
                wanted.setdefault(position, {})[key] = _as_saved(optimizer, position, key, empty)
    ckpt.load_tensors(path, {**{f"model.{name}": value for name, value in model_tensors.items()},
                             **{f"optimizer.{names[pos]}.{key}": value
                                for pos, entries in wanted.items() for key, value in entries.items()}})
    wanted = {pos: {key: _local_part(value) for key, value in entries.items()} for pos, entries in wanted.items()}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, model_tensors)
        optimizer.sync_from_model()
    else:
        unwrap(model).load_state_dict(model_tensors)
    local.load_state_dict({**checkpoint["optimizer"], "state": wanted})


def full_model_state(model: nn.Module, fsdp: bool) -> dict:
    """The model's state dict of whole tensors on the CPU (a collective call under FSDP2)."""
    if not fsdp:
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _first_row(param) -> int:
    """The first of the whole tensor's rows that this rank's FSDP2 shard of `param` holds (torch.chunk's split)."""
    return row_shards(param.shape[0], param.device_mesh.size())[param.device_mesh.get_local_rank()][0]


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with dim 0 zero-padded to `rows` (itself when it has them)."""
    if tensor.shape[0] == rows:
        return tensor
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    return padded
