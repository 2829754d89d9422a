"""The grid on the trainer: run settings that are not run identities, the data check before the first run, the
priced dry run, and a cut-down `tiny` preset end to end."""

import dataclasses
import json
import math
import shutil
import sysconfig
import time
from pathlib import Path

import pytest

from fastoptim.grid import cli, presets, runner
from fastoptim.grid.presets import OptimizerSweep, get_preset
from fastoptim.grid.runs import RunSpec
from fastoptim.grid.store import ResultsStore

pytestmark = pytest.mark.usefixtures("one_thread")


def spec(batch_size=16, model="tiny", **fields):
    return RunSpec("adamw", model, 1.0, {"lr": 1e-3, "batch_size": batch_size}, seq_len=32, steps=10, **fields)


def test_run_settings_are_not_the_runs_identity(tmp_path):
    settings = runner.RunSettings(device="cpu", micro_batch={"tiny": 6, "130m": "auto"}, compile=False,
                                  allow_repeat=True)
    assert settings.micro_batch_for(spec(16)) == 4  # the largest divisor of the batch up to 6
    assert settings.micro_batch_for(spec(4)) == 4 and settings.micro_batch_for(spec(5)) == 5
    assert settings.micro_batch_for(spec(16, model="130m")) == "auto"
    assert settings.micro_batch_for(spec(16, model="tiny2")) is None  # not named: the whole batch
    cfg = runner.train_config(spec(16), str(tmp_path), settings)
    assert (cfg.micro_batch, cfg.compile, cfg.allow_repeat, cfg.device, cfg.resume) == (4, False, True, "cpu", True)
    argv = runner.train_command(spec(16), str(tmp_path), settings)
    assert argv[argv.index("--micro-batch") + 1] == "4" and "--no-compile" in argv and "--allow-repeat" in argv
    from fastoptim.train.cli import build_parser, config_from_args

    parsed = config_from_args(build_parser().parse_args(argv[4:]))
    assert (parsed.micro_batch, parsed.compile, parsed.allow_repeat, parsed.eval_tokens) == \
        (4, False, True, cfg.eval_tokens)
    # The eval set is part of a run's identity; the settings are not part of the spec at all.
    assert spec(16).run_id == spec(16).run_id != spec(16, eval_tokens=2048).run_id != spec(16, eval_data="x").run_id


def test_micro_batch_option_reads_per_model_values():
    assert cli.parse_micro_batches("130m=16,300m=auto") == {"130m": 16, "300m": "auto"}
    assert set(cli.parse_micro_batches("8").values()) == {8}
    with pytest.raises(Exception, match="unknown model '7b'"):
        cli.parse_micro_batches("7b=4")


def small_text(folder: Path, size: int) -> Path:
    """`size` bytes of the standard library's source as a user's own text folder."""
    folder.mkdir()
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total >= size:
            break
        shutil.copy(path, folder / path.name)
        total += path.stat().st_size
    return folder


def test_paper_without_data_fails_in_seconds_naming_the_shortfall(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTOPTIM_CACHE", str(tmp_path / "cache"))
    began = time.perf_counter()
    assert cli.main(["--preset", "paper", "--out", str(tmp_path / "grid"), "--device", "cpu"]) == 2
    seconds = time.perf_counter() - began
    err = capsys.readouterr().err
    assert seconds < 10, seconds
    assert "Phase 1 130m 1×: 2,684,354,560 training tokens" in err and "stdlib holds at most" in err
    assert "eval_tokens=1,048,576" in err
    assert not (tmp_path / "grid").exists() and not (tmp_path / "cache").exists()  # nothing run, nothing tokenized


def test_data_check_names_each_short_regime_and_counts_declared_repeats(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTOPTIM_CACHE", str(tmp_path / "cache"))
    data = small_text(tmp_path / "text", 40_000)
    smoke = dataclasses.replace(get_preset("smoke"), data=str(data), tokens_per_param=0.5, eval_tokens=256)
    with pytest.raises(ValueError, match=r"(?s)too small.*Phase 1 tiny 2×: 131,072 training tokens \(1,024 steps × "
                                         r"batch_size 4 × 32\); .* holds at most .* per pass.*--allow-repeat"):
        runner.check_data(smoke)
    notes = runner.check_data(smoke, runner.RunSettings(allow_repeat=True))
    assert notes and all("passes (repeats allowed)" in note for note in notes)
    with pytest.raises(ValueError, match=r"eval_tokens=1,000,000: the held-out split of .* holds"):
        runner.check_data(dataclasses.replace(smoke, eval_tokens=1_000_000), runner.RunSettings(allow_repeat=True))


def test_dry_run_prices_the_paper_per_phase(capsys):
    assert cli.main(["--preset", "paper", "--dry-run", "--gpu", "H200", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours at 50% MFU of a H200 (989 TFLOP/s bf16 dense peak)" in out
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| Phase")]
    assert {row[0].strip() for row in rows} == {"Phase 1", "Phase 2", "Phase 3"}
    from fastoptim.models import get_model_config
    from fastoptim.train.throughput import train_flops_per_token

    for row in rows:
        model, tokens, flops, hours = row[1].strip(), float(row[3]), float(row[4]), float(row[5].replace(",", ""))
        per_token = train_flops_per_token(get_model_config(model), 4096)
        assert flops == pytest.approx(tokens * per_token, rel=1e-2)  # both printed to 3 digits
        assert hours == pytest.approx(flops / (0.5 * 989e12) / 3600, rel=1e-2, abs=1)
    assert cli.main(["--preset", "paper", "--dry-run", "--gpu", "abacus"]) == 2


def cut_down_tiny(data: Path) -> presets.GridPreset:
    """`tiny`'s structure (every optimizer's Phase I at tiny 1-8× and tiny2 1×, Phase II at tiny2 2-8×, declared
    repeats) with two optimizers, two learning rates each and 1/100 of its tokens per parameter (as `smoke`), on a
    small text corpus that tiny2 at 8× passes over more than once."""
    tiny = get_preset("tiny")
    sweeps = {name: OptimizerSweep({**tiny.optimizers[name].baseline, "batch_size": 4, "warmup": 2},
                                   {"lr": tiny.optimizers[name].grid["lr"][1:3]})
              for name in ("adamw", "lion")}
    return dataclasses.replace(tiny, name="tiny-cut", optimizers=sweeps, seq_len=32, tokens_per_param=0.005,
                               eval_every=100, eval_tokens=512, data=str(data))


@pytest.mark.slow
def test_cut_down_tiny_finishes_with_no_crashed_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTOPTIM_CACHE", str(tmp_path / "cache"))
    preset = cut_down_tiny(small_text(tmp_path / "text", 80_000))
    monkeypatch.setitem(presets.PRESETS, preset.name, preset)
    out = tmp_path / "grid"
    args = ["--preset", preset.name, "--out", str(out), "--device", "cpu"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "Phase 2 tiny2 8×" in err and "passes (repeats allowed)" in err  # the declared repeats, announced
    with ResultsStore(out / "grid.sqlite") as store:
        counts, runs = store.counts(), store.runs()
    assert counts == {"done": len(runs)} and len(runs) >= 2 * 8  # every regime ran; none crashed or is left
    regimes = {(run.spec.optimizer, run.spec.model, run.spec.chinchilla) for run in runs}
    assert regimes == {(o, m, r) for o in ("adamw", "lion") for m, r in
                       [("tiny", 1.0), ("tiny", 2.0), ("tiny", 4.0), ("tiny", 8.0), ("tiny2", 1.0), ("tiny2", 2.0),
                        ("tiny2", 4.0), ("tiny2", 8.0)]}
    shas = set()
    for run in runs:
        result = json.loads((Path(run.out_dir) / "result.json").read_text())
        assert not result["diverged"] and math.isfinite(result["final_val_loss"])
        assert not (Path(run.out_dir) / "checkpoints").exists()
        shas.add(result["eval_sha256"])
    assert len(shas) == 1  # every run scored on the same text
    report = (out / "report.md").read_text()
    assert "## Speedup over adamw" in report
    # Other micro-batches are settings, not new runs: the same grid again trains nothing.
    assert cli.main(args + ["--micro-batch", "2"]) == 0
    with ResultsStore(out / "grid.sqlite") as store:
        assert store.counts() == counts
