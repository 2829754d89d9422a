"""The `fastoptim` command: `train`, `grid`, `report` and `bench`, each owned by its own module."""

import argparse
import importlib
import sys

# Each subcommand lives in the module that owns it; importing lazily keeps `fastoptim --help` instant.
SUBCOMMANDS = {
    "train": ("fastoptim.train.cli", "Train one model with one optimizer."),
    "grid": ("fastoptim.grid.cli", "Run the benchmark grid (tuning phases, fits, speedups)."),
    "report": ("fastoptim.grid.report_cli", "Tables and plots from a results store."),
    "bench": ("fastoptim.benchcli", "Run the pytest-benchmark suite and print a table."),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = argparse.ArgumentParser(prog="fastoptim", description="Fast pretraining optimizers and their benchmark.")
        parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items()))
        parser.parse_args(argv[:1])
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
