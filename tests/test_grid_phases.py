"""Phases II and III on a synthetic loss whose optimal lr moves with N and D while weight decay's does not."""

import dataclasses
import math

import numpy as np
import pytest

from fastoptim.grid.phases import Benchmark
from fastoptim.grid.presets import GridPreset, OptimizerSweep, Regime, regimes
from fastoptim.grid.synthetic import SyntheticObjective

SIZES = {"s": 1_000_000, "m": 4_000_000, "l": 16_000_000, "xl": 64_000_000}
LRS = tuple(float(x) for x in 2e-3 * 2 ** (np.arange(17) / 4))  # dense: grid snapping barely blurs the optima
OBJECTIVE = SyntheticObjective(SIZES, optima={"weight_decay": 0.1, "beta1": 0.95}, lr0=1e-2, lr_A=0.3, lr_B=0.1,
                               curvature=0.05)


def sweep(**kwargs):
    return OptimizerSweep({"lr": 2e-3, "weight_decay": 0.0, "beta1": 0.9, "batch_size": 8, "warmup": 0},
                          {"lr": LRS, "weight_decay": (0.0, 0.1, 0.2), "beta1": (0.9, 0.95, 0.98)}, **kwargs)


PRESET = GridPreset(
    name="phases",
    optimizers={"adamw": sweep(), "sophia": sweep(phase2=False)},
    phase1=regimes(["s"], [1, 2, 4, 8]) + regimes(["m", "l"], [1]),
    phase2=regimes(["m", "l"], [2, 4, 8]),
    phase3=regimes(["xl"], [1, 2]) + regimes(["s"], [16]),
    phase3_optimizers=("adamw",),
    phase2_always=("lr", "warmup", "batch_size"),
    phase2_lower_lrs=2,
    seq_len=16,
    tokens_per_param=0.01,
)


def run_to_completion(bench):
    order = []
    while pending := bench.pending():
        for spec in pending:
            order.append(spec)
            bench.record(spec, OBJECTIVE(spec))
    return order


@pytest.fixture(scope="module")
def finished():
    bench = Benchmark(PRESET, OBJECTIVE.param_count)
    return bench, run_to_completion(bench)


def grid_argmin_lr(model, ratio, lrs=LRS):
    """Independent reference: the grid lr closest (in log2) to the objective's optimal lr."""
    best = 1e-2 * (SIZES[model] / SIZES["s"]) ** -0.3 * ratio ** -0.1
    return min(lrs, key=lambda lr: abs(math.log2(lr / best)))


def test_phase1_optima_match_the_objective(finished):
    bench, _ = finished
    for regime in PRESET.phase1:
        optimum = bench.optimum("adamw", regime)
        assert optimum.hparams["lr"] == grid_argmin_lr(regime.model, regime.ratio)
        assert optimum.hparams["weight_decay"] == 0.1 and optimum.hparams["beta1"] == 0.95


def test_only_lr_is_scale_sensitive(finished):
    bench, _ = finished
    assert bench.sensitive == {"adamw": ("lr",), "sophia": ("lr",)}
    assert bench.resweep_keys("adamw") == ("lr",)  # warmup and batch_size are not in this grid


def test_phase2_resweeps_only_sensitive_keys_from_the_nearest_phase1_optimum(finished):
    bench, order = finished
    phase1_runs = [s for s in order if Regime(s.model, s.chinchilla) in PRESET.phase1]
    phase2_runs = [s for s in order if Regime(s.model, s.chinchilla) in PRESET.phase2]
    assert order.index(phase2_runs[0]) > max(order.index(s) for s in phase1_runs if s.optimizer == "adamw")
    assert all(s.optimizer == "adamw" for s in phase2_runs)  # sophia: phase2=False
    for regime in PRESET.phase2:
        search = bench.searches[("adamw", regime)]
        assert list(search.grid) == ["lr"]
        assert search.grid["lr"][:2] == [LRS[0] / 4, LRS[0] / 2]  # two lower lrs added
        nearest = min(PRESET.phase1, key=lambda r: math.hypot(math.log2(SIZES[r.model] / SIZES[regime.model]),
                                                              math.log2(r.ratio / regime.ratio)))
        start = next(s.hparams for s in phase2_runs if Regime(s.model, s.chinchilla) == regime)
        assert start == bench.optimum("adamw", nearest).hparams
        assert bench.optimum("adamw", regime).hparams["lr"] == grid_argmin_lr(regime.model, regime.ratio,
                                                                              search.grid["lr"])


def test_phase3_fits_the_lr_law_and_runs_its_predictions(finished):
    bench, _ = finished
    law = bench.laws["adamw"]["lr"]
    # The optima it fits are snapped to a grid of spacing 2^(1/4) (±9%), so the law can be that far off.
    assert law.heldout[:2] == (SIZES["l"], 8.0)
    assert law.heldout_error < 0.15
    for regime in PRESET.phase3:
        predicted = bench.phase3[("adamw", regime)]["lr"]
        true = 1e-2 * (SIZES[regime.model] / SIZES["s"]) ** -0.3 * regime.ratio ** -0.1
        assert predicted == pytest.approx(float(law(SIZES[regime.model], regime.ratio)))
        assert abs(math.log2(predicted / true)) < 0.2  # extrapolated 4× beyond the largest tuned size
        assert bench.phase3[("adamw", regime)]["weight_decay"] == 0.1
        assert bench.optimum("adamw", regime) is not None  # and it was run
    assert not any(opt == "sophia" for opt, _ in bench.phase3)
    assert bench.done


def test_budget_and_warmup_rule():
    bench = Benchmark(PRESET, OBJECTIVE.param_count)
    regime = Regime("m", 2.0)
    # ⌊ratio · tokens_per_param · N / (seq_len · batch)⌋ = ⌊2 · 0.01 · 4e6 / (16 · 8)⌋ = 625
    assert bench.steps(regime, {"batch_size": 8}) == 625
    spec = bench.spec("adamw", regime, {"lr": 1e-2, "batch_size": 8, "warmup": 0})
    assert spec.steps == 625 and spec.seq_len == 16 and spec.chinchilla == 2.0
    feasible = bench._feasible(regime)
    assert feasible({"batch_size": 8, "warmup": 625}) and not feasible({"batch_size": 8, "warmup": 626})


def test_an_optimizer_that_always_diverges_skips_its_later_phases():
    bench = Benchmark(PRESET, OBJECTIVE.param_count)
    diverging = SyntheticObjective(SIZES, lr0=1e-9, diverge_factor=2.0)  # every grid lr is far too large
    while pending := bench.pending():
        for spec in pending:
            bench.record(spec, diverging(spec) if spec.optimizer == "sophia" else OBJECTIVE(spec))
    assert all(math.isinf(bench.optimum("sophia", r).loss) for r in PRESET.phase1)
    assert bench.done and bench.sensitive["sophia"] == ()  # no near-best evidence: nothing flagged
    unstable = dataclasses.replace(PRESET, optimizers={"adamw": sweep()}, phase3_optimizers=("adamw",))
    bench = Benchmark(unstable, OBJECTIVE.param_count)
    while pending := bench.pending():
        for spec in pending:
            bench.record(spec, diverging(spec))
    assert set(bench.skipped) == {("adamw", r) for r in PRESET.phase2 + PRESET.phase3}
