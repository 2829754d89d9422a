"""`fastoptim bench`: run the bench/ suite for the installed backends and print one table.

    fastoptim bench [--device cpu|cuda] [--filter EXPR] [--quick] [--save DIR [--merge]] [--compare [--threshold 0.25]]

Per benchmark: the fastest round's time, its ratio to the reference measured in the same run (a copy of the same
bytes, or a matmul of the same FLOPs), the achieved rate as % of that reference (the practical floor), and for our
backends the speedup over each peer of the same group. `--save DIR` keeps the run as DIR/<device>/baseline.json
(`--save bench/results` records this device's baseline; `--merge` adds a partial run to it); `--compare` checks the
run against the saved baseline like `python -m fastoptim.bench.compare` and exits 1 on a regression. The suites are a
source checkout's bench/ folder, or the copy a wheel carries.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from fastoptim.bench import compare
from fastoptim.bench.backends import is_ours


def _rate(info: dict) -> str:
    rate = info["achieved_rate"]
    if info["bound"] == "memory":
        return f"{rate / 1e9:8.1f} GB/s"
    return f"{rate / 1e12:8.2f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:8.1f} GFLOP/s"


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:8.3f} {unit}"
    return f"{seconds / 1e-9:8.1f} ns"


def format_table(run: dict, is_ours) -> str:
    """One section per group; our rows list `peer x.xx×` = peer time / our time for every peer in the group."""
    groups: dict[str, list[dict]] = {}
    for bench in run["benchmarks"]:
        if "ratio" in bench.get("extra_info", {}):
            groups.setdefault(bench["group"] or bench["name"], []).append(bench["extra_info"])
    info = run["machine_info"].get("fastoptim", {})
    lines = [f"device {info.get('device', '?')}, clock {info.get('clock', '?')}, torch {info.get('torch', '?')}"]
    header = f"{'backend':20s} {'time':>11s} {'ratio':>7s} {'% floor':>8s} {'rate':>15s}  speedup over peers"
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda r: r["time_s"])
        reference = "copy of the same bytes" if rows[0]["bound"] == "memory" else "matmul of the same FLOPs"
        lines += ["", f"{group}  (reference: {reference})", header]
        peers = [r for r in rows if not is_ours(r["backend"])]
        for r in rows:
            speedups = ", ".join(f"{p['backend']} {p['time_s'] / r['time_s']:.2f}x" for p in peers) if is_ours(
                r["backend"]) else ""
            lines.append(f"{r['backend']:20s} {_time(r['time_s'])} {r['ratio']:7.3f} {r['floor_pct']:7.1f}% "
                         f"{_rate(r)}  {speedups}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastoptim bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--filter", help="pytest -k expression selecting benchmarks (e.g. 'adamw and not 1.2b')")
    parser.add_argument("--quick", action="store_true", help="the smallest shape set of each kind only")
    parser.add_argument("--max-time", type=float, help="wall seconds of rounds per benchmark")
    parser.add_argument("--threads", type=int, help="torch threads on CPU (default 1, timed with the process clock)")
    parser.add_argument("--save", metavar="DIR", help="keep the run as DIR/<device>/baseline.json")
    parser.add_argument("--merge", action="store_true",
                        help="with --save: keep the saved baseline's other benchmarks, replacing those measured now")
    parser.add_argument("--compare", action="store_true", help="compare with bench/results/<device>/baseline.json")
    parser.add_argument("--threshold", type=float, help="allowed growth of a ratio for --compare (default 0.25)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run_file = Path(tmp) / "run.json"
        code = compare.run_suite(run_file, args.device, keyword=args.filter, quick=args.quick,
                                 max_time=args.max_time, threads=args.threads)
        if not run_file.is_file():
            print(f"fastoptim bench: the suite produced no results (pytest exit status {code})", file=sys.stderr)
            return code or 2
        run = compare.load_run(run_file)
        print(format_table(run, is_ours))
        if args.compare:
            verdict = compare.check(run_file, args.threshold or compare.DEFAULT_THRESHOLD)
            code = code or verdict
        if args.save:
            target = compare.baseline_path(compare.run_device(run), args.save)
            target.parent.mkdir(parents=True, exist_ok=True)
            if args.merge and target.is_file():
                target.write_text(json.dumps(compare.merge_runs(compare.load_run(target), run), indent=1))
            else:
                shutil.copyfile(run_file, target)
            print(f"saved {target}")
    return code


if __name__ == "__main__":
    sys.exit(main())
