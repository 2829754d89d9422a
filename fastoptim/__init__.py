"""fastoptim: fast pretraining optimizers for PyTorch, and the benchmark that compares them.

    import fastoptim
    opt = fastoptim.AdamW(model.parameters(), lr=1e-3)          # torch.optim.AdamW's arguments and result
    opt = fastoptim.build_optimizer("muon", model, fastoptim.paper_hparams("muon", "130m", 1))  # the paper's

`fastoptim.ops` is the native layer (torch.ops.fastoptim, its fakes, and whether the kernels loaded).
"""

from fastoptim import ops
from fastoptim.optim import OPTIMIZER_NAMES, OPTIMIZERS, build_optimizer, optimizer_class, param_groups
from fastoptim.optim.adam import AdamW, Cautious, Mars, NAdamW
from fastoptim.optim.adam_mini import AdamMini
from fastoptim.optim.kron import Kron
from fastoptim.optim.lion import Lion
from fastoptim.optim.distributed import ZeroRedundancy
from fastoptim.optim.muon import Muon, Scion
from fastoptim.optim.paper import paper_hparams
from fastoptim.optim.soap import Soap
from fastoptim.optim.sophia import SophiaH

__version__ = "0.2.0"

__all__ = [
    "OPTIMIZERS",
    "OPTIMIZER_NAMES",
    "build_optimizer",
    "optimizer_class",
    "paper_hparams",
    "param_groups",
    "ops",
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
    "ZeroRedundancy",
]
