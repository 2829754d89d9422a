"""The grid's one link to the trainer (fastoptim.train): a RunSpec becomes a TrainConfig or a `fastoptim train`
command line, and a finished run folder (result.json, metrics.jsonl) becomes a RunOutcome or a loss curve.

Every run resumes from its own folder's checkpoints (resume=True), so a run cut short by a killed grid or a preempted
job continues where its last checkpoint left it.
"""

import contextlib
import json
import sys
from pathlib import Path

from .runs import RunOutcome, RunSpec


def param_count(model: str) -> int:
    """Non-embedding parameters N of a model name (the Chinchilla budget's N)."""
    from fastoptim.models import get_model_config, non_embedding_params

    return non_embedding_params(get_model_config(model))


def train_config(spec: RunSpec, out_dir: str, device: str = "auto"):
    from fastoptim.train import TrainConfig

    data = {} if spec.data is None else {"data": spec.data}
    return TrainConfig(model=spec.model, optimizer=spec.optimizer, hparams=dict(spec.hparams),
                       chinchilla=spec.chinchilla, seq_len=spec.seq_len, steps=spec.steps, eval_every=spec.eval_every,
                       seed=spec.seed, out_dir=str(out_dir), device=device, resume=True, progress=False, **data)


def run_in_process(spec: RunSpec, out_dir: str, device: str = "auto") -> RunOutcome:
    """Train here; the trainer's own prints go to out_dir/train.log so the grid's progress line stays readable."""
    from fastoptim.train import train

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / "train.log", "a") as log, contextlib.redirect_stdout(log):
        result = train(train_config(spec, out_dir, device))
    return RunOutcome(result.final_val_loss, result.diverged, result.steps)


def train_command(spec: RunSpec, out_dir: str) -> list[str]:
    """`fastoptim train …` for a subprocess; hparams travel as --hp key=repr(value), which the CLI reads back with
    ast.literal_eval, so floats, ints, bools and strings arrive exactly."""
    argv = [sys.executable, "-m", "fastoptim.cli", "train", "--model", spec.model, "--optimizer", spec.optimizer,
            "--chinchilla", repr(float(spec.chinchilla)), "--seq-len", str(spec.seq_len), "--seed", str(spec.seed),
            "--out-dir", str(out_dir), "--resume", "--no-progress"]
    if spec.steps is not None:
        argv += ["--steps", str(spec.steps)]
    if spec.eval_every is not None:
        argv += ["--eval-every", str(spec.eval_every)]
    if spec.data is not None:
        argv += ["--data", spec.data]
    for key, value in sorted(spec.hparams.items()):
        argv += ["--hp", f"{key}={value!r}"]
    return argv


def read_outcome(out_dir: str) -> RunOutcome:
    path = Path(out_dir) / "result.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run did not finish")
    result = json.loads(path.read_text())
    return RunOutcome(float(result["final_val_loss"]), bool(result["diverged"]), result.get("steps"))


def read_curve(out_dir: str) -> tuple[list, list]:
    """(steps, losses) of a run: its validation losses when it was evaluated more than once, else its train loss."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return [], []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    key = "val_loss" if sum("val_loss" in r for r in records) > 1 else "train_loss"
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]
