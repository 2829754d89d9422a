"""Run records: config.json, metrics.jsonl (one line per log step and per evaluation step, val_loss on the
latter; the fields are listed where loop.py builds them), and optionally TensorBoard or wandb when installed and
asked for. result.json is written by loop.py when the run ends."""

import importlib.util
import json
from pathlib import Path

LOGGERS = ("tensorboard", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_logger(name: str | None) -> None:
    if name is None:
        return
    if name not in LOGGERS:
        raise ValueError(f"log_to={name!r} must be one of {LOGGERS} or None")
    if importlib.util.find_spec(_PACKAGE[name]) is None:
        raise ValueError(f"log_to={name!r} but the {_PACKAGE[name]} package is not installed")


class MetricsLog:
    def __init__(self, out_dir: Path, config: dict, history: list[dict], log_to: str | None):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config, indent=1, default=str))
        # Rewritten from the (checkpointed) history: a resumed run drops lines logged after its checkpoint.
        self.file = open(out_dir / "metrics.jsonl", "w")
        for record in history:
            self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.tensorboard = self.wandb = None
        if log_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        elif log_to == "wandb":
            import wandb

            self.wandb = wandb.init(project="fastoptim", name=out_dir.name, config=config, dir=str(out_dir),
                                    resume="allow")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
