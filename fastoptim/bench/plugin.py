"""The pytest plugin of fastoptim's benchmark suite (pytest-benchmark): its options, shape-set parametrisation and the
`measure` fixture. The suites (bench/bench_*.py) load it through bench/conftest.py. Run them explicitly:
`pytest bench` (tests/ is the default path), or `fastoptim bench` for the table and `fastoptim bench --compare`
(python -m fastoptim.bench.compare) for the regression check.

How to write a benchmark (a file bench/bench_<family>.py; functions test_*):

    import pytest
    from fastoptim.bench.backends import require_op, require_peer
    from fastoptim.bench.work import tensor_bytes

    @pytest.mark.parametrize("backend", ["fastoptim", "fastoptim-torch", "torch-foreach"])
    def test_lion_step(measure, model_set, bench_device, backend):
        params = make_params(model_set, bench_device)            # fastoptim.bench.tensors: one tensor per shape
        ...build `step` for this backend; require_op("lion_") / require_peer("heavyball") skip cleanly...
        measure(step, family="lion", shapes=model_set, backend=backend,
                bound="memory", work=tensor_bytes(reads..., writes...))

- `model_set` / `matrix_set`: parametrise over the shape sets (fastoptim/bench/shapes.py) that suit the device: the spec's
  130M/520M/1.2B lists and big matrices on CUDA, small sets on CPU. `@pytest.mark.shape_sets("130m", "1.2b")`
  narrows the GPU sets (CPU keeps its small ones).
- `bench_device`: the torch.device under test (`--bench-device cpu|cuda`; default cuda when available).
- `measure(fn, family, shapes, backend, bound, work, setup=None)`: warms `fn` up, picks the rounds that fit
  --benchmark-max-time seconds of wall time (at least --benchmark-min-rounds), times it with the device's clock (fastoptim/bench/timing.py), measures the
  in-run reference (bound="memory": a copy of `work` bytes read+written; bound="matrix": a matmul of `work` FLOPs)
  and records in `benchmark.extra_info`:
      family, shapes, backend, device, bound, work, time_s (fastest round), reference_s, reference_rate,
      ratio (= time_s / reference_s: what the regression compare compares), floor_pct (= 100 / ratio: % of the in-run
      copy bandwidth or matmul rate), achieved_rate (bytes/s or FLOP/s), clock
  `setup` (optional) runs untimed before every call, e.g. to restore state. Put more facts in extra_info yourself
  after calling `measure` (e.g. `benchmark.extra_info["symmetric_floor_pct"] = ...`).
- `family` names the op family or "step-<optimizer>"; the group (table section) is "<family>[<shape set>]", so all
  backends of one family and shape set sit side by side, and `fastoptim bench` shows our speedup over each peer.
- Backend names are in fastoptim/bench/backends.py: ours are "fastoptim" (the op / the default fused=None path) and
  "fastoptim-torch" (the pure-torch path, fused=False);
  peers "torch-foreach", "torch-fused", "torch", "plain-torch", "heavyball", "pytorch-optimizer", "kron-torch",
  "emerging-optimizers".
"""

import math
import time

import pytest
import torch

from fastoptim.bench.shapes import shape_sets
from fastoptim.bench.timing import REFERENCES, clock_for, clock_name, device_slug

MAX_ROUNDS = 1000
WARMUP_ROUNDS = {"cpu": 2, "cuda": 3}
REFERENCE_SHARE = 4  # each of the two reference measurements gets 1/4 of the benchmark's rounds


def pytest_addoption(parser):
    group = parser.getgroup("fastoptim-bench")
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device to benchmark (auto: cuda when available)")
    group.addoption("--bench-threads", type=int, default=1,
                    help="torch intra-op threads on CPU (1: timed with the process clock; >1: wall clock)")
    group.addoption("--bench-quick", action="store_true",
                    help="the smallest shape set of each kind only (CI's subset)")


def pytest_configure(config):
    config.addinivalue_line("markers", "shape_sets(*names): the GPU shape sets this benchmark runs on")


def pytest_collect_file(file_path, parent):
    # bench_*.py files are benchmark modules (tests/ keeps the test_*.py convention).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device(config) -> torch.device:
    choice = config.getoption("bench_device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA GPU is available here")
    return torch.device(choice)


def pytest_generate_tests(metafunc):
    device = _device(metafunc.config).type
    marker = metafunc.definition.get_closest_marker("shape_sets")
    names = marker.args if marker else None
    quick = metafunc.config.getoption("bench_quick")
    for fixture, kind in (("model_set", "model"), ("matrix_set", "matrix")):
        if fixture in metafunc.fixturenames:
            sets = shape_sets(kind, device, names, quick)
            metafunc.parametrize(fixture, sets, ids=[s.name for s in sets])


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    device = _device(pytestconfig)
    if device.type == "cpu":
        torch.set_num_threads(pytestconfig.getoption("bench_threads"))
    return device


def pytest_benchmark_update_machine_info(config, machine_info):
    device = _device(config)
    threads = config.getoption("bench_threads")
    machine_info["fastoptim"] = {
        "device": device_slug(device),
        "device_type": device.type,
        "threads": threads if device.type == "cpu" else None,
        "clock": clock_name(device, threads),
        "torch": torch.__version__,
    }


@pytest.fixture
def measure(benchmark, bench_device, pytestconfig):
    threads = pytestconfig.getoption("bench_threads")
    clock = clock_for(bench_device, threads)
    max_time = float(pytestconfig.getoption("benchmark_max_time"))
    min_rounds = int(pytestconfig.getoption("benchmark_min_rounds"))
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("this pytest-benchmark keeps its timer elsewhere; fastoptim/bench/plugin.py needs updating")
    benchmark._timer = clock  # the device's clock for this benchmark's rounds (pytest-benchmark has one global)

    def run(fn, *, family, shapes, backend, bound, work, setup=None):
        if bound not in REFERENCES:
            raise ValueError(f"measure: bound must be one of {sorted(REFERENCES)}, got {bound!r}")
        if not work > 0:
            raise ValueError(f"measure: work must be positive (bytes or FLOPs), got {work!r}")

        # Warm-up, and the rounds that fit --benchmark-max-time of wall time (a loaded machine runs fewer rounds
        # rather than taking longer: the duration of the suite stays bounded).
        for _ in range(WARMUP_ROUNDS[bench_device.type]):
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            if bench_device.type == "cuda":
                torch.cuda.synchronize(bench_device)
            wall = time.perf_counter() - start
        rounds = max(min_rounds, min(MAX_ROUNDS, math.ceil(max_time / max(wall, 1e-9))))
        reference_rounds = max(min_rounds, rounds // REFERENCE_SHARE)
        reference = REFERENCES[bound](work, bench_device, clock, reference_rounds)

        benchmark.group = f"{family}[{shapes.name}]"
        untimed = None if setup is None else lambda: setup() and None  # pedantic would take a result as args
        benchmark.pedantic(fn, setup=untimed, rounds=rounds, warmup_rounds=0, iterations=1)

        # Reference again after, so a load change during the benchmark cannot masquerade as a change of speed.
        after = REFERENCES[bound](work, bench_device, clock, reference_rounds)
        reference = min(reference, after, key=lambda r: r.seconds)
        seconds = benchmark.stats.stats.min
        benchmark.extra_info.update(
            family=family,
            shapes=shapes.name,
            backend=backend,
            device=device_slug(bench_device),
            bound=bound,
            work=work,
            time_s=seconds,
            reference_s=reference.seconds,
            reference_rate=reference.rate,
            ratio=seconds / reference.seconds,
            floor_pct=100.0 * reference.seconds / seconds,
            achieved_rate=work / seconds,
            clock=clock_name(bench_device, threads),
        )

    return run
