"""Optimizer classes, their parameter routing and the registry by name."""

from fastoptim.optim.registry import OPTIMIZER_NAMES, OPTIMIZERS, build_optimizer, optimizer_class
from fastoptim.optim.routing import param_groups

__all__ = ["OPTIMIZERS", "OPTIMIZER_NAMES", "build_optimizer", "optimizer_class", "param_groups"]
