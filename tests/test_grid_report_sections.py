"""Every section of a grid's report, on a synthetic store whose right answers are known: the pipeline-check banner,
provenance, crashed and diverged runs with their reasons, seed noise marks and intervals, cells beyond the fitted
budget range, costs, plots, summary.json, and the CSV export that `--csv-in` reads back. No training."""

import io
import json
import math
import sqlite3

import pytest
from scipy.stats import t as student_t

from fastoptim.grid import report_cli
from fastoptim.grid.driver import run_grid
from fastoptim.grid.executors import SequentialExecutor
from fastoptim.grid.presets import GridPreset, OptimizerSweep, regimes
from fastoptim.grid.report import replay
from fastoptim.grid.runner import read_outcome
from fastoptim.grid.runs import RunOutcome, RunSpec
from fastoptim.grid.store import ResultsStore
from fastoptim.grid.synthetic import SyntheticObjective

PNG = b"\x89PNG\r\n\x1a\n"
SIZES = {"s": 1_000_000}
# Muon is far ahead (its 8× loss lies beyond AdamW's fitted range); Lion trails AdamW by less than the seed noise.
OBJECTIVE = SyntheticObjective(SIZES, curvature=0.05, offsets={"muon": -0.05, "lion": 0.001})
LRS = (2.5e-3, 5e-3, 1e-2, 2e-2)
SEED_NOISE = {0: 0.0, 1: 0.004, 2: -0.004}  # per seed: every repeated cell has mean L and standard deviation 0.004
# Muon's, above 1, is what Soap's refresh on log steps produces: the report must call it biased, not a share.
STEP_SHARE = {"adamw": 0.1, "muon": 1.3, "lion": 0.2}
SECONDS_PER_STEP = 0.01
PRESET = GridPreset(
    name="sections",
    optimizers={name: OptimizerSweep({"lr": 5e-3, "batch_size": 8, "warmup": 0}, {"lr": LRS})
                for name in ("adamw", "muon", "lion")},
    phase1=regimes(["s"], [1, 2, 4, 8]),
    seq_len=16,
    tokens_per_param=0.01,
    extra_seeds=2,
    pipeline_check=True,
)
SESSION = {"host": "ci", "started": 1_800_000_000.0, "ended": 1_800_000_600.0, "fastoptim_version": "9.9",
           "fastoptim_commit": "abc123", "fastoptim_dirty": False, "torch_version": "2.14.1",
           "device_name": "AMD EPYC", "device_count": 2, "data": "stdlib", "train_tokens": 1234,
           "tokenizer_sha256": "f00d"}


def crashes(spec):
    return spec.optimizer == "lion" and spec.hparams["lr"] == LRS[-1]


def diverges(spec):
    return spec.optimizer == "adamw" and spec.hparams["lr"] == LRS[-1] and spec.chinchilla == 1.0


def train(spec, out_dir):
    """The synthetic objective plus seed noise, writing what the trainer writes: metrics.jsonl and result.json."""
    if crashes(spec):
        raise RuntimeError("worker lost\n  (the traceback's second line)")
    seconds = spec.steps * SECONDS_PER_STEP
    if diverges(spec):
        outcome = RunOutcome(math.inf, True, spec.steps, seconds, reason=f"eval loss NaN at step {spec.steps}")
    else:
        outcome = RunOutcome(OBJECTIVE(spec).final_val_loss + SEED_NOISE[spec.seed], False, spec.steps, seconds)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.jsonl", "w") as log:
        for step in (1, 5, 10):
            # The first step's timing (state built, nothing averaged) must stay out of the share.
            step_time = 1.0 if step == 1 else 0.1
            share = 0.9 if step == 1 else STEP_SHARE[spec.optimizer]
            log.write(json.dumps({"step": step, "train_loss": 5.0 / step, "step_time_s": step_time,
                                  "optimizer_step_time_s": share * step_time,
                                  "val_loss": outcome.final_val_loss + 1.0 / step - 0.1}) + "\n")
    (out_dir / "result.json").write_text(json.dumps({
        "final_val_loss": outcome.final_val_loss if not outcome.diverged else "inf", "diverged": outcome.diverged,
        "diverged_reason": outcome.reason, "steps": spec.steps, "eval_tokens": 4096, "eval_sha256": "e" * 64,
        "wall_time_s": seconds, "config": {"device_name": "cpu"}}))
    return outcome


def run_sections_grid(out, preset=PRESET):
    with ResultsStore(out / "grid.sqlite") as store:
        store.record_session(SESSION)
        run_grid(preset, store, SequentialExecutor(lambda spec, out_dir: train(spec, out / "runs" / spec.run_id)),
                 OBJECTIVE.param_count, out / "runs", idle_s=0.01)
        bench = replay(store, OBJECTIVE.param_count)  # what `fastoptim report` sees later
        report_cli.write_report(bench, store, out, csv_out=out / "best.csv", stream=io.StringIO())
    return (out / "report.md").read_text(), json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("sections")
    text, summary = run_sections_grid(out)
    return out, text, summary


def section(text, title):
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def table(text, title, index=0):
    blocks = [block for block in section(text, title).split("\n\n") if block.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in blocks[index].splitlines()
            if not set(line) <= set("|- ")]
    return rows[0], rows[1:]


def best_loss(optimizer, ratio):
    return min(OBJECTIVE.loss(optimizer, "s", ratio, {"lr": lr}) for lr in LRS)


def test_banner_says_a_pipeline_check_is_no_result(grid, tmp_path):
    _, text, summary = grid
    steps = [math.floor(r * 0.01 * SIZES["s"] / (16 * 8)) for r in (1, 8)]
    banner = text.split("\n\n")[1]
    assert banner.startswith("> **A pipeline check, not a result.**")
    assert f"{steps[0]}–{steps[1]} steps of 8 × 16 tokens" in banner and "--preset cpu" in banner
    assert summary["pipeline_check"] is True and summary["run_lengths"]["steps"] == steps

    quiet = GridPreset(**{**PRESET.__dict__, "pipeline_check": False, "name": "study"})
    text, _ = run_sections_grid(tmp_path, quiet)
    assert "pipeline check" not in text and f"Runs train for {steps[0]}–{steps[1]} steps" in text


def test_provenance_in_report_and_summary(grid):
    _, text, summary = grid
    facts = summary["provenance"]
    for key in ("fastoptim_version", "fastoptim_commit", "torch_version", "device_name", "device_count", "data",
                "train_tokens", "tokenizer_sha256"):
        assert facts[key] == SESSION[key], key
    assert facts["eval_tokens"] == 4096 and facts["eval_sha256"] == "e" * 64
    assert facts["preset"] == "sections" and facts["seeds"] == [0, 1, 2]
    assert facts["session_wall_time_s"] == 600.0 and facts["sessions"] == 1
    assert facts["start"].endswith("+00:00") and facts["end"] >= facts["start"]
    rows = dict(table(text, "Provenance")[1])
    assert rows["fastoptim commit"] == "abc123" and rows["eval_sha256"] == "e" * 64 and rows["seeds"] == "[0, 1, 2]"


def test_crashed_and_diverged_runs_are_listed_with_their_reasons(grid):
    _, text, summary = grid
    header, rows = table(text, "What went wrong")
    crashed = sorted(row[1:] for row in rows if row[0] == "crashed")
    diverged = [row[1:] for row in rows if row[0] == "diverged"]
    assert len(crashed) + len(diverged) == len(rows)
    assert crashed == [["lion", f"s {r}×", "0", "lr=0.02", "RuntimeError: worker lost"] for r in (1, 2, 4, 8)]
    assert diverged == [["adamw", "s 1×", "0", "lr=0.02", "eval loss NaN at step 78"]]
    assert "(5 runs" not in text and "1 diverged, 4 crashed" in text
    assert {(f["kind"], f["reason"]) for f in summary["failures"]} == {
        ("crashed", "RuntimeError: worker lost"), ("diverged", "eval loss NaN at step 78")}


def test_store_keeps_the_divergence_reason_and_upgrades_an_older_store(tmp_path):
    run = RunSpec("adamw", "s", 1.0, {"lr": 1e-3, "batch_size": 8}, seq_len=16, steps=10)
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the schema before the reason column
        db.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, config TEXT NOT NULL, optimizer TEXT NOT NULL, "
                   "model TEXT NOT NULL, ratio REAL NOT NULL, status TEXT NOT NULL, final_val_loss REAL, "
                   "diverged INTEGER, steps INTEGER, seconds REAL, worker TEXT, host TEXT, pid INTEGER, "
                   "heartbeat REAL, out_dir TEXT, error TEXT, started REAL, finished REAL)")
    with ResultsStore(path) as store:
        assert store.claim(run, str(tmp_path / "run"))
        store.finish(run, RunOutcome(math.inf, True, 7, 1.0, reason="eval loss 1.2e+04 > 1e4 at step 7"))
    with ResultsStore(path) as store:
        assert store.result(run.run_id).reason == "eval loss 1.2e+04 > 1e4 at step 7"
        assert store.runs()[0].outcome.reason == "eval loss 1.2e+04 > 1e4 at step 7"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps(
        {"final_val_loss": "inf", "diverged": True, "diverged_reason": "eval loss NaN at step 3", "steps": 3}))
    assert read_outcome(tmp_path / "run").reason == "eval loss NaN at step 3"  # what the gpus executor stores


def test_a_store_of_an_older_version_serves_the_same_preset(tmp_path):
    """A preset JSON written before the fields extra_seeds, vocab_size and pipeline_check existed is the same grid."""
    preset = GridPreset(**{**PRESET.__dict__, "extra_seeds": 0, "pipeline_check": False})
    old = json.loads(preset.to_json())
    for field in ("extra_seeds", "vocab_size", "pipeline_check"):
        del old[field]
    with ResultsStore(tmp_path / "s.sqlite") as store:
        store.bind_preset(json.dumps(old))
        store.bind_preset(preset.to_json())
        with pytest.raises(ValueError, match="different preset"):
            store.bind_preset(PRESET.to_json())  # extra seeds make another grid


def test_seed_noise_marks_and_intervals(grid):
    _, text, summary = grid
    noise = summary["seed_noise"]
    assert noise["sigma"] == pytest.approx(0.004, rel=1e-6) and noise["cells"] == 12 and noise["dof"] == 24
    header, rows = table(text, "Speedup over adamw", index=1)
    cells = {row[0]: dict(zip(header[1:], row[1:])) for row in rows}
    assert all(cell.startswith("≈ ") for cell in cells["lion"].values())      # 0.001 worse: within noise
    assert not any(cell.startswith("≈") for cell in cells["muon"].values())   # 0.05 better: clears it
    assert not any(cell.startswith("≈") for cell in cells["adamw"].values())  # the baseline is not compared to itself

    # AdamW's law passes exactly through its (noise-free) means; Lion's 2× interval is its mean ± t·σ/√3 through it.
    law = summary["loss_laws"]["s"]
    t95 = student_t.ppf(0.975, 24)
    D_eff = lambda loss: ((loss - law["beta"]) / law["alpha"]) ** (-1 / law["B"])
    lion = next(r for r in summary["speedups"] if r["optimizer"] == "lion" and r["ratio"] == 2.0)
    half = t95 * 0.004 / math.sqrt(3)
    assert lion["loss"] == pytest.approx(best_loss("lion", 2.0), abs=1e-9) and lion["seeds"] == 3
    assert lion["interval"] == pytest.approx([D_eff(lion["loss"] + half) / 2, D_eff(lion["loss"] - half) / 2])
    assert lion["within_noise"] is True
    assert cells["lion"]["s 2×"] == f"≈ {lion['speedup']:.2f} [{lion['interval'][0]:.2f}, {lion['interval'][1]:.2f}]"

    verdicts = {row[0]: row[4] for row in table(text, "Speedup over adamw", index=2)[1]}
    assert verdicts == {f"s {r}×": "yes" for r in (1, 2, 4, 8)}  # Muon wins by 0.05 at every budget
    best = table(text, "Best final validation loss")[1]
    adamw_2x = dict(zip(["optimizer", "s 1×", "s 2×", "s 4×", "s 8×"], best[0]))["s 2×"]
    assert adamw_2x == f"{best_loss('adamw', 2.0):.4f} ({best_loss('adamw', 2.0):.4f} ± 0.0040, 3 seeds)"


def test_cells_beyond_the_fitted_range_show_bounds_not_extrapolations(grid):
    _, text, summary = grid
    header, rows = table(text, "Speedup over adamw", index=1)
    muon = dict(zip(header[1:], next(row for row in rows if row[0] == "muon")[1:]))
    assert muon["s 8×"] == "> 1.00 [> 1.00, > 1.00]"  # D_eff beyond 8×, the largest budget AdamW was fitted on
    row = next(r for r in summary["speedups"] if r["optimizer"] == "muon" and r["ratio"] == 8.0)
    assert row["beyond_fitted_range"] == ">" and row["speedup"] is None and row["bound"] == 1.0
    assert "∞" not in text and "inf" not in json.dumps(summary)
    law_header, laws = table(text, "Speedup over adamw", index=0)
    assert laws[0][4:] == ["1–8×", "4 (1 left)"]


def test_costs_wall_clock_and_optimizer_step_share(grid):
    _, text, summary = grid
    header, rows = table(text, "Costs: wall-clock and the optimizer step", index=0)
    adamw = dict(zip(header, next(row for row in rows if row[0] == "adamw")))
    for ratio in (1, 2, 4, 8):
        steps = math.floor(ratio * 0.01 * SIZES["s"] / (16 * 8))
        assert float(adamw[f"s {ratio}×"]) == pytest.approx(steps * SECONDS_PER_STEP, abs=0.05)
    header, rows = table(text, "Costs: wall-clock and the optimizer step", index=1)
    assert {row[0]: row[3] for row in rows} == {"adamw": "10.0%", "muon": "130.0% (biased)", "lion": "20.0%"}
    assert "(biased): above 100%, so not a share" in text
    shares = {(s["optimizer"], s["size"]): s["median_share"] for s in summary["costs"]["optimizer_step_share"]}
    assert shares == pytest.approx({(name, "s"): share for name, share in STEP_SHARE.items()})
    assert {s["optimizer"] for s in summary["costs"]["optimizer_step_share"] if s["biased"]} == {"muon"}
    runs = summary["costs"]["runs"]
    assert len(runs) == len([r for r in runs if r["seconds"] is not None]) > 0
    assert all(r["seconds"] == pytest.approx(r["steps"] * SECONDS_PER_STEP) for r in runs)


def test_plots_are_written_and_embedded(grid):
    out, text, summary = grid
    names = ["loss_vs_budget.png", "effective_budget.png", "speedup_heatmap.png", "loss_vs_tokens.png",
             "sensitivity_lr.png"]
    assert summary["plots"] == names
    for name in names:
        assert (out / name).read_bytes().startswith(PNG) and (out / name).stat().st_size > 10_000, name
        assert f"]({name})" in section(text, "Plots")


def test_best_configs_hold_every_hyperparameter(grid):
    _, _, summary = grid
    configs = {(c["optimizer"], c["ratio"]): c for c in summary["best_configs"]}
    assert len(configs) == 12
    adamw = configs[("adamw", 2.0)]
    assert adamw["hparams"]["lr"] == 1e-2 and adamw["loss"] == pytest.approx(best_loss("adamw", 2.0))
    # Not swept, not in the preset's baseline: the trainer's defaults and the paper's settings it fills in.
    assert {"beta1", "beta2", "eps", "weight_decay", "max_grad_norm", "lr_schedule", "min_lr_ratio"} <= set(
        adamw["hparams"])
    assert adamw["seed_losses"] == pytest.approx([adamw["loss"], adamw["loss"] + 0.004, adamw["loss"] - 0.004])


def test_csv_export_reads_back_into_the_same_speedups(grid, tmp_path):
    out, text, _ = grid
    assert report_cli.main(["--csv-in", str(out / "best.csv"), "--out", str(tmp_path), "--csv",
                            str(tmp_path / "again.csv")]) == 0
    again = (tmp_path / "report.md").read_text()
    assert section(again, "Speedup over adamw") == section(text, "Speedup over adamw")
    assert (tmp_path / "again.csv").read_text() == (out / "best.csv").read_text()
    header = (out / "best.csv").read_text().splitlines()[0]
    assert header == "optimizer,size,ratio,loss,seed_losses"
    for name in ("loss_vs_budget.png", "effective_budget.png", "speedup_heatmap.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG) and f"]({name})" in again
    assert json.loads((tmp_path / "summary.json").read_text())["seed_noise"]["dof"] == 24


def test_csv_of_the_papers_losses_renders_the_tables(tmp_path):
    """A CSV as the paper releases it (one final loss per cell, no seeds): the speedups, bounds and plots, and the
    plain statement that its noise is unknown."""
    lines = ["optimizer,size,ratio,loss"]
    for size, (alpha, B, beta) in {"130m": (0.417, 0.495, 3.112), "300m": (0.350, 0.478, 2.913)}.items():
        for ratio in (1, 2, 4, 8):
            adamw = alpha * ratio ** -B + beta
            lines += [f"adamw,{size},{ratio},{adamw!r}", f"muon,{size},{ratio},{adamw - 0.02!r}"]
    (tmp_path / "paper.csv").write_text("\n".join(lines) + "\n")
    assert report_cli.main(["--csv-in", str(tmp_path / "paper.csv"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Seed noise **not measured**" in text and "≈" not in section(text, "Speedup over adamw").split("- ")[0]
    header, rows = table(text, "Speedup over adamw", index=1)
    assert header == ["optimizer", "130m 1×", "130m 2×", "130m 4×", "130m 8×", "300m 1×", "300m 2×", "300m 4×",
                      "300m 8×"]
    muon = dict(zip(header[1:], next(row for row in rows if row[0] == "muon")[1:]))
    assert muon["130m 8×"] == "> 1.00" and float(muon["130m 1×"]) > 1.0
    assert (tmp_path / "out" / "effective_budget.png").read_bytes().startswith(PNG)
