"""The training loop: one model, one optimizer, one data budget; the final eval loss is the run's metric.

Readable top to bottom in `train`: check the config, prepare data and the fixed eval set, build model and optimizer,
maybe resume, then step: set the scheduled LR, forward/backward over micro-batches, optimizer step (the optimizer
owns gradient clipping). Nothing is read back to the host between log steps: the loss, the norms and the timings
are synchronised, all-reduced and written on log steps (every `log_every` steps, the first and the last) and on
evaluation steps only. The divergence rule and the final-loss definition are the study's (divergence.py). A run
that ends (finished or diverged) writes result.json, optionally its final weights, and drops its resume checkpoints.
"""

import contextlib
import dataclasses
import importlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from fastoptim.data import (TrainLoader, check_batch_divisible, check_data_spec, default_cache_dir, eval_set,
                            prepare_data, prepare_eval_data)
from fastoptim.models import Llama, get_model_config, non_embedding_params
from fastoptim.models.llama import LLAMA3_VOCAB
from fastoptim.optim.paper import BASELINE, paper_hparams
from fastoptim.train import checkpoint as ckpt
from fastoptim.train.batches import DeviceBatches
from fastoptim.train.distributed import (barrier, build_sharded_optimizer, check_mode, checkpoint_tensors,
                                         full_model_state, global_norm, gradient_norm, init_distributed,
                                         min_over_ranks, optimizer_state_bytes, per_rank, restore_checkpoint,
                                         run_mode, shutdown_distributed, sum_over_ranks, unwrap,
                                         world_size_from_env, wrap_model)
from fastoptim.train.divergence import divergence_reason
from fastoptim.train.metrics import MetricsLog, check_logger
from fastoptim.train.micro_batch import (cached_probe, check_micro_batch, fits_on_gpu, largest_fitting,
                                         local_batch_of)
from fastoptim.train.run_lock import run_folder_lock
from fastoptim.train.schedule import lr_multiplier
from fastoptim.train.throughput import (device_peak_flops, peak_memory_bytes, synchronize,
                                        train_flops_per_token)

# hparams keys the trainer consumes; everything else goes to build_optimizer.
TRAINER_DEFAULTS = {"batch_size": 128, "warmup": 0, "lr_schedule": "cosine", "decay": 1.0, "min_lr_ratio": 0.0}


@dataclass
class TrainConfig:
    model: str = "tiny"
    optimizer: str = BASELINE
    hparams: dict = field(default_factory=dict)  # flat: optimizer hparams + TRAINER_DEFAULTS' keys
    chinchilla: float = 1.0
    seq_len: int | None = None  # None: the model preset's (4096 for the paper sizes)
    steps: int | None = None  # None: floor(chinchilla * 20 * N / (seq_len * batch_size))
    eval_every: int | None = None  # None: min(1000, steps - 1) as in the paper; 0: only at the end
    eval_tokens: int = 131_072  # the fixed eval set: eval_tokens // seq_len windows of the held-out text
    eval_data: str | None = None  # None: the data's held-out split; else a data spec of its own
    seed: int = 0
    data: str = "stdlib"
    vocab_size: int | None = None  # text: the BPE's size (None: 4096); shards: None = what their headers record
    corpus_bytes: int | None = None  # how much text of the corpus to tokenize (None: all of it)
    cache_dir: str | None = None
    allow_repeat: bool = False
    out_dir: str = "runs/run"
    device: str = "auto"
    micro_batch: int | str | None = None  # sequences per forward and rank; None: the whole per-rank batch; "auto"
    compile: bool | None = None  # torch.compile each transformer block; None: on CUDA, off on CPU
    log_every: int = 10  # steps between log records (also the first step, every evaluation and the last step)
    checkpoint_every: int | None = None  # steps; None: at every evaluation; 0: never on a step count
    checkpoint_every_s: float | None = 1800.0  # also after this many seconds (checked on log steps); None: never
    keep_checkpoints: int = 2
    keep_final_weights: bool = False  # a finished run keeps out_dir/final_model.pt
    resume: bool = False
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    # Under fsdp: "bfloat16" all-gathers and computes with bf16 parameters and reduces gradients in float32 (FSDP2's
    # MixedPrecisionPolicy); the shards the optimizer steps, and its state, stay float32.
    fsdp_param_dtype: str = "float32"
    # Under fsdp: reduce-scatter gradients once per step, after the last micro-batch, instead of after each one
    # (less communication; each rank holds unsharded gradients between micro-batches).
    fsdp_defer_grad_sync: bool = False
    zero1: bool = False  # under torchrun: DDP with the optimizer state sharded over ranks (ZeroRedundancy)
    progress: bool = True
    log_to: str | None = None  # "tensorboard" | "wandb"
    peak_flops: float | None = None  # the accelerator's bf16 peak FLOP/s for MFU (None: from the device name)


@dataclass
class RunResult:
    final_val_loss: float
    diverged: bool
    diverged_reason: str | None
    steps: int
    tokens: int
    wall_time_s: float
    tokens_per_s: float
    optimizer_step_share: float | None
    peak_memory_bytes: int
    eval_tokens: int
    eval_sha256: str
    world_size: int
    data_passes: float
    out_dir: str
    config: dict
    history: list[dict]
    mode: str = "single"  # single, ddp, zero1 or fsdp
    optimizer_state_bytes: list[int] = field(default_factory=list)  # per rank, at the end of the run


FSDP_PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def optimizer_registry():
    # Imported when a run starts: the optimizers load native kernels that `fastoptim --help` should not pay for.
    return importlib.import_module("fastoptim.optim.registry")


def split_hparams(hparams: dict, paper: dict) -> tuple[dict, dict]:
    """(trainer settings with defaults filled in, optimizer hparams): optimizer hparams not given are the paper's
    tuned settings `paper` (fastoptim.paper_hparams), not the optimizer class's library defaults."""
    trainer = {key: hparams.get(key, default) for key, default in TRAINER_DEFAULTS.items()}
    optimizer = {k: v for k, v in {**paper, **hparams}.items() if k not in TRAINER_DEFAULTS}
    return trainer, optimizer


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
    needs_hvp: bool
    mode: str
    compile: bool
    identity: dict
    resume_from: dict | None
    finished: RunResult | None  # the result of a run that already finished in out_dir (resume returns it)


def plan_run(cfg: TrainConfig) -> Plan:
    """Check the whole config (names, sizes, paths, checkpoint) so bad input fails before data or model work."""
    model_cfg = get_model_config(cfg.model)
    schedule, optimizer_hparams = split_hparams(cfg.hparams, paper_hparams(cfg.optimizer, cfg.model, cfg.chinchilla))
    seq_len = cfg.seq_len or model_cfg.seq_len
    world_size = world_size_from_env()
    batch_size = schedule["batch_size"]
    check_batch_divisible(batch_size, world_size)
    check_micro_batch(cfg.micro_batch, batch_size, world_size)
    steps = resolve_steps(cfg, model_cfg, seq_len, batch_size)
    lr_multiplier(steps, schedule["lr_schedule"], schedule["warmup"], schedule["decay"], schedule["min_lr_ratio"])
    check_data_spec(cfg.data)
    if cfg.eval_data is not None:
        check_data_spec(cfg.eval_data, what="eval_data")
    if cfg.eval_tokens < seq_len:
        raise ValueError(f"eval_tokens={cfg.eval_tokens} must be at least one sequence of seq_len={seq_len} tokens")
    check_logger(cfg.log_to)
    optimizer_cls = optimizer_registry().optimizer_class(cfg.optimizer)
    mode = run_mode(world_size, cfg.zero1, cfg.fsdp)
    if optimizer_cls.needs_hvp and world_size > 1:
        raise ValueError(f"optimizer={cfg.optimizer!r} takes a Hessian-vector product through autograd.grad, which "
                         f"bypasses DDP's and FSDP's gradient reduction: it runs on a single process")
    for name, value in (("keep_checkpoints", cfg.keep_checkpoints), ("log_every", cfg.log_every)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if cfg.checkpoint_every_s is not None and cfg.checkpoint_every_s < 0:
        raise ValueError(f"checkpoint_every_s={cfg.checkpoint_every_s} must be ≥ 0 seconds, or None")
    # Build the optimizer over a parameter-free (meta) copy of the model: checks its name and hparams for free.
    with torch.device("meta"):
        probe = Llama(dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size or 512))
    probe_optimizer = optimizer_registry().build_optimizer(cfg.optimizer, probe, optimizer_hparams)
    clipping = bool(probe_optimizer.defaults.get("max_grad_norm"))
    if cfg.fsdp_param_dtype not in FSDP_PARAM_DTYPES:
        raise ValueError(f"fsdp_param_dtype={cfg.fsdp_param_dtype!r} must be one of {sorted(FSDP_PARAM_DTYPES)}")
    if not cfg.fsdp and (cfg.fsdp_param_dtype != "float32" or cfg.fsdp_defer_grad_sync):
        raise ValueError(f"fsdp_param_dtype={cfg.fsdp_param_dtype!r} and fsdp_defer_grad_sync="
                         f"{cfg.fsdp_defer_grad_sync} are FSDP2 settings: they need fsdp=True")
    if cfg.zero1 or cfg.fsdp:  # refused on one process too: the same command must not fail only under torchrun
        check_mode("zero1" if cfg.zero1 else "fsdp", probe_optimizer)

    eval_every = max(1, min(1000, steps - 1)) if cfg.eval_every is None else cfg.eval_every
    if eval_every < 0:
        raise ValueError(f"eval_every={eval_every} must be positive, or 0 for an evaluation at the end only")
    checkpoint_every = eval_every if cfg.checkpoint_every is None else cfg.checkpoint_every
    compile_blocks = cfg.compile if cfg.compile is not None else cfg.device != "cpu" and torch.cuda.is_available()
    identity = {"model": cfg.model, "optimizer": cfg.optimizer, "hparams": dict(cfg.hparams), "seq_len": seq_len,
                "steps": steps, "seed": cfg.seed, "data": cfg.data, "vocab_size": cfg.vocab_size,
                "corpus_bytes": cfg.corpus_bytes, "eval_tokens": cfg.eval_tokens, "eval_data": cfg.eval_data}
    out_dir = Path(cfg.out_dir)
    finished = _finished_run(out_dir, identity, cfg.resume)
    checkpoints = ckpt.list_checkpoints(out_dir / "checkpoints")
    resume_from = None
    if checkpoints and not cfg.resume:
        raise ValueError(f"out_dir={cfg.out_dir!r} already holds checkpoints: pass resume=True (--resume) to "
                         f"continue that run, or choose another out_dir")
    if checkpoints and finished is None:
        resume_from = ckpt.load_checkpoint(checkpoints[-1])
        ckpt.check_identity(resume_from, identity, checkpoints[-1])
    return Plan(model_cfg, seq_len, steps, eval_every, checkpoint_every, schedule, optimizer_hparams, clipping,
                optimizer_cls.needs_hvp, mode, compile_blocks, identity, resume_from, finished)


def _finished_run(out_dir: Path, identity: dict, resume: bool) -> RunResult | None:
    """The RunResult a finished run left in out_dir (result.json, metrics.jsonl): returned by a resume of the same
    run, refused for another one."""
    path = out_dir / "result.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if not resume:
        raise ValueError(f"out_dir={str(out_dir)!r} already holds a finished run (result.json): pass resume=True "
                         f"(--resume) to read its result, or choose another out_dir")
    theirs = {key: saved["config"].get(key) for key in identity}
    for key in sorted(identity):
        if theirs[key] != identity[key]:
            raise ValueError(f"{path} belongs to a different run: {key}={theirs[key]!r} there, "
                             f"{key}={identity[key]!r} here")
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    fields = {f.name for f in dataclasses.fields(RunResult)}
    return RunResult(**{k: v for k, v in saved.items() if k in fields},
                     history=[json.loads(line) for line in lines if line.strip()])


def train(cfg: TrainConfig) -> RunResult:
    plan = plan_run(cfg)  # reads out_dir only
    if plan.finished is not None:
        return plan.finished
    # Before anything is written there: one live trainer per folder (rank 0 holds the lock for its group).
    first_rank = os.environ.get("RANK", "0") == "0"
    with run_folder_lock(cfg.out_dir) if first_rank else contextlib.nullcontext():
        env = init_distributed(cfg.device)
        try:
            return _run(cfg, plan, env)
        finally:
            shutdown_distributed(env)


def _run(cfg: TrainConfig, plan: Plan, env) -> RunResult:
    began = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    batch_size = plan.schedule["batch_size"]

    # Data and the fixed eval set: rank 0 prepares the caches first so that ranks never race to write them.
    def prepare():
        data = prepare_data(cfg.data, cfg.cache_dir, cfg.vocab_size, cfg.corpus_bytes)
        if cfg.eval_data is None:
            return data, data.val, f"the held-out split of {cfg.data}"
        source, description = prepare_eval_data(cfg.eval_data, data, cfg.cache_dir)
        return data, source, description

    if env.is_main:
        data, eval_source, eval_description = prepare()
    barrier(env)
    if not env.is_main:
        data, eval_source, eval_description = prepare()
    evals = eval_set(eval_source, plan.seq_len, cfg.eval_tokens, eval_description)
    loader = TrainLoader(data.train, plan.seq_len, batch_size, cfg.seed, env.rank, env.world_size)
    repeat_note = loader.check_budget(plan.steps, cfg.allow_repeat)

    # The model's vocabulary follows the data's.
    model_cfg = dataclasses.replace(plan.model_cfg, vocab_size=data.vocab_size)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda"
                else contextlib.nullcontext())
    fsdp = plan.mode == "fsdp"

    def build_model() -> torch.nn.Module:
        model = Llama(model_cfg).to(env.device)
        if plan.compile:
            for block in model.layers:
                block.compile()
        return model

    def build_optimizer(module):
        return optimizer_registry().build_optimizer(cfg.optimizer, module, plan.optimizer_hparams)

    micro_batch = _micro_batch(cfg, plan, env, batch_size, model_cfg, build_model, build_optimizer, autocast)
    torch.manual_seed(cfg.seed)
    model = wrap_model(build_model(), env, fsdp, FSDP_PARAM_DTYPES[cfg.fsdp_param_dtype])
    optimizer = build_sharded_optimizer(plan.mode, model, build_optimizer, lambda: Llama(model_cfg), env)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    multiplier = lr_multiplier(plan.steps, plan.schedule["lr_schedule"], plan.schedule["warmup"],
                               plan.schedule["decay"], plan.schedule["min_lr_ratio"])

    start, history, earlier = 0, [], {"wall_time_s": 0.0, "train_time_s": 0.0, "timed_tokens": 0}
    if plan.resume_from is not None:
        state = plan.resume_from
        restore_checkpoint(state, model, optimizer, fsdp)
        loader.load_state_dict(state["loader"])
        ckpt.restore_rng(state["rng"])
        start, history, earlier = state["step"], state["history"], state["timing"]

    params = sum(p.numel() for p in unwrap(model).parameters())
    flops_per_token = train_flops_per_token(model_cfg, plan.seq_len)
    peak_flops = cfg.peak_flops or device_peak_flops(env.device)
    grad_accum = local_batch_of(batch_size, env.world_size) // micro_batch
    config_record = {
        **dataclasses.asdict(cfg), **plan.identity, "world_size": env.world_size, "mode": plan.mode,
        "micro_batch": micro_batch,
        "grad_accum": grad_accum, "compile": plan.compile, "non_embedding_params": non_embedding_params(model_cfg),
        "params": params, "model_config": dataclasses.asdict(model_cfg), "data_description": data.description,
        "eval_description": eval_description, "flops_per_token": flops_per_token, "peak_flops": peak_flops,
        "device_name": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"}
    log = MetricsLog(out_dir, config_record, history, cfg.log_to) if env.is_main else None
    if env.is_main:
        print(f"fastoptim train: {cfg.model} ({params:,} params), {cfg.optimizer}, {plan.steps} steps x "
              f"{batch_size} x {plan.seq_len} tokens (micro-batch {micro_batch}) on {env.world_size} x {env.device}"
              f"{', compiled' if plan.compile else ''}; data: {data.description}; eval: {evals.tokens:,} tokens of "
              f"{eval_description}" + (f"; resuming at step {start}" if start else ""))
        if repeat_note:
            print(repeat_note)
        if plan.model_cfg.vocab_size == LLAMA3_VOCAB and data.vocab_size != LLAMA3_VOCAB:
            print(f"note: the data's vocabulary is {data.vocab_size:,}, not Llama-3's {LLAMA3_VOCAB:,}: losses are "
                  f"not comparable to the paper's")

    def evaluate() -> float:
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=env.device)
        with torch.no_grad():
            for x, y, rows in evals.batches(micro_batch, env.rank, env.world_size):
                with autocast:
                    total += model(x.to(env.device), y.to(env.device)).double() * rows
        model.train()
        return sum_over_ranks(total, env).item() / evals.windows.shape[0]

    tokens_per_step = batch_size * plan.seq_len
    batches = DeviceBatches(loader, env.device, plan.steps - start)
    timing = dict(earlier)
    reason, val_loss = None, next((r["val_loss"] for r in reversed(history) if "val_loss" in r), math.nan)
    bar = tqdm(total=plan.steps, initial=start, disable=not (cfg.progress and env.is_main), unit="step",
               dynamic_ncols=True)
    interval_start, interval_steps, last_save = time.perf_counter(), 0, time.perf_counter()
    for step in range(start, plan.steps):
        done = step + 1
        lr_scale = multiplier(step)
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * lr_scale
        last = done == plan.steps
        evaluating = last or bool(plan.eval_every and done % plan.eval_every == 0)
        logging = evaluating or done % cfg.log_every == 0 or done == 1
        x, y = batches.next()
        loss = _forward_backward(model, optimizer, x, y, micro_batch, autocast,
                                 hessian=plan.needs_hvp and optimizer.hessian_due,
                                 defer_grad_sync=fsdp and cfg.fsdp_defer_grad_sync)
        if logging:
            grad_norm = gradient_norm(model, optimizer)
            synchronize(env.device)
            stepped = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        interval_steps += 1
        bar.update(1)
        if not logging:
            continue

        # A log step: everything below reads the device, once per interval.
        synchronize(env.device)
        now = time.perf_counter()
        optimizer_time, interval = now - stepped, now - interval_start
        time_due = cfg.checkpoint_every_s is not None and now - last_save >= cfg.checkpoint_every_s
        summed = sum_over_ranks(torch.stack([loss.double(), torch.tensor(float(time_due), dtype=torch.float64,
                                                                           device=loss.device)]), env).tolist()
        train_loss, time_due = summed[0] / env.world_size, summed[1] > 0
        timing["train_time_s"] += interval
        timing["timed_tokens"] += interval_steps * tokens_per_step
        tokens_per_s = interval_steps * tokens_per_step / interval
        record = {"step": done, "tokens": done * tokens_per_step, "train_loss": train_loss,
                  "lr": peak_lrs[0] * lr_scale, "tokens_per_s": tokens_per_s, "step_time_s": interval / interval_steps,
                  "optimizer_step_time_s": optimizer_time,
                  "mfu": None if peak_flops is None else flops_per_token * tokens_per_s / (peak_flops * env.world_size),
                  "peak_memory_bytes": peak_memory_bytes(env.device), "grad_norm": grad_norm,
                  "param_norm": global_norm(list(unwrap(model).parameters()))}
        if evaluating or not math.isfinite(train_loss):
            val_loss = record["val_loss"] = evaluate()
            reason = divergence_reason(done, val_loss)
        history.append(record)
        if log is not None:
            log.write(record)
        bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if reason is not None or last:
            break
        step_due = plan.checkpoint_every and done % plan.checkpoint_every == 0
        if step_due or time_due:
            timing["wall_time_s"] = earlier["wall_time_s"] + time.perf_counter() - began
            _save(out_dir, done, model, optimizer, batches, plan, history, timing, cfg, fsdp)
            last_save = time.perf_counter()
        interval_start, interval_steps = time.perf_counter(), 0
    bar.close()

    steps_done = history[-1]["step"] if history else start
    if cfg.keep_final_weights:
        model_state = full_model_state(model, fsdp)  # collective under FSDP: every rank
        if env.is_main:
            torch.save(model_state, out_dir / "final_model.pt")
    state_bytes = per_rank(optimizer_state_bytes(optimizer), env)
    timed = [r for r in history if r.get("optimizer_step_time_s") is not None]
    result = RunResult(
        final_val_loss=math.inf if reason else val_loss, diverged=reason is not None, diverged_reason=reason,
        steps=steps_done, tokens=steps_done * tokens_per_step,
        wall_time_s=earlier["wall_time_s"] + time.perf_counter() - began,
        tokens_per_s=timing["timed_tokens"] / timing["train_time_s"] if timing["train_time_s"] else 0.0,
        optimizer_step_share=(sum(r["optimizer_step_time_s"] for r in timed) / sum(r["step_time_s"] for r in timed)
                              if timed else None),
        peak_memory_bytes=max([peak_memory_bytes(env.device)] + [r["peak_memory_bytes"] for r in history]),
        eval_tokens=evals.tokens, eval_sha256=evals.sha256, world_size=env.world_size,
        data_passes=loader.passes(steps_done), out_dir=str(out_dir), config=config_record, history=history,
        mode=plan.mode, optimizer_state_bytes=state_bytes)
    if log is not None:
        log.close()
        (out_dir / "result.json").write_text(_result_json(result))
        # A finished run keeps its records (and final weights when asked), not its resume checkpoints.
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        print(f"final val loss {result.final_val_loss:.4f}" + (f" (diverged: {reason})" if reason else ""))
    barrier(env)
    return result


def _forward_backward(model, optimizer, x, y, micro_batch: int, autocast, hessian: bool,
                      defer_grad_sync: bool = False) -> torch.Tensor:
    """Gradients of this rank's batch, accumulated over its micro-batches; returns the batch's mean loss (on the
    device, not read back)."""
    micro_batches = list(zip(x.split(micro_batch), y.split(micro_batch)))
    count = len(micro_batches)
    losses = []
    if hessian:
        # SophiaH takes the micro-batch losses with their graphs alive and computes gradients and the Hessian
        # estimate itself. The Hessian-vector product differentiates twice, which only eager code, the math
        # attention kernel and the plain cross-entropy support.
        def micro_losses():
            for mx, my in micro_batches:
                with sdpa_kernel(SDPBackend.MATH), torch.compiler.set_stance("force_eager"), autocast:
                    loss = model(mx, my, double_backward=True) / count
                losses.append(loss.detach())
                yield loss

        optimizer.update_hessian(micro_losses())
        return torch.stack(losses).sum()
    for i, (mx, my) in enumerate(micro_batches):
        last = i == count - 1
        # DDP all-reduces gradients on the last micro-batch only; FSDP2 reduce-scatters after each one unless told to
        # wait for the last.
        if defer_grad_sync:
            model.set_requires_gradient_sync(last)
        sync = last or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
            loss = model(mx, my) / count
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum()


def _micro_batch(cfg: TrainConfig, plan: Plan, env, batch_size: int, model_cfg, build_model, build_optimizer,
                 autocast) -> int:
    local = local_batch_of(batch_size, env.world_size)
    if cfg.micro_batch is None or (cfg.micro_batch == "auto" and env.device.type != "cuda"):
        return local
    if cfg.micro_batch != "auto":
        return cfg.micro_batch

    def probe() -> int:
        model = build_model()
        optimizer = build_optimizer(model)
        tokens = torch.randint(model_cfg.vocab_size, (local, plan.seq_len + 1), device=env.device,
                               generator=torch.Generator(env.device).manual_seed(0))

        def train_one_step(m):
            try:
                hessian = plan.needs_hvp  # the costlier step bounds the memory
                _forward_backward(model, optimizer, tokens[:, :-1], tokens[:, 1:], m, autocast, hessian)
                optimizer.step()
            finally:
                optimizer.zero_grad(set_to_none=True)

        found = largest_fitting(local, fits_on_gpu(env.device, train_one_step))
        del model, optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
        return found

    key = "|".join(map(str, (torch.cuda.get_device_name(env.device), cfg.model, model_cfg.vocab_size, plan.seq_len,
                             local, cfg.optimizer, plan.compile, env.world_size, plan.mode, torch.__version__)))
    found = cached_probe(Path(cfg.cache_dir or default_cache_dir()), key, probe)
    return min_over_ranks(found, env)


def _save(out_dir: Path, step: int, model, optimizer, batches, plan: Plan, history, timing, cfg: TrainConfig,
          fsdp: bool) -> None:
    tensors, optimizer_rest = checkpoint_tensors(model, optimizer, fsdp)
    # A collective call: every rank writes its share of the tensors, rank 0 the rest.
    ckpt.save_checkpoint(out_dir / "checkpoints", tensors,
                         {"step": step, "identity": plan.identity, "optimizer": optimizer_rest,
                          "loader": batches.state_dict(), "rng": ckpt.capture_rng(), "history": history,
                          "timing": timing}, cfg.keep_checkpoints)


def _result_json(result: RunResult) -> str:
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "history"}
    return json.dumps(summary, indent=1, default=str)
