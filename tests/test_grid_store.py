"""Results store and driver: claims between workers, stale claims, and a grid killed mid-way that resumes without
repeating or losing a run."""

import random
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from fastoptim.grid.driver import run_grid
from fastoptim.grid.executors import SequentialExecutor
from fastoptim.grid.presets import GridPreset, OptimizerSweep, regimes
from fastoptim.grid.runs import RunOutcome, RunSpec
from fastoptim.grid.store import ResultsStore
from fastoptim.grid.synthetic import SyntheticObjective

SIZES = {"s": 1_000_000, "m": 4_000_000}
OBJECTIVE = SyntheticObjective(SIZES, optima={"weight_decay": 0.1}, curvature=0.05, offsets={"muon": -0.05})
LRS = tuple(1e-3 * 2 ** i for i in range(6))
PRESET = GridPreset(
    name="test",
    optimizers={
        "adamw": OptimizerSweep({"lr": 1e-3, "weight_decay": 0.0, "batch_size": 8, "warmup": 1},
                                {"lr": LRS, "weight_decay": (0.0, 0.1, 0.2)}),
        "muon": OptimizerSweep({"lr": 3.2e-2, "weight_decay": 0.2, "batch_size": 8, "warmup": 0},
                               {"lr": LRS, "weight_decay": (0.0, 0.1, 0.2)}),
    },
    phase1=regimes(["s"], [1, 2, 4]) + regimes(["m"], [1]),
    phase2=regimes(["m"], [2, 4]),
    phase2_always=("lr",),
    seq_len=16,
    tokens_per_param=0.01,
    eval_every=None,
)


def spec(lr=1e-3, model="s"):
    return RunSpec("adamw", model, 1.0, {"lr": lr, "batch_size": 8}, seq_len=16, steps=10)


class Killed(BaseException):
    """What a SIGINT/SIGTERM does to the grid: not an ordinary run failure."""


class Recorder:
    """The synthetic objective as a run function, remembering every run it trained; optionally killed at call k."""

    def __init__(self, kill_at=None):
        self.calls = []
        self.kill_at = kill_at

    def __call__(self, spec, out_dir):
        if self.kill_at is not None and len(self.calls) + 1 == self.kill_at:
            raise Killed()
        self.calls.append(spec.run_id)
        return OBJECTIVE(spec)


def grid(store_path, runner, idle_s=0.01):
    with ResultsStore(store_path) as store:
        return run_grid(PRESET, store, SequentialExecutor(runner), OBJECTIVE.param_count, store_path.parent / "runs",
                        idle_s=idle_s)


def optima(bench):
    return {key: search.best() for key, search in bench.searches.items()}


def test_claim_is_exclusive_between_workers_and_finished_runs_are_never_reclaimed(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultsStore(path) as a, ResultsStore(path) as b:
        run = spec()
        assert a.claim(run, "out") is True
        assert b.claim(run, "out") is False  # a live worker holds it
        assert b.result(run.run_id) is None
        a.finish(run, RunOutcome(3.25, False, 10, 1.5))
        assert b.result(run.run_id) == RunOutcome(3.25, False, 10, 1.5)
        assert a.claim(run, "out") is False and b.claim(run, "out") is False

        crashed = spec(lr=2e-3)
        assert b.claim(crashed, "out")
        b.fail(crashed, "RuntimeError: out of memory")
        assert a.result(crashed.run_id) is None
        assert a.claim(crashed, "out") is True  # a crash is retried by the next claim

        released = spec(lr=4e-3)
        assert a.claim(released, "out")
        b.release(released)  # only the owner can release
        assert not b.claim(released, "out")
        a.release(released)
        assert b.claim(released, "out")
        assert {r.spec.run_id: r.status for r in a.runs()} == {
            run.run_id: "done", crashed.run_id: "running", released.run_id: "running"}


def test_stale_claims_are_taken_over(tmp_path):
    path = tmp_path / "s.sqlite"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with ResultsStore(path) as a, ResultsStore(path, lease_s=600) as b:
        by_dead_process, by_silent_host = spec(lr=1e-3), spec(lr=2e-3)
        assert a.claim(by_dead_process, "out") and a.claim(by_silent_host, "out")
        db = sqlite3.connect(path)
        with db:
            db.execute("UPDATE runs SET pid=? WHERE run_id=?", (dead.pid, by_dead_process.run_id))
            db.execute("UPDATE runs SET host='elsewhere', heartbeat=? WHERE run_id=?",
                       (time.time() - 601, by_silent_host.run_id))
        db.close()
        assert b.claim(by_dead_process, "out") is True   # same host, process gone
        assert b.claim(by_silent_host, "out") is True    # other host, heartbeat older than the lease


def test_heartbeat_keeps_claims_fresh(tmp_path):
    with ResultsStore(tmp_path / "s.sqlite", heartbeat_s=0.02) as store:
        run = spec()
        store.claim(run, "out")
        read = lambda: store._db.execute("SELECT heartbeat FROM runs").fetchone()[0]
        first = read()
        store.start_heartbeat()
        time.sleep(0.2)
        store.stop_heartbeat()
        assert read() > first


def test_concurrent_workers_claim_each_run_exactly_once(tmp_path):
    path = tmp_path / "s.sqlite"
    runs = [spec(lr=1e-4 * (i + 1)) for i in range(30)]
    ResultsStore(path).close()  # create the schema once
    winners = {run.run_id: [] for run in runs}

    def worker(seed):
        order = runs[:]
        random.Random(seed).shuffle(order)
        with ResultsStore(path) as store:
            for run in order:
                if store.claim(run, "out"):
                    winners[run.run_id].append(store.worker)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(owners) == 1 for owners in winners.values())


def test_store_refuses_another_presets_grid(tmp_path):
    with ResultsStore(tmp_path / "s.sqlite") as store:
        store.bind_preset(PRESET.to_json())
        store.bind_preset(PRESET.to_json())
        other = GridPreset(**{**PRESET.__dict__, "seq_len": 32})
        with pytest.raises(ValueError, match="different preset"):
            store.bind_preset(other.to_json())


def test_uninterrupted_grid_runs_every_config_once(tmp_path):
    runner = Recorder()
    bench = grid(tmp_path / "s.sqlite", runner)
    assert bench.done
    assert len(runner.calls) == len(set(runner.calls)) == len(bench.outcomes)
    with ResultsStore(tmp_path / "s.sqlite") as store:
        assert store.counts() == {"done": len(runner.calls)}
    # A second session over a finished store trains nothing and reaches the same answers.
    again = Recorder()
    assert optima(grid(tmp_path / "s.sqlite", again)) == optima(bench)
    assert again.calls == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted grid: which runs it trains, and the optimum of every search."""
    recorder = Recorder()
    bench = grid(tmp_path_factory.mktemp("reference") / "s.sqlite", recorder)
    return recorder.calls, optima(bench)


@pytest.mark.parametrize("kill_at", [1, 7, 23])
def test_killed_grid_resumes_without_repeats_or_losses(tmp_path, kill_at, reference):
    reference_calls, expected = reference
    assert kill_at < len(reference_calls)

    path = tmp_path / "killed.sqlite"
    first = Recorder(kill_at=kill_at)
    with pytest.raises(Killed):
        grid(path, first)
    assert len(first.calls) == kill_at - 1
    with ResultsStore(path) as store:
        assert store.counts().get("running", 0) == 0  # the interrupted claim was given back
        assert store.counts().get("done", 0) == kill_at - 1

    second = Recorder()
    resumed = grid(path, second)
    assert not set(first.calls) & set(second.calls)          # nothing finished was run again
    assert sorted(first.calls + second.calls) == sorted(reference_calls)  # nothing was lost
    assert optima(resumed) == expected


def test_crashed_run_is_recorded_then_retried_next_session(tmp_path):
    path = tmp_path / "s.sqlite"
    crash_lr = LRS[3]

    def flaky(spec, out_dir):
        if spec.hparams["lr"] == crash_lr and spec.optimizer == "adamw":
            raise RuntimeError("CUDA out of memory")
        return OBJECTIVE(spec)

    bench = grid(path, flaky)
    assert bench.done
    with ResultsStore(path) as store:
        errors = [run for run in store.runs() if run.status == "error"]
        assert errors and all("CUDA out of memory" in run.error for run in errors)
    retried = Recorder()
    grid(path, retried)
    assert {r.spec.run_id for r in errors} <= set(retried.calls)


def test_two_workers_share_one_store_without_duplicates(tmp_path, reference):
    reference_calls, expected = reference
    path = tmp_path / "shared.sqlite"
    ResultsStore(path).close()
    workers = [Recorder(), Recorder()]
    results = [None, None]

    def slow(recorder):
        def run(spec, out_dir):
            time.sleep(0.002)
            return recorder(spec, out_dir)
        return run

    def work(i):
        results[i] = grid(path, slow(workers[i]), idle_s=0.005)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    calls = workers[0].calls + workers[1].calls
    assert sorted(calls) == sorted(reference_calls)
    assert optima(results[0]) == optima(results[1]) == expected
