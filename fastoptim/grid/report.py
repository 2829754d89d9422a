"""A grid's report: Markdown tables for the terminal and report.md, and the same facts as summary.json.

Everything is recomputed from the store and the run folders: the phases are replayed against the stored outcomes (no
run is started), so a report of a finished, a half-finished or a still-running grid reads the same way. Sections:
a banner when the preset is only a pipeline check; provenance; status; what went wrong (crashed and diverged runs
with their reasons); best losses with their seeds; speedups with seed intervals, noise marks and fitted-range bounds;
wall-clock and optimizer-step costs; plots; scale-sensitive keys, hyperparameter laws and the tuned configs.
A CSV of final losses (the paper's, or another grid's) gets the sections its numbers allow (`LossReport`).
"""

import datetime
import hashlib
import math
import statistics
from dataclasses import dataclass, field

from . import runner
from .fits import HparamLaw
from .phases import Benchmark
from .presets import GridPreset
from .runs import CRASHED
from .speedup import LossRow, SpeedupTable, compute_speedups


def replay(store, param_count, preset: GridPreset | None = None) -> Benchmark:
    """The Benchmark state that the store's runs determine: finished runs as they ended, crashed ones as the driver
    counts them (lost), runs still missing simply stay pending."""
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
            outcome = store.result(spec.run_id) or (CRASHED if store.crashed(spec.run_id) else None)
            if outcome is not None:
                bench.record(spec, outcome)
                answered = True
    return bench


def loss_rows(bench: Benchmark) -> list[LossRow]:
    """The best run of every regime with a finished run (diverged → nan), with its losses under every seed."""
    rows = []
    for optimizer in bench.preset.optimizers:
        for regime in _regimes(bench):
            optimum = bench.optimum(optimizer, regime)
            if optimum is not None:
                loss = optimum.loss if math.isfinite(optimum.loss) else math.nan
                seeds = tuple(bench.seed_losses(optimum)) if math.isfinite(loss) else ()
                rows.append(LossRow(optimizer, regime.model, regime.ratio, loss, seeds))
    return rows


@dataclass
class LossReport:
    """The sections a table of final losses supports: speedups (with noise and bounds) and the ranking per budget."""
    speedups: SpeedupTable
    rows: list[LossRow]
    size_order: list[str]
    optimizers: list[str]
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name, title), embedded when set

    @classmethod
    def of(cls, rows: list[LossRow], baseline: str, size_key=None, optimizers=None) -> "LossReport":
        """size_key orders the sizes (default: as they come); optimizers orders the rows (default: as they come)."""
        sizes = list(dict.fromkeys(row.size for row in rows))
        if size_key is not None:
            sizes.sort(key=size_key)
        present = list(dict.fromkeys(row.optimizer for row in rows))
        order = [name for name in optimizers if name in present] if optimizers else present
        table = compute_speedups(rows, baseline=baseline)
        table.rows.sort(key=lambda row: order.index(row.optimizer))  # plots and summary list them in this order too
        return cls(table, rows, sizes, order)

    def speedup_markdown(self) -> str:
        table = self.speedups
        parts = [f"## Speedup over {table.baseline} (D_eff / D)"]
        if table.laws:
            law_rows = []
            for size in self._sizes(table.laws):
                law, (low, high) = table.laws[size], self._fitted_range(size)
                budgets = sum(1 for r in self.rows if r.optimizer == table.baseline and r.size == size)
                law_rows.append([size, f"{law.alpha:.4g}", f"{law.B:.4g}", f"{law.beta:.4g}", f"{low:g}–{high:g}×",
                                 f"{budgets} ({budgets - 3} left)" if budgets > 3 else f"{budgets} (exact fit)"])
            parts.append(f"{table.baseline} loss law per size, L(D) = α·D^(−B) + β:\n\n" + markdown_table(
                ["size", "α", "B", "β", "fitted on", "budgets (degrees of freedom)"], law_rows))
        columns = self._columns()
        lookup = {(row.optimizer, row.size, row.ratio): row for row in table.rows}
        rows = [[optimizer, *(lookup[(optimizer, *c)].cell() if (optimizer, *c) in lookup else "" for c in columns)]
                for optimizer in self.optimizers if any((optimizer, *c) in lookup for c in columns)]
        if rows:
            parts.append(markdown_table(["optimizer", *(f"{size} {ratio:g}×" for size, ratio in columns)], rows))
            parts.append(self._legend())
            parts.append(self._ranking())
        if table.failed_fits:
            parts.append("\n".join(f"- no speedups at {size}: {reason}" for size, reason in table.failed_fits.items()))
        return "\n\n".join(part for part in parts if part)

    def _legend(self) -> str:
        noise, baseline = self.speedups.noise, self.speedups.baseline
        lines = [f"- `> x` / `< x`: the loss maps to a budget of {baseline} beyond the largest / below the smallest "
                 f"budget its law was fitted on; the speedup is only known to lie above / below x (no "
                 f"extrapolation)."]
        if noise is None:
            lines.append("- Seed noise **not measured** (no config was run under a second seed): no cell can be told "
                         "apart from noise, and none is marked.")
        else:
            lines.append(f"- Seed noise: σ = {noise.sigma:.4g} per run, pooled over {noise.cells} cells "
                         f"({noise.dof} degrees of freedom). Each cell is the mean over its seeds; `[a, b]` is the "
                         f"speedup of its 95% interval (the law's own fitting error not included).")
            lines.append(f"- `≈`: its loss differs from {baseline}'s at that budget by less than a two-sided 95% "
                         f"t-test can tell from seed noise.")
        return "\n".join(lines)

    def _ranking(self) -> str:
        """Per budget: the best optimizer, the runner-up, and whether the gap clears the noise."""
        noise = self.speedups.noise
        rows = []
        for size, ratio in self._columns():
            cell = sorted((row for row in self.speedups.rows if (row.size, row.ratio) == (size, ratio)
                           and not row.diverged), key=lambda row: row.loss)
            if len(cell) < 2:
                continue
            best, second = cell[:2]
            gap = second.loss - best.loss
            verdict = ("not measured" if noise is None else
                       "yes" if gap > noise.threshold(best.runs, second.runs) else "no (within noise)")
            rows.append([f"{size} {ratio:g}×", f"{best.optimizer} ({best.loss:.4f})",
                         f"{second.optimizer} ({second.loss:.4f})", f"{gap:.4f}", verdict])
        if not rows:
            return ""
        return "Best optimizer per budget:\n\n" + markdown_table(
            ["budget", "best (loss)", "runner-up (loss)", "gap", "clears seed noise"], rows)

    def plots_markdown(self) -> str:
        if not self.plots:
            return ""
        return "## Plots\n\n" + "\n\n".join(f"![{title}]({name})" for name, title in self.plots)

    def summary(self) -> dict:
        table = self.speedups
        return {
            "baseline": table.baseline,
            "loss_laws": {size: {"alpha": law.alpha, "B": law.B, "beta": law.beta,
                                 "fitted_range": list(self._fitted_range(size))} for size, law in table.laws.items()},
            "failed_fits": table.failed_fits,
            "seed_noise": None if table.noise is None else {"sigma": table.noise.sigma, "dof": table.noise.dof,
                                                             "cells": table.noise.cells},
            "speedups": [_speedup_summary(row) for row in table.rows],
            "plots": [name for name, _ in self.plots],
        }

    def _fitted_range(self, size) -> tuple:
        return next((row.fitted_range for row in self.speedups.rows if row.size == size), (math.nan, math.nan))

    def _sizes(self, sizes) -> list:
        return [size for size in self.size_order if size in sizes]

    def _columns(self) -> list[tuple]:
        present = {(row.size, row.ratio) for row in self.speedups.rows}
        return sorted(present, key=lambda c: (self.size_order.index(c[0]), c[1]))


@dataclass
class GridReport:
    bench: Benchmark
    losses: LossReport
    runs: list               # every StoredRun of the store (any status)
    results: dict            # run_id → its result.json (runs whose folder is here)
    step_shares: dict        # run_id → optimizer step / step time (runner.read_step_share)
    sessions: list[dict]     # the grid sessions' provenance (store.sessions())

    @classmethod
    def build(cls, bench: Benchmark, store=None, read_result=runner.read_result,
              read_step_share=runner.read_step_share) -> "GridReport":
        runs = store.runs() if store is not None else []
        results, shares = {}, {}
        for run in runs:
            if run.status == "done" and run.out_dir:
                results[run.spec.run_id] = read_result(run.out_dir)
                shares[run.spec.run_id] = read_step_share(run.out_dir)
        losses = LossReport.of(loss_rows(bench), bench.preset.baseline_optimizer, size_key=bench.param_count,
                               optimizers=list(bench.preset.optimizers))
        return cls(bench, losses, runs, results, shares, store.sessions() if store is not None else [])

    @property
    def speedups(self) -> SpeedupTable:
        return self.losses.speedups

    def markdown(self) -> str:
        sections = [f"# fastoptim grid: preset `{self.bench.preset.name}`", self._banner(),
                    "## Provenance\n\n" + markdown_table(["", ""], _provenance_rows(self.provenance())),
                    self._status(), self._failures_markdown(), self._best_losses(), self.losses.speedup_markdown(),
                    self._costs_markdown(), self.losses.plots_markdown(), self._sensitivity(), self._laws(),
                    self._tuned()]
        return "\n\n".join(section for section in sections if section) + "\n"

    def summary(self) -> dict:
        """The report's facts, machine-readable (summary.json)."""
        return {"preset": self.bench.preset.name, "pipeline_check": self.bench.preset.pipeline_check,
                "provenance": self.provenance(), "status": self._counts(), "run_lengths": self._run_lengths(),
                "failures": self.failures(), **self.losses.summary(), "costs": self.costs(),
                "best_configs": self.best_configs()}

    # ---- facts ----

    def _specs(self):
        return [spec for spec, _ in self.bench.outcomes.values()]

    def _run_lengths(self) -> dict | None:
        specs = self._specs()
        if not specs:
            return None
        steps = [spec.steps for spec in specs]
        tokens = [_tokens(spec) for spec in specs]
        return {"steps": [min(steps), max(steps)], "tokens": [min(tokens), max(tokens)],
                "batch_sizes": sorted({spec.hparams["batch_size"] for spec in specs}), "seq_len": specs[0].seq_len}

    def provenance(self) -> dict:
        preset = self.bench.preset
        first = preset.seed
        sessions = self.sessions
        results = [r for r in self.results.values() if r]
        started = [run.started for run in self.runs if run.started]
        finished = [run.finished for run in self.runs if run.finished]
        facts = {key: _distinct(session.get(key) for session in sessions)
                 for key in ("fastoptim_version", "fastoptim_commit", "fastoptim_dirty", "torch_version",
                             "python_version", "device_name", "device_count", "device_kind", "torch_threads",
                             "executor", "host", "data", "data_description", "train_tokens", "val_tokens",
                             "vocab_size", "tokenizer", "tokenizer_sha256")}
        facts.update({
            "run_device_names": _distinct(r.get("config", {}).get("device_name") for r in results),
            "eval_tokens": _distinct(r.get("eval_tokens") for r in results),
            "eval_sha256": _distinct(r.get("eval_sha256") for r in results),
            "preset": preset.name, "preset_sha256": hashlib.sha256(preset.to_json().encode()).hexdigest()[:16],
            "seeds": list(range(first, first + 1 + preset.extra_seeds)),
            "sessions": len(sessions),
            "session_wall_time_s": sum((s["ended"] or s["started"]) - s["started"] for s in sessions) or None,
            "run_seconds": sum(run.outcome.seconds or 0.0 for run in self.runs if run.outcome) or None,
            "start": _utc(min(started)) if started else None, "end": _utc(max(finished)) if finished else None,
        })
        facts["wall_time_s"] = max(finished) - min(started) if started and finished else None
        return facts

    def _counts(self) -> dict:
        outcomes = [outcome for _, outcome in self.bench.outcomes.values()]
        return {"runs": len(outcomes), "diverged": sum(o.diverged for o in outcomes),
                "crashed": sum(o is CRASHED for o in outcomes), "pending": len(self.bench.pending()),
                "finished": self.bench.done}

    def failures(self) -> list[dict]:
        """Every crashed and every diverged run with its reason."""
        failures = []
        for run in self.runs:
            if run.status == "error":
                kind, reason = "crashed", _first_line(run.error) or "no error recorded"
            elif run.outcome is not None and run.outcome.diverged:
                result = self.results.get(run.spec.run_id) or {}
                kind, reason = "diverged", run.outcome.reason or result.get("diverged_reason") or "reason not recorded"
            else:
                continue
            failures.append({"kind": kind, "reason": reason, "optimizer": run.spec.optimizer,
                             "size": run.spec.model, "ratio": run.spec.chinchilla, "seed": run.spec.seed,
                             "run_id": run.spec.run_id, "hparams": self._swept(run.spec)})
        return failures

    def _swept(self, spec) -> dict:
        """The run's values of its optimizer's swept keys (what tells it from its neighbours)."""
        sweep = self.bench.preset.optimizers.get(spec.optimizer)
        return {key: spec.hparams[key] for key in (sweep.grid if sweep else ()) if key in spec.hparams}

    def costs(self) -> dict:
        """Wall-clock of every finished run, and per optimizer and size the optimizer step's share of step time."""
        per_run = []
        for run in self.runs:
            if run.outcome is None:
                continue
            result = self.results.get(run.spec.run_id) or {}
            per_run.append({"run_id": run.spec.run_id, "optimizer": run.spec.optimizer, "size": run.spec.model,
                            "ratio": run.spec.chinchilla, "seed": run.spec.seed, "steps": run.spec.steps,
                            "tokens": _tokens(run.spec), "seconds": run.outcome.seconds,
                            "trainer_wall_time_s": result.get("wall_time_s"),
                            "optimizer_step_share": self.step_shares.get(run.spec.run_id)})
        shares = {}
        for entry in per_run:
            if entry["optimizer_step_share"] is not None:
                shares.setdefault((entry["optimizer"], entry["size"]), []).append(entry["optimizer_step_share"])
        share_rows = [{"optimizer": optimizer, "size": size, "runs": len(values),
                       "median_share": statistics.median(values), "min_share": min(values),
                       "max_share": max(values), "biased": max(values) > 1.0}
                      for (optimizer, size), values in shares.items()]
        return {"runs": per_run, "optimizer_step_share": share_rows}

    def best_configs(self) -> list[dict]:
        """The best run of every regime: its loss, its seeds' losses, and every hyperparameter the trainer used."""
        from fastoptim.optim.paper import paper_hparams
        from fastoptim.train.loop import split_hparams

        configs = []
        for optimizer in self.bench.preset.optimizers:
            for regime in _regimes(self.bench):
                optimum = self.bench.optimum(optimizer, regime)
                if optimum is None or not math.isfinite(optimum.loss):
                    continue
                spec = self.bench.spec(optimizer, regime, optimum.hparams)
                trainer, optim = split_hparams(optimum.hparams, paper_hparams(optimizer, regime.model, regime.ratio))
                configs.append({"optimizer": optimizer, "size": regime.model, "ratio": regime.ratio,
                                "phase": self.bench.phase_of.get((optimizer, regime), 3), "loss": optimum.loss,
                                "seed_losses": [_finite(x) for x in self.bench.seed_losses(optimum)],
                                "run_id": spec.run_id, "seq_len": spec.seq_len, "steps": spec.steps,
                                "tokens": _tokens(spec), "vocab_size": spec.vocab_size,
                                "hparams": {**trainer, **optim}})
        return configs

    # ---- what the plots draw ----

    def curves(self, read_curve=runner.read_curve) -> tuple[dict, set]:
        """regime label → optimizer → [(tokens, losses) per seed run] of each regime's best config, and which
        losses they are ('val_loss', 'train_loss': runner.read_curve)."""
        run_dirs = {run.spec.run_id: run.out_dir for run in self.runs if run.status == "done" and run.out_dir}
        curves, kinds = {}, set()
        for optimum in self.bench.settled_optima():
            specs = [self.bench.spec(optimum.optimizer, optimum.regime, optimum.hparams),
                     *self.bench.seed_specs(optimum)]
            label = f"{optimum.regime.model} {optimum.regime.ratio:g}×"
            for spec in specs:
                if spec.run_id not in run_dirs:
                    continue
                steps, losses, kind = read_curve(run_dirs[spec.run_id])
                if steps:
                    per_step = spec.hparams["batch_size"] * spec.seq_len
                    curves.setdefault(label, {}).setdefault(optimum.optimizer, []).append(
                        ([step * per_step for step in steps], losses))
                    kinds.add(kind)
        order = [f"{r.model} {r.ratio:g}×" for r in self._columns()]
        return {label: curves[label] for label in order if label in curves}, kinds

    def sensitivity_lines(self) -> dict:
        """swept key → regime label → optimizer → (values, losses, optimum's value): every run of the regime's
        search that differs from its optimum in that key alone (the 1-D line through the optimum)."""
        lines = {}
        for regime in self._columns():
            label = f"{regime.model} {regime.ratio:g}×"
            for optimizer in self.bench.preset.optimizers:
                search = self.bench.searches.get((optimizer, regime))
                optimum = self.bench.optimum(optimizer, regime)
                if search is None or optimum is None or not math.isfinite(optimum.loss):
                    continue
                for key in search.grid:
                    line = [(hparams[key], score) for hparams, score in search.runs()
                            if all(hparams.get(k) == v for k, v in optimum.hparams.items() if k != key)]
                    if len(line) > 1:
                        values, losses = zip(*line)
                        lines.setdefault(key, {}).setdefault(label, {})[optimizer] = (
                            list(values), list(losses), optimum.hparams[key])
        return lines

    # ---- sections ----

    def _banner(self) -> str:
        lengths = self._run_lengths()
        if not self.bench.preset.pipeline_check or lengths is None:
            return ""
        (low, high), (tokens_low, tokens_high) = lengths["steps"], lengths["tokens"]
        batches = "/".join(map(str, lengths["batch_sizes"]))
        return (f"> **A pipeline check, not a result.** Preset `{self.bench.preset.name}` trains each model for "
                f"{low}–{high} steps of {batches} × {lengths['seq_len']} tokens ({tokens_low:,}–{tokens_high:,} "
                f"tokens per run): far too short for any conclusion about the optimizers. Its numbers show only "
                f"that training, tuning, fits, speedups and this report run end to end. For a study whose ranking "
                f"can rise above seed noise, run `fastoptim grid --preset cpu` (five optimizers, four budgets, "
                f"lr tuned at each, three seeds of each best config; about 20 minutes on two quiet CPU cores); `tiny` "
                f"and `paper` need GPUs.")

    def _status(self) -> str:
        counts = self._counts()
        state = "finished" if counts["finished"] else f"in progress ({counts['pending']} runs pending)"
        lines = [f"Grid {state}: {counts['runs']} runs ({counts['diverged']} diverged, {counts['crashed']} crashed)."]
        lengths = self._run_lengths()
        if lengths:
            lines[0] += (f" Runs train for {lengths['steps'][0]:,}–{lengths['steps'][1]:,} steps "
                         f"({lengths['tokens'][0]:,}–{lengths['tokens'][1]:,} tokens).")
        lines += [f"- skipped {optimizer} at {regime.model} {regime.ratio:g}×: {reason}"
                  for (optimizer, regime), reason in self.bench.skipped.items()]
        return "\n".join(lines)

    def _failures_markdown(self) -> str:
        failures = self.failures()
        if not failures:
            return ""
        rows = [[f["kind"], f["optimizer"], f"{f['size']} {f['ratio']:g}×", str(f["seed"]),
                 ", ".join(f"{k}={_value(v)}" for k, v in f["hparams"].items()), f["reason"]] for f in failures]
        return "## What went wrong\n\n" + markdown_table(["", "optimizer", "regime", "seed", "swept keys", "reason"],
                                                         rows)

    def _columns(self):
        return sorted(set(_regimes(self.bench)), key=lambda r: (self.bench.param_count(r.model), r.ratio))

    def _best_losses(self) -> str:
        columns = self._columns()
        rows = []
        for optimizer in self.bench.preset.optimizers:
            cells = []
            for regime in columns:
                optimum = self.bench.optimum(optimizer, regime)
                cells.append("" if optimum is None else "diverged" if math.isinf(optimum.loss)
                             else _loss_cell(optimum.loss, self.bench.seed_losses(optimum)))
            if any(cells):
                rows.append([optimizer, *cells])
        header = ["optimizer", *(f"{r.model} {r.ratio:g}×" for r in columns)]
        note = ("" if not self.bench.preset.extra_seeds else
                "\n\nThe best run of each search; in brackets, the mean ± standard deviation of its config over every "
                "seed run so far (the search's own run included).")
        return "## Best final validation loss\n\n" + markdown_table(header, rows) + note

    def _costs_markdown(self) -> str:
        costs = self.costs()
        if not costs["runs"]:
            return ""
        columns = self._columns()
        seconds = {}
        for entry in costs["runs"]:
            if entry["seconds"] is not None:
                seconds.setdefault((entry["optimizer"], entry["size"], entry["ratio"]), []).append(entry["seconds"])
        rows = []
        for optimizer in self.bench.preset.optimizers:
            cells = [statistics.median(seconds[key]) if (key := (optimizer, r.model, r.ratio)) in seconds else None
                     for r in columns]
            if any(cell is not None for cell in cells):
                total = sum(sum(v) for k, v in seconds.items() if k[0] == optimizer)
                rows.append([optimizer, *("" if c is None else f"{c:.1f}" for c in cells), f"{total:,.0f}"])
        parts = ["## Costs: wall-clock and the optimizer step",
                 "Median wall-clock seconds per run (data, model, training and evaluation; the whole run as its "
                 "executor timed it), and each optimizer's total:\n\n" + markdown_table(
                     ["optimizer", *(f"{r.model} {r.ratio:g}×" for r in columns), "total s"], rows)]
        if costs["optimizer_step_share"]:
            share_rows = [[s["optimizer"], s["size"], str(s["runs"]),
                           f"{100 * s['median_share']:.1f}%" + (" (biased)" if s["biased"] else ""),
                           f"{100 * s['min_share']:.1f}–{100 * s['max_share']:.1f}%"]
                          for s in sorted(costs["optimizer_step_share"],
                                          key=lambda s: (self.bench.param_count(s["size"]),
                                                         list(self.bench.preset.optimizers).index(s["optimizer"])))]
            parts.append("The optimizer step's share of step time (the trainer's `optimizer_step_time_s` over "
                         "`step_time_s` in metrics.jsonl, first step left out), per run:\n\n" + markdown_table(
                             ["optimizer", "size", "runs", "median", "range"], share_rows))
            if any(s["biased"] for s in costs["optimizer_step_share"]):
                parts.append("(biased): above 100%, so not a share. The trainer times the optimizer step on log "
                             "steps only, against the mean step of the interval; an optimizer whose costly periodic "
                             "work falls on log steps (Soap's eigenbasis refresh every `precondition_frequency` "
                             "steps, when it divides `log_every`) is timed at its slowest steps only.")
        return "\n\n".join(parts)

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
        rows, edges = [], False
        for (optimizer, regime), search in self.bench.searches.items():
            if not search.scores:
                continue
            hparams, loss = search.best()
            swept = []
            for key, values in search.grid.items():
                edge = len(values) > 1 and hparams[key] in (values[0], values[-1])
                edges |= edge
                swept.append(f"{key}={_value(hparams[key])}" + (" (grid edge)" if edge else ""))
            phase = self.bench.phase_of[(optimizer, regime)]
            rows.append([optimizer, f"{regime.model} {regime.ratio:g}×", f"Phase {phase}",
                         str(len(search.scores)), "yes" if search.done else "no", ", ".join(swept)])
        note = ("\n\n(grid edge): the best value is the grid's smallest or largest, so the optimum may lie beyond "
                "it." if edges else "")
        return "## Tuned hyperparameters (best run of each search)\n\n" + markdown_table(
            ["optimizer", "regime", "phase", "runs", "finished", "swept keys at the best run"], rows) + note


def markdown_table(header, rows) -> str:
    """A Markdown table padded to aligned columns, so it also reads as a terminal table."""
    table = [[str(cell) for cell in header], *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


_PROVENANCE_LABELS = {
    "fastoptim_version": "fastoptim version", "fastoptim_commit": "fastoptim commit",
    "fastoptim_dirty": "uncommitted changes", "torch_version": "torch", "python_version": "python",
    "device_name": "device", "device_count": "device count", "device_kind": "device kind",
    "torch_threads": "torch threads", "run_device_names": "device (as the runs recorded it)",
    "executor": "executor", "host": "host", "data": "data", "data_description": "data (as prepared)",
    "train_tokens": "train tokens", "val_tokens": "val tokens", "vocab_size": "vocabulary", "tokenizer": "tokenizer",
    "tokenizer_sha256": "tokenizer sha256", "eval_tokens": "eval tokens", "eval_sha256": "eval_sha256",
    "preset": "preset", "preset_sha256": "preset sha256 (of its JSON)", "seeds": "seeds",
    "sessions": "grid sessions", "session_wall_time_s": "wall time of the sessions (s)",
    "run_seconds": "sum of run times (s)", "start": "first run started", "end": "last run ended",
    "wall_time_s": "first start to last end (s)",
}


def _provenance_rows(facts: dict) -> list[list[str]]:
    rows = []
    for key, label in _PROVENANCE_LABELS.items():
        if key not in facts:
            continue
        value = facts[key]
        if isinstance(value, list) and key != "seeds":
            value = "; ".join(map(str, value)) + (" (differs between sessions or runs)" if len(value) > 1 else "")
        if isinstance(value, float):
            value = f"{value:,.1f}"
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        rows.append([label, "not recorded" if value in (None, "", []) else str(value)])
    return rows


def _distinct(values):
    """A fact's one value, or the list of its distinct values when sessions or runs disagree (None: unknown)."""
    seen = list(dict.fromkeys(v for v in values if v is not None))
    return None if not seen else seen[0] if len(seen) == 1 else seen


def _regimes(bench: Benchmark) -> list:
    return [*bench.preset.phase1, *bench.preset.phase2, *bench.preset.phase3]


def _tokens(spec) -> int:
    return spec.steps * spec.hparams["batch_size"] * spec.seq_len


def _loss_cell(loss: float, seed_losses: list[float]) -> str:
    seeds = [x for x in seed_losses if math.isfinite(x)]
    text = f"{loss:.4f}"
    if len(seeds) > 1:
        text += f" ({statistics.fmean(seeds):.4f} ± {statistics.stdev(seeds):.4f}, {len(seeds)} seeds)"
    if len(seeds) < len(seed_losses):
        text += f" ({len(seed_losses) - len(seeds)} seed(s) diverged)"
    return text


def _speedup_summary(row) -> dict:
    """A speedup cell as numbers. Beyond the fitted range the speedup is unknown (None) and `bound` is what the
    table shows (D_max/D or D_min/D); interval ends beyond it are clipped to those bounds."""
    low, high = row.fitted_range
    bound = {">": high / row.ratio, "<": low / row.ratio}.get(row.beyond)
    inside = bound is None and not row.diverged
    interval = None if row.interval is None else [min(max(end, low / row.ratio), high / row.ratio)
                                                  for end in row.interval]
    return {"optimizer": row.optimizer, "size": row.size, "ratio": row.ratio, "loss": _finite(row.loss),
            "seeds": row.runs, "effective_ratio": row.effective_ratio if inside else None,
            "speedup": row.speedup if inside else None, "beyond_fitted_range": row.beyond, "bound": bound,
            "interval": interval, "within_noise": row.within_noise, "diverged": row.diverged, "cell": row.cell()}


def _first_line(text: str | None) -> str | None:
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), None)


def _utc(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")


def _finite(value):
    """JSON has no inf or nan: None stands for them."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
