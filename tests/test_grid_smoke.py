"""The grid on the real trainer: every preset's configs pass the trainer's checks, and the `smoke` preset runs end to
end on CPU (`pytest -m slow tests/test_grid_smoke.py`; a few minutes on 2 cores)."""

import json
import math
import re

import pytest

pytest.importorskip("fastoptim.train")

from fastoptim.grid import cli, report_cli, runner  # noqa: E402
from fastoptim.grid.phases import Benchmark  # noqa: E402
from fastoptim.grid.presets import get_preset  # noqa: E402
from fastoptim.grid.store import ResultsStore  # noqa: E402
from fastoptim.train.loop import plan_run  # noqa: E402


@pytest.mark.parametrize("name", [pytest.param("paper", marks=pytest.mark.slow), "tiny", "smoke", "cpu"])
def test_every_preset_config_passes_the_trainers_checks(name, tmp_path):
    """Names, hyperparameter keys and values (built into each optimizer on a parameter-free model), steps, schedule:
    each optimizer's baseline, and its grid's smallest and largest values all at once."""
    preset = get_preset(name)
    bench = Benchmark(preset, runner.param_count)
    regime = preset.phase1[0]
    for optimizer, sweep in preset.optimizers.items():
        extremes = [{**sweep.baseline, **{key: values[i] for key, values in sweep.grid.items()}} for i in (0, -1)]
        for hparams in [sweep.baseline, *extremes]:
            if not bench._feasible(regime)(hparams):  # the searches skip these (warmup longer than the run)
                hparams = {**hparams, "warmup": 0}
            spec = bench.spec(optimizer, regime, hparams)
            plan = plan_run(runner.train_config(spec, str(tmp_path / spec.run_id), runner.RunSettings(device="cpu")))
            assert plan.steps == spec.steps


def best_losses(report):
    section = report.split("## Best final validation loss", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines()
            if line.startswith("| ") and "optimizer" not in line]
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows}


@pytest.mark.slow
def test_smoke_preset_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "grid"
    assert cli.main(["--preset", "smoke", "--out", str(out), "--device", "cpu"]) == 0
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert report.split("\n\n")[1].startswith("> **A pipeline check, not a result.**")
    assert summary["plots"] == ["loss_vs_budget.png", "effective_budget.png", "speedup_heatmap.png",
                                "loss_vs_tokens.png", "sensitivity_lr.png"]
    for plot in summary["plots"]:
        assert (out / plot).stat().st_size > 5000 and f"]({plot})" in report
    facts = summary["provenance"]
    assert facts["torch_version"] and facts["device_kind"] == "cpu" and facts["tokenizer_sha256"]
    assert len(facts["eval_sha256"]) == 64 and facts["eval_tokens"] == get_preset("smoke").eval_tokens
    assert summary["seed_noise"] is not None and summary["failures"] == []
    assert all(s["median_share"] > 0 for s in summary["costs"]["optimizer_step_share"])

    preset = get_preset("smoke")
    with ResultsStore(out / "grid.sqlite") as store:
        counts = store.counts()
        runs = store.runs()
    assert set(counts) == {"done"}, counts  # nothing crashed, nothing left claimed
    assert re.search(rf"Grid finished: {counts['done']} runs", report)
    losses = best_losses(report)
    assert set(losses) == set(preset.optimizers)
    regimes = len(preset.phase1) + len(preset.phase2)
    for optimizer, cells in losses.items():
        values = [float(cell.split()[0]) for cell in cells if cell]  # the best run (its seeds follow)
        assert len(values) == regimes, optimizer
        # Training happened: below the loss of a uniform guess over the vocabulary, ln(8192) ≈ 9.01.
        assert all(math.isfinite(v) and v < math.log(8192) for v in values), (optimizer, values)
    assert "## Speedup over adamw" in report and "| muon" in report
    for run in runs:
        assert (tmp_path / "grid" / "runs" / run.spec.run_id / "result.json").exists()

    # The same command again: a finished grid trains nothing and reports the same numbers.
    capsys.readouterr()
    assert cli.main(["--preset", "smoke", "--out", str(out), "--device", "cpu"]) == 0
    with ResultsStore(out / "grid.sqlite") as store:
        assert store.counts() == counts
    assert best_losses((out / "report.md").read_text()) == losses
    assert report_cli.main(["--out", str(out)]) == 0
