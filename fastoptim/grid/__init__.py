"""The benchmark grid of spec §2–§5: presets, the three tuning phases, results store, fits, speedups, reports."""

from .driver import run_grid
from .executors import LocalGPUExecutor, SequentialExecutor, SlurmExecutor
from .fits import FitError, HparamLaw, LossLaw, fit_hparam_law, fit_loss_law
from .phases import Benchmark
from .presets import PRESETS, GridPreset, OptimizerSweep, Regime, get_preset
from .runs import RunOutcome, RunSpec
from .search import CoordinateDescent
from .speedup import LossRow, compute_speedups, read_loss_csv
from .store import ResultsStore

__all__ = ["Benchmark", "CoordinateDescent", "FitError", "GridPreset", "HparamLaw", "LocalGPUExecutor", "LossLaw",
           "LossRow", "OptimizerSweep", "PRESETS", "Regime", "ResultsStore", "RunOutcome", "RunSpec",
           "SequentialExecutor", "SlurmExecutor", "compute_speedups", "fit_hparam_law", "fit_loss_law", "get_preset",
           "read_loss_csv", "run_grid"]
