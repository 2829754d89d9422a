"""The grid's one link to the trainer (fastoptim.train): a RunSpec (what a run is) and RunSettings (how this machine
runs it) become a TrainConfig or a `fastoptim train` command line; a finished run folder (result.json,
metrics.jsonl) becomes a RunOutcome or a loss curve; and before the first run, `check_data` proves that the data
holds every run's tokens.

Every run resumes from its own folder's checkpoints (resume=True), so a run cut short by a killed grid or a preempted
job continues where its last checkpoint left it. The settings (device, micro-batch, compile, repeats, ranks per run
and how they split it) are not part of a run's identity: changing them never retrains a finished run.
"""

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .runs import RunOutcome, RunSpec


@dataclass(frozen=True)
class RunSettings:
    device: str = "auto"
    # model → the largest micro-batch that fits (each run takes the largest divisor of its batch up to it), or
    # "auto" (the trainer probes the GPU once and caches the answer); a model not named: the whole batch at once.
    micro_batch: dict = field(default_factory=dict)
    compile: bool | None = None  # None: the trainer's default (on CUDA, off on CPU)
    allow_repeat: bool = False
    cache_dir: str | None = None
    ranks: int = 1  # processes per run: torchrun over that many local GPUs, or that many Slurm tasks
    parallel: str = "ddp"  # how several ranks split a run: ddp, zero1 (sharded optimizer state) or fsdp

    def __post_init__(self):
        if self.ranks < 1:
            raise ValueError(f"ranks={self.ranks}: a run needs at least one process")
        if self.parallel not in ("ddp", "zero1", "fsdp"):
            raise ValueError(f"parallel={self.parallel!r}: expected 'ddp', 'zero1' or 'fsdp'")

    def micro_batch_for(self, spec: RunSpec) -> int | str | None:
        limit = self.micro_batch.get(spec.model)
        if limit is None or limit == "auto":
            return limit
        batch = spec.hparams["batch_size"]
        return next(m for m in range(min(limit, batch), 0, -1) if batch % m == 0)


def param_count(model: str) -> int:
    """Non-embedding parameters N of a model name (the Chinchilla budget's N)."""
    from fastoptim.models import get_model_config, non_embedding_params

    return non_embedding_params(get_model_config(model))


def train_config(spec: RunSpec, out_dir: str, settings: RunSettings | None = None):
    from fastoptim.train import TrainConfig

    settings = settings or RunSettings()
    optional = {key: value for key, value in (("data", spec.data), ("eval_tokens", spec.eval_tokens),
                                              ("vocab_size", spec.vocab_size)) if value is not None}
    return TrainConfig(model=spec.model, optimizer=spec.optimizer, hparams=dict(spec.hparams),
                       chinchilla=spec.chinchilla, seq_len=spec.seq_len, steps=spec.steps, eval_every=spec.eval_every,
                       eval_data=spec.eval_data, seed=spec.seed, out_dir=str(out_dir), device=settings.device,
                       micro_batch=settings.micro_batch_for(spec), compile=settings.compile,
                       allow_repeat=settings.allow_repeat, cache_dir=settings.cache_dir, resume=True, progress=False,
                       zero1=settings.parallel == "zero1", fsdp=settings.parallel == "fsdp", **optional)


def run_in_process(spec: RunSpec, out_dir: str, settings: RunSettings | None = None) -> RunOutcome:
    """Train here; the trainer's own prints go to out_dir/train.log so the grid's progress line stays readable."""
    from fastoptim.train import train

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / "train.log", "a") as log, contextlib.redirect_stdout(log):
        result = train(train_config(spec, out_dir, settings))
    return RunOutcome(result.final_val_loss, result.diverged, result.steps, reason=result.diverged_reason)


def train_command(spec: RunSpec, out_dir: str, settings: RunSettings | None = None) -> list[str]:
    """`fastoptim train …` for a subprocess; hparams travel as --hp key=repr(value), which the CLI reads back with
    ast.literal_eval, so floats, ints, bools and strings arrive exactly."""
    settings = settings or RunSettings()
    cfg = train_config(spec, out_dir, settings)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={settings.ranks}"] \
        if settings.ranks > 1 else [sys.executable]
    argv = launcher + ["-m", "fastoptim.cli", "train", "--model", spec.model, "--optimizer", spec.optimizer,
                       "--chinchilla", repr(float(spec.chinchilla)), "--seq-len", str(spec.seq_len),
                       "--seed", str(spec.seed), "--out-dir", str(out_dir), "--eval-tokens", str(cfg.eval_tokens),
                       "--resume", "--no-progress"]
    flags = {"--steps": spec.steps, "--eval-every": spec.eval_every, "--data": spec.data,
             "--eval-data": spec.eval_data, "--vocab-size": spec.vocab_size, "--micro-batch": cfg.micro_batch,
             "--cache-dir": cfg.cache_dir}
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, str(value)]
    if cfg.compile is not None:
        argv.append("--compile" if cfg.compile else "--no-compile")
    if cfg.allow_repeat:
        argv.append("--allow-repeat")
    if settings.parallel != "ddp":
        argv.append(f"--{settings.parallel}")
    for key, value in sorted(spec.hparams.items()):
        argv += ["--hp", f"{key}={value!r}"]
    return argv


def read_outcome(out_dir: str) -> RunOutcome:
    result = read_result(out_dir)
    if result is None:
        raise FileNotFoundError(f"{Path(out_dir) / 'result.json'} is missing: the run did not finish")
    return RunOutcome(float(result["final_val_loss"]), bool(result["diverged"]), result.get("steps"),
                      reason=result.get("diverged_reason"))


def read_curve(out_dir: str) -> tuple[list, list, str]:
    """(steps, losses, which) of a run: its validation losses when it was evaluated more than once (which =
    "val_loss"), else its train loss ("train_loss")."""
    records = _metrics(out_dir)
    key = "val_loss" if sum("val_loss" in r for r in records) > 1 else "train_loss"
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points], key


def read_step_share(out_dir: str) -> float | None:
    """The optimizer step's share of step time over a run's log records (metrics.jsonl), leaving out the first step
    (it builds the optimizer's state, and its step time holds no earlier steps to average over) when later records
    exist. None when the run logged no timings."""
    timed = [r for r in _metrics(out_dir) if r.get("optimizer_step_time_s") is not None and r.get("step_time_s")]
    if len(timed) > 1:
        timed = [r for r in timed if r["step"] > 1] or timed
    total = sum(r["step_time_s"] for r in timed)
    return sum(r["optimizer_step_time_s"] for r in timed) / total if total else None


def read_result(out_dir: str) -> dict | None:
    """The run's result.json (the trainer's RunResult without its history), None when the run left none."""
    path = Path(out_dir) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(out_dir: str) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the data check before the first run ----

def _regimes_and_batches(preset):
    """Every (phase, regime) of the preset and every batch size a run of it may take (baselines and grids)."""
    batches = sorted({value for sweep in preset.optimizers.values()
                      for value in (sweep.baseline["batch_size"], *sweep.grid.get("batch_size", ()))})
    phases = [(1, preset.phase1), (2, preset.phase2), (3, preset.phase3)]
    return [(phase, regime) for phase, regimes in phases for regime in regimes], batches


def check_data(preset, settings: RunSettings | None = None) -> list[str]:
    """Raise ValueError naming every regime whose runs need more training tokens than one pass over the data holds
    (unless repeats are allowed), or an eval set larger than its source; return notes on declared repeats.

    Seconds even for the paper's grid: shard headers are read, not the shards; a text corpus that is not tokenized
    yet is first bounded by its byte count (a byte-level BPE makes at most one token per byte), and tokenized (and
    cached for the runs) only when the bound leaves it possible that the data suffices.
    """
    from fastoptim.data import data_capacity, prepare_data
    from fastoptim.train import TrainConfig

    from .phases import Benchmark

    settings = settings or RunSettings()
    spec = preset.data or TrainConfig.data
    capacity = data_capacity(spec, settings.cache_dir, preset.vocab_size)
    bench = Benchmark(preset, param_count)
    pairs, batches = _regimes_and_batches(preset)
    seq = preset.seq_len

    def shortfalls(capacity):
        """Per regime whose runs need more than one pass at some batch size: the batch size with the largest
        need per pass, its steps, and the tokens one pass holds at it."""
        short = []
        for phase, regime in pairs:
            needs = []
            for batch in batches:
                steps = bench.steps(regime, {"batch_size": batch})
                per_pass = capacity.windows("train", seq) // batch * batch * seq
                needs.append((steps * batch * seq / max(per_pass, 1), batch, steps, per_pass))
            ratio, batch, steps, per_pass = max(needs)
            if steps * batch * seq > per_pass:
                short.append((phase, regime, batch, steps, per_pass))
        return short

    if not capacity.exact and (settings.allow_repeat or not shortfalls(capacity)):
        # Tokenize (cached for the runs): the bound cannot decide.
        prepare_data(spec, settings.cache_dir, preset.vocab_size)
        capacity = data_capacity(spec, settings.cache_dir, preset.vocab_size)
    held = "holds" if capacity.exact else "holds at most (not tokenized yet: one token per byte)"
    problems, notes = [], []
    for phase, regime, batch, steps, per_pass in shortfalls(capacity):
        needed = steps * batch * seq
        line = (f"Phase {phase} {regime.model} {regime.ratio:g}×: {needed:,} training tokens ({steps:,} steps × "
                f"batch_size {batch} × {seq}); {spec} {held} {per_pass:,} per pass")
        if settings.allow_repeat:
            if per_pass == 0:
                problems.append(line + " (not one batch)")
            else:
                notes.append(f"{line}: {needed / per_pass:.2f} passes (repeats allowed)")
        else:
            problems.append(line)
    eval_tokens = preset.eval_tokens or TrainConfig.eval_tokens
    if preset.eval_data is not None:
        eval_capacity = data_capacity(preset.eval_data, settings.cache_dir, preset.vocab_size)
        eval_windows = eval_capacity.windows("train", seq) + eval_capacity.windows("val", seq)
        eval_source = preset.eval_data
    else:
        eval_windows, eval_source = capacity.windows("val", seq), f"the held-out split of {spec}"
    if eval_tokens // seq > eval_windows:
        problems.append(f"eval_tokens={eval_tokens:,}: {eval_source} holds {eval_windows * seq:,} tokens "
                        f"of {seq}-token windows")
    if problems:
        raise ValueError(f"preset {preset.name!r}: the data is too small for these runs:\n  " + "\n  ".join(problems)
                         + "\ngive more data (--data), allow repeated passes (--allow-repeat) or choose a smaller "
                           "preset")
    return notes


def with_data(preset, data: str | None, eval_data: str | None):
    """The preset with the command line's data choices (None: the preset's own)."""
    changes = {key: value for key, value in (("data", data), ("eval_data", eval_data)) if value is not None}
    return dataclasses.replace(preset, **changes) if changes else preset
