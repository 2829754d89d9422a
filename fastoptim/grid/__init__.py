"""The benchmark grid of spec §2–§5: presets, the three tuning phases, results store, fits, speedups, reports."""

from .fits import FitError, HparamLaw, LossLaw, fit_hparam_law, fit_loss_law
from .phases import Benchmark
from .presets import PRESETS, GridPreset, OptimizerSweep, Regime, get_preset
from .runs import RunOutcome, RunSpec
from .search import CoordinateDescent
from .speedup import LossRow, compute_speedups, read_loss_csv
from .store import ResultsStore

__all__ = ["Benchmark", "CoordinateDescent", "FitError", "GridPreset", "HparamLaw", "LossLaw", "LossRow",
           "OptimizerSweep", "PRESETS", "Regime", "ResultsStore", "RunOutcome", "RunSpec", "compute_speedups",
           "fit_hparam_law", "fit_loss_law", "get_preset", "read_loss_csv"]
