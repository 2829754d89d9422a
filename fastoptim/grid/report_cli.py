"""`fastoptim report`: tables and plots from a grid's results store, or speedups from a CSV of losses.

    fastoptim report --out runs/grid-smoke                 # the store runs/grid-smoke/grid.sqlite
    fastoptim report --store my.sqlite --out report/
    fastoptim report --csv losses.csv --out report/       # columns optimizer,size,ratio,loss
"""

import argparse
import sys
from pathlib import Path

from . import runner
from .plots import plot_loss_curves, plot_loss_vs_budget, plot_speedup_heatmap
from .report import GridReport, best_loss_rows, replay, speedup_markdown
from .speedup import compute_speedups, read_loss_csv
from .store import ResultsStore

STORE_NAME = "grid.sqlite"


def write_report(bench, store, out_dir, read_curve=runner.read_curve, stream=None) -> Path:
    """report.md and PNG plots into out_dir; the report is also printed. Returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = GridReport.build(bench)
    text = report.markdown()
    path = out_dir / "report.md"
    path.write_text(text)
    (stream or sys.stdout).write(text)

    sizes = sorted(bench.preset.sizes, key=bench.param_count)
    plot_loss_vs_budget(best_loss_rows(bench), report.speedups, sizes, out_dir / "loss_vs_budget.png")
    if report.speedups.rows:
        plot_speedup_heatmap(report.speedups, sizes, out_dir / "speedup_heatmap.png")
    run_dirs = {run.spec.run_id: run.out_dir for run in store.runs(status="done")}
    curves = {}
    for regime in sorted(set(bench.tuned_regimes()) | set(r for _, r in bench.phase3),
                         key=lambda r: (bench.param_count(r.model), r.ratio)):
        label = f"{regime.model} {regime.ratio:g}×"
        for optimizer in bench.preset.optimizers:
            optimum = bench.optimum(optimizer, regime)
            if optimum is None:
                continue
            run_dir = run_dirs.get(bench.spec(optimizer, regime, optimum.hparams).run_id)
            steps, losses = read_curve(run_dir) if run_dir else ([], [])
            if steps:
                curves.setdefault(label, {})[optimizer] = (steps, losses)
    plot_loss_curves(curves, out_dir / "loss_curves.png")
    return path


def csv_report(csv_path, out_dir, baseline: str, stream=None) -> Path:
    rows = read_loss_csv(csv_path)
    table = compute_speedups(rows, baseline=baseline)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = f"# Speedups from {csv_path}\n\n" + speedup_markdown(table) + "\n"
    path = out_dir / "report.md"
    path.write_text(text)
    (stream or sys.stdout).write(text)
    sizes = list(dict.fromkeys(row.size for row in rows))
    plot_loss_vs_budget([(r.optimizer, r.size, r.ratio, r.loss) for r in rows], table, sizes,
                        out_dir / "loss_vs_budget.png")
    if table.rows:
        plot_speedup_heatmap(table, sizes, out_dir / "speedup_heatmap.png")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastoptim report", description=__doc__.splitlines()[0])
    p.add_argument("--store", help=f"results store (default: OUT/{STORE_NAME})")
    p.add_argument("--out", help="folder for report.md and the plots (default: the store's folder)")
    p.add_argument("--csv", help="instead of a store: a CSV with columns optimizer,size,ratio,loss")
    p.add_argument("--baseline", default="adamw", help="optimizer whose loss law defines the speedup (CSV mode)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.csv:
            path = csv_report(args.csv, args.out or Path(args.csv).parent, args.baseline)
        else:
            if not (args.store or args.out):
                raise ValueError("give --store, --out (a grid's output folder) or --csv")
            store_path = Path(args.store or Path(args.out) / STORE_NAME)
            if not store_path.exists():
                raise FileNotFoundError(f"no results store at {store_path}")
            with ResultsStore(store_path) as store:
                path = write_report(replay(store, runner.param_count), store, args.out or store_path.parent)
    except (ValueError, FileNotFoundError) as error:
        print(f"fastoptim report: error: {error}", file=sys.stderr)
        return 2
    print(f"report: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
