"""Speedup over AdamW (spec §5), from any table of final losses: ours, or a CSV a user brings.

Per model size, fit the baseline's L(D) = α·D^(−B) + β over the Chinchilla ratios; an optimizer reaching loss L at
budget D is worth D_eff = ((L − β)/α)^(−1/B) baseline tokens; speedup = D_eff / D (token-based, ignores wall-clock).

Two things keep the numbers honest:
- The law is only known between the smallest and largest ratio it was fitted on. A D_eff outside [D_min, D_max] is an
  extrapolation (or infinite, when L ≤ β), so such a cell says only "> D_max/D" or "< D_min/D".
- A cell whose best config was run under several seeds is the mean of those runs. The seeds' spread, pooled over every
  such cell, is the noise: a cell is within noise when its loss differs from the baseline's at the same size and
  ratio by no more than a two-sided 95% t-test of the two means allows, and its interval is its mean loss ± the 95%
  t half-width, mapped through the law. The law's own fitting error is not in the interval.
"""

import csv
import math
import statistics
from dataclasses import dataclass

from scipy.stats import t as student_t

from fastoptim.optim.paper import BASELINE

from .fits import FitError, LossLaw, fit_loss_law

CSV_COLUMNS = ("optimizer", "size", "ratio", "loss")
SEED_COLUMN = "seed_losses"  # optional: the best config's final loss under each seed, ';'-separated
CONFIDENCE = 0.95


@dataclass(frozen=True)
class LossRow:
    optimizer: str
    size: str
    ratio: float
    loss: float                # the best run's final loss (the one its search chose; nan or inf: diverged)
    seed_losses: tuple = ()    # the best config's final loss under every seed run, the chosen run's included

    @property
    def finite_seed_losses(self) -> list[float]:
        return [loss for loss in self.seed_losses if math.isfinite(loss)]

    @property
    def estimate(self) -> float:
        """The cell's loss: the mean over its seeds where it has several, else its one run."""
        seeds = self.finite_seed_losses
        return statistics.fmean(seeds) if len(seeds) > 1 and math.isfinite(self.loss) else self.loss

    @property
    def runs(self) -> int:
        return max(1, len(self.finite_seed_losses))


@dataclass(frozen=True)
class SeedNoise:
    """The pooled between-seed standard deviation of a run's final loss."""
    sigma: float
    dof: int        # Σ (seeds − 1) over the cells it pools
    cells: int

    def t(self) -> float:
        return float(student_t.ppf(0.5 + CONFIDENCE / 2, self.dof))

    def half_width(self, runs: int) -> float:
        """95% half-width of the mean of `runs` seeds."""
        return self.t() * self.sigma / math.sqrt(runs)

    def threshold(self, runs: int, baseline_runs: int) -> float:
        """The largest difference of two such means that a two-sided 95% t-test does not tell from noise."""
        return self.t() * self.sigma * math.sqrt(1 / runs + 1 / baseline_runs)


@dataclass(frozen=True)
class SpeedupRow:
    optimizer: str
    size: str
    ratio: float
    loss: float                  # the cell's loss (LossRow.estimate)
    runs: int                    # seeds behind it
    effective_ratio: float       # D_eff: inf when loss ≤ β, 0 when the run diverged
    speedup: float               # D_eff / D
    effective_interval: tuple | None  # D_eff of the loss's 95% interval (None: no noise measured)
    within_noise: bool | None    # the loss is within noise of the baseline's (None: unknown, or the baseline itself)
    fitted_range: tuple          # (D_min, D_max) of the baseline law at this size

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.loss)

    @property
    def beyond(self) -> str | None:
        """'>' when D_eff lies above the fitted range, '<' below it, None inside."""
        return _beyond(self.effective_ratio, self.fitted_range)

    @property
    def interval(self) -> tuple | None:
        """The speedup's 95% interval (its ends may lie beyond the fitted range: see `cell`)."""
        if self.effective_interval is None:
            return None
        return tuple(end / self.ratio for end in self.effective_interval)

    def cell(self) -> str:
        """The table cell: the speedup (bounded to the fitted range), its interval, and ≈ when within noise."""
        if self.diverged:
            return "diverged"
        text = _bounded(self.effective_ratio, self.fitted_range, self.ratio)
        if self.effective_interval is not None:
            low, high = (_bounded(end, self.fitted_range, self.ratio) for end in self.effective_interval)
            text += f" [{low}, {high}]"
        return ("≈ " if self.within_noise else "") + text


@dataclass
class SpeedupTable:
    baseline: str
    laws: dict[str, LossLaw]          # size → the baseline's fitted loss law
    failed_fits: dict[str, str]       # size → why its law could not be fitted
    rows: list[SpeedupRow]
    noise: SeedNoise | None = None    # None: no cell was run under more than one seed


def pooled_noise(rows: list[LossRow]) -> SeedNoise | None:
    """Pool the seed variance of every cell with two or more finite seed losses (homoscedastic: one noise level)."""
    squares, dof, cells = 0.0, 0, 0
    for row in rows:
        seeds = row.finite_seed_losses
        if len(seeds) > 1:
            squares += statistics.variance(seeds) * (len(seeds) - 1)
            dof += len(seeds) - 1
            cells += 1
    if dof == 0:
        return None
    return SeedNoise(math.sqrt(squares / dof), dof, cells)


def compute_speedups(rows, baseline: str = BASELINE) -> SpeedupTable:
    """Speedups of every (optimizer, size, ratio) row over `baseline`.

    rows: LossRow or (optimizer, size, ratio, loss[, seed_losses]) tuples.

    Repeated (optimizer, size, ratio) rows keep their lowest loss (the best-tuned run). Sizes whose baseline law
    cannot be fitted (fewer than 3 ratios, diverged losses) are listed in failed_fits and get no speedups.
    """
    best: dict[tuple, LossRow] = {}
    for row in rows:
        row = row if isinstance(row, LossRow) else LossRow(*row)
        row = LossRow(row.optimizer, str(row.size), float(row.ratio), float(row.loss), tuple(row.seed_losses))
        key = (row.optimizer, row.size, row.ratio)
        if key not in best or _better(row.loss, best[key].loss):
            best[key] = row
    noise = pooled_noise(list(best.values()))

    laws, failed = {}, {}
    for size in sorted({size for _, size, _ in best}):
        points = sorted((ratio, row.estimate) for (opt, s, ratio), row in best.items() if opt == baseline and s == size)
        try:
            laws[size] = fit_loss_law([r for r, _ in points], [l for _, l in points])
        except FitError as error:
            failed[size] = str(error)

    fitted = {size: (min(r for o, s, r in best if o == baseline and s == size),
                     max(r for o, s, r in best if o == baseline and s == size)) for size in laws}
    table = []
    for (optimizer, size, ratio), row in sorted(best.items()):
        if size not in laws:
            continue
        law, loss = laws[size], row.estimate
        effective = _equivalent(law, loss)
        interval = within = None
        if noise is not None and math.isfinite(loss):
            half = noise.half_width(row.runs)
            interval = (_equivalent(law, loss + half), _equivalent(law, loss - half))
            reference = best.get((baseline, size, ratio))
            if optimizer != baseline and reference is not None and math.isfinite(reference.estimate):
                within = abs(loss - reference.estimate) <= noise.threshold(row.runs, reference.runs)
        table.append(SpeedupRow(optimizer, size, ratio, loss, row.runs, effective, effective / ratio, interval,
                                within, fitted[size]))
    return SpeedupTable(baseline, laws, failed, table, noise)


def _equivalent(law: LossLaw, loss: float) -> float:
    return float(law.equivalent_budget(loss)) if math.isfinite(loss) else 0.0


def _beyond(effective: float, fitted_range: tuple) -> str | None:
    low, high = fitted_range
    slack = 1 + 1e-9  # a law fitted exactly through its end points gives them back to rounding
    return ">" if effective > high * slack else "<" if effective * slack < low else None


def _bounded(effective: float, fitted_range: tuple, ratio: float) -> str:
    """D_eff / D as text, or the bound it passes: '> D_max/D' or '< D_min/D' (never an extrapolated number)."""
    side = _beyond(effective, fitted_range)
    if side == ">":
        return f"> {fitted_range[1] / ratio:.2f}"
    if side == "<":
        return f"< {fitted_range[0] / ratio:.2f}"
    return f"{effective / ratio:.2f}"


def _better(loss: float, incumbent: float) -> bool:
    return math.isnan(incumbent) or loss < incumbent


def read_loss_csv(path) -> list[LossRow]:
    """Rows of a CSV with a header naming the columns optimizer,size,ratio,loss, and optionally seed_losses (the
    best config's loss under each seed, ';'-separated); other columns are ignored."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: CSV lacks column(s) {missing}; it needs a header with {','.join(CSV_COLUMNS)}")
        rows = []
        for line, record in enumerate(reader, start=2):
            try:
                seeds = tuple(float(x) for x in (record.get(SEED_COLUMN) or "").split(";") if x.strip())
                rows.append(LossRow(record["optimizer"], record["size"], float(record["ratio"]),
                                    float(record["loss"]), seeds))
            except ValueError as error:
                raise ValueError(f"{path}:{line}: ratio, loss and {SEED_COLUMN} must be numbers ({error})") from error
        return rows


def write_loss_csv(rows: list[LossRow], path) -> None:
    """The CSV that read_loss_csv reads back: one row per (optimizer, size, ratio), with its seeds' losses."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_COLUMNS, SEED_COLUMN])
        for row in rows:
            writer.writerow([row.optimizer, row.size, f"{row.ratio:g}", repr(row.loss),
                             ";".join(repr(loss) for loss in row.seed_losses)])
