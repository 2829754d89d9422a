"""The training loop: one model, one optimizer, one data budget; the final validation loss is the run's metric.

Readable top to bottom in `train`: check the config, prepare data, build model and optimizer, maybe resume, then
step: set the scheduled LR, forward/backward over micro-batches, optimizer step (the optimizer owns gradient
clipping), log, evaluate, checkpoint. A run stops early and reports `diverged` on a NaN/inf loss, a loss above
1e4, or a loss still >= 6 after 2000 steps (the benchmark's rule); its final_val_loss is then inf.
"""

import contextlib
import dataclasses
import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from fastoptim.data import TrainLoader, check_batch_divisible, check_data_spec, prepare_data, validation_batches
from fastoptim.models import Llama, get_model_config, non_embedding_params
from fastoptim.train import checkpoint as ckpt
from fastoptim.train.distributed import (UNSHARDABLE_OPTIMIZERS, OwnerStepper, barrier, full_state, init_distributed,
                                         load_full_state, mean_over_ranks, shutdown_distributed, spreadable, unwrap,
                                         world_size_from_env, wrap_model)
from fastoptim.train.metrics import MetricsLog, check_logger
from fastoptim.train.schedule import lr_multiplier

# hparams keys the trainer consumes; everything else goes to build_optimizer.
TRAINER_DEFAULTS = {"batch_size": 128, "warmup": 0, "lr_schedule": "cosine", "decay": 1.0, "min_lr_ratio": 0.0}
DIVERGENCE_LOSS = 1e4
LATE_LOSS, LATE_STEP = 6.0, 2000


@dataclass
class TrainConfig:
    model: str = "tiny"
    optimizer: str = "adamw"
    hparams: dict = field(default_factory=dict)  # flat: optimizer hparams + TRAINER_DEFAULTS' keys
    chinchilla: float = 1.0
    seq_len: int | None = None  # None: the model preset's (4096 for the paper sizes)
    steps: int | None = None  # None: floor(chinchilla * 20 * N / (seq_len * batch_size))
    eval_every: int | None = None  # None: min(1000, steps - 1) as in the paper; 0: only at the end
    eval_batches: int = 8
    seed: int = 0
    data: str = "stdlib"
    vocab_size: int = 4096  # BPE vocabulary trained on text data (ignored for .bin shards)
    corpus_bytes: int = 4_000_000  # how much text of the corpus to tokenize
    cache_dir: str | None = None
    allow_repeat: bool = False
    out_dir: str = "runs/run"
    device: str = "auto"
    grad_accum: int = 1  # micro-batches per rank and step
    checkpoint_every: int | None = None  # None: at every evaluation (at the end when eval_every=0); 0: never
    keep_checkpoints: int = 2
    resume: bool = False
    fsdp: bool = False
    progress: bool = True
    log_to: str | None = None  # "tensorboard" | "wandb"


@dataclass
class RunResult:
    final_val_loss: float
    diverged: bool
    steps: int
    history: list[dict]
    tokens: int
    tokens_per_s: float
    out_dir: str
    config: dict


def optimizer_registry():
    # Imported when a run starts: the optimizers load native kernels that `fastoptim --help` should not pay for.
    return importlib.import_module("fastoptim.optim.registry")


def split_hparams(hparams: dict) -> tuple[dict, dict]:
    """(trainer settings with defaults filled in, optimizer hparams)."""
    trainer = {key: hparams.get(key, default) for key, default in TRAINER_DEFAULTS.items()}
    return trainer, {k: v for k, v in hparams.items() if k not in TRAINER_DEFAULTS}


def resolve_steps(cfg: TrainConfig, model_cfg, seq_len: int, batch_size: int) -> int:
    if cfg.steps is not None:
        if cfg.steps <= 0:
            raise ValueError(f"steps={cfg.steps} must be positive")
        return cfg.steps
    if cfg.chinchilla <= 0:
        raise ValueError(f"chinchilla={cfg.chinchilla} must be positive")
    steps = math.floor(cfg.chinchilla * 20 * non_embedding_params(model_cfg) / (seq_len * batch_size))
    if steps <= 0:
        raise ValueError(f"chinchilla={cfg.chinchilla} gives less than one step of {seq_len * batch_size} tokens")
    return steps


def is_diverged(steps_done: int, loss: float) -> bool:
    """The benchmark's rule: a NaN/inf loss, a loss above 1e4, or a loss still >= 6 after 2000 steps."""
    return not math.isfinite(loss) or loss > DIVERGENCE_LOSS or (steps_done > LATE_STEP and loss >= LATE_LOSS)


@dataclass
class Plan:
    """Everything derived from the config before any work is done."""
    model_cfg: object
    seq_len: int
    steps: int
    eval_every: int
    checkpoint_every: int
    schedule: dict
    optimizer_hparams: dict
    clipping: bool
    identity: dict
    resume_from: dict | None


def plan_run(cfg: TrainConfig) -> Plan:
    """Check the whole config (names, sizes, paths, checkpoint) so bad input fails before data or model work."""
    model_cfg = get_model_config(cfg.model)
    schedule, optimizer_hparams = split_hparams(cfg.hparams)
    seq_len = cfg.seq_len or model_cfg.seq_len
    world_size = world_size_from_env()
    batch_size = schedule["batch_size"]
    check_batch_divisible(batch_size, world_size * cfg.grad_accum)
    steps = resolve_steps(cfg, model_cfg, seq_len, batch_size)
    lr_multiplier(steps, schedule["lr_schedule"], schedule["warmup"], schedule["decay"], schedule["min_lr_ratio"])
    check_data_spec(cfg.data)
    check_logger(cfg.log_to)
    if cfg.fsdp and cfg.optimizer in UNSHARDABLE_OPTIMIZERS:
        raise ValueError(f"optimizer={cfg.optimizer!r} preconditions all parameters jointly and does not run under "
                         f"FSDP2: run it with DDP (fsdp=False)")
    if cfg.optimizer == "sophia" and (world_size > 1 or cfg.grad_accum > 1):
        raise ValueError("optimizer='sophia' computes its Hessian estimate from one batch's graph: it runs on a "
                         "single process with grad_accum=1")
    if cfg.keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints={cfg.keep_checkpoints} must be at least 1")
    # Build the optimizer over a parameter-free (meta) copy of the model: checks its name and hparams for free.
    with torch.device("meta"):
        probe = Llama(dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size or 512))
    probe_optimizer = optimizer_registry().build_optimizer(cfg.optimizer, probe, optimizer_hparams)
    clipping = probe_optimizer.defaults.get("max_grad_norm", 0) > 0

    eval_every = max(1, min(1000, steps - 1)) if cfg.eval_every is None else cfg.eval_every
    if eval_every < 0:
        raise ValueError(f"eval_every={eval_every} must be positive, or 0 for an evaluation at the end only")
    checkpoint_every = (eval_every or steps) if cfg.checkpoint_every is None else cfg.checkpoint_every
    identity = {"model": cfg.model, "optimizer": cfg.optimizer, "hparams": dict(cfg.hparams), "seq_len": seq_len,
                "steps": steps, "seed": cfg.seed, "data": cfg.data, "vocab_size": cfg.vocab_size,
                "corpus_bytes": cfg.corpus_bytes}
    checkpoints = ckpt.list_checkpoints(Path(cfg.out_dir) / "checkpoints")
    resume_from = None
    if checkpoints and not cfg.resume:
        raise ValueError(f"out_dir={cfg.out_dir!r} already holds checkpoints: pass resume=True (--resume) to "
                         f"continue that run, or choose another out_dir")
    if checkpoints:
        resume_from = ckpt.load_checkpoint(checkpoints[-1])
        ckpt.check_identity(resume_from, identity, checkpoints[-1])
    return Plan(model_cfg, seq_len, steps, eval_every, checkpoint_every, schedule, optimizer_hparams, clipping,
                identity, resume_from)


def train(cfg: TrainConfig) -> RunResult:
    plan = plan_run(cfg)
    env = init_distributed(cfg.device)
    try:
        return _run(cfg, plan, env)
    finally:
        shutdown_distributed(env)


def _run(cfg: TrainConfig, plan: Plan, env) -> RunResult:
    out_dir = Path(cfg.out_dir)
    batch_size = plan.schedule["batch_size"]

    # Data: rank 0 prepares the cache first so that ranks never race to write it.
    if env.is_main:
        data = prepare_data(cfg.data, cfg.cache_dir, cfg.vocab_size, cfg.corpus_bytes)
    barrier(env)
    if not env.is_main:
        data = prepare_data(cfg.data, cfg.cache_dir, cfg.vocab_size, cfg.corpus_bytes)
    loader = TrainLoader(data.train, plan.seq_len, batch_size, cfg.seed, env.rank, env.world_size)
    repeat_note = loader.check_budget(plan.steps, cfg.allow_repeat)

    model_cfg = plan.model_cfg
    if model_cfg.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=data.vocab_size)
    elif model_cfg.vocab_size < data.vocab_size:
        raise ValueError(f"model={cfg.model!r} has vocab_size={model_cfg.vocab_size}, smaller than the data's "
                         f"{data.vocab_size}")
    torch.manual_seed(cfg.seed)
    model = Llama(model_cfg).to(env.device)
    fsdp = cfg.fsdp and env.distributed
    model = wrap_model(model, env, fsdp)

    def build_optimizer(module):
        return optimizer_registry().build_optimizer(cfg.optimizer, module, plan.optimizer_hparams)

    if fsdp:
        optimizer = OwnerStepper(model, lambda: Llama(model_cfg), build_optimizer,
                                 lambda kind: spreadable(kind, cfg.optimizer, plan.clipping), env)
    else:
        optimizer = build_optimizer(unwrap(model))
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    multiplier = lr_multiplier(plan.steps, plan.schedule["lr_schedule"], plan.schedule["warmup"],
                               plan.schedule["decay"], plan.schedule["min_lr_ratio"])

    start, history = 0, []
    if plan.resume_from is not None:
        state = plan.resume_from
        load_full_state(model, optimizer, fsdp, state["model"], state["optimizer"])
        loader.load_state_dict(state["loader"])
        ckpt.restore_rng(state["rng"])
        start, history = state["step"], state["history"]

    config_record = {**dataclasses.asdict(cfg), **plan.identity, "world_size": env.world_size,
                     "non_embedding_params": non_embedding_params(model_cfg),
                     "params": sum(p.numel() for p in unwrap(model).parameters()),
                     "model_config": dataclasses.asdict(model_cfg), "data_description": data.description}
    log = MetricsLog(out_dir, config_record, history, cfg.log_to) if env.is_main else None
    if env.is_main:
        print(f"fastoptim train: {cfg.model} ({config_record['params']:,} params), {cfg.optimizer}, "
              f"{plan.steps} steps x {batch_size} x {plan.seq_len} tokens on {env.world_size} x {env.device}; "
              f"data: {data.description}" + (f"; resuming at step {start}" if start else ""))
        if repeat_note:
            print(repeat_note)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda"
                else contextlib.nullcontext())

    def evaluate() -> float:
        model.eval()
        losses = []
        with torch.no_grad():
            for x, y in validation_batches(data.val, plan.seq_len, batch_size, cfg.eval_batches,
                                           env.rank, env.world_size):
                for mx, my in zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)):
                    with autocast:
                        losses.append(model(mx.to(env.device), my.to(env.device))[1])
        model.train()
        return mean_over_ranks(torch.stack(losses).mean(), env).item()

    diverged = False
    val_loss = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), math.nan)
    tokens_per_step = batch_size * plan.seq_len
    started = time.perf_counter()
    bar = tqdm(total=plan.steps, initial=start, disable=not (cfg.progress and env.is_main), unit="step",
               dynamic_ncols=True)
    for step in range(start, plan.steps):
        lr_scale = multiplier(step)
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * lr_scale
        loss = _train_step(model, optimizer, loader, cfg, env, autocast)
        loss_value = mean_over_ranks(loss, env).item()

        elapsed = time.perf_counter() - started
        record = {"step": step + 1, "train_loss": loss_value, "lr": peak_lrs[0] * lr_scale,
                  "tokens": (step + 1) * tokens_per_step,
                  "tokens_per_s": (step + 1 - start) * tokens_per_step / max(elapsed, 1e-9)}
        diverged = is_diverged(step + 1, loss_value)
        last = step + 1 == plan.steps or diverged
        if not diverged and (last or (plan.eval_every and (step + 1) % plan.eval_every == 0)):
            val_loss = record["val_loss"] = evaluate()
        history.append(record)
        if log is not None:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if diverged:
            break
        if plan.checkpoint_every and (last or (step + 1) % plan.checkpoint_every == 0):
            _save(out_dir, step + 1, model, optimizer, loader, plan, history, cfg, env, fsdp)
    bar.close()

    steps_done = history[-1]["step"] if history else start
    result = RunResult(final_val_loss=math.inf if diverged else val_loss, diverged=diverged, steps=steps_done,
                       history=history, tokens=steps_done * tokens_per_step,
                       tokens_per_s=history[-1]["tokens_per_s"] if steps_done > start else 0.0,
                       out_dir=str(out_dir), config=config_record)
    if log is not None:
        log.close()
        (out_dir / "result.json").write_text(_result_json(result))
        print(f"final val loss {result.final_val_loss:.4f}" + (" (diverged)" if diverged else ""))
    return result


def _train_step(model, optimizer, loader, cfg: TrainConfig, env, autocast) -> torch.Tensor:
    """One optimizer step over this rank's share of the global batch; returns the mean training loss."""
    x, y = loader.next_batch()
    x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
    if getattr(optimizer, "hessian_due", False):
        # SophiaH: the optimizer takes the loss with its graph alive and computes gradients and the Hessian estimate.
        # Its Hessian-vector product differentiates twice, which only the math attention kernel supports.
        with sdpa_kernel(SDPBackend.MATH), autocast:
            loss = model(x, y)[1]
        optimizer.update_hessian(loss)
    else:
        micro_batches = list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)))
        loss = torch.zeros((), device=env.device)
        for i, (mx, my) in enumerate(micro_batches):
            # DDP all-reduces gradients on the last micro-batch only.
            sync = i == len(micro_batches) - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                micro_loss = model(mx, my)[1] / len(micro_batches)
            micro_loss.backward()
            loss += micro_loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _save(out_dir: Path, step: int, model, optimizer, loader, plan: Plan, history, cfg: TrainConfig, env,
          fsdp: bool) -> None:
    model_state, optimizer_state = full_state(model, optimizer, fsdp)  # collective under FSDP: every rank
    if env.is_main:
        ckpt.save_checkpoint(out_dir / "checkpoints",
                             {"step": step, "identity": plan.identity, "model": model_state,
                              "optimizer": optimizer_state, "loader": loader.state_dict(),
                              "rng": ckpt.capture_rng(), "history": history}, cfg.keep_checkpoints)
    barrier(env)


def _result_json(result: RunResult) -> str:
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "history"}
    return json.dumps(summary, indent=1, default=str)
