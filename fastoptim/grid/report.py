"""Tables of a grid's results, for the terminal and Markdown: best losses, speedups, sensitive keys, fitted laws.

Everything is recomputed from the store: the phases are replayed against the stored outcomes (no run is started), so
a report of a finished, a half-finished or a still-running grid reads the same way.
"""

import math
from dataclasses import dataclass

from .fits import HparamLaw
from .phases import Benchmark
from .presets import GridPreset
from .speedup import SpeedupTable, compute_speedups


def replay(store, param_count, preset: GridPreset | None = None) -> Benchmark:
    """The Benchmark state that the store's finished runs determine (runs still missing simply stay pending)."""
    if preset is None:
        text = store.preset_json()
        if text is None:
            raise ValueError(f"store {store.path} has no grid in it yet (no preset recorded)")
        preset = GridPreset.from_json(text)
    bench = Benchmark(preset, param_count)
    answered = True
    while answered:
        answered = False
        for spec in bench.pending():
            outcome = store.result(spec.run_id)
            if outcome is not None:
                bench.record(spec, outcome)
                answered = True
    return bench


@dataclass
class GridReport:
    bench: Benchmark
    speedups: SpeedupTable

    @classmethod
    def build(cls, bench: Benchmark) -> "GridReport":
        return cls(bench, compute_speedups(best_loss_rows(bench), baseline=bench.preset.baseline_optimizer))

    def markdown(self) -> str:
        sections = [f"# fastoptim grid: preset `{self.bench.preset.name}`", self._status(), self._best_losses(),
                    self._speedup_section(), self._sensitivity(), self._laws(), self._tuned()]
        return "\n\n".join(section for section in sections if section) + "\n"

    # ---- sections ----

    def _status(self) -> str:
        outcomes = [outcome for _, outcome in self.bench.outcomes.values()]
        diverged = sum(outcome.diverged for outcome in outcomes)
        crashed = sum(not outcome.diverged and math.isinf(outcome.final_val_loss) for outcome in outcomes)
        state = "finished" if self.bench.done else f"in progress ({len(self.bench.pending())} runs pending)"
        lines = [f"Grid {state}: {len(outcomes)} runs ({diverged} diverged, {crashed} crashed)."]
        lines += [f"- skipped {optimizer} at {regime.model} {regime.ratio:g}×: {reason}"
                  for (optimizer, regime), reason in self.bench.skipped.items()]
        return "\n".join(lines)

    def _columns(self):
        regimes = [*self.bench.preset.phase1, *self.bench.preset.phase2, *self.bench.preset.phase3]
        return sorted(set(regimes), key=lambda r: (self.bench.param_count(r.model), r.ratio))

    def _best_losses(self) -> str:
        columns = self._columns()
        rows = []
        for optimizer in self.bench.preset.optimizers:
            cells = []
            for regime in columns:
                optimum = self.bench.optimum(optimizer, regime)
                cells.append("" if optimum is None else "diverged" if math.isinf(optimum.loss)
                             else f"{optimum.loss:.4f}")
            if any(cells):
                rows.append([optimizer, *cells])
        header = ["optimizer", *(f"{r.model} {r.ratio:g}×" for r in columns)]
        return "## Best final validation loss\n\n" + markdown_table(header, rows)

    def _speedup_section(self) -> str:
        return speedup_markdown(self.speedups, size_key=self.bench.param_count,
                                optimizers=list(self.bench.preset.optimizers))

    def _sensitivity(self) -> str:
        if not self.bench.sensitive:
            return ""
        rows = [[optimizer, ", ".join(keys) or "none", ", ".join(self.bench.resweep_keys(optimizer)) or "none"]
                for optimizer, keys in self.bench.sensitive.items()]
        return (f"## Scale-sensitive hyperparameters (Δ2 = {self.bench.preset.delta2:g})\n\n"
                + markdown_table(["optimizer", "sensitive", "re-swept in Phase II"], rows))

    def _laws(self) -> str:
        rows, failures = [], []
        for optimizer, laws in self.bench.laws.items():
            for key, law in laws.items():
                if not isinstance(law, HparamLaw):
                    failures.append(f"- {optimizer} {key}: {law}")
                    continue
                error = "" if law.heldout_error is None else f"{100 * law.heldout_error:.1f}%"
                predictions = "; ".join(f"{r.model} {r.ratio:g}×: {hp[key]:.4g}"
                                        for (opt, r), hp in self.bench.phase3.items() if opt == optimizer)
                rows.append([optimizer, key, f"{law.alpha:.4g}", f"{law.A:.4g}", f"{law.B:.4g}", f"{law.beta:.4g}",
                             error, predictions])
        if not rows and not failures:
            return ""
        parts = ["## Hyperparameter scaling laws h(N, D) = α·N^(−A)·D^(−B) + β"]
        if rows:
            parts.append(markdown_table(["optimizer", "key", "α", "A", "B", "β", "held-out error", "Phase III"], rows))
        if failures:
            parts.append("\n".join(failures))
        return "\n\n".join(parts)

    def _tuned(self) -> str:
        rows = []
        for (optimizer, regime), search in self.bench.searches.items():
            if not search.scores:
                continue
            hparams, loss = search.best()
            swept = ", ".join(f"{key}={_value(hparams[key])}" for key in search.grid)
            phase = self.bench.phase_of[(optimizer, regime)]
            rows.append([optimizer, f"{regime.model} {regime.ratio:g}×", f"Phase {phase}",
                         str(len(search.scores)), "yes" if search.done else "no", swept])
        return "## Tuned hyperparameters (best run of each search)\n\n" + markdown_table(
            ["optimizer", "regime", "phase", "runs", "finished", "swept keys at the best run"], rows)


def speedup_markdown(table: SpeedupTable, size_key=str, optimizers=None) -> str:
    """The baseline's loss law per size and the speedup of every (optimizer, size, ratio); sizes sort by size_key."""
    parts = [f"## Speedup over {table.baseline} (D_eff / D)"]
    if table.laws:
        parts.append(f"{table.baseline} loss law per size, L(D) = α·D^(−B) + β:\n\n" + markdown_table(
            ["size", "α", "B", "β"],
            [[size, f"{law.alpha:.4g}", f"{law.B:.4g}", f"{law.beta:.4g}"]
             for size, law in sorted(table.laws.items(), key=lambda item: size_key(item[0]))]))
    columns = sorted({(row.size, row.ratio) for row in table.rows}, key=lambda c: (size_key(c[0]), c[1]))
    lookup = {(row.optimizer, row.size, row.ratio): row.speedup for row in table.rows}
    optimizers = optimizers or list(dict.fromkeys(row.optimizer for row in table.rows))
    rows = [[optimizer, *(_speedup_cell(lookup.get((optimizer, *column))) for column in columns)]
            for optimizer in optimizers if any((optimizer, *c) in lookup for c in columns)]
    if rows:
        parts.append(markdown_table(["optimizer", *(f"{size} {ratio:g}×" for size, ratio in columns)], rows))
    if table.failed_fits:
        parts.append("\n".join(f"- no speedups at {size}: {reason}" for size, reason in table.failed_fits.items()))
    return "\n\n".join(parts)


def best_loss_rows(bench: Benchmark) -> list[tuple]:
    """(optimizer, size, ratio, loss) of the best run of every regime with a finished run (diverged → nan)."""
    rows = []
    for optimizer in bench.preset.optimizers:
        for regime in [*bench.preset.phase1, *bench.preset.phase2, *bench.preset.phase3]:
            optimum = bench.optimum(optimizer, regime)
            if optimum is not None:
                loss = optimum.loss if math.isfinite(optimum.loss) else math.nan
                rows.append((optimizer, regime.model, regime.ratio, loss))
    return rows


def markdown_table(header, rows) -> str:
    """A Markdown table padded to aligned columns, so it also reads as a terminal table."""
    table = [[str(cell) for cell in header], *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def _speedup_cell(value) -> str:
    if value is None:
        return ""
    return "∞" if math.isinf(value) else f"{value:.2f}"


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
