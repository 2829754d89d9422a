"""Learning-rate schedules of benchmark-spec §4, as multipliers of the peak LR.

`lr_multiplier(...)` returns a function step -> float, usable as a torch.optim.lr_scheduler.LambdaLR lambda; the
trainer applies it itself (lr = peak · multiplier(step)) so that the LR is a pure function of the step and resume
needs no scheduler state.

- "cosine" (Levanter's default): linear warmup from 0 over `warmup` steps, then cosine decay over the remaining
  steps to min_lr_ratio·peak.
- "linear" (warmup-stable-decay, used for Muon and Scion): linear warmup, constant LR, then linear decay to
  min_lr_ratio·peak over the final `decay` fraction of all steps.
"""

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "linear")


def lr_multiplier(total_steps: int, lr_schedule: str = "cosine", warmup: int = 0, decay: float = 1.0,
                  min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    if lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={lr_schedule!r} must be one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if not 0 <= warmup <= total_steps:
        raise ValueError(f"warmup={warmup} must be between 0 and the run's {total_steps} steps")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay} must be a fraction in [0, 1]")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    decay_steps = round(decay * total_steps)
    decay_start = max(warmup, total_steps - decay_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / warmup
        if lr_schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return 1.0 - (1 - min_lr_ratio) * min(progress, 1.0)

    return multiplier
