"""Presets: the paper grid as spec §2/§4 define it, the scaled-down presets keep its structure, bad presets fail."""

import dataclasses
import math

import pytest

from fastoptim.grid.phases import Benchmark
from fastoptim.grid.presets import PRESETS, GridPreset, OptimizerSweep, Regime, get_preset, regimes
from fastoptim.grid.synthetic import dry_run

ALL = ["adamw", "nadamw", "mars", "cautious", "lion", "mini", "muon", "scion", "kron", "soap", "sophia"]
# spec §2: N = 512·d², the budget's N; tiny sizes: any small N will do for structure checks.
PARAMS = {"130m": 512 * 512 ** 2, "300m": 512 * 768 ** 2, "520m": 512 * 1024 ** 2, "1.2b": 512 * 1536 ** 2,
          "tiny": 131_072, "tiny2": 1_048_576}


def test_paper_grid_regimes_follow_spec_table_2():
    paper = get_preset("paper")
    assert list(paper.optimizers) == ALL
    assert set(paper.phase1) == {Regime("130m", r) for r in (1, 2, 4, 8)} | {Regime("300m", 1), Regime("520m", 1)}
    assert set(paper.phase2) == {Regime(m, r) for m in ("300m", "520m") for r in (2, 4, 8)}
    assert set(paper.phase3) == ({Regime("1.2b", r) for r in (1, 2, 4, 8)} | {Regime("130m", 16), Regime("300m", 16)})
    assert set(paper.phase3_optimizers) == {"adamw", "nadamw", "muon", "soap"}
    assert paper.seq_len == 4096 and paper.tokens_per_param == 20
    assert (paper.delta1, paper.delta2) == (3e-3, 6.4e-3)
    assert not paper.optimizers["sophia"].phase2  # the study ran Sophia at Phase I regimes only


def test_paper_grids_and_baselines_follow_spec():
    sweeps = get_preset("paper").optimizers
    adamw = sweeps["adamw"]
    assert adamw.grid == {"lr": (4e-3, 8e-3, 1.6e-2, 3.2e-2), "weight_decay": (0.0, 0.1, 0.2),
                          "warmup": (500, 1000, 2000, 4000), "beta1": (0.9, 0.95, 0.98), "beta2": (0.9, 0.95, 0.98),
                          "eps": (1e-25, 1e-20, 1e-15, 1e-10), "max_grad_norm": (0, 1, 2),
                          "batch_size": (128, 256, 512, 1024)}
    # spec §1.1: AdamW's best at 130M 1×.
    assert {k: adamw.baseline[k] for k in ("lr", "weight_decay", "warmup", "beta1", "beta2", "eps", "max_grad_norm",
                                           "batch_size", "min_lr_ratio")} == {
        "lr": 0.008, "weight_decay": 0.1, "warmup": 2000, "beta1": 0.9, "beta2": 0.98, "eps": 1e-20,
        "max_grad_norm": 1, "batch_size": 128, "min_lr_ratio": 0}
    assert sweeps["lion"].grid["weight_decay"] == tuple(round(0.1 * i, 1) for i in range(11))
    assert sweeps["nadamw"].grid["beta1"] == (0.8, 0.9, 0.95, 0.98)
    assert sweeps["cautious"].grid == sweeps["nadamw"].grid and sweeps["mini"].grid == adamw.grid
    muon = sweeps["muon"]
    assert muon.baseline["ns_steps"] == 10 and sweeps["scion"].baseline["ns_steps"] == 10  # spec §1.7/§1.8
    assert {k: muon.baseline[k] for k in ("lr", "adam_lr_ratio", "momentum", "beta1", "decay", "warmup")} == {
        "lr": 0.016, "adam_lr_ratio": 0.2, "momentum": 0.95, "beta1": 0.8, "decay": 0.8, "warmup": 0}
    assert muon.grid["lr"] == (8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1)
    for name, sweep in sweeps.items():
        schedule = "linear" if name in ("muon", "scion") else "cosine"
        assert sweep.baseline["lr_schedule"] == schedule, name
        assert {"lr", "batch_size", "warmup"} <= set(sweep.baseline), name
    assert sweeps["kron"].grid["normalize_grads"] == (False, True)
    assert sweeps["soap"].grid["precondition_frequency"] == (1, 5, 10)
    assert sweeps["sophia"].grid["gamma"] == (0.00625, 0.0125, 0.025, 0.05)


def test_scaled_down_presets_keep_the_structure():
    tiny, smoke = get_preset("tiny"), get_preset("smoke")
    assert list(tiny.optimizers) == ALL
    assert {r.ratio for r in tiny.phase1 if r.model == "tiny"} == {1, 2, 4, 8}
    assert len(tiny.sizes) >= 2 and len(smoke.sizes) >= 2
    assert all(set(s.grid) == {"lr", "weight_decay"} for s in tiny.optimizers.values())
    assert {"adamw", "muon"} <= set(smoke.optimizers) and len(smoke.optimizers) <= 3
    assert all(list(s.grid) == ["lr"] and len(s.grid["lr"]) <= 3 for s in smoke.optimizers.values())
    assert {r.ratio for r in smoke.phase1 + smoke.phase2} == {1, 2, 4}  # the 3 ratios a loss law needs
    for preset in (tiny, smoke):  # the optimizer-specific settings come from the paper's baselines
        assert preset.optimizers["adamw"].baseline["beta2"] == 0.98
        assert preset.optimizers["muon"].baseline["lr_schedule"] == "linear"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json_and_run_on_a_synthetic_loss(name):
    preset = get_preset(name)
    assert GridPreset.from_json(preset.to_json()) == preset
    bench = dry_run(preset, PARAMS.__getitem__)
    assert bench.done
    ran = {(spec.optimizer, spec.model, spec.chinchilla) for spec, _ in bench.outcomes.values()}
    for optimizer, sweep in preset.optimizers.items():
        assert {(optimizer, r.model, r.ratio) for r in preset.phase1} <= ran
        if sweep.phase2:
            assert {(optimizer, r.model, r.ratio) for r in preset.phase2} <= ran
    for optimizer in preset.phase3_optimizers:
        assert {(optimizer, r.model, r.ratio) for r in preset.phase3} <= ran
    for spec, _ in bench.outcomes.values():
        assert spec.hparams.get("warmup", 0) <= spec.steps  # the spec's skip rule held
        if name == "paper" and spec.optimizer in ("muon", "scion"):
            assert spec.hparams["ns_steps"] == 10


def test_paper_steps_match_spec_examples():
    bench = Benchmark(get_preset("paper"), PARAMS.__getitem__)
    # spec §2: 130M at 1× with BSZ 128 is exactly 5,120 steps; 1.2B at 1× with BSZ 256 is 23,040 steps.
    assert bench.steps(Regime("130m", 1.0), {"batch_size": 128}) == 5120
    assert bench.steps(Regime("1.2b", 1.0), {"batch_size": 256}) == 23040


def test_bad_presets_fail_clearly():
    sweep = OptimizerSweep({"lr": 1e-3}, {"lr": (1e-3,)})
    with pytest.raises(ValueError, match=r"unknown optimizer\(s\) \['adam'\]"):
        GridPreset("bad", {"adam": sweep}, regimes(["tiny"], [1]))
    with pytest.raises(ValueError, match="more than one phase"):
        GridPreset("bad", {"adamw": sweep}, regimes(["tiny"], [1]), phase2=regimes(["tiny"], [1]))
    with pytest.raises(ValueError, match=r"grid keys \['beta1'\] have no baseline"):
        OptimizerSweep({"lr": 1e-3}, {"beta1": (0.9,)})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")
    assert math.isclose(get_preset("smoke").delta1, 3e-3)


def test_cpu_preset_is_the_papers_structure_at_cpu_scale():
    from fastoptim.models import get_model_config, non_embedding_params

    cpu = get_preset("cpu")
    assert non_embedding_params(get_model_config("tiny")) == PARAMS["tiny"]
    assert {"adamw", "nadamw", "lion", "muon", "soap"} <= set(cpu.optimizers)
    assert sorted({r.ratio for r in cpu.phase1 if r.model == "tiny"}) == [1, 2, 4, 8]  # the loss law keeps 1 dof
    assert all("lr" in s.grid and len(s.grid["lr"]) >= 3 for s in cpu.optimizers.values())
    assert cpu.extra_seeds == 2 and not cpu.pipeline_check
    model = get_model_config("tiny")
    embeddings = 2 * cpu.vocab_size * model.dim  # untied input embedding and output head
    assert embeddings <= PARAMS["tiny"]  # the non-embedding parameters are not dwarfed
    bench = Benchmark(cpu, PARAMS.__getitem__)
    assert bench.steps(Regime("tiny", 1.0), cpu.optimizers["adamw"].baseline) == 64


def test_extra_seeds_rerun_each_optimum_without_moving_the_search():
    cpu = get_preset("cpu")
    single = dry_run(dataclasses.replace(cpu, extra_seeds=0), PARAMS.__getitem__)
    seeded = dry_run(cpu, PARAMS.__getitem__)
    assert {k: s.best() for k, s in seeded.searches.items()} == {k: s.best() for k, s in single.searches.items()}
    optima = seeded.settled_optima()
    assert len(optima) == len(cpu.optimizers) * len(cpu.phase1)
    for optimum in optima:
        repeats = seeded.seed_specs(optimum)
        assert [spec.seed for spec in repeats] == [1, 2]
        assert all(spec.hparams == optimum.hparams and spec.run_id in seeded.outcomes for spec in repeats)
        assert len(seeded.seed_losses(optimum)) == 3
    assert len(seeded.outcomes) == len(single.outcomes) + 2 * len(optima)
