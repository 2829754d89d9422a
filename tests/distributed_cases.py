"""Ranks of the distributed tests: one launch runs many cases, each a few steps of a tiny Llama in one mode.

`run_case` is the single-process reference and every rank's body alike: the same model (same seed), the same global
batches (rank r takes its slice), the optimizer in the given mode; it returns the global mean loss of every step and
this rank's optimizer-state bytes.
"""

import os
import traceback

import torch
import torch.distributed as dist

from fastoptim.models import Llama
from fastoptim.models.llama import LlamaConfig
from fastoptim.optim.distributed import ZeroRedundancy, params_in_order
from fastoptim.optim.paper import paper_hparams
from fastoptim.optim.registry import build_optimizer
from fastoptim.train.loop import TRAINER_DEFAULTS

# Rows that 2 and 4 ranks do not divide (70, 66): the last shards are shorter, the owners' transfers padded.
MODEL = LlamaConfig(dim=32, n_layers=2, n_heads=2, intermediate=70, vocab_size=66, seq_len=16)
BATCH, SEQ = 8, 16
# Small preconditioner blocks keep Kron and Soap cheap; Soap leaves axes of 64 or more unrotated, Kron gives axes
# over 60 diagonal factors, and neither merges dims, so that their embedding, head and up/gate projections (rows 66
# and 70) step as row shards, as a real vocabulary does; float32
# Newton–Schulz (bf16 would round the ranks' last-bit gradient differences visibly); a clip that binds, so the
# global-norm clip over ranks is exercised.
OVERRIDES = {"kron": {"block_size": 16, "max_size_triangular": 60, "merge_dims_target": 0},
             "soap": {"block_size": 16, "max_precond_dim": 64, "merge_dims_target": 0},
             "muon": {"ns_dtype": "float32"}, "scion": {"ns_dtype": "float32"}}
MAX_GRAD_NORM = 0.5
# Soap's trajectory in float32 is chaotic under last-bit gradient differences (its first eigenbases come from
# near-degenerate spectra: in one process a 1e-7 relative gradient perturbation moves the loss by 1e-3 within three
# steps, whatever eps), so its ranks are compared with one process in float64.
DTYPES = {"soap": torch.float64}


def hparams(name: str) -> dict:
    h = {k: v for k, v in paper_hparams(name, "130m").items() if k not in TRAINER_DEFAULTS}
    return {**h, "max_grad_norm": MAX_GRAD_NORM, **OVERRIDES.get(name, {})}


def batches(steps: int) -> torch.Tensor:
    return torch.randint(MODEL.vocab_size, (steps, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def build(name: str, mode: str, rank: int, world_size: int, config: LlamaConfig = MODEL):
    torch.manual_seed(0)
    model = Llama(config).to(DTYPES.get(name, torch.float32))
    if mode == "single":
        return model, build_optimizer(name, model, hparams(name))
    if mode in ("ddp", "zero1"):
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = build_optimizer(name, model, hparams(name))
        return wrapped, ZeroRedundancy(optimizer, model=wrapped) if mode == "zero1" else optimizer
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from fastoptim.train.distributed import DistEnv, OwnerStepper

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        env = DistEnv(rank=rank, world_size=world_size)
        return model, OwnerStepper(model, lambda: Llama(config).to(model.embed_tokens.weight.dtype),
                                   lambda module: build_optimizer(name, module, hparams(name)), env)
    raise ValueError(f"mode {mode!r}")


def state_bytes(optimizer) -> dict[str, int]:
    """Bytes of every state tensor this rank holds; of its step counters; of the factors of Soap's and Kron's
    row-sharded tensors that every rank holds whole and alike (each rank holding part of a parameter keeps its own
    copy of those two)."""
    sharded = hasattr(optimizer, "state_bytes")
    inner = optimizer.optimizer if sharded else optimizer
    axes = optimizer.row_axes if sharded else {}
    counts = dict.fromkeys(("state_bytes", "step_bytes", "shared_bytes"), 0)
    for k, param in enumerate(params_in_order(inner)):
        for key, value in inner.state.get(param, {}).items():
            counts["state_bytes"] += value.nbytes
            if key == "step":
                counts["step_bytes"] += value.nbytes
            elif k in axes and axes[k].get(key) is None:
                counts["shared_bytes"] += value.nbytes
    return counts


def run_case(name: str, mode: str, steps: int, rank: int = 0, world_size: int = 1) -> dict:
    model, optimizer = build(name, mode, rank, world_size)
    local = BATCH // world_size
    losses = []
    for rows in batches(steps):
        rows = rows[rank * local:(rank + 1) * local]
        loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world_size > 1:
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
    return {"losses": losses, **state_bytes(optimizer)}


def bad_gradient_case(rank: int, world_size: int) -> dict:
    """A gradient rank 1 owns turns NaN there under check_finite='raise': every rank must raise, none may update."""
    torch.manual_seed(0)
    model = Llama(MODEL)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = ZeroRedundancy(build_optimizer("adamw", model, {"lr": 1e-2, "check_finite": "raise"}), model=wrapped)
    rows = batches(1)[0][:BATCH // world_size]
    wrapped(rows[:, :-1], rows[:, 1:]).backward()
    if rank == 1:
        k = min(optimizer.held)
        optimizer.params[k].grad.view(-1)[optimizer.spans[k][rank][0]] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    try:
        optimizer.step()
    except Exception as error:  # the outcome under test
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        return {"error": f"{type(error).__name__}: {error}", "unchanged": unchanged,
                "state": len(optimizer.optimizer.state)}
    return {"error": None}


def reduce_scatter_case(rank: int, world_size: int) -> dict:
    """One Muon step (row-sharded AdamW branch, whole matrices) through ZeroRedundancy's comm hook, against one
    through DDP's all-reduce: the largest differences (relative to the largest magnitude) of the gradient elements
    this rank owns from the average, of the others from this rank's own gradient, and of the stepped parameters.
    In float64: the two reductions sum in different orders, and Adam's first step g/(|g| + eps) magnifies a
    rounding difference of a near-zero gradient up to lr."""
    rows = batches(1)[0][rank * (BATCH // world_size):(rank + 1) * (BATCH // world_size)]
    runs = []
    for hooked in (True, False):
        torch.manual_seed(0)
        model = Llama(MODEL).double()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = ZeroRedundancy(build_optimizer("muon", model, hparams("muon")),
                                   model=wrapped if hooked else None)
        local = [g.detach().clone() for g in torch.autograd.grad(model(rows[:, :-1], rows[:, 1:]),
                                                                 list(model.parameters()))]
        wrapped(rows[:, :-1], rows[:, 1:]).backward()
        runs.append((model, optimizer, local, [p.grad.detach().clone() for p in model.parameters()]))
        optimizer.step()
    (_, zero, local, hooked_grads), (_, _, _, averaged) = runs
    order = {id(p): i for i, p in enumerate(runs[0][0].parameters())}
    owned_error = other_error = 0.0
    for k, param in enumerate(zero.params):
        i = order[id(param)]
        first, end = zero.spans[k][rank]
        owned = torch.zeros(param.numel(), dtype=torch.bool)
        owned[first:end] = True
        got, scale = hooked_grads[i].view(-1), averaged[i].abs().max().item()
        owned_error = max(owned_error, ((got - averaged[i].view(-1))[owned].abs().max().item() / scale
                                        if end > first else 0.0))
        other_error = max(other_error, ((got - local[i].view(-1))[~owned].abs().max().item() / scale
                                        if param.numel() > end - first else 0.0))
    step_error = max(((a - b).abs().max() / b.abs().max()).item()
                     for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()))
    return {"owned": owned_error, "other": other_error, "step": step_error}


def _built(name: str, mode: str) -> tuple:
    """(model, the model as stepped, optimizer) of `name` in one process ("single") or under ZeRO-1 ("zero1"), with
    the final norm frozen so that one parameter never has state."""
    torch.manual_seed(0)
    model = Llama(MODEL).to(DTYPES.get(name, torch.float32))
    model.norm.weight.requires_grad_(False)
    optimizer = build_optimizer(name, model, hparams(name))
    if mode == "single":
        return model, model, optimizer
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    return model, wrapped, ZeroRedundancy(optimizer, model=wrapped)


def _step(wrapped, optimizer, rows, rank: int, world_size: int) -> None:
    """One step on a rank's slice of the global batch (all of it in one process)."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        rows = rows[rank * (BATCH // world_size):(rank + 1) * (BATCH // world_size)]
    wrapped(rows[:, :-1], rows[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def consolidated_state_case(name: str, rank: int, world_size: int) -> dict:
    """ZeroRedundancy's state_dict() after 3 steps, against one process's after the same steps (its keys and
    shapes, and the largest difference relative to each tensor's largest magnitude); then a fresh wrapper loads it
    (whether its own state_dict() is the loaded one exactly) and both take a 4th step: their parameters' largest
    relative difference. (Not bitwise: DDP rebuilds its buckets after the first step, so the fresh wrapper's
    reduce-scatter sums in another order.)"""
    data = batches(4)
    (model, wrapped, zero), (_, one, single) = _built(name, "zero1"), _built(name, "single")
    for rows in data[:3]:
        _step(wrapped, zero, rows, rank, world_size)
        _step(one, single, rows, rank, world_size)
    got, want = zero.state_dict(), single.state_dict()
    same_layout = got["state"].keys() == want["state"].keys() and all(
        got["state"][k].keys() == want["state"][k].keys()
        and all(got["state"][k][key].shape == value.shape for key, value in want["state"][k].items())
        for k in want["state"])
    worst = max(((got["state"][k][key] - value).abs().max() / value.abs().max().clamp(min=1e-30)).item()
                for k in want["state"] for key, value in want["state"][k].items() if key != "step") if same_layout else 1.0
    fresh_model, fresh_wrapped, fresh = _built(name, "zero1")
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(got)
    again = fresh.state_dict()
    round_trip = again["state"].keys() == got["state"].keys() and all(
        torch.equal(again["state"][k][key], value) for k in got["state"] for key, value in got["state"][k].items())
    _step(wrapped, zero, data[3], rank, world_size)
    _step(fresh_wrapped, fresh, data[3], rank, world_size)
    resumed = max(((a - b).abs().max() / b.abs().max()).item()
                  for a, b in zip(fresh_model.parameters(), model.parameters()))
    return {"same_layout": same_layout, "worst": worst, "round_trip": round_trip, "resumed": resumed}


def row_shard_checkpoint_case(name: str, folder: str, rank: int, world_size: int) -> dict:
    """Soap's or Kron's row-sharded state through DCP: ZeRO-1 saves it after 3 steps (each state tensor split on its
    row axis, the factors every rank holds alike whole); FSDP2 over the same ranks restores it, and each of its
    local state tensors must equal ZeRO-1's (both split rows as torch.chunk does); reading whole tensors must give
    ZeRO-1's consolidated state. Returns those two checks and how many saved tensors are split on each axis."""
    from pathlib import Path

    from torch.distributed.tensor import DTensor, Shard

    from fastoptim.train import checkpoint as ckpt
    from fastoptim.train.distributed import checkpoint_tensors, restore_checkpoint

    wrapped, zero = build(name, "zero1", rank, world_size)
    for rows in batches(3):
        _step(wrapped, zero, rows, rank, world_size)
    tensors, rest = checkpoint_tensors(wrapped, zero, fsdp=False)
    split_on = {axis: sum(isinstance(t, DTensor) and tuple(t.placements) == (Shard(axis),) for t in tensors.values())
                for axis in (0, 1)}
    path = ckpt.save_checkpoint(Path(folder), tensors, {"step": 3}, keep=1)
    fsdp_model, fsdp = build(name, "fsdp", rank, world_size)
    restore_checkpoint({"path": path, "tensors": ckpt.tensor_shapes(path), "optimizer": rest}, fsdp_model, fsdp,
                       fsdp=True)
    mine, theirs = zero.local_state_dict()["state"], fsdp.local_state_dict()["state"]
    local_equal = mine.keys() == theirs.keys() and all(
        mine[k].keys() == theirs[k].keys() and all(torch.equal(v, theirs[k][key].cpu()) for key, v in mine[k].items())
        for k in mine)
    names = [name for group in zero.param_groups for name in group["names"]]
    whole = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in ckpt.tensor_shapes(path).items()
             if name.startswith("optimizer.")}
    ckpt.load_tensors(path, whole)
    consolidated = {f"optimizer.{names[k]}.{key}": value for k, entries in zero.state_dict()["state"].items()
                    for key, value in entries.items()}
    whole_equal = whole.keys() == consolidated.keys() and all(torch.equal(whole[n], v.cpu())
                                                              for n, v in consolidated.items())
    return {"split_on": split_on, "local_equal": local_equal, "whole_equal": whole_equal}


def bad_parameter_case(rank: int, world_size: int) -> dict:
    """ZeroRedundancy over a non-contiguous parameter: the error on every rank, before any collective."""
    torch.manual_seed(0)
    model = Llama(MODEL)
    model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.randn(MODEL.dim, MODEL.intermediate).mT)
    try:
        ZeroRedundancy(build_optimizer("adamw", model, {}))
    except ValueError as error:  # the outcome under test
        return {"error": str(error)}
    return {"error": None}


CASES = {"run": run_case, "bad_gradient": bad_gradient_case, "reduce_scatter": reduce_scatter_case,
         "consolidated_state": consolidated_state_case, "row_shard_checkpoint": row_shard_checkpoint_case,
         "bad_parameter": bad_parameter_case}


def worker(rank: int, world_size: int, port: int, cases: list, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    outcomes = {}
    try:
        for case in cases:
            kind, *args = case
            try:
                outcomes[case] = CASES[kind](*args, rank=rank, world_size=world_size)
            except Exception:
                outcomes[case] = {"crash": traceback.format_exc()}
                raise
    finally:
        torch.save(outcomes, f"{results}.{rank}")
        dist.destroy_process_group()



class Killed(Exception):
    """Stands in for a kill: raised on every rank inside the same step."""


def train_worker(rank: int, world_size: int, runs: list, results: str) -> None:
    """One rank of a torchrun-like launch of the trainer: each run (port, config, checkpoint to resume from or None,
    steps after which to die or None) gets a fresh process group on its own port."""
    from fastoptim.train import loop, train

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    real = loop._forward_backward
    outcomes = []
    for port, cfg, resume_from, die_after in runs:
        os.environ["MASTER_PORT"] = str(port)
        if resume_from is not None:
            place_checkpoint(resume_from, cfg.out_dir, rank)
        calls = []

        def forward_backward(*args, **kwargs):
            calls.append(1)
            if die_after is not None and len(calls) > die_after:
                raise Killed
            return real(*args, **kwargs)

        loop._forward_backward = forward_backward
        try:
            result = train(cfg)
            outcomes.append({"history": result.history, "final": result.final_val_loss})
        except Killed:
            outcomes.append({"killed": True})
    torch.save(outcomes, f"{results}.{rank}")


def place_checkpoint(checkpoint, out_dir, rank: int = 0) -> None:
    """Copy a checkpoint folder into out_dir/checkpoints, as a killed run leaves it (the first rank to rename wins)."""
    import shutil
    from pathlib import Path

    folder = Path(out_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint, folder / f"tmp{rank}")
    try:
        os.rename(folder / f"tmp{rank}", folder / Path(checkpoint).name)
    except OSError:
        shutil.rmtree(folder / f"tmp{rank}")
