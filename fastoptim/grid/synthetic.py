"""A synthetic stand-in for training: the final loss as a known function of model size, budget and hyperparameters.

`fastoptim grid --dry-run` drives a preset with it to show how many runs the phases will ask for, in seconds; the
tests drive the phases, the store and the report with it, where the right answer is known in closed form.

loss = E + a·(N/N0)^(−α) + b·D^(−β) + offset[optimizer]
       + Σ_key curvature · (log2(value / optimum_key(N, D)))²      (numeric keys, optimum > 0)
       + Σ_key curvature · [value ≠ optimum_key]                   (other keys)
with optimum_lr(N, D) = lr0 · (N/N0)^(−lr_A) · D^(−lr_B) and every other key's optimum fixed. A run whose lr exceeds
diverge_factor · optimum_lr diverges.
"""

import math
from dataclasses import dataclass, field

from .runs import RunOutcome


@dataclass
class SyntheticObjective:
    param_counts: dict                  # model → N
    optima: dict = field(default_factory=dict)  # key → fixed optimum (keys absent here cost nothing)
    lr0: float = 1e-2
    lr_A: float = 0.3
    lr_B: float = 0.1
    curvature: float = 0.02
    E: float = 2.0
    a: float = 1.0
    alpha: float = 0.3
    b: float = 0.5
    beta: float = 0.5
    offsets: dict = field(default_factory=dict)  # optimizer → additive loss offset
    diverge_factor: float = math.inf

    def param_count(self, model: str) -> int:
        return self.param_counts[model]

    def optimum(self, key: str, model: str, ratio: float):
        if key == "lr":
            n = self.param_counts[model] / min(self.param_counts.values())
            return self.lr0 * n ** -self.lr_A * ratio ** -self.lr_B
        return self.optima.get(key)

    def loss(self, optimizer: str, model: str, ratio: float, hparams: dict) -> float:
        n = self.param_counts[model] / min(self.param_counts.values())
        value = self.E + self.a * n ** -self.alpha + self.b * ratio ** -self.beta + self.offsets.get(optimizer, 0.0)
        for key, setting in hparams.items():
            best = self.optimum(key, model, ratio)
            if best is None:
                continue
            if isinstance(best, (int, float)) and not isinstance(best, bool) and best > 0 and setting > 0:
                value += self.curvature * math.log2(setting / best) ** 2
            elif setting != best:
                value += self.curvature
        return value

    def __call__(self, spec, out_dir=None) -> RunOutcome:
        limit = self.diverge_factor * self.optimum("lr", spec.model, spec.chinchilla)
        if spec.hparams["lr"] > limit:
            return RunOutcome(math.inf, True, spec.steps, reason=f"synthetic: lr {spec.hparams['lr']:g} > {limit:.3g}")
        return RunOutcome(self.loss(spec.optimizer, spec.model, spec.chinchilla, spec.hparams), False, spec.steps)


def dry_run(preset, param_count) -> "Benchmark":
    """Drive every phase of a preset on the synthetic objective (its lr optimum moving with N and D, every other
    key's optimum at the preset's baseline) and return the finished Benchmark: how many runs, and of which sizes,
    the grid will ask for, without training anything."""
    from .phases import Benchmark

    first = next(iter(preset.optimizers.values())).baseline
    objective = SyntheticObjective({model: param_count(model) for model in preset.sizes},
                                   optima={key: value for key, value in first.items() if key != "lr"})
    bench = Benchmark(preset, param_count)
    while pending := bench.pending():
        for spec in pending:
            bench.record(spec, objective(spec))
    return bench
