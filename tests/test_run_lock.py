"""One live trainer per run folder: the lock outlives a dead driver, dies with its trainer, and a second driver
does not start a run whose trainer is still alive."""

import signal
import subprocess
import sys
import time

import pytest

from fastoptim.grid.driver import run_grid
from fastoptim.grid.executors import SequentialExecutor
from fastoptim.grid.presets import GridPreset, OptimizerSweep, regimes
from fastoptim.grid.runs import RunOutcome
from fastoptim.grid.store import ResultsStore
from fastoptim.train.run_lock import run_folder_busy, run_folder_lock

# A trainer left behind by a dead driver: holds the folder's lock, says so, and trains on until it is told to stop.
ORPHAN = """
import sys, time
from fastoptim.train.run_lock import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
print("released at", time.time(), flush=True)
"""


def orphan(out_dir, seconds=60.0):
    process = subprocess.Popen([sys.executable, "-c", ORPHAN, str(out_dir), str(seconds)], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "holding"
    return process


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    assert not run_folder_busy(tmp_path / "run")
    process = orphan(tmp_path / "run")
    try:
        assert run_folder_busy(tmp_path / "run")
        with pytest.raises(RuntimeError, match=rf"being trained by another live process \(pid {process.pid} on "):
            with run_folder_lock(tmp_path / "run"):
                pass
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not run_folder_busy(tmp_path / "run")  # a killed trainer leaves no stale lock behind
    with run_folder_lock(tmp_path / "run"):
        assert run_folder_busy(tmp_path / "run")
    assert not run_folder_busy(tmp_path / "run")


def test_a_second_driver_waits_for_the_trainer_a_dead_driver_left(tmp_path):
    preset = GridPreset("lock", {"adamw": OptimizerSweep({"lr": 0.1, "batch_size": 8}, {})}, regimes(["tiny"], [1]),
                        seq_len=16, tokens_per_param=1.0)
    starts, folders = [], []

    def run_fn(spec, out_dir):
        starts.append(time.time())
        folders.append(out_dir)
        return RunOutcome(3.0, False, spec.steps)

    with ResultsStore(tmp_path / "first.sqlite") as store:
        run_grid(preset, store, SequentialExecutor(run_fn), lambda m: 1000, tmp_path / "runs")
    (out_dir,) = folders

    # The first driver is gone (a fresh store knows nothing of its claims); its trainer of that run lives on.
    process = orphan(out_dir, seconds=1.5)
    with ResultsStore(tmp_path / "second.sqlite") as store:
        bench = run_grid(preset, store, SequentialExecutor(run_fn), lambda m: 1000, tmp_path / "runs", idle_s=0.1)
    released = float(process.communicate()[0].split()[-1])
    assert bench.done and folders == [out_dir, out_dir]
    assert starts[1] >= released  # started only once the trainer left behind had let go of the folder
