"""The benchmark tooling: the regression compare (bench/compare.py), the shape sets against the spec's table
(bench/shapes.py), the work counts (bench/work.py) and `fastoptim bench`'s table (fastoptim/benchcli.py)."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives in the checkout, beside fastoptim/

from fastoptim.bench import compare  # noqa: E402
from fastoptim.bench.shapes import SHAPE_SETS, SPEC_MODELS, shape_sets  # noqa: E402
from fastoptim.bench.work import newton_schulz_flops, tensor_bytes  # noqa: E402
from fastoptim.bench import cli as benchcli  # noqa: E402

DEVICE = "cpu-test-model-2cores"


def _run(ratios: dict[str, float], device=DEVICE, times=None) -> dict:
    """A pytest-benchmark JSON run as bench/conftest.py writes it (only the fields the tools read)."""
    benchmarks = []
    for name, ratio in ratios.items():
        group, backend = name.split("::")
        seconds = (times or {}).get(name, ratio * 1e-3)
        benchmarks.append({
            "fullname": name, "name": name, "group": group,
            "extra_info": {"ratio": ratio, "backend": backend, "time_s": seconds, "floor_pct": 100 / ratio,
                           "bound": "memory", "achieved_rate": 1e9 / ratio, "reference_s": seconds / ratio},
        })
    return {"machine_info": {"fastoptim": {"device": device, "clock": "process_time", "torch": "x"}},
            "benchmarks": benchmarks}


def _write(path: Path, run: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))
    return path


# ---- compare ---------------------------------------------------------------------------------------------------

def test_a_ratio_grown_past_the_threshold_is_a_regression():
    base = {"g::a": 2.0, "g::b": 1.0, "g::c": 4.0}
    current = {"g::a": 2.0 * 1.26, "g::b": 1.0 * 1.24, "g::c": 4.0 * 0.7}
    cmp = compare.compare_ratios(base, current, threshold=0.25)
    assert [c.name for c in cmp.regressions] == ["g::a"]
    assert cmp.regressions[0].change == pytest.approx(0.26)
    assert [c.name for c in cmp.steady] == ["g::b"]
    assert [c.name for c in cmp.improvements] == ["g::c"]
    assert not cmp.ok


def test_noise_within_the_threshold_is_not_a_regression():
    gen = torch.Generator().manual_seed(0)
    base = {f"g::{i}": float(r) for i, r in enumerate(torch.rand(50, generator=gen) * 3 + 0.5)}
    jitter = torch.empty(50).uniform_(-0.2, 0.2, generator=gen)
    current = {name: ratio * (1 + float(j)) for (name, ratio), j in zip(base.items(), jitter)}
    cmp = compare.compare_ratios(base, current, threshold=0.25)
    assert cmp.ok and len(cmp.steady) == 50


def test_benchmarks_on_one_side_only_are_listed_not_compared():
    cmp = compare.compare_ratios({"g::old": 1.0, "g::both": 1.0}, {"g::new": 9.0, "g::both": 1.0}, threshold=0.25)
    assert cmp.new == ["g::new"] and cmp.gone == ["g::old"] and cmp.ok


@pytest.mark.parametrize("threshold", [0.0, -0.1])
def test_threshold_must_be_positive(threshold):
    with pytest.raises(ValueError, match="threshold"):
        compare.compare_ratios({}, {}, threshold)


def test_check_fails_on_a_regression_against_the_device_baseline(tmp_path, capsys):
    _write(tmp_path / "results" / DEVICE / "baseline.json", _run({"g::a": 1.0, "g::b": 2.0}))
    run = _write(tmp_path / "run.json", _run({"g::a": 1.0, "g::b": 3.0}))
    assert compare.check(run, 0.25, results_dir=tmp_path / "results") == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "g::b" in out and "FAIL: 1 regressed" in out


def test_check_passes_when_ratios_hold(tmp_path, capsys):
    _write(tmp_path / "results" / DEVICE / "baseline.json", _run({"g::a": 1.0, "g::b": 2.0}))
    run = _write(tmp_path / "run.json", _run({"g::a": 1.1, "g::b": 1.9}))
    assert compare.check(run, 0.25, results_dir=tmp_path / "results") == 0
    assert "OK: 0 regressed" in capsys.readouterr().out


def test_a_regression_that_does_not_repeat_on_rerun_passes(tmp_path):
    _write(tmp_path / "results" / DEVICE / "baseline.json", _run({"g::a": 1.0, "g::b": 2.0}))
    run = _write(tmp_path / "run.json", _run({"g::a": 1.0, "g::b": 3.0}))
    asked = []

    def rerun(names):
        asked.extend(names)
        return {"g::b": 2.1}

    assert compare.check(run, 0.25, results_dir=tmp_path / "results", rerun=rerun) == 0
    assert asked == ["g::b"]
    assert compare.check(run, 0.25, results_dir=tmp_path / "results", rerun=lambda names: {"g::b": 2.9}) == 1


def test_a_partial_run_merges_into_the_baseline():
    old = _run({"adamw::fastoptim": 1.0, "adamw::torch": 1.2, "soap::fastoptim": 3.0})
    new = _run({"soap::fastoptim": 2.5, "kron::fastoptim": 4.0}, device="cuda-new")
    merged = compare.merge_runs(old, new)
    assert compare.ratios(merged) == {"adamw::fastoptim": 1.0, "adamw::torch": 1.2, "soap::fastoptim": 2.5,
                                      "kron::fastoptim": 4.0}
    assert compare.run_device(merged) == "cuda-new"


def test_missing_baseline_is_reported_clearly(tmp_path, capsys):
    _write(tmp_path / "results" / "nvidia-h100-80gb-hbm3" / "baseline.json", _run({"g::a": 1.0}))
    run = _write(tmp_path / "run.json", _run({"g::a": 1.0}))
    assert compare.check(run, 0.25, results_dir=tmp_path / "results") == 2
    err = capsys.readouterr().err
    assert f"no baseline for device '{DEVICE}'" in err
    assert str(tmp_path / "results" / DEVICE / "baseline.json") in err
    assert "nvidia-h100-80gb-hbm3" in err and "--save" in err


def test_a_run_from_elsewhere_is_refused_with_its_reason(tmp_path):
    run = _run({"g::a": 1.0})
    del run["machine_info"]["fastoptim"]
    with pytest.raises(ValueError, match="machine_info.fastoptim.device"):
        compare.run_device(run)


# ---- shape sets ------------------------------------------------------------------------------------------------

# benchmark-spec §2, Table 2: non-embedding parameters N.
SPEC_N = {"130m": 134_217_728, "300m": 301_989_888, "520m": 536_870_912, "1.2b": 1_207_959_552}


@pytest.mark.parametrize("name", ["130m", "520m", "1.2b"])
def test_model_sets_match_the_spec_table(name):
    shapes = SHAPE_SETS[name]
    d = SPEC_MODELS[name].hidden
    assert shapes.non_embedding_numel == SPEC_N[name] == 512 * d * d
    # Embedding and head 128256×d each; two RMSNorms per layer and the final norm, d each.
    assert shapes.numel == SPEC_N[name] + 2 * 128_256 * d + (2 * 32 + 1) * d
    assert len(shapes.of_kind("matrix")) == 32 * 7


@pytest.mark.parametrize("name", ["cpu-tiny", "cpu-small"])
def test_cpu_model_sets_keep_the_structure(name):
    dims = SHAPE_SETS[name].dims
    d, ff, layers = dims.hidden, dims.intermediate, dims.layers
    assert SHAPE_SETS[name].non_embedding_numel == layers * (3 * d * ff + 4 * d * d)
    assert SHAPE_SETS[name].numel < 20_000_000  # seconds on a 2-core CPU


def test_cpu_never_gets_gpu_sized_sets():
    for kind in ("model", "matrix"):
        for names in (None, ("130m", "1.2b", "4096x4096")):
            sets = shape_sets(kind, "cpu", names)
            assert sets and all("cpu" in s.devices for s in sets)
            assert all(s.numel < 20_000_000 for s in sets)
    assert [s.name for s in shape_sets("model", "cuda", ("130m", "1.2b"))] == ["130m", "1.2b"]
    assert len(shape_sets("model", "cpu", quick=True)) == 1
    with pytest.raises(ValueError, match="unknown set"):
        shape_sets("model", "cuda", ("7b",))


def test_param_model_names_route_as_the_shape_kinds():
    from fastoptim.bench.tensors import param_model
    from fastoptim.optim.routing import named_kinds

    shapes = SHAPE_SETS["cpu-tiny"]
    model = param_model(shapes, "cpu")
    routed = {name: kind for name, _, kind in named_kinds(model)}
    assert routed == {p.name: p.kind for p in shapes.params}
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


# ---- work counts -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("rows", "cols"), [(3, 5), (5, 3), (4, 4)])
def test_newton_schulz_flops_count_each_product(rows, cols):
    m, n = min(rows, cols), max(rows, cols)
    per_step = 2 * m * n * m + 2 * m * m * m + 2 * m * m * n  # X·Xᵀ, A·A, B·X on the wide orientation
    assert newton_schulz_flops(rows, cols, steps=5) == 5 * per_step
    symmetric = m * (m + 1) * n + m * (m + 1) * m + 2 * m * m * n  # upper triangles of the two symmetric products
    assert newton_schulz_flops(rows, cols, steps=5, symmetric=True) == 5 * symmetric


def test_tensor_bytes_sums_every_list():
    a = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.bfloat16)]
    assert tensor_bytes(a, a[:1]) == (12 * 4 + 5 * 2) + 12 * 4


# ---- fastoptim bench's table -----------------------------------------------------------------------------------

def test_table_shows_our_speedup_over_each_peer():
    run = _run({"step-adamw[130m]::fastoptim": 1.0, "step-adamw[130m]::torch-fused": 1.5,
                "step-adamw[130m]::torch-foreach": 3.0},
               times={"step-adamw[130m]::fastoptim": 2e-3, "step-adamw[130m]::torch-fused": 3e-3,
                      "step-adamw[130m]::torch-foreach": 6e-3})
    table = benchcli.format_table(run, is_ours=lambda backend: backend == "fastoptim")
    ours = next(line for line in table.splitlines() if line.startswith("fastoptim "))
    assert "torch-fused 1.50x" in ours and "torch-foreach 3.00x" in ours
    assert re.search(r"2\.000 ms\s+1\.000\s+100\.0%", ours)
    peer = next(line for line in table.splitlines() if line.startswith("torch-fused"))
    assert "x" not in peer.split("%", 1)[1].replace("GB/s", "")


def test_device_slug_names_the_cpu_and_its_cores():
    from fastoptim.bench.timing import device_slug

    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d+cores", device_slug(torch.device("cpu")))
