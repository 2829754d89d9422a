"""torchrun support: process group setup, DDP or FSDP2 wrapping, and full (unsharded) state dicts for checkpoints.

Under torchrun (WORLD_SIZE > 1) each rank gets batch_size / world_size sequences of every global batch (see
data/loader.py), so the run computes the same global-batch gradient as a single process.

FSDP2 (`fully_shard` per transformer block, then the root) shards parameters, gradients and optimizer state; the
elementwise optimizers then step on their local shards. Optimizers that need whole matrices (Muon, Scion: Newton-
Schulz; Soap, Kron: Kronecker factors per dimension) would need each matrix gathered to an owner rank, updated there
and scattered back; that is not implemented, so those optimizers are refused under FSDP2 (use DDP).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

WHOLE_MATRIX_OPTIMIZERS = ("muon", "scion", "soap", "kron")


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


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of whole (unsharded) tensors; a collective call under FSDP2."""
    if not fsdp:
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool,
                    model_state: dict, optimizer_state: dict) -> None:
    if not fsdp:
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
