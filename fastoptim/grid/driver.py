"""Drive a preset's phases to completion: answer what the store already knows, claim and run the rest.

Any number of drivers (one per machine, or one per Slurm allocation) may share a store: each replays the same phases,
claims the runs nobody has claimed, and reads the others' results from the store as they land. A claim whose driver
died goes stale and may be taken over, but a run is never started in a folder whose trainer is still alive
(fastoptim/train/run_lock.py).
"""

import time
from pathlib import Path

from fastoptim.train.run_lock import run_folder_busy

from .phases import Benchmark
from .progress import GridProgress
from .runs import CRASHED


def run_grid(preset, store, executor, param_count, runs_dir, progress: GridProgress | None = None,
             idle_s: float = 1.0) -> Benchmark:
    """Run the grid until every phase is finished; returns the Benchmark with every outcome recorded.

    A run that crashes is recorded as an error (retried by a later session) and loses in its search. An interrupt
    (KeyboardInterrupt, SystemExit, a kill) gives this worker's unfinished claims back, so a restart redoes only those
    and never a finished run.
    """
    bench = Benchmark(preset, param_count)
    store.bind_preset(preset.to_json())
    runs_dir = Path(runs_dir)
    in_flight = {}
    durations = []
    store.start_heartbeat()
    try:
        while True:
            pending = bench.pending()
            if _answer_from_store(bench, store, pending, in_flight):
                continue
            if not pending and not in_flight:
                break
            started = 0
            for spec in pending:
                if executor.slots <= 0:
                    break
                if spec.run_id in in_flight:
                    continue
                out_dir = str(runs_dir / spec.run_id)
                if store.claim(spec, out_dir):
                    if run_folder_busy(out_dir):
                        # A trainer whose driver died still writes there: let it finish; its result is read from
                        # the folder once it has ended and the run is claimed again.
                        store.release(spec)
                        continue
                    in_flight[spec.run_id] = spec
                    executor.start(spec, out_dir)
                    started += 1
            _show(progress, bench, pending, in_flight, durations, executor, store)
            finished = executor.poll(timeout=0.0 if started else idle_s)
            for spec, outcome in finished:
                del in_flight[spec.run_id]
                if isinstance(outcome, Exception):
                    store.fail(spec, f"{type(outcome).__name__}: {outcome}")
                    bench.record(spec, CRASHED)
                else:
                    store.finish(spec, outcome)
                    bench.record(spec, outcome)
                    if outcome.seconds is not None:
                        durations.append(outcome.seconds)
            if not started and not finished:
                time.sleep(idle_s)  # every pending run is held by another worker: wait for its result
    finally:
        for spec in in_flight.values():
            store.release(spec)
        executor.shutdown()
        store.stop_heartbeat()
    if progress is not None:
        progress.update(len(bench.outcomes), 0, 0, None, 1, final=True)
    return bench


def _answer_from_store(bench, store, pending, in_flight) -> bool:
    answered = False
    for spec in pending:
        if spec.run_id not in in_flight and (outcome := store.result(spec.run_id)) is not None:
            bench.record(spec, outcome)
            answered = True
    return answered


def _show(progress, bench, pending, in_flight, durations, executor, store):
    if progress is None:
        return
    left = sum(1 for spec in pending if spec.run_id not in in_flight)
    # This session's runs; before the first finishes, those of earlier sessions (a resumed grid).
    mean = sum(durations) / len(durations) if durations else store.mean_seconds()
    progress.update(len(bench.outcomes), len(in_flight), left, mean, max(1, executor.running + executor.slots))
