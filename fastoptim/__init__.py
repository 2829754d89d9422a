"""fastoptim: fast pretraining optimizers for PyTorch, and the benchmark that compares them."""

from fastoptim.optim import OPTIMIZER_NAMES, build_optimizer, optimizer_class, param_groups

__all__ = ["OPTIMIZER_NAMES", "build_optimizer", "optimizer_class", "param_groups"]
