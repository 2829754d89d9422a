"""The `fastoptim` command: `train`, `grid`, `report`, `data` and `bench`, each owned by its own module."""

import argparse
import importlib
import sys

# Each subcommand lives in the module that owns it; importing lazily keeps `fastoptim --help` instant. The last
# entry is the extra (pip install 'fastoptim[EXTRA]') that brings the packages it needs beyond torch and numpy.
SUBCOMMANDS = {
    "train": ("fastoptim.train.cli", "Train one model with one optimizer.", "train"),
    "grid": ("fastoptim.grid.cli", "Run the benchmark grid (tuning phases, fits, speedups).", "grid"),
    "report": ("fastoptim.grid.report_cli", "Tables and plots from a results store.", "grid"),
    "data": ("fastoptim.data.cli", "Tokenize text into token shards; inspect shards.", "train"),
    "bench": ("fastoptim.bench.cli", "Run the pytest-benchmark suite and print a table.", "bench"),
}
EXTRA_PACKAGES = {"tokenizers", "tqdm", "scipy", "matplotlib", "pytest", "pytest_benchmark", "submitit"}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = argparse.ArgumentParser(prog="fastoptim", description="Fast pretraining optimizers and their benchmark.")
        parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items()))
        parser.parse_args(argv[:1])
    name, _, extra = SUBCOMMANDS[argv[0]]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name not in EXTRA_PACKAGES:
            raise
        print(f"fastoptim {argv[0]}: needs {err.name}, which the '{extra}' extra installs: "
              f"pip install 'fastoptim[{extra}]'", file=sys.stderr)
        return 2
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
