"""Executors: one subprocess per GPU pinned with CUDA_VISIBLE_DEVICES, and the submitit path (where installed)."""

import json
import sys
import pytest

from fastoptim.grid.driver import run_grid
from fastoptim.grid.executors import LocalGPUExecutor, SequentialExecutor, SlurmExecutor
from fastoptim.grid.runner import RunSettings, read_outcome, train_command
from fastoptim.grid.runs import RunOutcome, RunSpec
from fastoptim.grid.store import ResultsStore

# A stand-in for `fastoptim train`: sleeps, then writes result.json as the trainer does, recording its GPU.
FAKE_TRAIN = """
import json, os, sys, time
out_dir, lr = sys.argv[1], float(sys.argv[2])
began = time.time()
time.sleep(0.5)
if lr < 0:
    sys.exit(3)
os.makedirs(out_dir, exist_ok=True)
record = {"final_val_loss": 3.0 + lr, "diverged": False, "steps": 10,
          "gpu": os.environ["CUDA_VISIBLE_DEVICES"], "began": began, "ended": time.time()}
json.dump(record, open(os.path.join(out_dir, "result.json"), "w"))
"""


def spec(lr):
    return RunSpec("adamw", "tiny", 1.0, {"lr": lr, "batch_size": 8}, seq_len=16, steps=10)


def fake_command(spec, out_dir):
    return [sys.executable, "-c", FAKE_TRAIN, out_dir, repr(spec.hparams["lr"])]


def test_local_gpus_run_in_parallel_one_per_gpu(tmp_path):
    executor = LocalGPUExecutor(["0", "1"], fake_command, read_outcome)
    runs = [spec(0.1), spec(0.2)]
    for run in runs:
        assert executor.slots > 0
        executor.start(run, str(tmp_path / run.run_id))
    assert executor.slots == 0 and executor.running == 2
    finished = []
    while len(finished) < 2:
        finished += executor.poll(timeout=5)
    results = {s.run_id: o for s, o in finished}
    written = [json.loads((tmp_path / r.run_id / "result.json").read_text()) for r in runs]
    assert {w["gpu"] for w in written} == {"0", "1"}
    assert max(w["began"] for w in written) < min(w["ended"] for w in written)  # they ran at the same time
    for run in runs:
        assert results[run.run_id].final_val_loss == pytest.approx(3.0 + run.hparams["lr"])

    executor.start(spec(-1.0), str(tmp_path / "crash"))
    (_, outcome), = executor.poll(timeout=5)
    assert isinstance(outcome, RuntimeError) and "status 3" in str(outcome) and "train.log" in str(outcome)


def test_train_command_round_trips_hparams():
    run = RunSpec("muon", "tiny2", 2.0, {"lr": 1.6e-2, "eps": 1e-25, "ns_steps": 10, "normalize_grads": True,
                                         "lr_schedule": "linear"}, seq_len=64, steps=204, eval_every=None)
    argv = train_command(run, "/tmp/x")
    assert argv[1:4] == ["-m", "fastoptim.cli", "train"]
    hps = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--hp")
    import ast
    assert {k: ast.literal_eval(v) for k, v in hps.items()} == run.hparams
    assert argv[argv.index("--steps") + 1] == "204" and "--resume" in argv and "--eval-every" not in argv


def test_slurm_executor_through_submitit_debug_cluster(tmp_path):
    pytest.importorskip("submitit")
    calls = []

    def run_fn(spec, out_dir):
        calls.append(spec.run_id)
        return RunOutcome(3.0 + spec.hparams["lr"], False, spec.steps)

    executor = SlurmExecutor(run_fn, tmp_path / "slurm", max_jobs=4, cluster="debug")
    executor.start(spec(0.5), str(tmp_path / "a"))
    (done, outcome), = executor.poll(timeout=30)
    assert done.run_id == calls[0] and outcome.final_val_loss == pytest.approx(3.5)


def test_slurm_executor_without_submitit_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(RuntimeError, match="pip install submitit"):
        SlurmExecutor(lambda s, o: None, tmp_path)


def test_interrupted_parallel_grid_stops_its_children_and_releases_claims(tmp_path):
    from fastoptim.grid.presets import GridPreset, OptimizerSweep, regimes

    preset = GridPreset("gpus", {"adamw": OptimizerSweep({"lr": 0.1, "batch_size": 8}, {"lr": (0.1, 0.2, 0.3)})},
                        regimes(["tiny"], [1]), seq_len=16, tokens_per_param=1.0)

    class Interrupting(LocalGPUExecutor):
        def poll(self, timeout=0.0):
            raise KeyboardInterrupt

    executor = Interrupting(["0"], fake_command, read_outcome)
    with ResultsStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            run_grid(preset, store, executor, lambda m: 1000, tmp_path / "runs")
        assert executor.running == 0
        assert store.counts() == {}
    sequential = SequentialExecutor(lambda s, o: RunOutcome(3.0 + s.hparams["lr"], False, s.steps))
    with ResultsStore(tmp_path / "s.sqlite") as store:
        bench = run_grid(preset, store, sequential, lambda m: 1000, tmp_path / "runs")
    assert bench.done and len(bench.outcomes) == 3


def test_local_gpus_pack_runs_of_several_gpus_into_whole_groups(tmp_path):
    executor = LocalGPUExecutor(["0", "1", "2", "3", "4"], fake_command, read_outcome, gpus_per_run=2)
    assert executor.slots == 2 and executor.gpus == ["0", "1", "2", "3"]  # GPU 4 alone cannot hold a run
    runs = [spec(0.1), spec(0.2)]
    for run in runs:
        executor.start(run, str(tmp_path / run.run_id))
    assert executor.slots == 0
    finished = []
    while len(finished) < 2:
        finished += executor.poll(timeout=5)
    written = [json.loads((tmp_path / r.run_id / "result.json").read_text()) for r in runs]
    assert sorted(w["gpu"] for w in written) == ["0,1", "2,3"]
    with pytest.raises(ValueError, match="gpus_per_run=3: must be between 1 and the 2 GPUs"):
        LocalGPUExecutor(["0", "1"], fake_command, read_outcome, gpus_per_run=3)


def test_several_ranks_per_run_launch_through_torchrun():
    run = spec(0.1)
    argv = train_command(run, "/tmp/x", RunSettings(ranks=4, parallel="zero1"))
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert argv[5:8] == ["-m", "fastoptim.cli", "train"] and "--zero1" in argv and "--fsdp" not in argv
    assert "torch.distributed.run" not in train_command(run, "/tmp/x", RunSettings())
    assert "--zero1" not in train_command(run, "/tmp/x", RunSettings(ranks=4))  # DDP is the trainer's default


def test_sequential_grid_refuses_several_gpus_per_run(tmp_path):
    from fastoptim.grid.cli import build_parser, make_executor

    args = build_parser().parse_args(["--preset", "smoke", "--gpus-per-run", "2"])
    with pytest.raises(ValueError, match="--gpus-per-run 2 needs --executor gpus or slurm"):
        make_executor(args, tmp_path, RunSettings(ranks=2))


@pytest.mark.slow
def test_a_grid_run_of_two_ranks_trains_under_torchrun_and_records_them(tmp_path):
    # The real trainer through the command the GPU executor runs, on two CPU processes (gloo).
    run = RunSpec("adamw", "tiny", 1.0, {"lr": 1e-3, "batch_size": 4}, seq_len=16, steps=3)
    settings = RunSettings(device="cpu", ranks=2, compile=False)
    executor = LocalGPUExecutor(["0"], lambda s, o: train_command(s, o, settings), read_outcome)
    out_dir = tmp_path / run.run_id
    executor.start(run, str(out_dir))
    finished = []
    while not finished:
        finished = executor.poll(timeout=5)
    (_, outcome), = finished
    assert not isinstance(outcome, Exception), (out_dir / "train.log").read_text()[-3000:]
    result = json.loads((out_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["mode"] == "ddp" and result["steps"] == 3
