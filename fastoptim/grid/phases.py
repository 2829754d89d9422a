"""The three tuning phases of spec §4 as one ask/tell state machine over a preset.

Phase I   coordinate descent over each optimizer's full grid at every Phase I regime.
Phase II  once an optimizer's Phase I is finished: its scale-sensitive keys (no single value is near-best, within Δ2,
          in every Phase I regime), plus the keys the study re-swept anyway (preset.phase2_always), are re-swept at
          each Phase II regime by coordinate descent from the nearest Phase I optimum; lr gains lower values.
Phase III once Phase I and II are finished: h(N, D) = α·N^(−A)·D^(−B) + β fitted per re-swept key to the optima of
          every Phase I/II regime; the Phase III regimes run once at the predicted hyperparameters.

`pending()` lists the runs needed now; `record()` tells an outcome. Nothing here runs or stores anything, so a grid
driver, a resumed session and a report replaying a finished store all drive the same object.
"""

import math
from dataclasses import dataclass

from .fits import FitError, HparamLaw, fit_hparam_law
from .presets import GridPreset, Regime
from .runs import RunOutcome, RunSpec
from .search import CoordinateDescent


@dataclass(frozen=True)
class Optimum:
    optimizer: str
    regime: Regime
    hparams: dict
    loss: float


class Benchmark:
    def __init__(self, preset: GridPreset, param_count):
        """param_count(model name) → non-embedding parameter count N, as used for budgets and the Phase III fit."""
        self.preset = preset
        self._param_count = param_count
        self._n_cache: dict[str, int] = {}
        self.searches: dict[tuple[str, Regime], CoordinateDescent] = {}
        self.phase_of: dict[tuple[str, Regime], int] = {}
        self.sensitive: dict[str, tuple] = {}          # optimizer → scale-sensitive keys (after Phase I)
        self.laws: dict[str, dict] = {}                # optimizer → key → HparamLaw, or the reason it failed (str)
        self.phase3: dict[tuple[str, Regime], dict] = {}
        self.outcomes: dict[str, tuple[RunSpec, RunOutcome]] = {}
        self.skipped: dict[tuple[str, Regime], str] = {}  # later-phase regimes with no finite optimum to start from
        for name, sweep in preset.optimizers.items():
            for regime in preset.phase1:
                self._start_search(name, regime, sweep.baseline, sweep.grid, phase=1)

    # ---- budgets ----

    def param_count(self, model: str) -> int:
        if model not in self._n_cache:
            self._n_cache[model] = int(self._param_count(model))
        return self._n_cache[model]

    def steps(self, regime: Regime, hparams: dict) -> int:
        """⌊ratio · tokens_per_param · N / (seq_len · batch_size)⌋, the trainer's Chinchilla budget (spec §2)."""
        tokens = regime.ratio * self.preset.tokens_per_param * self.param_count(regime.model)
        return max(1, math.floor(tokens / (self.preset.seq_len * hparams["batch_size"])))

    def spec(self, optimizer: str, regime: Regime, hparams: dict, seed: int | None = None) -> RunSpec:
        """The run of `hparams` at `regime`; seed None: the preset's (the seed every search runs with)."""
        steps = self.steps(regime, hparams)
        every = self.preset.eval_every
        eval_every = None if every is None else steps if every == 0 else min(every, max(1, steps - 1))
        return RunSpec(optimizer=optimizer, model=regime.model, chinchilla=regime.ratio, hparams=dict(hparams),
                       seq_len=self.preset.seq_len, steps=steps, eval_every=eval_every,
                       seed=self.preset.seed if seed is None else seed,
                       data=self.preset.data, eval_tokens=self.preset.eval_tokens, eval_data=self.preset.eval_data,
                       vocab_size=self.preset.vocab_size)

    def _feasible(self, regime: Regime):
        # The study skipped configs whose warmup exceeds the run (spec §2).
        return lambda hparams: hparams.get("warmup", 0) <= self.steps(regime, hparams)

    # ---- ask / tell ----

    def pending(self) -> list[RunSpec]:
        self._advance()
        specs = {}
        for (optimizer, regime), search in self.searches.items():
            for hparams in search.ask():
                spec = self.spec(optimizer, regime, hparams)
                specs[spec.run_id] = spec
        for (optimizer, regime), hparams in self.phase3.items():
            spec = self.spec(optimizer, regime, hparams)
            if spec.run_id not in self.outcomes:
                specs[spec.run_id] = spec
        for optimum in self.settled_optima():
            for spec in self.seed_specs(optimum):
                if spec.run_id not in self.outcomes:
                    specs[spec.run_id] = spec
        return list(specs.values())

    @property
    def done(self) -> bool:
        return not self.pending()

    def record(self, spec: RunSpec, outcome: RunOutcome) -> None:
        self.outcomes[spec.run_id] = (spec, outcome)
        if spec.seed != self.preset.seed:
            return  # an optimum repeated under another seed measures noise; it is no answer to the search
        search = self.searches.get((spec.optimizer, Regime(spec.model, float(spec.chinchilla))))
        if search is not None:
            search.tell(spec.hparams, outcome.score)

    # ---- results ----

    def optimum(self, optimizer: str, regime: Regime) -> Optimum | None:
        """Best finished run of a regime (min loss over its search, or its Phase III run)."""
        key = (optimizer, regime)
        if key in self.searches and self.searches[key].scores:
            hparams, loss = self.searches[key].best()
            return Optimum(optimizer, regime, hparams, loss)
        if key in self.phase3:
            run_id = self.spec(optimizer, regime, self.phase3[key]).run_id
            if run_id in self.outcomes:
                return Optimum(optimizer, regime, self.phase3[key], self.outcomes[run_id][1].score)
        return None

    def settled_optima(self) -> list[Optimum]:
        """The finite optimum of every regime whose search has finished (or whose Phase III run has)."""
        settled = []
        for key in [*self.searches, *self.phase3]:
            search = self.searches.get(key)
            if search is not None and not (search.scores and search.done):
                continue
            optimum = self.optimum(*key)
            if optimum is not None and math.isfinite(optimum.loss):
                settled.append(optimum)
        return settled

    def seed_specs(self, optimum: Optimum) -> list[RunSpec]:
        """The optimum's repeats under the preset's extra seeds (the runs that measure seed noise)."""
        first = self.preset.seed + 1
        return [self.spec(optimum.optimizer, optimum.regime, optimum.hparams, seed)
                for seed in range(first, first + self.preset.extra_seeds)]

    def seed_losses(self, optimum: Optimum) -> list[float]:
        """Final losses of the optimum under every seed run so far, the search's own seed first (inf: diverged)."""
        repeats = [self.outcomes.get(spec.run_id) for spec in self.seed_specs(optimum)]
        return [optimum.loss] + [outcome.score for _, outcome in filter(None, repeats)]

    def phase_done(self, optimizer: str, phase: int) -> bool:
        keys = [key for key, p in self.phase_of.items() if key[0] == optimizer and p == phase]
        return all(self.searches[key].done for key in keys)

    # ---- phase transitions ----

    def _start_search(self, optimizer, regime, start, grid, phase):
        self.searches[(optimizer, regime)] = CoordinateDescent(start, grid, self.preset.delta1, self._feasible(regime))
        self.phase_of[(optimizer, regime)] = phase

    def _advance(self):
        for optimizer, sweep in self.preset.optimizers.items():
            if optimizer not in self.sensitive and self.phase_done(optimizer, 1):
                self.sensitive[optimizer] = self._scale_sensitive(optimizer)
                if sweep.phase2:
                    self._start_phase2(optimizer)
            if optimizer in self.sensitive and optimizer not in self.laws and self.phase_done(optimizer, 2):
                self.laws[optimizer] = self._fit_laws(optimizer)
                if optimizer in self.preset.phase3_optimizers:
                    self._start_phase3(optimizer)

    def _scale_sensitive(self, optimizer) -> tuple:
        """Keys with no value shared by a near-best (Δ2) config of every Phase I regime; regimes that all diverged
        carry no evidence and are skipped."""
        near_best = [self.searches[(optimizer, r)].near_best(self.preset.delta2) for r in self.preset.phase1]
        near_best = [configs for configs in near_best if configs]
        if not near_best:
            return ()
        grid = self.preset.optimizers[optimizer].grid
        return tuple(key for key in grid if not set.intersection(*({c[key] for c in configs} for configs in near_best)))

    def resweep_keys(self, optimizer) -> tuple:
        grid = self.preset.optimizers[optimizer].grid
        chosen = set(self.sensitive[optimizer]) | set(self.preset.phase2_always)
        return tuple(key for key in grid if key in chosen)

    def _start_phase2(self, optimizer):
        grid = self.preset.optimizers[optimizer].grid
        resweep = {key: list(grid[key]) for key in self.resweep_keys(optimizer)}
        if "lr" in resweep:
            smallest = min(resweep["lr"])
            resweep["lr"] = [smallest / 2 ** i for i in range(self.preset.phase2_lower_lrs, 0, -1)] + resweep["lr"]
        for regime in self.preset.phase2:
            start = self._nearest_optimum(optimizer, regime, self.preset.phase1)
            if start is None:
                self.skipped[(optimizer, regime)] = "every Phase I run diverged"
                continue
            self._start_search(optimizer, regime, start.hparams, resweep, phase=2)

    def _nearest_optimum(self, optimizer, regime, among) -> Optimum | None:
        """The finite optimum of the regime in `among` closest to `regime` in (log N, log D); None if all diverged."""
        def distance(other: Regime):
            size = math.log2(self.param_count(other.model) / self.param_count(regime.model))
            return math.hypot(size, math.log2(other.ratio / regime.ratio))
        candidates = [self.optimum(optimizer, r) for r in sorted(among, key=distance)]
        return next((o for o in candidates if o is not None and math.isfinite(o.loss)), None)

    def tuned_regimes(self):
        return [*self.preset.phase1, *self.preset.phase2]

    def _fit_laws(self, optimizer) -> dict:
        optima = [o for r in self.tuned_regimes() if (o := self.optimum(optimizer, r)) and math.isfinite(o.loss)]
        grid = self.preset.optimizers[optimizer].grid
        laws = {}
        for key in self.resweep_keys(optimizer):
            if any(isinstance(v, (bool, str)) for v in grid[key]):
                laws[key] = f"{key} is categorical: no law"
                continue
            try:
                laws[key] = fit_hparam_law([self.param_count(o.regime.model) for o in optima],
                                           [o.regime.ratio for o in optima], [o.hparams[key] for o in optima],
                                           drop_first=self.preset.fit_drop_first)
            except FitError as error:
                laws[key] = str(error)
        return laws

    def _start_phase3(self, optimizer):
        grid = self.preset.optimizers[optimizer].grid
        for regime in self.preset.phase3:
            nearest = self._nearest_optimum(optimizer, regime, self.tuned_regimes())
            if nearest is None:
                self.skipped[(optimizer, regime)] = "every Phase I/II run diverged"
                continue
            hparams = dict(nearest.hparams)
            for key, law in self.laws[optimizer].items():
                if isinstance(law, HparamLaw):
                    predicted = float(law(self.param_count(regime.model), regime.ratio))
                    hparams[key] = _admissible(predicted, grid[key], fallback=hparams[key])
            self.phase3[(optimizer, regime)] = hparams


def _admissible(predicted: float, values, fallback):
    """A predicted value the trainer can use: integer keys (batch size, warmup, block size) snap to the nearest grid
    value on a log scale; a non-positive prediction for a positive-valued key falls back to the nearest optimum's."""
    if all(isinstance(v, int) for v in values):
        positive = [v for v in values if v > 0]
        if predicted <= 0 or not positive:
            return min(values, key=lambda v: abs(v - predicted))
        return min(positive, key=lambda v: abs(math.log(v / predicted)))
    if predicted <= 0 and all(v > 0 for v in values):
        return fallback
    return predicted
