"""Report: tables hold the right numbers, plots are written, the CSV mode and the progress line work."""

import io
import json
import math
import re
from pathlib import Path

import pytest

from fastoptim.grid import report_cli
from fastoptim.grid.driver import run_grid
from fastoptim.grid.executors import SequentialExecutor
from fastoptim.grid.presets import GridPreset, OptimizerSweep, regimes
from fastoptim.grid.progress import GridProgress
from fastoptim.grid.report import GridReport, replay
from fastoptim.grid.runner import read_curve
from fastoptim.grid.store import ResultsStore
from fastoptim.grid.synthetic import SyntheticObjective

PNG = b"\x89PNG\r\n\x1a\n"
SIZES = {"s": 1_000_000, "m": 4_000_000}
OBJECTIVE = SyntheticObjective(SIZES, curvature=0.05, offsets={"muon": -0.04})
LRS = (2.5e-3, 5e-3, 1e-2, 2e-2)
PRESET = GridPreset(
    name="report",
    optimizers={name: OptimizerSweep({"lr": 5e-3, "batch_size": 8, "warmup": 0}, {"lr": LRS})
                for name in ("adamw", "muon")},
    phase1=regimes(["s"], [1, 2, 4]) + regimes(["m"], [1]),
    phase2=regimes(["m"], [2, 4]),
    phase2_always=("lr",),
    seq_len=16,
    tokens_per_param=0.01,
)


def train_and_log(spec, out_dir):
    """The synthetic objective, also writing the trainer's metrics.jsonl (a loss curve decaying to the final loss)."""
    outcome = OBJECTIVE(spec)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / "metrics.jsonl", "w") as log:
        for step in range(1, 11):
            record = {"step": step, "train_loss": outcome.final_val_loss + 1.0 / step}
            if step % 5 == 0:
                record["val_loss"] = outcome.final_val_loss + (1.0 / step if step < 10 else 0.0)
            log.write(json.dumps(record) + "\n")
    return outcome


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    with ResultsStore(out / "grid.sqlite") as store:
        run_grid(PRESET, store, SequentialExecutor(train_and_log), OBJECTIVE.param_count, out / "runs", idle_s=0.01)
    return out


def tables(markdown, title):
    """The tables (lists of rows of cells, header first) of the section under '## title'."""
    section = markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    found = []
    for block in section.split("\n\n"):
        if block.startswith("|"):
            found.append([[cell.strip() for cell in line.strip("|").split("|")]
                          for line in block.splitlines() if not set(line) <= set("|- ")])
    return found


def test_report_tables_hold_best_losses_and_speedups(grid_dir, tmp_path):
    with ResultsStore(grid_dir / "grid.sqlite") as store:
        bench = replay(store, OBJECTIVE.param_count)
        stream = io.StringIO()
        report_cli.write_report(bench, store, tmp_path, stream=stream)
    text = (tmp_path / "report.md").read_text()
    assert stream.getvalue() == text
    assert "Grid finished" in text

    header, *rows = tables(text, "Best final validation loss")[0]
    assert header == ["optimizer", "s 1×", "s 2×", "s 4×", "m 1×", "m 2×", "m 4×"]
    for optimizer, *cells in rows:
        for column, cell in zip(header[1:], cells):
            model, ratio = column.split()
            expected = min(OBJECTIVE.loss(optimizer, model, float(ratio[:-1]), {"lr": lr}) for lr in LRS)
            assert float(cell) == pytest.approx(expected, abs=1e-4)

    # Speedups. Through AdamW's losses at D = 1, 2, 4 the law L = α·D^(−B) + β passes exactly; in closed form
    # 2^(−B) = (L2 − L4)/(L1 − L2), α = (L1 − L2)/(1 − 2^(−B)), β = L1 − α. Then D_eff = ((L − β)/α)^(−1/B).
    laws, speeds, ranking = tables(text, "Speedup over adamw")
    speed_header, *speed_rows = speeds
    muon = next(row for row in speed_rows if row[0] == "muon")
    adamw = next(row for row in speed_rows if row[0] == "adamw")
    best = lambda optimizer, model, ratio: min(OBJECTIVE.loss(optimizer, model, ratio, {"lr": lr}) for lr in LRS)
    for column, cell, own in zip(speed_header[1:], muon[1:], adamw[1:]):
        model, ratio = column.split()
        ratio = float(ratio[:-1])
        L1, L2, L4 = (best("adamw", model, d) for d in (1.0, 2.0, 4.0))
        half = (L2 - L4) / (L1 - L2)
        B, alpha = -math.log2(half), (L1 - L2) / (1 - half)
        beta = L1 - alpha
        assert [float(x) for x in next(r for r in laws if r[0] == model)[1:4]] == pytest.approx([alpha, B, beta],
                                                                                                rel=1e-3)
        expected = ((best("muon", model, ratio) - beta) / alpha) ** (-1 / B) / ratio
        if expected * ratio > 4.0:  # beyond AdamW's largest fitted budget: only the bound D_max / D is shown
            assert cell == f"> {4.0 / ratio:.2f}"
        else:
            assert float(cell) == pytest.approx(expected, abs=0.006)  # printed with 2 decimals
        assert expected > 1.0 and float(own) == pytest.approx(1.0, abs=0.006)
    assert any(cell.startswith(">") for cell in muon)
    assert {row[1].split()[0] for row in ranking[1:]} == {"muon"} and {row[4] for row in ranking[1:]} == {
        "not measured"}
    assert "Seed noise **not measured**" in text

    sensitive = {row[0]: row[1] for row in tables(text, "Scale-sensitive hyperparameters")[0][1:]}
    assert sensitive == {"adamw": "lr", "muon": "lr"}
    assert "## Tuned hyperparameters" in text and "## Hyperparameter scaling laws" in text

    for name in ("loss_vs_budget.png", "speedup_heatmap.png", "loss_vs_tokens.png", "effective_budget.png",
                 "sensitivity_lr.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name


def test_read_curve_prefers_validation_losses(grid_dir):
    run_dir = next((grid_dir / "runs").iterdir())
    steps, losses, kind = read_curve(run_dir)
    assert steps == [5, 10]
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert losses[-1] == final
    assert kind == "val_loss" and read_curve(grid_dir / "missing") == ([], [], "train_loss")


def test_report_of_an_unfinished_grid(tmp_path):
    class Stop(BaseException):
        pass

    calls = []

    def stop_after_five(spec, out_dir):
        if len(calls) == 5:
            raise Stop()
        calls.append(spec)
        return OBJECTIVE(spec)

    with ResultsStore(tmp_path / "grid.sqlite") as store:
        with pytest.raises(Stop):
            run_grid(PRESET, store, SequentialExecutor(stop_after_five), OBJECTIVE.param_count, tmp_path, idle_s=0.01)
        text = GridReport.build(replay(store, OBJECTIVE.param_count)).markdown()
    assert re.search(r"Grid in progress \(\d+ runs pending\): 5 runs", text)
    assert "no speedups at s" in text  # AdamW has not reached 3 ratios yet


def test_csv_report_cli(tmp_path, capsys):
    lines = ["optimizer,size,ratio,loss"]
    for ratio in (1, 2, 4, 8):
        adamw = 0.417 * ratio ** -0.495 + 3.112
        lines += [f"adamw,130m,{ratio},{adamw!r}", f"muon,130m,{ratio},{adamw - 0.03!r}"]
    (tmp_path / "losses.csv").write_text("\n".join(lines) + "\n")
    assert report_cli.main(["--csv-in", str(tmp_path / "losses.csv"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert text in capsys.readouterr().out
    muon_2x = ((0.417 * 2 ** -0.495 - 0.03) / 0.417) ** (-1 / 0.495) / 2
    assert f"{muon_2x:.2f}" in next(line for line in text.splitlines() if line.startswith("| muon"))
    assert (tmp_path / "out" / "speedup_heatmap.png").read_bytes().startswith(PNG)
    assert report_cli.main(["--store", str(tmp_path / "nowhere.sqlite")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_progress_line():
    stream = io.StringIO()
    progress = GridProgress(stream, min_interval_s=0)
    line = progress.update(done=3, running=1, left=4, seconds_per_run=2.5, parallel=1)
    assert line == "grid: 3 done | 1 running | 4+ left | ETA 0m10s"
    assert progress.update(3, 2, 4, 3600.0, 2) == "grid: 3 done | 2 running | 4+ left | ETA 2h00m"
    assert progress.update(7, 0, 0, None, 1, final=True) == "grid: 7 done | 0 running | 0 left | ETA ?"
    assert stream.getvalue().splitlines()[0] == line
    assert math.isclose(len(stream.getvalue().splitlines()), 3)
