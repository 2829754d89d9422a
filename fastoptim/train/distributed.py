"""torchrun support: process group setup, DDP or FSDP2 wrapping, and full (unsharded) state dicts for checkpoints.

Under torchrun (WORLD_SIZE > 1) each rank gets batch_size / world_size sequences of every global batch (see
data/loader.py), so the run computes the same global-batch gradient as a single process.

FSDP2 (`fully_shard` per transformer block, then the root) shards parameters and gradients. Optimizers step through
`OwnerStepper`: every parameter has one owner rank, which gathers its gradient, runs the optimizer on the whole tensor
(Muon and Scion need whole matrices for Newton-Schulz) and scatters the result back into the shards. Parameters that
one gradient clip covers share an owner, so the clip sees its whole set: for Muon, Scion and Adam-mini the matrices
(never clipped) spread over ranks and the rest sits on rank 0; for the other optimizers everything sits on rank 0
unless clipping is off (max_grad_norm=0). Soap and Kron precondition and clip all parameters jointly: they are
refused under FSDP2 (use DDP).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastoptim.optim.routing import named_kinds

# benchmark-spec §1: these clip only their AdamW/signum branch, never the hidden matrices.
UNCLIPPED_MATRIX_OPTIMIZERS = ("muon", "scion", "mini")
UNSHARDABLE_OPTIMIZERS = ("soap", "kron")  # not under FSDP2


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


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool) -> nn.Module:
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def spreadable(kind: str, optimizer: str, clipping: bool) -> bool:
    """Whether a parameter of this routing kind may have an owner of its own (no clip must see it with others)."""
    return not clipping or (kind == "matrix" and optimizer in UNCLIPPED_MATRIX_OPTIMIZERS)


def assign_owners(named_sizes: list[tuple[str, int, bool]], world_size: int) -> list[int]:
    """Owner rank per (name, size, spreadable) parameter: the others all on rank 0, so that their gradient clip sees
    every one of them; the spreadable ones greedily to the least-loaded rank, largest first."""
    load = [0] * world_size
    owners = [0] * len(named_sizes)
    for _, size, spread in named_sizes:
        if not spread:
            load[0] += size
    for i in sorted(range(len(named_sizes)), key=lambda i: -named_sizes[i][1]):
        if named_sizes[i][2]:
            owners[i] = min(range(world_size), key=lambda r: load[r])
            load[owners[i]] += named_sizes[i][1]
    return owners


class OwnerStepper:
    """An optimizer over an FSDP2 model: each rank runs it on the parameters it owns, whole.

    The optimizer is built over a "shadow" copy of the model whose owned parameters are full tensors and whose other
    parameters stay on the meta device (no memory; their gradients stay None, so the optimizer skips them). A step
    all-gathers each gradient (the owner keeps it), steps the shadow, then scatters each owner's updated matrix back
    into the FSDP shards. The optimizer state is thus split over ranks by ownership.
    """

    def __init__(self, model: nn.Module, make_shadow: Callable[[], nn.Module],
                 build: Callable[[nn.Module], torch.optim.Optimizer], spread: Callable[[str], bool], env: DistEnv):
        self.model, self.env = model, env
        self.params = list(model.named_parameters())
        kinds = {name: kind for name, _, kind in named_kinds(model)}
        self.owners = assign_owners([(n, p.numel(), spread(kinds[n])) for n, p in self.params], env.world_size)
        with torch.device("meta"):
            self.shadow = make_shadow()
        for i, whole in self._whole_owned_params():
            module_name, _, leaf = self.params[i][0].rpartition(".")
            setattr(self.shadow.get_submodule(module_name), leaf, nn.Parameter(whole.clone()))
        shadow_params = dict(self.shadow.named_parameters())
        self.shadow_params = [shadow_params[name] for name, _ in self.params]
        self.optimizer = build(self.shadow)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _whole_owned_params(self) -> list[tuple[int, torch.Tensor]]:
        """(index, whole tensor) of this rank's parameters. Every rank must call it: it all-gathers each one."""
        with torch.no_grad():
            wholes = [(i, param.full_tensor()) for i, (_, param) in enumerate(self.params)]
        return [(i, whole) for i, whole in wholes if self.owners[i] == self.env.rank]

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Owned shadow parameters := the model's (after the model loaded a checkpoint)."""
        for i, whole in self._whole_owned_params():
            self.shadow_params[i].copy_(whole)

    @torch.no_grad()
    def step(self) -> None:
        from torch.distributed.tensor import distribute_tensor

        for i, (_, param) in enumerate(self.params):
            full_grad = param.grad.full_tensor()
            if self.owners[i] == self.env.rank:
                self.shadow_params[i].grad = full_grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for i, (_, param) in enumerate(self.params):
            owned = self.owners[i] == self.env.rank
            source = self.shadow_params[i] if owned else torch.empty(param.shape, dtype=param.dtype,
                                                                         device=param.to_local().device)
            shard = distribute_tensor(source.detach(), param.device_mesh, param.placements,
                                      src_data_rank=self.owners[i])
            param.to_local().copy_(shard.to_local())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The whole optimizer state, merged from every owner (a collective call)."""
        own = self.optimizer.state_dict()
        parts = [None] * self.env.world_size
        dist.all_gather_object(parts, _to_cpu(own["state"]))
        merged = {}
        for part in parts:
            merged.update(part)
        return {"state": merged, "param_groups": own["param_groups"]}

    def load_state_dict(self, state: dict) -> None:
        """Load the whole optimizer state; each rank keeps only its own parameters' entries."""
        # torch numbers the state by position over the param groups; meta parameters belong to other ranks.
        in_group_order = [p for group in self.optimizer.param_groups for p in group["params"]]
        owned = {k for k, p in enumerate(in_group_order) if not p.is_meta}
        self.optimizer.load_state_dict({"state": {k: s for k, s in state["state"].items() if k in owned},
                                        "param_groups": state["param_groups"]})


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def full_state(model: nn.Module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of whole (unsharded) tensors; a collective call under FSDP2."""
    if not fsdp:
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if isinstance(optimizer, OwnerStepper):
        return get_model_state_dict(model, options=options), optimizer.state_dict()
    return get_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer, fsdp: bool, model_state: dict, optimizer_state: dict) -> None:
    if not fsdp:
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    if isinstance(optimizer, OwnerStepper):
        set_model_state_dict(model, model_state, options=options)
        optimizer.sync_from_model()
        optimizer.load_state_dict(optimizer_state)
        return
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=options)
