"""Speedup over AdamW (spec §5), from any table of final losses: ours, or a CSV a user brings.

Per model size, fit the baseline's L(D) = α·D^(−B) + β over the Chinchilla ratios; an optimizer reaching loss L at
budget D is worth D_eff = ((L − β)/α)^(−1/B) baseline tokens; speedup = D_eff / D (token-based, ignores wall-clock).
"""

import csv
import math
from dataclasses import dataclass

from .fits import FitError, LossLaw, fit_loss_law

CSV_COLUMNS = ("optimizer", "size", "ratio", "loss")


@dataclass(frozen=True)
class LossRow:
    optimizer: str
    size: str
    ratio: float
    loss: float


@dataclass(frozen=True)
class SpeedupRow:
    optimizer: str
    size: str
    ratio: float
    loss: float
    effective_ratio: float
    speedup: float


@dataclass
class SpeedupTable:
    baseline: str
    laws: dict[str, LossLaw]          # size → the baseline's fitted loss law
    failed_fits: dict[str, str]       # size → why its law could not be fitted
    rows: list[SpeedupRow]


def compute_speedups(rows, baseline: str = "adamw") -> SpeedupTable:
    """Speedups of every (optimizer, size, ratio) row over `baseline`.

    rows: LossRow or (optimizer, size, ratio, loss) tuples.

    Repeated (optimizer, size, ratio) rows keep their lowest loss (the best-tuned run). Sizes whose baseline law
    cannot be fitted (fewer than 3 ratios, diverged losses) are listed in failed_fits and get no speedups.
    """
    best: dict[tuple, float] = {}
    for row in rows:
        row = row if isinstance(row, LossRow) else LossRow(*row)
        key = (row.optimizer, str(row.size), float(row.ratio))
        loss = float(row.loss)
        if key not in best or _better(loss, best[key]):
            best[key] = loss

    laws, failed = {}, {}
    for size in sorted({size for _, size, _ in best}):
        points = sorted((ratio, loss) for (opt, s, ratio), loss in best.items() if opt == baseline and s == size)
        try:
            laws[size] = fit_loss_law([r for r, _ in points], [l for _, l in points])
        except FitError as error:
            failed[size] = str(error)

    table = []
    for (optimizer, size, ratio), loss in sorted(best.items()):
        if size not in laws:
            continue
        effective = float(laws[size].equivalent_budget(loss)) if math.isfinite(loss) else 0.0
        table.append(SpeedupRow(optimizer, size, ratio, loss, effective, effective / ratio))
    return SpeedupTable(baseline, laws, failed, table)


def _better(loss: float, incumbent: float) -> bool:
    return math.isnan(incumbent) or loss < incumbent


def read_loss_csv(path) -> list[LossRow]:
    """Rows of a CSV with a header naming the columns optimizer,size,ratio,loss (others are ignored)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: CSV lacks column(s) {missing}; it needs a header with {','.join(CSV_COLUMNS)}")
        rows = []
        for line, record in enumerate(reader, start=2):
            try:
                rows.append(LossRow(record["optimizer"], record["size"], float(record["ratio"]), float(record["loss"])))
            except ValueError as error:
                raise ValueError(f"{path}:{line}: ratio and loss must be numbers ({error})") from error
        return rows
