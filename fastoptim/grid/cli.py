"""`fastoptim grid`: run a preset's benchmark grid (Phase I–III), then write its report and plots.

    fastoptim grid --preset smoke                              # CPU, minutes; output in runs/grid-smoke
    fastoptim grid --preset tiny --executor gpus               # one run per local GPU
    fastoptim grid --preset paper --executor slurm --slurm-partition gpu --slurm-timeout-min 2880
    fastoptim grid --preset paper --dry-run                    # how many runs, how many tokens

Stop it at any time and run the same command again: finished runs are kept in the store and never rerun; unfinished
ones resume from their checkpoints. Several machines may run the same command on one shared --store.
"""

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

from . import runner
from .driver import run_grid
from .executors import LocalGPUExecutor, SequentialExecutor, SlurmExecutor
from .presets import PRESETS, Regime, get_preset
from .progress import GridProgress
from .report import markdown_table
from .report_cli import STORE_NAME, write_report
from .store import ResultsStore
from .synthetic import dry_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastoptim grid", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="grid to run (default: smoke)")
    p.add_argument("--out", help="output folder: runs/, report.md, plots (default: runs/grid-PRESET)")
    p.add_argument("--store", help=f"results store, shareable by several workers (default: OUT/{STORE_NAME})")
    p.add_argument("--data", help="corpus for every run (default: the trainer's embedded corpus)")
    p.add_argument("--executor", choices=["sequential", "gpus", "slurm"], default="sequential",
                   help="sequential: in this process; gpus: one `fastoptim train` per local GPU; slurm: submitit")
    p.add_argument("--device", default="auto", help="device of sequential runs: auto, cpu, cuda")
    p.add_argument("--gpus", help="GPU indices for --executor gpus (default: all visible)")
    p.add_argument("--slurm-folder", help="submitit logs (default: OUT/slurm)")
    p.add_argument("--slurm-partition")
    p.add_argument("--slurm-timeout-min", type=int, default=24 * 60)
    p.add_argument("--slurm-gpus-per-node", type=int, default=1)
    p.add_argument("--slurm-max-jobs", type=int, default=64, help="jobs in the queue at once")
    p.add_argument("--no-report", action="store_true", help="only run the grid")
    p.add_argument("--dry-run", action="store_true",
                   help="train nothing: drive the phases on a synthetic loss and print how many runs they ask for")
    return p


def print_dry_run(preset, stream=sys.stdout) -> None:
    bench = dry_run(preset, runner.param_count)
    rows = {}
    for spec, _ in bench.outcomes.values():
        regime = Regime(spec.model, float(spec.chinchilla))
        phase = bench.phase_of.get((spec.optimizer, regime), 3)
        runs, tokens = rows.get((phase, spec.model), (0, 0))
        rows[(phase, spec.model)] = (runs + 1, tokens + spec.steps * spec.seq_len * spec.hparams["batch_size"])
    table = [[f"Phase {phase}", model, str(runs), f"{tokens:.3g}"] for (phase, model), (runs, tokens) in sorted(
        rows.items(), key=lambda item: (item[0][0], runner.param_count(item[0][1])))]
    total_runs = sum(runs for runs, _ in rows.values())
    total_tokens = sum(tokens for _, tokens in rows.values())
    table.append(["all", "", str(total_runs), f"{total_tokens:.3g}"])
    stream.write(f"preset {preset.name!r} on a synthetic loss (a real grid's count differs with its losses):\n\n"
                 + markdown_table(["phase", "model", "runs", "training tokens"], table) + "\n")


def make_executor(args, out: Path):
    if args.executor == "sequential":
        return SequentialExecutor(functools.partial(runner.run_in_process, device=args.device))
    if args.executor == "gpus":
        return LocalGPUExecutor(_gpus(args.gpus), runner.train_command, runner.read_outcome)
    params = {"timeout_min": args.slurm_timeout_min, "gpus_per_node": args.slurm_gpus_per_node}
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    return SlurmExecutor(functools.partial(runner.run_in_process, device="cuda"),
                         args.slurm_folder or out / "slurm", max_jobs=args.slurm_max_jobs, **params)


def _gpus(text):
    if text:
        return [gpu.strip() for gpu in text.split(",") if gpu.strip()]
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError("--executor gpus found no CUDA device; use --executor sequential or pass --gpus")
    return list(range(count))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    preset = get_preset(args.preset)
    if args.data:
        preset = dataclasses.replace(preset, data=args.data)
    if args.dry_run:
        print_dry_run(preset)
        return 0
    out = Path(args.out or f"runs/grid-{preset.name}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        executor = make_executor(args, out)
        with ResultsStore(args.store or out / STORE_NAME) as store:
            bench = run_grid(preset, store, executor, runner.param_count, out / "runs", progress=GridProgress())
            if not args.no_report:
                write_report(bench, store, out)
    except (ValueError, RuntimeError) as error:
        print(f"fastoptim grid: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfastoptim grid: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"grid finished: report in {out / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
