"""The regression check: run the bench suite and compare each benchmark's ratio (its time divided by the reference
measured in the same run, see fastoptim/bench/timing.py) with the baseline saved for this device,
bench/results/<device>/baseline.json. Exit status 0: no ratio grew by more than the threshold; 1: a regression;
2: no baseline for this device, or the suite itself failed.

    python -m fastoptim.bench.compare                          # full suite on the default device, threshold 25%
    python -m fastoptim.bench.compare --quick --threshold 0.5  # CI's subset
    python -m fastoptim.bench.compare --run my-run.json        # compare a saved run instead of running the suite

A benchmark that regresses is run once more (--retries) and counts as regressed only if it does again: a burst of
load on a shared machine does not fail the check. Only the standard library is imported here (the suite runs in a
subprocess), so the logic can be unit-tested and reused by `fastoptim bench --compare`.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def suite_root() -> Path:
    """The folder holding the suites' bench/: a source checkout (beside the fastoptim package), else the copy a
    wheel carries (fastoptim/bench/suite). Benchmark names are relative to it ("bench/bench_x.py::test_y[...]"), the
    same in both, so a baseline recorded in one compares with a run from the other."""
    checkout = PACKAGE.parents[1]
    if (checkout / "bench" / "conftest.py").is_file():
        return checkout
    return PACKAGE / "suite"


RESULTS_DIR = suite_root() / "bench" / "results"
BASELINE_NAME = "baseline.json"
DEFAULT_THRESHOLD = 0.25


class MissingBaseline(Exception):
    """No saved baseline for the device a run was made on."""


def load_run(path) -> dict:
    with open(path) as f:
        return json.load(f)


def run_device(run: dict) -> str:
    """The device slug a run was made on (written by bench/conftest.py into machine_info)."""
    try:
        return run["machine_info"]["fastoptim"]["device"]
    except KeyError:
        raise ValueError("run: no machine_info.fastoptim.device; was it made by fastoptim's bench suite?") from None


def ratios(run: dict) -> dict[str, float]:
    """fullname → ratio for every benchmark of a pytest-benchmark JSON run."""
    return {b["fullname"]: b["extra_info"]["ratio"] for b in run["benchmarks"] if "ratio" in b.get("extra_info", {})}


def merge_runs(old: dict, new: dict) -> dict:
    """`new` plus every benchmark of `old` that `new` did not measure (partial runs accumulate into one baseline)."""
    measured = {b["fullname"] for b in new["benchmarks"]}
    return {**new, "benchmarks": [b for b in old["benchmarks"] if b["fullname"] not in measured] + new["benchmarks"]}


def baseline_path(device: str, results_dir=RESULTS_DIR) -> Path:
    return Path(results_dir) / device / BASELINE_NAME


def find_baseline(device: str, results_dir=RESULTS_DIR) -> Path:
    path = baseline_path(device, results_dir)
    if not path.is_file():
        known = sorted(p.parent.name for p in Path(results_dir).glob(f"*/{BASELINE_NAME}"))
        raise MissingBaseline(
            f"no baseline for device {device!r}: expected {path}. Baselines exist for: {', '.join(known) or 'none'}. "
            f"Record one on this machine with `fastoptim bench --save {results_dir}` (or pass --baseline FILE)."
        )
    return path


@dataclass(frozen=True)
class Change:
    name: str
    baseline: float
    current: float

    @property
    def change(self) -> float:
        """Relative growth of the ratio: +0.30 means 30% slower relative to the reference."""
        return self.current / self.baseline - 1.0


@dataclass
class Comparison:
    threshold: float
    regressions: list[Change] = field(default_factory=list)
    improvements: list[Change] = field(default_factory=list)
    steady: list[Change] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the run, not in the baseline
    gone: list[str] = field(default_factory=list)  # in the baseline, not in the run (skipped or filtered out)

    @property
    def ok(self) -> bool:
        return not self.regressions


def compare_ratios(baseline: dict[str, float], current: dict[str, float], threshold: float) -> Comparison:
    """Classify each benchmark present in both: a regression when its ratio grew by more than `threshold`."""
    if not threshold > 0:
        raise ValueError(f"threshold must be positive (0.25 = 25%), got {threshold!r}")
    result = Comparison(threshold)
    for name in sorted(current):
        if name not in baseline:
            result.new.append(name)
            continue
        change = Change(name, baseline[name], current[name])
        if change.change > threshold:
            result.regressions.append(change)
        elif change.change < -threshold:
            result.improvements.append(change)
        else:
            result.steady.append(change)
    result.gone = sorted(set(baseline) - set(current))
    return result


def format_comparison(cmp: Comparison, baseline_file) -> str:
    lines = [f"Compared with {baseline_file} (ratio = time / in-run reference; threshold +{cmp.threshold:.0%})"]
    for title, changes in (("REGRESSED", cmp.regressions), ("improved", cmp.improvements), ("steady", cmp.steady)):
        for c in changes:
            lines.append(f"  {title:9s} {c.change:+7.1%}  ratio {c.baseline:8.3f} -> {c.current:8.3f}  {c.name}")
    if cmp.new:
        lines.append(f"  {len(cmp.new)} benchmark(s) without a baseline entry (not compared): " + ", ".join(cmp.new))
    if cmp.gone:
        lines.append(f"  {len(cmp.gone)} baseline entr(ies) not in this run (skipped or filtered out)")
    compared = len(cmp.regressions) + len(cmp.improvements) + len(cmp.steady)
    verdict = "FAIL" if cmp.regressions else "OK"
    lines.append(f"{verdict}: {len(cmp.regressions)} regressed, {len(cmp.improvements)} improved, "
                 f"{len(cmp.steady)} steady of {compared} compared")
    return "\n".join(lines)


def run_suite(json_path, device="auto", select=(), keyword=None, quick=False, max_time=None, threads=None,
              extra=()) -> int:
    """Run the bench suite (or the node ids in `select`) in a subprocess, writing pytest-benchmark JSON."""
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise ModuleNotFoundError("the bench suite runs under pytest-benchmark: pip install 'fastoptim[bench]'",
                                  name="pytest_benchmark")
    root = suite_root()
    if not (root / "bench" / "conftest.py").is_file():
        raise FileNotFoundError(f"the bench suites are missing: no {root / 'bench'} (a wheel built without them?)")
    cmd = [sys.executable, "-m", "pytest", *(select or ["bench"]), "-q", "-p", "no:cacheprovider",
           f"--rootdir={root}", f"--bench-device={device}", f"--benchmark-json={json_path}",
           "--benchmark-group-by=group", "--benchmark-columns=min,median,rounds"]
    if keyword:
        cmd += ["-k", keyword]
    if quick:
        cmd.append("--bench-quick")
    if max_time is not None:
        cmd.append(f"--benchmark-max-time={max_time}")
    if threads is not None:
        cmd.append(f"--bench-threads={threads}")
    cmd += list(extra)
    # The suites import fastoptim: the one this module belongs to, wherever the suites are run from.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE.parents[1]), env.get("PYTHONPATH")]))
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=root, env=env).returncode


def check(run_file, threshold, baseline_file=None, results_dir=RESULTS_DIR, rerun=None) -> int:
    """Compare a run with its device's baseline and print the verdict; `rerun(names) -> {name: ratio}` measures
    regressed benchmarks again, and a benchmark stays regressed only if its better ratio still is."""
    run = load_run(run_file)
    try:
        baseline_file = baseline_file or find_baseline(run_device(run), results_dir)
    except MissingBaseline as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    baseline = ratios(load_run(baseline_file))
    current = ratios(run)
    cmp = compare_ratios(baseline, current, threshold)
    if cmp.regressions and rerun is not None:
        names = [c.name for c in cmp.regressions]
        print(f"compare: {len(names)} regression(s) on the first run; measuring them again", flush=True)
        for name, ratio in rerun(names).items():
            current[name] = min(current[name], ratio)
        cmp = compare_ratios(baseline, current, threshold)
    print(format_comparison(cmp, baseline_file))
    return 0 if cmp.ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastoptim.bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"allowed growth of a ratio before it is a regression (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--baseline", help="baseline JSON (default: bench/results/<device>/baseline.json)")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="folder of per-device baselines")
    parser.add_argument("--run", help="compare this saved run instead of running the suite")
    parser.add_argument("-k", "--filter", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--quick", action="store_true", help="smallest shape set of each kind only (CI)")
    parser.add_argument("--max-time", type=float, help="wall seconds of rounds per benchmark (pytest-benchmark's)")
    parser.add_argument("--retries", type=int, default=1, help="re-measurements of a regressed benchmark (default 1)")
    args = parser.parse_args(argv)

    def suite(json_path, select=()):
        return run_suite(json_path, args.device, select, None if select else args.filter, args.quick, args.max_time)

    with tempfile.TemporaryDirectory() as tmp:
        run_file = args.run
        if run_file is None:
            run_file = Path(tmp) / "run.json"
            code = suite(run_file)
            if code != 0 or not run_file.is_file():
                print(f"compare: the bench suite failed (pytest exit status {code})", file=sys.stderr)
                return 2

        def rerun(names):
            ratios_again = {}
            for attempt in range(args.retries):
                again = Path(tmp) / f"rerun{attempt}.json"
                # pytest-benchmark's fullname is the node id relative to the rootdir (the repository root).
                if suite(again, names) == 0:
                    for name, ratio in ratios(load_run(again)).items():
                        ratios_again[name] = min(ratio, ratios_again.get(name, ratio))
            return ratios_again

        return check(run_file, args.threshold, args.baseline, args.results,
                     rerun if args.retries > 0 and args.run is None else None)


if __name__ == "__main__":
    sys.exit(main())
