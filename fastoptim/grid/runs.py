"""One point of the grid (a fully specified training run) and what it returns.

A run's identity is the hash of its canonical config: everything that changes the result (model, optimizer,
hyperparameters, data budget, sequence length, seed, data, eval set) and nothing that does not (device, output
folder, micro-batch, compile: see grid/runner.py's RunSettings).
The same config asked for by two phases, two workers or two sessions is therefore one run.
"""

import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    model: str
    chinchilla: float
    hparams: dict = field(hash=False)
    seq_len: int
    steps: int | None = None  # None: the trainer derives ⌊ratio·20·N / (seq_len·batch_size)⌋
    eval_every: int | None = None
    seed: int = 0
    data: str | None = None  # None: the trainer's default corpus
    eval_tokens: int | None = None  # None: the trainer's default size of the fixed eval set
    eval_data: str | None = None  # None: the held-out split of `data`
    vocab_size: int | None = None  # text data: the BPE's vocabulary; None: the trainer's default

    def config(self) -> dict:
        config = {
            "optimizer": self.optimizer,
            "model": self.model,
            "chinchilla": float(self.chinchilla),
            "hparams": {k: _plain(v) for k, v in sorted(self.hparams.items())},
            "seq_len": self.seq_len,
            "steps": self.steps,
            "eval_every": self.eval_every,
            "seed": self.seed,
            "data": self.data,
            "eval_tokens": self.eval_tokens,
            "eval_data": self.eval_data,
        }
        # Set only when given, so every run of a store made before the field existed keeps its id.
        if self.vocab_size is not None:
            config["vocab_size"] = self.vocab_size
        return config

    def canonical_json(self) -> str:
        return json.dumps(self.config(), sort_keys=True, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:20]

    @classmethod
    def from_config(cls, config: dict) -> "RunSpec":
        return cls(**config)


def _plain(value):
    """Hyperparameter values as JSON-stable scalars: 0.1 and numpy's 0.1 must hash alike, ints stay ints."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"hyperparameter value {value!r} must be a number, bool, str or None, not {type(value).__name__}")


@dataclass(frozen=True)
class RunOutcome:
    final_val_loss: float
    diverged: bool
    steps: int | None = None
    seconds: float | None = None
    reason: str | None = None  # why a diverged run diverged: the rule that fired (fastoptim.train.divergence)

    @property
    def score(self) -> float:
        """The loss a search compares: a diverged or non-finite run is finished and loses to everything."""
        if self.diverged or not math.isfinite(self.final_val_loss):
            return math.inf
        return self.final_val_loss


# A run that raised: finished as far as its search is concerned (it loses to every run), retried by a later session.
CRASHED = RunOutcome(final_val_loss=math.inf, diverged=False)
