"""`fastoptim report`: report.md, summary.json and PNG plots from a grid's results store, or from a CSV of losses.

    fastoptim report --out runs/grid-smoke                       # the store runs/grid-smoke/grid.sqlite
    fastoptim report --store my.sqlite --out report/
    fastoptim report --out runs/grid-cpu --csv best.csv          # also export the best loss per regime as CSV
    fastoptim report --csv-in paper_losses.csv --out report/     # a CSV a user brings (the paper's final losses)

The CSV has the columns optimizer,size,ratio,loss and optionally seed_losses (the best config's loss under each seed,
';'-separated); `--csv` writes exactly what `--csv-in` reads, so two grids, or a grid and the paper, sit side by side.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

from fastoptim.optim.paper import BASELINE

from . import runner
from .plots import (plot_effective_budget, plot_loss_vs_budget, plot_loss_vs_tokens, plot_sensitivity,
                    plot_speedup_heatmap)
from .report import GridReport, LossReport, replay
from .speedup import read_loss_csv, write_loss_csv
from .store import ResultsStore

STORE_NAME = "grid.sqlite"
_CURVE_LABELS = {frozenset({"val_loss"}): "validation loss (nats/token)",
                 frozenset({"train_loss"}): "training loss (nats/token, batch mean)"}


def write_report(bench, store, out_dir, read_curve=runner.read_curve, stream=None, csv_out=None) -> Path:
    """report.md, summary.json and the PNG plots into out_dir (and the best losses as CSV to csv_out); the report is
    also printed. Returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = GridReport.build(bench, store)
    _draw_loss_plots(report.losses, out_dir)
    curves, kinds = report.curves(read_curve)
    if curves:
        label = _CURVE_LABELS.get(frozenset(kinds), "loss (nats/token; validation where a run was evaluated during "
                                                    "training, else training)")
        plot_loss_vs_tokens(curves, out_dir / "loss_vs_tokens.png", ylabel=label)
        report.losses.plots.append(("loss_vs_tokens.png", "Loss against training tokens of each best config "
                                                          "(band: its seeds' range)"))
    for key, lines in report.sensitivity_lines().items():
        name = f"sensitivity_{_file_safe(key)}.png"
        plot_sensitivity(lines, key, out_dir / name)
        report.losses.plots.append((name, f"1-D sensitivity of the final loss to {key} around each optimum"))
    summary = report.summary()
    return _write(report.markdown(), summary, out_dir, report.losses, csv_out, stream)


def csv_report(csv_path, out_dir, baseline: str, stream=None, csv_out=None) -> Path:
    """The report of a CSV of final losses: the speedup sections and the plots a table of losses allows."""
    rows = read_loss_csv(csv_path)
    losses = LossReport.of(rows, baseline)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _draw_loss_plots(losses, out_dir)
    source = {"csv": str(csv_path), "csv_sha256": hashlib.sha256(Path(csv_path).read_bytes()).hexdigest(),
              "rows": len(rows)}
    text = (f"# Speedups from {csv_path}\n\nFinal losses from a CSV ({len(rows)} rows, sha256 "
            f"`{source['csv_sha256'][:16]}`): its runs' provenance, failures, costs, curves and hyperparameters are "
            f"not in it.\n\n" + "\n\n".join(part for part in (losses.speedup_markdown(), losses.plots_markdown())
                                               if part) + "\n")
    return _write(text, {"provenance": source, **losses.summary()}, out_dir, losses, csv_out, stream)


def _draw_loss_plots(losses: LossReport, out_dir: Path) -> None:
    """The plots a table of final losses allows (a grid's and a CSV's alike)."""
    sizes = losses.size_order
    if not losses.rows:
        return
    plot_loss_vs_budget(losses.rows, losses.speedups, sizes, out_dir / "loss_vs_budget.png")
    losses.plots.append(("loss_vs_budget.png", "Final loss against data budget, with the baseline's fitted law"))
    if losses.speedups.rows:
        plot_effective_budget(losses.speedups, sizes, out_dir / "effective_budget.png")
        plot_speedup_heatmap(losses.speedups, sizes, out_dir / "speedup_heatmap.png")
        losses.plots += [("effective_budget.png", "Equivalent baseline budget D_eff against D"),
                         ("speedup_heatmap.png", "Speedup over the baseline")]


def _write(text: str, summary: dict, out_dir: Path, losses: LossReport, csv_out, stream) -> Path:
    path = out_dir / "report.md"
    path.write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    if csv_out is not None:
        write_loss_csv(losses.rows, csv_out)
    (stream or sys.stdout).write(text)
    return path


def _file_safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastoptim report", description=__doc__.splitlines()[0])
    p.add_argument("--store", help=f"results store (default: OUT/{STORE_NAME})")
    p.add_argument("--out", help="folder for report.md, summary.json and the plots (default: the store's folder, or "
                                 "the input CSV's)")
    p.add_argument("--csv-in", help="instead of a store: a CSV with columns optimizer,size,ratio,loss[,seed_losses]")
    p.add_argument("--csv", help="also write the best final loss per (optimizer, size, ratio) to this CSV, in the "
                                 "columns --csv-in reads")
    p.add_argument("--baseline", default=BASELINE, help="optimizer whose loss law defines the speedup (CSV mode; "
                                                       f"default {BASELINE}, the study's)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.csv_in:
            path = csv_report(args.csv_in, args.out or Path(args.csv_in).parent, args.baseline, csv_out=args.csv)
        else:
            if not (args.store or args.out):
                raise ValueError("give --store, --out (a grid's output folder) or --csv-in")
            store_path = Path(args.store or Path(args.out) / STORE_NAME)
            if not store_path.exists():
                raise FileNotFoundError(f"no results store at {store_path}")
            with ResultsStore(store_path) as store:
                path = write_report(replay(store, runner.param_count), store, args.out or store_path.parent,
                                    csv_out=args.csv)
    except (ValueError, FileNotFoundError) as error:
        print(f"fastoptim report: error: {error}", file=sys.stderr)
        return 2
    print(f"report: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
