"""The paper's tuned settings (benchmark-spec §1, §4), apart from the optimizers' own defaults.

``paper_hparams(optimizer, model, ratio)`` gives, in the benchmark's flat keys (lr, beta1, beta2, eps,
weight_decay, max_grad_norm, warmup, batch_size, lr_schedule, decay, min_lr_ratio and each optimizer's own keys,
as ``build_optimizer`` and the trainer take them), the configuration the study found best at that model size and
Chinchilla ratio where the spec records one, else its Phase I starting configuration (the 130M, 1× start, which
the grid's presets use as their baselines). Model names other than the paper's sizes (the CPU sizes) get the
starting configuration. Where the spec gives a range ("η 0.008 → 0.004 as size grows"), the entry below picks its
ends and says so.
"""

from dataclasses import dataclass, field

# The optimizer the study measures every speedup against, and the trainer's default.
BASELINE = "adamw"

_COSINE = {"lr_schedule": "cosine", "decay": 1.0, "min_lr_ratio": 0.0}
_WSD = {"lr_schedule": "linear", "min_lr_ratio": 0.0}
_ADAMW_START = {"lr": 8e-3, "weight_decay": 0.1, "warmup": 2000, "beta1": 0.9, "beta2": 0.98, "eps": 1e-20,
                "max_grad_norm": 1.0, "batch_size": 128, **_COSINE}


@dataclass(frozen=True)
class Tuned:
    """Overrides of the start for the regimes of `models` × `ratios` (empty: every model / every ratio)."""
    overrides: dict
    models: tuple = ()
    ratios: tuple = ()

    def applies(self, model: str, ratio: float) -> bool:
        return (not self.models or model in self.models) and (not self.ratios or float(ratio) in self.ratios)


@dataclass(frozen=True)
class PaperSettings:
    start: dict  # Phase I start: every hyperparameter a run sets
    tuned: tuple = field(default_factory=tuple)  # applied in order, later entries win


PAPER_SETTINGS = {
    "adamw": PaperSettings(_ADAMW_START),  # §1.1: the 130M 1× best is the start
    "nadamw": PaperSettings(
        {**_ADAMW_START, "lr": 1.6e-2, "beta1": 0.95, "beta2": 0.95, "eps": 1e-10},
        (Tuned({"lr": 8e-3, "beta1": 0.95, "beta2": 0.98, "eps": 1e-10, "warmup": 2000}, ("300m",), (2., 4., 8.)),
         Tuned({"lr": 4e-3, "beta1": 0.98, "beta2": 0.98, "warmup": 4000}, ("520m", "1.2b")))),
    "mars": PaperSettings(
        {**_ADAMW_START, "beta1": 0.95, "beta2": 0.99, "gamma": 0.025, "eps": 1e-25},
        (Tuned({"beta1": 0.98, "beta2": 0.99, "gamma": 0.05, "eps": 1e-25, "lr": 8e-3, "warmup": 1000}, ("300m",)),
         Tuned({"beta1": 0.95, "beta2": 0.98, "gamma": 0.025, "lr": 8e-3, "warmup": 2000}, ("520m",)),
         Tuned({"lr": 4e-3}, ("520m",), (8.,)))),
    "cautious": PaperSettings(
        {**_ADAMW_START, "beta1": 0.98, "beta2": 0.98, "eps": 1e-25, "batch_size": 256},
        (Tuned({"lr": 4e-3}, ("520m",), (4., 8.)),)),
    "mini": PaperSettings(
        {**_ADAMW_START, "lr": 4e-3, "eps": 1e-25, "max_grad_norm": 2.0},
        (Tuned({"lr": 2e-3}, ("300m",), (8.,)),
         Tuned({"lr": 4e-3, "warmup": 4000, "eps": 1e-10}, ("520m",)))),
    "lion": PaperSettings(  # Lion has no eps
        {**{k: v for k, v in _ADAMW_START.items() if k != "eps"}, "lr": 2e-3, "weight_decay": 0.7, "beta2": 0.95},
        (Tuned({"lr": 1e-3, "weight_decay": 0.7, "beta2": 0.98}, ("300m",)),
         Tuned({"lr": 1e-3, "weight_decay": 0.6, "beta2": 0.95}, ("520m",)),
         Tuned({"lr": 5e-4}, ("520m",), (8.,)))),
    # Muon and Scion: Levanter's backend_steps was 10 when the sweep ran (spec §1.7).
    "muon": PaperSettings(
        {"lr": 1.6e-2, "adam_lr_ratio": 0.2, "momentum": 0.95, "beta1": 0.8, "beta2": 0.98, "eps": 1e-15,
         "muon_eps": 1e-5, "ns_steps": 10, "weight_decay": 0.1, "max_grad_norm": 1.0, "warmup": 0, "decay": 0.8,
         "batch_size": 128, **_WSD},
        (Tuned({"lr": 8e-3, "adam_lr_ratio": 0.3, "momentum": 0.98}, ("130m",), (2., 4., 8.)),
         Tuned({"momentum": 0.95}, ("130m",), (4.,)),
         Tuned({"lr": 8e-3, "adam_lr_ratio": 0.3, "momentum": 0.98, "decay": 1.0, "eps": 1e-25}, ("520m",), (1.,)),
         Tuned({"lr": 4e-3, "adam_lr_ratio": 0.3, "momentum": 0.98, "max_grad_norm": 2.0, "decay": 1.0,
                "batch_size": 256}, ("1.2b",)))),
    "scion": PaperSettings(
        {"lr": 1.6e-2, "signum_lr_ratio": 0.2, "momentum": 0.95, "beta1": 0.98, "scion_eps": 1e-5, "ns_steps": 10,
         "weight_decay": 0.1, "max_grad_norm": 2.0, "warmup": 0, "decay": 0.8, "batch_size": 128, **_WSD},
        # "η = 0.008 or 0.004" at 300M/520M: the larger at 300M, the smaller at 520M.
        (Tuned({"lr": 8e-3, "signum_lr_ratio": 0.1, "decay": 0.8}, ("300m",)),
         Tuned({"lr": 4e-3, "signum_lr_ratio": 0.1, "decay": 1.0}, ("520m",)))),
    "kron": PaperSettings(  # §1.9: the 300M best is the start
        {"lr": 1e-3, "weight_decay": 0.7, "beta1": 0.95, "block_size": 256, "max_grad_norm": 1.0,
         "normalize_grads": True, "precond_lr": 0.2, "precond_update_prob_min": 0.1,
         "precond_update_flat_start": 2000, "init_scale": 1.0, "warmup": 1000, "batch_size": 128, **_COSINE},
        (Tuned({"lr": 5e-4, "weight_decay": 0.5}, ("520m",)),)),
    "soap": PaperSettings(  # §1.10: the 130M 8× best is the start
        {"lr": 8e-3, "beta1": 0.95, "beta2": 0.99, "shampoo_beta": 0.98, "eps": 1e-15, "block_size": 512,
         "precondition_frequency": 10, "warmup": 1000, "weight_decay": 0.1, "max_grad_norm": 1.0,
         "batch_size": 256, **_COSINE},
        # "shampoo_beta 0.9–0.95, η 0.008 → 0.004 as size grows": 0.95 and 0.008 at 300M, 0.9 and 0.004 at 1.2B.
        (Tuned({"shampoo_beta": 0.95, "eps": 1e-10, "lr": 8e-3}, ("300m",)),
         Tuned({"shampoo_beta": 0.95, "eps": 1e-10, "lr": 4e-3}, ("520m",)),
         Tuned({"shampoo_beta": 0.9, "eps": 1e-10, "lr": 4e-3}, ("1.2b",)))),
    "sophia": PaperSettings(
        {"lr": 4e-3, "gamma": 0.0125, "eps": 1e-12, "beta1": 0.96, "beta2": 0.99, "weight_decay": 0.1,
         "update_interval": 10, "max_grad_norm": 1.0, "warmup": 2000, "batch_size": 128, **_COSINE}),
}


def paper_hparams(optimizer: str, model: str = "130m", ratio: float = 1.0) -> dict:
    """The study's settings for `optimizer` at `model` (130m, 300m, 520m, 1.2b) and Chinchilla `ratio`, as a new
    flat dict (see the module docstring)."""
    if optimizer not in PAPER_SETTINGS:
        raise ValueError(f"optimizer: unknown name {optimizer!r}; expected one of {', '.join(PAPER_SETTINGS)}")
    settings = PAPER_SETTINGS[optimizer]
    hparams = dict(settings.start)
    for tuned in settings.tuned:
        if tuned.applies(model, ratio):
            hparams.update(tuned.overrides)
    return hparams
