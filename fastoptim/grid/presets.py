"""Grid presets: which optimizers, model sizes and Chinchilla ratios, each optimizer's Phase I grid and baseline.

`paper` is the study of spec §2/§4; `tiny` and `smoke` keep its structure (Phase I on a small size at every ratio and
on larger sizes at 1×, Phase II re-sweeps at the other regimes) at a scale a single GPU or a 2-core CPU finishes.

Hyperparameters use the trainer's flat keys. Common: lr, weight_decay, beta1, beta2, eps, max_grad_norm, warmup
(absolute steps), batch_size (sequences), lr_schedule ("cosine" | "linear" = WSD), decay (WSD's final fraction),
min_lr_ratio. Per optimizer: mars gamma; muon momentum, adam_lr_ratio, ns_steps, muon_eps; scion momentum,
signum_lr_ratio, ns_steps, scion_eps; kron block_size, normalize_grads, precond_lr, precond_update_prob_min,
precond_update_flat_start, init_scale; soap shampoo_beta, precondition_frequency, block_size; sophia gamma,
update_interval.
"""

import json
from dataclasses import asdict, dataclass, replace

from fastoptim.optim.paper import BASELINE, paper_hparams

OPTIMIZER_NAMES = ("adamw", "nadamw", "mars", "cautious", "lion", "mini", "muon", "scion", "kron", "soap", "sophia")


@dataclass(frozen=True)
class Regime:
    model: str
    ratio: float


@dataclass(frozen=True)
class OptimizerSweep:
    baseline: dict   # Phase I start: every hyperparameter the run sets, swept or not
    grid: dict       # swept key → values, in the order coordinate descent visits them
    phase2: bool = True  # re-swept at the Phase II regimes (the study ran Sophia at Phase I regimes only)

    def __post_init__(self):
        unknown = [key for key in self.grid if key not in self.baseline]
        if unknown:
            raise ValueError(f"grid keys {unknown} have no baseline value: every swept key needs a start")


@dataclass(frozen=True)
class GridPreset:
    name: str
    optimizers: dict                 # name → OptimizerSweep
    phase1: tuple                    # Regimes tuned by full coordinate descent
    phase2: tuple = ()               # Regimes re-sweeping only the scale-sensitive keys
    phase3: tuple = ()               # Regimes run once at the hyperparameters the fitted laws predict
    phase3_optimizers: tuple = ()
    seq_len: int = 4096
    tokens_per_param: float = 20.0   # 1× Chinchilla = tokens_per_param · N tokens; scaled-down presets shrink it
    eval_every: int | None = 1000    # capped at steps − 1 as in the study (plus one at the end); 0: only at the end
    delta1: float = 3e-3
    delta2: float = 6.4e-3
    phase2_always: tuple = ("lr", "warmup", "batch_size")  # re-swept at Phase II whether sensitive or not (spec §4)
    phase2_lower_lrs: int = 1        # Phase II adds this many halvings below the smallest Phase I lr
    fit_drop_first: bool = True      # Phase III fit drops the smallest (N, D) point, as the study's code does
    baseline_optimizer: str = BASELINE
    seed: int = 0
    extra_seeds: int = 0             # the best config of every regime runs again with seeds seed+1 … seed+extra_seeds
    data: str | None = None          # corpus spec for the trainer; None: its embedded default corpus
    eval_tokens: int | None = None   # size of the fixed eval set; None: the trainer's default
    eval_data: str | None = None     # a separate eval set; None: the held-out split of the data
    allow_repeat: bool = False       # declared: runs may take more than one pass over the data
    vocab_size: int | None = None    # text data: the BPE's vocabulary (None: the trainer's default, 4096)
    pipeline_check: bool = False     # a check that the pipeline runs, too short for conclusions: its report says so

    def __post_init__(self):
        unknown = [name for name in self.optimizers if name not in OPTIMIZER_NAMES]
        if unknown:
            raise ValueError(f"preset {self.name!r}: unknown optimizer(s) {unknown}; "
                             f"known: {', '.join(OPTIMIZER_NAMES)}")
        if not self.phase1:
            raise ValueError(f"preset {self.name!r}: phase1 needs at least one regime")
        stray = [name for name in self.phase3_optimizers if name not in self.optimizers]
        if stray:
            raise ValueError(f"preset {self.name!r}: phase3_optimizers {stray} are not among its optimizers")
        every = [*self.phase1, *self.phase2, *self.phase3]
        if len(set(every)) != len(every):
            raise ValueError(f"preset {self.name!r}: a regime appears in more than one phase (or twice in one)")

    @property
    def sizes(self) -> list[str]:
        return list(dict.fromkeys(regime.model for regime in (*self.phase1, *self.phase2, *self.phase3)))

    def to_json(self) -> str:
        return json.dumps(asdict(self))  # unsorted: a grid's key order is the order coordinate descent sweeps

    @classmethod
    def from_json(cls, text: str) -> "GridPreset":
        raw = json.loads(text)
        raw["optimizers"] = {name: OptimizerSweep(sweep["baseline"], {k: tuple(v) for k, v in sweep["grid"].items()},
                                                  sweep["phase2"]) for name, sweep in raw["optimizers"].items()}
        for phase in ("phase1", "phase2", "phase3"):
            raw[phase] = tuple(Regime(**regime) for regime in raw[phase])
        for key in ("phase3_optimizers", "phase2_always"):
            raw[key] = tuple(raw[key])
        return cls(**raw)


def regimes(models, ratios) -> tuple:
    return tuple(Regime(model, float(ratio)) for model in models for ratio in ratios)


# ---- the study (spec §1 best/starting configs as baselines, §4 Phase I grids) ----

_WARMUP = (500, 1000, 2000, 4000)
_BSZ = (128, 256, 512, 1024)
_CLIP = (0, 1, 2)
_WD = (0.0, 0.1, 0.2)
_NADAMW_GRID_LR = (8e-3, 1.6e-2, 3.2e-2)
_ADAMW_GRID = {"lr": (4e-3, 8e-3, 1.6e-2, 3.2e-2), "weight_decay": _WD, "warmup": _WARMUP, "beta1": (0.9, 0.95, 0.98),
               "beta2": (0.9, 0.95, 0.98), "eps": (1e-25, 1e-20, 1e-15, 1e-10), "max_grad_norm": _CLIP,
               "batch_size": _BSZ}
_NADAMW_GRID = {**_ADAMW_GRID, "lr": _NADAMW_GRID_LR, "beta1": (0.8, 0.9, 0.95, 0.98)}

# Phase I grids (spec §4); each starts from the paper's starting configuration (fastoptim.paper_hparams).
_PAPER_GRIDS = {
    "adamw": _ADAMW_GRID,
    "nadamw": _NADAMW_GRID,
    "cautious": _NADAMW_GRID,
    "mini": _ADAMW_GRID,
    "mars": {"lr": _NADAMW_GRID_LR, "weight_decay": _WD, "warmup": _WARMUP, "beta1": (0.8, 0.9, 0.95, 0.98),
             "beta2": (0.9, 0.95, 0.98, 0.99), "gamma": (0.0125, 0.025, 0.05, 0.1),
             "eps": (1e-30, 1e-25, 1e-20, 1e-15, 1e-10), "batch_size": _BSZ},
    "lion": {"lr": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3), "weight_decay": tuple(round(0.1 * i, 1) for i in range(11)),
             "beta1": (0.8, 0.9, 0.95, 0.98), "beta2": (0.9, 0.95, 0.98), "warmup": _WARMUP, "max_grad_norm": _CLIP,
             "batch_size": _BSZ},
    "muon": {"lr": (8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1), "adam_lr_ratio": (0.1, 0.2, 0.3, 0.4),
             "momentum": (0.8, 0.9, 0.95, 0.98), "decay": (0.2, 0.4, 0.6, 0.8, 1.0), "beta1": (0.8, 0.9, 0.95, 0.98),
             "beta2": (0.9, 0.95, 0.98), "eps": (1e-25, 1e-20, 1e-15, 1e-10),
             "muon_eps": (1e-25, 1e-20, 1e-15, 1e-10, 1e-5), "max_grad_norm": _CLIP, "weight_decay": _WD,
             "batch_size": _BSZ},
    "scion": {"lr": (8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1), "weight_decay": _WD, "momentum": (0.8, 0.9, 0.95, 0.98),
              "beta1": (0.8, 0.9, 0.95, 0.98), "scion_eps": (1e-20, 1e-15, 1e-10, 1e-5), "max_grad_norm": _CLIP,
              "decay": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "signum_lr_ratio": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
              "batch_size": _BSZ},
    "kron": {"lr": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3), "weight_decay": (0.0, 0.5, 0.7, 0.9), "beta1": (0.9, 0.95, 0.98),
             "block_size": (128, 256, 512), "max_grad_norm": _CLIP, "normalize_grads": (False, True),
             "precond_lr": (0.1, 0.2), "precond_update_prob_min": (0.05, 0.1),
             "precond_update_flat_start": (500, 1000, 2000), "warmup": (1000, 2000, 4000), "batch_size": _BSZ},
    "soap": {"lr": (4e-3, 8e-3, 1.6e-2), "beta1": (0.8, 0.9, 0.95), "beta2": (0.9, 0.95, 0.98, 0.99),
             "shampoo_beta": (0.9, 0.95, 0.98, 0.99), "precondition_frequency": (1, 5, 10),
             "block_size": (128, 256, 512), "eps": (1e-20, 1e-15, 1e-10), "warmup": (500, 1000, 2000),
             "weight_decay": _WD, "batch_size": (128, 256, 512)},
    "sophia": {"lr": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2), "gamma": (0.00625, 0.0125, 0.025, 0.05),
               "eps": (1e-17, 1e-12, 1e-7), "beta1": (0.8, 0.9, 0.95, 0.98), "beta2": (0.9, 0.95, 0.98, 0.99, 0.995),
               "weight_decay": (0.0, 0.1, 0.2, 0.3), "warmup": _WARMUP, "batch_size": _BSZ},
}
# The study ran Sophia at Phase I regimes only.
_PAPER_SWEEPS = {name: OptimizerSweep(paper_hparams(name), grid, phase2=name != "sophia")
                 for name, grid in _PAPER_GRIDS.items()}
PAPER_SWEEPS = {name: _PAPER_SWEEPS[name] for name in OPTIMIZER_NAMES}  # the spec's order, for reports

PAPER = GridPreset(
    name="paper",
    optimizers=PAPER_SWEEPS,
    phase1=regimes(["130m"], [1, 2, 4, 8]) + regimes(["300m", "520m"], [1]),
    phase2=regimes(["300m", "520m"], [2, 4, 8]),
    phase3=regimes(["1.2b"], [1, 2, 4, 8]) + regimes(["130m", "300m"], [16]),
    phase3_optimizers=("adamw", "nadamw", "muon", "soap"),
    # The study scores Paloma's C4-en validation split, about a million tokens (unconfirmed: our reading of Paloma's
    # per-domain size): 256 windows of 4096.
    eval_tokens=1 << 20,
)

# The largest micro-batch (sequences per forward on one GPU) per model: a run setting, not part of any preset or run
# identity (`fastoptim grid --micro-batch` overrides it, `auto` probes the GPU). The paper sizes' values are estimates
# for an 80 GB GPU at sequence 4096 with bf16 autocast, compiled blocks and the chunked cross-entropy (about 34·d
# bytes of activations per token and layer), not measurements; the tiny sizes take their whole batch.
MICRO_BATCH = {"130m": 16, "300m": 8, "520m": 4, "1.2b": 2}


# ---- scaled-down presets: the same sweeps, only the main keys swept, short schedules ----

def _scaled_down(keys: tuple, overrides: dict, names=OPTIMIZER_NAMES, lr_values: int | None = None) -> dict:
    """Each optimizer's paper sweep reduced to `keys`, with schedule/batch overrides fitting a short run.

    weight_decay keeps three values (0, the baseline's, the paper grid's largest) so Lion's 0–1 range stays cheap;
    `lr_values` keeps that many paper lrs centred on the baseline's.
    """
    sweeps = {}
    for name in names:
        paper = PAPER_SWEEPS[name]
        baseline = {**paper.baseline, **{k: v for k, v in overrides.items() if k in paper.baseline}}
        if name in ("muon", "scion"):
            baseline["ns_steps"] = 5
        grid = {}
        for key in keys:
            values = paper.grid[key]
            if key == "weight_decay":
                values = tuple(sorted({0.0, baseline[key], max(values)}))
            elif key == "lr" and lr_values:
                centre = min(range(len(values)), key=lambda i: abs(values[i] - baseline["lr"]))
                start = max(0, min(centre - lr_values // 2, len(values) - lr_values))
                values = values[start:start + lr_values]
            grid[key] = values
        sweeps[name] = replace(paper, baseline=baseline, grid=grid)
    return sweeps


_SHORT_RUN = {"batch_size": 16, "warmup": 10, "precond_update_flat_start": 20}

TINY = GridPreset(
    name="tiny",
    optimizers=_scaled_down(("lr", "weight_decay"), _SHORT_RUN, lr_values=4),
    phase1=regimes(["tiny"], [1, 2, 4, 8]) + regimes(["tiny2"], [1]),
    phase2=regimes(["tiny2"], [2, 4, 8]),
    phase2_always=("lr",),
    phase2_lower_lrs=0,
    seq_len=128,
    tokens_per_param=0.5,  # tiny 1× = 32 steps … tiny2 8× = 2048 steps of 16 × 128 tokens
    eval_every=100,
    eval_tokens=1 << 16,
    # tiny2 at 8× needs 4.2 M training tokens; the embedded corpus (all of the standard library's source outside its
    # tests) holds about 3.2 M, so that regime makes about 1.3 passes (every other regime fits in one).
    allow_repeat=True,
)

SMOKE = GridPreset(
    name="smoke",
    optimizers=_scaled_down(("lr",), {**_SHORT_RUN, "batch_size": 4, "warmup": 2}, names=("adamw", "muon", "lion"),
                            lr_values=3),
    # The paper's Phase II sits at the larger sizes; here tiny2 at 2× alone would double the smoke's time, so Phase II
    # re-sweeps tiny at 4× (same mechanics: sensitivity from the Phase I regimes, start from the nearest optimum).
    phase1=regimes(["tiny"], [1, 2]) + regimes(["tiny2"], [1]),
    phase2=regimes(["tiny"], [4]),
    phase2_always=("lr",),
    phase2_lower_lrs=0,
    seq_len=32,
    tokens_per_param=0.005,  # tiny 1× = 5 steps, tiny 4× = 20, tiny2 1× = 40 steps of 4 × 32 tokens
    eval_every=0,
    eval_tokens=1 << 12,
    extra_seeds=1,  # so the check covers the seed runs and the noise marks too
    pipeline_check=True,
)

# The paper's structure at the scale of two CPU cores in under 30 minutes: five optimizers (the baseline, two scalar
# and two matrix methods), four budgets at one size, each optimizer's lr tuned at every budget, and the best config of
# each budget rerun under two more seeds to measure the noise the speedups must clear. The tiny model with a
# 512-token BPE keeps the embeddings (2 × 512 × 64) at half the non-embedding parameters (131,072), as in the paper's
# models, instead of dwarfing them as a 4096-token vocabulary would. Soap's blocks are 64 wide: on CPU its eigenbasis
# refresh costs as much as 10 AdamW steps at 128 and more above.
# The lr grids bracket the optima of pilot runs at 1× and 8× (Dec 2026, 2-core AMD EPYC): every optimizer's best
# lr moved by at most one grid step between those budgets; Muon's moved from 0.064 to 0.032, so it keeps four values.
_CPU_LRS = {"adamw": (2e-3, 4e-3, 8e-3), "nadamw": (2e-3, 4e-3, 8e-3), "lion": (1e-3, 2e-3, 4e-3),
            "muon": (1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1), "soap": (8e-3, 1.6e-2, 3.2e-2)}
_CPU_SWEEPS = _scaled_down(("lr",), {"batch_size": 16, "warmup": 8, "block_size": 64, "precond_update_flat_start": 20},
                           names=tuple(_CPU_LRS))
CPU = GridPreset(
    name="cpu",
    optimizers={name: replace(sweep, baseline={**sweep.baseline, "lr": _CPU_LRS[name][1]},
                              grid={"lr": _CPU_LRS[name]}) for name, sweep in _CPU_SWEEPS.items()},
    phase1=regimes(["tiny"], [1, 2, 4, 8]),
    seq_len=64,
    tokens_per_param=0.5,  # tiny 1× = 64 steps … 8× = 512 steps of 16 × 64 tokens
    eval_every=32,
    eval_tokens=1 << 14,
    vocab_size=512,
    extra_seeds=2,
)

PRESETS = {preset.name: preset for preset in (PAPER, TINY, SMOKE, CPU)}


def get_preset(name: str) -> GridPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
