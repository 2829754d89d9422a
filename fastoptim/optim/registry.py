"""Optimizers by the names the benchmark uses, and construction from a flat hyperparameter dict."""

import inspect

from torch import nn

from fastoptim.optim.adam import AdamW, Cautious, Mars, NAdamW
from fastoptim.optim.adam_mini import AdamMini
from fastoptim.optim.kron import Kron
from fastoptim.optim.lion import Lion
from fastoptim.optim.muon import Muon, Scion
from fastoptim.optim.soap import Soap
from fastoptim.optim.sophia import SophiaH

OPTIMIZERS = {
    "adamw": AdamW,
    "nadamw": NAdamW,
    "mars": Mars,
    "cautious": Cautious,
    "mini": AdamMini,
    "lion": Lion,
    "muon": Muon,
    "scion": Scion,
    "kron": Kron,
    "soap": Soap,
    "sophia": SophiaH,
}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def optimizer_class(name: str):
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown name {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    return OPTIMIZERS[name]


def constructor_kwargs(cls, hparams: dict) -> dict:
    """The flat keys of the benchmark's configs (beta1, beta2, muon_eps, ...) as `cls`'s constructor arguments,
    through its ``flat_keys`` (a key → an argument, or (argument, index) for one entry of a tuple such as betas)."""
    kwargs, parts = {}, {}
    for key, value in hparams.items():
        target = cls.flat_keys.get(key, key)
        if isinstance(target, tuple):
            parts.setdefault(target[0], {})[target[1]] = (key, value)
        else:
            kwargs[target] = value
    for name, entries in parts.items():
        given = ", ".join(key for key, _ in entries.values())
        if name in kwargs:
            raise ValueError(f"hparams: give either {name} or {given}, not both")
        parameter = inspect.signature(cls).parameters.get(name)
        if parameter is None:
            raise ValueError(f"hparams: {cls.__name__} takes no {name}, so {given} do not apply")
        kwargs[name] = tuple(entries[i][1] if i in entries else default for i, default in enumerate(parameter.default))
    return kwargs


def build_optimizer(name: str, model: nn.Module, hparams: dict):
    """`name`'s optimizer over `model`, with the paper's routing; `hparams` uses flat keys (beta1, beta2, ...)."""
    cls = optimizer_class(name)
    kwargs = constructor_kwargs(cls, hparams)
    try:
        return cls(model, **kwargs)
    except TypeError as err:  # an unknown keyword: name it in the library's terms
        raise ValueError(f"hparams for {name}: {err}") from err
