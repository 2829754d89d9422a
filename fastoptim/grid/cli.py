"""`fastoptim grid`: run a preset's benchmark grid (Phase I–III), then write its report and plots.

    fastoptim grid --preset smoke                              # CPU, minutes; output in runs/grid-smoke
    fastoptim grid --preset tiny --executor gpus               # one run per local GPU
    fastoptim grid --preset paper --executor slurm --slurm-partition gpu --slurm-timeout-min 2880
    fastoptim grid --preset paper --dry-run                    # runs, tokens, FLOPs and GPU-hours per phase
    fastoptim grid --preset paper --data shards/ --micro-batch 130m=16,300m=8 --executor gpus

Stop it at any time and run the same command again: finished runs are kept in the store and never rerun; unfinished
ones resume from their checkpoints. Several machines may run the same command on one shared --store. Before the
first run the grid checks that the data holds every run's tokens and fails in seconds, naming the shortfall.
"""

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

from fastoptim.models import MODEL_CONFIGS
from fastoptim.train.cli import parse_micro_batch

from . import runner
from .driver import run_grid
from .executors import LocalGPUExecutor, SequentialExecutor, SlurmExecutor
from .presets import MICRO_BATCH, PRESETS, Regime, get_preset
from .progress import GridProgress
from .provenance import session_facts
from .report import markdown_table
from .report_cli import STORE_NAME, write_report
from .store import ResultsStore
from .synthetic import dry_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastoptim grid", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="grid to run (default: smoke)")
    p.add_argument("--out", help="output folder: runs/, report.md, plots (default: runs/grid-PRESET)")
    p.add_argument("--store", help=f"results store, shareable by several workers (default: OUT/{STORE_NAME})")
    p.add_argument("--data", help="corpus for every run: text files/folders or token shards (default: the preset's, "
                                  "else the trainer's embedded corpus)")
    p.add_argument("--eval-data", help="a separate fixed eval set (default: the data's held-out split)")
    p.add_argument("--allow-repeat", action="store_true",
                   help="let runs take more than one pass over the data (some presets declare it)")
    p.add_argument("--micro-batch", type=parse_micro_batches, default={},
                   help="largest micro-batch per model (MODEL=N,…), one N for every model, or 'auto' (probe each "
                        f"GPU once, cached); default {','.join(f'{m}={n}' for m, n in MICRO_BATCH.items())}, the "
                        "whole batch for models not named")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block (default: on CUDA, off on CPU)")
    p.add_argument("--cache-dir", help="token cache (default $FASTOPTIM_CACHE or ~/.cache/fastoptim)")
    p.add_argument("--executor", choices=["sequential", "gpus", "slurm"], default="sequential",
                   help="sequential: in this process; gpus: one `fastoptim train` per local GPU; slurm: submitit")
    p.add_argument("--device", default="auto", help="device of sequential runs: auto, cpu, cuda")
    p.add_argument("--gpus", help="GPU indices for --executor gpus (default: all visible)")
    p.add_argument("--gpus-per-run", type=int, default=1,
                   help="GPUs of one run: torchrun over a group of that many local GPUs (--executor gpus packs the "
                        "groups onto --gpus), or that many tasks of one Slurm job (default 1)")
    p.add_argument("--parallel", choices=["ddp", "zero1", "fsdp"], default="ddp",
                   help="how a run of several GPUs splits: DDP, DDP with ZeRO-1 sharded optimizer state, or FSDP2")
    p.add_argument("--slurm-folder", help="submitit logs (default: OUT/slurm)")
    p.add_argument("--slurm-partition")
    p.add_argument("--slurm-timeout-min", type=int, default=24 * 60)
    p.add_argument("--slurm-max-jobs", type=int, default=64, help="jobs in the queue at once")
    p.add_argument("--no-report", action="store_true", help="only run the grid")
    p.add_argument("--dry-run", action="store_true",
                   help="train nothing: drive the phases on a synthetic loss and print runs, tokens, FLOPs and "
                        "GPU-hours per phase")
    p.add_argument("--gpu", default="H100", help="dry run: the GPU to price on (a name in "
                                                 "fastoptim.train.throughput.BF16_PEAK_FLOPS; default H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.4, help="dry run: the MFU assumed (default 0.4)")
    return p


def parse_micro_batches(text: str) -> dict:
    """'16' or 'auto' (every model), or '130m=16,300m=8' (those models; the rest take their whole batch)."""
    if "=" not in text:
        value = parse_micro_batch(text)
        return {model: value for model in MODEL_CONFIGS}
    chosen = {}
    for item in text.split(","):
        model, _, value = item.partition("=")
        if model.strip() not in MODEL_CONFIGS:
            raise argparse.ArgumentTypeError(f"--micro-batch {text!r}: unknown model {model.strip()!r}; "
                                             f"known: {', '.join(MODEL_CONFIGS)}")
        chosen[model.strip()] = parse_micro_batch(value.strip())
    return chosen


def print_dry_run(preset, gpu: str = "H100", mfu: float = 0.4, stream=None) -> None:
    """Runs, training tokens, FLOPs and GPU-hours per phase and model, at `mfu` of `gpu`'s bf16 dense peak (FLOPs as
    the trainer counts them for MFU: 6·(N + V·d) per token plus attention, fastoptim/train/throughput.py)."""
    from fastoptim.data.dataset import DEFAULT_TEXT_VOCAB
    from fastoptim.models import get_model_config
    from fastoptim.train.throughput import peak_flops_of, train_flops_per_token

    stream = stream or sys.stdout
    peak = peak_flops_of(gpu)
    if peak is None:
        raise ValueError(f"--gpu {gpu!r} has no known bf16 peak; choose one of the names in "
                         f"fastoptim.train.throughput.BF16_PEAK_FLOPS")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu} must be in (0, 1]")
    bench = dry_run(preset, runner.param_count)
    rows = {}
    for spec, _ in bench.outcomes.values():
        regime = Regime(spec.model, float(spec.chinchilla))
        phase = bench.phase_of.get((spec.optimizer, regime), 3)
        model_cfg = get_model_config(spec.model)
        if model_cfg.vocab_size is None:  # tiny sizes: the embedded corpus's vocabulary
            model_cfg = dataclasses.replace(model_cfg, vocab_size=preset.vocab_size or DEFAULT_TEXT_VOCAB)
        tokens = spec.steps * spec.seq_len * spec.hparams["batch_size"]
        runs, total, flops = rows.get((phase, spec.model), (0, 0, 0.0))
        rows[(phase, spec.model)] = (runs + 1, total + tokens,
                                     flops + tokens * train_flops_per_token(model_cfg, spec.seq_len))
    def hours(flops):
        return flops / (mfu * peak) / 3600

    ordered = sorted(rows.items(), key=lambda item: (item[0][0], runner.param_count(item[0][1])))
    table = [[f"Phase {phase}", model, f"{runs:,}", f"{tokens:.3g}", f"{flops:.3g}", f"{hours(flops):,.0f}"]
             for (phase, model), (runs, tokens, flops) in ordered]
    totals = [sum(values) for values in zip(*rows.values())]
    table.append(["all", "", f"{totals[0]:,}", f"{totals[1]:.3g}", f"{totals[2]:.3g}", f"{hours(totals[2]):,.0f}"])
    stream.write(f"preset {preset.name!r} on a synthetic loss (a real grid's count differs with its losses); "
                 f"GPU-hours at {mfu:.0%} MFU of a {gpu} ({peak / 1e12:,.0f} TFLOP/s bf16 dense peak):\n\n"
                 + markdown_table(["phase", "model", "runs", "training tokens", "FLOPs", "GPU-hours"], table) + "\n")


def run_settings(args, preset) -> runner.RunSettings:
    micro_batch = {**MICRO_BATCH, **args.micro_batch}
    return runner.RunSettings(device=args.device, micro_batch=micro_batch, compile=args.compile,
                              allow_repeat=args.allow_repeat or preset.allow_repeat, cache_dir=args.cache_dir,
                              ranks=args.gpus_per_run, parallel=args.parallel)


def make_executor(args, out: Path, settings: runner.RunSettings):
    if args.executor == "sequential":
        if settings.ranks > 1:
            raise ValueError(f"--gpus-per-run {settings.ranks} needs --executor gpus or slurm (sequential runs train "
                             "in this one process)")
        return SequentialExecutor(functools.partial(runner.run_in_process, settings=settings))
    if args.executor == "gpus":
        return LocalGPUExecutor(_gpus(args.gpus), functools.partial(runner.train_command, settings=settings),
                                runner.read_outcome, gpus_per_run=settings.ranks)
    # One task per GPU, all on one node: torchrun's single-node rendezvous is what the trainer's tests cover.
    params = {"timeout_min": args.slurm_timeout_min, "gpus_per_node": settings.ranks, "tasks_per_node": settings.ranks,
              "nodes": 1}
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    gpu_settings = dataclasses.replace(settings, device="cuda")
    return SlurmExecutor(functools.partial(runner.run_in_process, settings=gpu_settings),
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
    try:
        preset = runner.with_data(get_preset(args.preset), args.data, args.eval_data)
        if args.dry_run:
            print_dry_run(preset, args.gpu, args.mfu)
            return 0
        settings = run_settings(args, preset)
        for note in runner.check_data(preset, settings):
            print(f"fastoptim grid: {note}", file=sys.stderr)
        out = Path(args.out or f"runs/grid-{preset.name}")
        out.mkdir(parents=True, exist_ok=True)
        executor = make_executor(args, out, settings)
        with ResultsStore(args.store or out / STORE_NAME) as store:
            store.bind_preset(preset.to_json())
            facts = session_facts(preset, args.device, args.executor, args.cache_dir,
                                  gpus=len(executor.gpus) if args.executor == "gpus" else None)
            store.record_session(facts)
            try:
                bench = run_grid(preset, store, executor, runner.param_count, out / "runs", progress=GridProgress())
            finally:
                store.record_session({**facts, "ended": time.time()})
            if not args.no_report:
                write_report(bench, store, out)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"fastoptim grid: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfastoptim grid: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"grid finished: report in {out / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
