"""Where runs execute: in this process one after another, one `fastoptim train` subprocess per local GPU, or Slurm.

Every executor has the same face: `slots` runs at a time, `start(spec, out_dir)`, `poll(timeout)` → the runs that
finished since the last poll with their RunOutcome (or the Exception that ended them), `shutdown()`. A run's out_dir
holds its checkpoints, so a run cut short (killed grid, preempted job) resumes from them when it is started again.
"""

import dataclasses
import os
import subprocess
import time
from pathlib import Path


class SequentialExecutor:
    """One run at a time in this process (the default; also the test harness): `start` queues it, `poll` trains it."""

    def __init__(self, run_fn):
        self.run_fn = run_fn  # run_fn(spec, out_dir) → RunOutcome
        self._queued = None

    @property
    def slots(self) -> int:
        return 0 if self._queued else 1

    @property
    def running(self) -> int:
        return 1 if self._queued else 0

    def start(self, spec, out_dir):
        self._queued = (spec, out_dir)

    def poll(self, timeout: float = 0.0):
        if self._queued is None:
            return []
        (spec, out_dir), self._queued = self._queued, None
        started = time.time()
        try:
            outcome = self.run_fn(spec, out_dir)
        except Exception as error:  # a crashed run is recorded; an interrupt (BaseException) stops the grid
            outcome = error
        return [(spec, _timed(outcome, time.time() - started))]

    def shutdown(self):
        self._queued = None


class LocalGPUExecutor:
    """One `fastoptim train` subprocess per group of `gpus_per_run` GPUs, pinned with CUDA_VISIBLE_DEVICES (a group of
    several runs under torchrun, which command_fn asks for); its log goes to out_dir/train.log."""

    def __init__(self, gpus, command_fn, read_fn, gpus_per_run: int = 1):
        """command_fn(spec, out_dir) → argv; read_fn(out_dir) → RunOutcome from what the trainer wrote there."""
        if not gpus:
            raise ValueError("gpus must list at least one GPU index")
        if gpus_per_run < 1 or gpus_per_run > len(gpus):
            raise ValueError(f"gpus_per_run={gpus_per_run}: must be between 1 and the {len(gpus)} GPUs given")
        gpus = [str(gpu) for gpu in gpus]
        # Whole groups only: GPUs left over would run nothing.
        self.groups = [",".join(gpus[i:i + gpus_per_run]) for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]
        self.gpus = gpus[:len(self.groups) * gpus_per_run]
        self.command_fn = command_fn
        self.read_fn = read_fn
        self._procs = {}  # group → (process, spec, out_dir, started, log handle)

    @property
    def slots(self) -> int:
        return len(self.groups) - len(self._procs)

    @property
    def running(self) -> int:
        return len(self._procs)

    def start(self, spec, out_dir):
        group = next(g for g in self.groups if g not in self._procs)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(out_dir) / "train.log", "ab")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": group}
        process = subprocess.Popen(self.command_fn(spec, out_dir), env=env, stdout=log, stderr=subprocess.STDOUT)
        self._procs[group] = (process, spec, out_dir, time.time(), log)

    def poll(self, timeout: float = 0.0):
        deadline = time.time() + timeout
        while True:
            finished = []
            for group, (process, spec, out_dir, started, log) in list(self._procs.items()):
                if process.poll() is None:
                    continue
                log.close()
                del self._procs[group]
                finished.append((spec, _timed(self._outcome(process.returncode, out_dir), time.time() - started)))
            if finished or time.time() >= deadline:
                return finished
            time.sleep(min(0.2, max(0.0, deadline - time.time())))

    def _outcome(self, returncode, out_dir):
        if returncode != 0:
            return RuntimeError(f"fastoptim train exited with status {returncode}; see {Path(out_dir) / 'train.log'}")
        try:
            return self.read_fn(out_dir)
        except Exception as error:
            return error

    def shutdown(self):
        # Interrupted grid: stop the children; their checkpoints let the next session resume them.
        for process, *_, log in self._procs.values():
            process.terminate()
        for process, *_, log in self._procs.values():
            process.wait()
            log.close()
        self._procs.clear()


class SlurmExecutor:
    """Each run a Slurm job through submitit (optional dependency); preempted jobs requeue and resume from out_dir.
    A job of several tasks (slurm_params tasks_per_node=k with gpus_per_node=k) is one distributed run, one rank per
    task; submitit hands back the first task's result."""

    def __init__(self, run_fn, folder, max_jobs: int = 64, cluster: str | None = None, **slurm_params):
        """cluster: submitit's choice (None: Slurm when present, else local processes; "debug": in this process)."""
        try:
            import submitit
        except ImportError as error:
            raise RuntimeError("the Slurm executor needs submitit: pip install submitit "
                               "(or pip install 'fastoptim[slurm]')") from error
        self.submitit = submitit
        self.run_fn = run_fn
        self.max_jobs = max_jobs
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        self.executor.update_parameters(**slurm_params)
        self._jobs = []  # (job, spec, started)

    @property
    def slots(self) -> int:
        return self.max_jobs - len(self._jobs)

    @property
    def running(self) -> int:
        return len(self._jobs)

    def start(self, spec, out_dir):
        job = self.executor.submit(_resumable(self.submitit, self.run_fn), spec, out_dir)
        self._jobs.append((job, spec, time.time()))

    def poll(self, timeout: float = 0.0):
        deadline = time.time() + timeout
        while True:
            finished = [entry for entry in self._jobs if entry[0].done()]
            if finished or time.time() >= deadline:
                break
            time.sleep(min(5.0, max(0.0, deadline - time.time())))
        self._jobs = [entry for entry in self._jobs if entry not in finished]
        results = []
        for job, spec, started in finished:
            try:
                outcome = job.results()[0]  # a job of several tasks: rank 0's outcome (every rank returns it)
            except Exception as error:
                outcome = error
            results.append((spec, _timed(outcome, time.time() - started)))
        return results

    def shutdown(self):
        # Interrupted grid: cancel the jobs (the driver releases their claims); the next session resubmits them and
        # they resume from their checkpoints.
        for job, *_ in self._jobs:
            job.cancel(check=False)
        self._jobs.clear()


def _resumable(submitit, run_fn):
    """A submitit Checkpointable around run_fn: on preemption it requeues the same call, which resumes from out_dir."""

    class ResumableRun(submitit.helpers.Checkpointable):
        def __call__(self, spec, out_dir):
            if submitit.JobEnvironment().num_tasks > 1:  # one task per GPU: the trainer reads torchrun's variables
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return run_fn(spec, out_dir)

    return ResumableRun()


def _timed(outcome, seconds):
    if isinstance(outcome, Exception) or outcome.seconds is not None:
        return outcome
    return dataclasses.replace(outcome, seconds=seconds)
