"""fastoptim: fast pretraining optimizers for PyTorch, and the benchmark that compares them."""

from fastoptim.optim import OPTIMIZER_NAMES, build_optimizer, optimizer_class, param_groups
from fastoptim.optim.kron import Kron
from fastoptim.optim.muon import Muon, Scion
from fastoptim.optim.soap import Soap

__all__ = ["OPTIMIZER_NAMES", "build_optimizer", "optimizer_class", "param_groups", "Muon", "Scion", "Soap", "Kron"]
