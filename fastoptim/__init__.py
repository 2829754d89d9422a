"""fastoptim: fast pretraining optimizers for PyTorch, and the benchmark that compares them."""

from fastoptim.optim import OPTIMIZER_NAMES, build_optimizer, optimizer_class, param_groups
from fastoptim.optim.adam import AdamW, Cautious, Mars, NAdamW
from fastoptim.optim.adam_mini import AdamMini
from fastoptim.optim.kron import Kron
from fastoptim.optim.lion import Lion
from fastoptim.optim.muon import Muon, Scion
from fastoptim.optim.soap import Soap
from fastoptim.optim.sophia import SophiaH

__all__ = [
    "OPTIMIZER_NAMES",
    "build_optimizer",
    "optimizer_class",
    "param_groups",
    "AdamW",
    "NAdamW",
    "Mars",
    "Cautious",
    "Lion",
    "AdamMini",
    "Muon",
    "Scion",
    "Kron",
    "Soap",
    "SophiaH",
]
