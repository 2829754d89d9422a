"""Optimizers by the names the benchmark uses, and construction from a flat hyperparameter dict."""

import importlib
import inspect

from torch import nn

# name -> "module:Class"; imported on first use so that one optimizer's import error cannot hide the others.
_PATHS = {
    "adamw": "fastoptim.optim.adam:AdamW",
    "nadamw": "fastoptim.optim.adam:NAdamW",
    "mars": "fastoptim.optim.adam:Mars",
    "cautious": "fastoptim.optim.adam:Cautious",
    "mini": "fastoptim.optim.adam_mini:AdamMini",
    "lion": "fastoptim.optim.lion:Lion",
    "muon": "fastoptim.optim.muon:Muon",
    "scion": "fastoptim.optim.muon:Scion",
    "kron": "fastoptim.optim.kron:Kron",
    "soap": "fastoptim.optim.soap:Soap",
    "sophia": "fastoptim.optim.sophia:SophiaH",
}
OPTIMIZER_NAMES = tuple(_PATHS)


def optimizer_class(name: str):
    if name not in _PATHS:
        raise ValueError(f"optimizer: unknown name {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    module, cls = _PATHS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_optimizer(name: str, model: nn.Module, hparams: dict):
    """`name`'s optimizer over `model`, with the paper's routing; `hparams` uses flat keys (beta1, beta2, ...)."""
    cls = optimizer_class(name)
    kwargs = dict(hparams)
    if "beta1" in kwargs or "beta2" in kwargs:
        if "betas" in kwargs:
            raise ValueError("hparams: give either betas or beta1/beta2, not both")
        signature = inspect.signature(cls)
        if "betas" not in signature.parameters:
            raise ValueError(f"hparams: {name} takes no betas, so beta1/beta2 do not apply")
        b1, b2 = signature.parameters["betas"].default
        kwargs["betas"] = (kwargs.pop("beta1", b1), kwargs.pop("beta2", b2))
    try:
        return cls(model, **kwargs)
    except TypeError as err:  # an unknown keyword: name it in the library's terms
        raise ValueError(f"hparams for {name}: {err}") from err
