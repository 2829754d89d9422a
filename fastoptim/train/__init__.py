"""Training: the loop, LR schedules, evaluation, checkpoints, and torchrun (DDP, FSDP2)."""

from fastoptim.train.loop import RunResult, TrainConfig, train
from fastoptim.train.schedule import lr_multiplier

__all__ = ["RunResult", "TrainConfig", "lr_multiplier", "train"]
