"""Coordinate descent over a hyperparameter grid (spec §4, Phase I; Phase II reuses it on fewer keys).

The search is ask/tell: `ask()` returns the configs whose final loss it needs next, `tell()` gives it one. It never
runs anything itself, so the same object serves a sequential loop, many GPUs, a cluster, a resumed grid (answers come
straight from the results store) and a report that replays finished searches.

Rule: sweep one hyperparameter at a time over its grid with all others at the incumbent's values; move to the best
value on that line only if it beats the incumbent by more than `delta`; cycle over the keys until a full cycle makes no
move, i.e. every 1-D neighbour of the incumbent has been run. A diverged run scores +inf: finished, and failed.
An empty grid runs the start config alone.
"""

import json
import math
from typing import Callable, Sequence


def config_key(hparams: dict) -> str:
    return json.dumps(hparams, sort_keys=True, separators=(",", ":"))


class CoordinateDescent:
    def __init__(self, start: dict, grid: dict[str, Sequence], delta: float = 3e-3,
                 feasible: Callable[[dict], bool] = lambda hparams: True):
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid[{key!r}] is empty: give at least one value")
        if not feasible(start):
            raise ValueError(f"start config {start} is infeasible for this regime (e.g. warmup longer than the run)")
        self.grid = {key: list(values) for key, values in grid.items()}
        self.delta = delta
        self.feasible = feasible
        self.incumbent = dict(start)
        self.scores: dict[str, float] = {}
        self._configs: dict[str, dict] = {}
        self._keys = list(self.grid)
        self._position = 0
        self._settled_keys = 0  # consecutive keys whose full line around the incumbent was run without a move
        self.moves = 0

    @property
    def done(self) -> bool:
        return not self.ask()

    def tell(self, hparams: dict, score: float) -> None:
        key = config_key(hparams)
        self.scores[key] = math.inf if score is None or math.isnan(score) else score
        self._configs[key] = dict(hparams)

    def score(self, hparams: dict) -> float | None:
        return self.scores.get(config_key(hparams))

    def ask(self) -> list[dict]:
        if self.score(self.incumbent) is None:
            return [dict(self.incumbent)]
        while self._settled_keys < len(self._keys):
            key = self._keys[self._position]
            line = self._line(key)
            missing = [hparams for hparams in line if self.score(hparams) is None]
            if missing:
                return missing
            self._settle(line)
            self._position = (self._position + 1) % len(self._keys)
        return []

    def _line(self, key: str) -> list[dict]:
        line = [{**self.incumbent, key: value} for value in self.grid[key]]
        return [hparams for hparams in line if self.feasible(hparams)]

    def _settle(self, line: list[dict]) -> None:
        challenger = min(line, key=self.score)
        if self.score(challenger) < self.score(self.incumbent) - self.delta:
            self.incumbent = challenger
            self.moves += 1
            self._settled_keys = 1  # the line just used is also the new incumbent's line: already run
        else:
            self._settled_keys += 1

    def runs(self) -> list[tuple[dict, float]]:
        """Every config told so far with its score."""
        return [(dict(self._configs[key]), score) for key, score in self.scores.items()]

    def best(self) -> tuple[dict, float]:
        """The minimum-loss config run so far (the spec's grab_best_run), with its loss."""
        if not self.scores:
            raise ValueError("no run has been told to this search yet")
        key = min(self.scores, key=self.scores.get)
        return dict(self._configs[key]), self.scores[key]

    def near_best(self, delta: float) -> list[dict]:
        """Every config run so far whose loss is within `delta` of the best one (the spec's C_r for Δ2)."""
        _, best = self.best()
        if math.isinf(best):
            return []
        return [dict(self._configs[key]) for key, score in self.scores.items() if score <= best + delta]
