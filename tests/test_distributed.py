"""Distributed optimizer steps on CPU with gloo, 2 and 4 processes: each mode matches one process, ZeRO-1 splits the
state, bad input on one rank stops every rank. Each world size is one launch running every case (distributed_cases)."""

import dataclasses
import socket

import pytest
import torch
import torch.multiprocessing as mp

import distributed_cases as cases
from fastoptim.optim.registry import OPTIMIZERS

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
# Every mode takes every optimizer but SophiaH (its Hessian-vector product bypasses the data-parallel averaging).
MODES = dict.fromkeys(("ddp", "zero1", "fsdp"), [n for n, cls in OPTIMIZERS.items() if not cls.needs_hvp])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, case_list: list, tmp_path) -> list[dict]:
    results = tmp_path / f"results-{world_size}"
    # spawn, not fork: a parent that has already run autograd cannot fork autograd's threads.
    mp.start_processes(cases.worker, args=(world_size, _free_port(), case_list, str(results)), nprocs=world_size,
                       join=True, start_method="spawn")
    return [torch.load(f"{results}.{rank}", weights_only=False) for rank in range(world_size)]


@pytest.fixture(scope="module")
def single():
    names = sorted({n for names in MODES.values() for n in names})
    return {name: cases.run_case(name, "single", STEPS) for name in names}


@pytest.mark.parametrize("world_size", [2, 4])
def test_modes_match_one_process_and_zero1_splits_the_state(world_size, single, tmp_path):
    runs = [("run", name, mode, STEPS) for mode, names in MODES.items() for name in names]
    checks = [("bad_gradient",), ("reduce_scatter",), ("bad_parameter",),
              *[("consolidated_state", name) for name in ("muon", "soap", "kron")],
              *[("row_shard_checkpoint", name, str(tmp_path / name)) for name in ("soap", "kron")]]
    outcomes = launch(world_size, runs + checks, tmp_path)
    differ = {}
    for case in runs:
        _, name, mode, _ = case
        for rank, got in enumerate(outcomes):
            worst = max(abs(a - b) / abs(b) for a, b in zip(got[case]["losses"], single[name]["losses"]))
            if worst > 1e-5:
                differ[(name, mode, rank)] = worst
    assert not differ, sorted(differ.items())
    for case in runs:
        _, name, mode, _ = case
        if mode in ("zero1", "fsdp"):
            total = single[name]["state_bytes"]
            held = [got[case]["state_bytes"] for got in outcomes]
            assert max(held) <= total * (1 / world_size + 0.1), (name, mode, held, total)
            # The shares partition the state exactly, but for the step counters and the factors every rank holds
            # alike (Soap's and Kron's for their row-sharded tensors): each rank holding part of a parameter keeps
            # its own copy.
            shared = {got[case]["shared_bytes"] for got in outcomes}
            assert len(shared) == 1 and (name in ("soap", "kron")) == (shared != {0}), (name, mode, shared)
            apart = [got[case]["state_bytes"] - got[case]["step_bytes"] - got[case]["shared_bytes"]
                     for got in outcomes]
            assert sum(apart) == total - single[name]["step_bytes"] - shared.pop(), (name, mode, apart, total)
    for rank, got in enumerate(outcomes):
        outcome = got[("bad_gradient",)]
        assert outcome["unchanged"] and outcome["state"] == 0, rank
        if rank == 1:
            assert outcome["error"].startswith("FloatingPointError: non-finite gradient in parameter ")
        else:
            assert outcome["error"].startswith("RuntimeError: rank 1 refused the optimizer step (FloatingPointError")
    for rank, got in enumerate(outcomes):
        for name in ("muon", "soap", "kron"):
            outcome = got[("consolidated_state", name)]
            # One process's state up to rounding (in float32, Muon's Adam branch magnifies it on near-zero gradients:
            # 3e-6 to 4e-6 on 2 and 4 ranks; Soap in float64); Soap's and Kron's row shards joined on their row
            # axes; loaded back exactly.
            assert outcome["same_layout"] and outcome["round_trip"], (rank, name, outcome)
            assert outcome["worst"] < 5e-5 and outcome["resumed"] < 5e-5, (rank, name, outcome)
        # Six row-sharded tensors (embedding, head, up and gate projections): Soap's two moments in the block
        # layout (rows on axis 1), Kron's momentum (axis 0) and diagonal factor (axis 1).
        for name, split_on in (("soap", {0: 0, 1: 12}), ("kron", {0: 6, 1: 6})):
            outcome = got[("row_shard_checkpoint", name, str(tmp_path / name))]
            assert outcome == {"split_on": split_on, "local_equal": True, "whole_equal": True}, (rank, name, outcome)
    for got in outcomes:
        assert got[("bad_parameter",)]["error"].startswith(
            "ZeroRedundancy: parameter 'layers.0.mlp.up_proj.weight' (shape (70, 32)) is not contiguous"), got
    for rank, got in enumerate(outcomes):
        outcome = got[("reduce_scatter",)]
        # The owned elements are the average (summed in another order: float64 rounding); the rest were not
        # reduced at all, so they are this rank's own gradient; the steps agree (Newton-Schulz in float32).
        assert outcome["owned"] < 1e-12 and outcome["other"] == 0.0 and outcome["step"] < 1e-6, (rank, outcome)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_each_rank_holds_its_share_of_the_state_of_the_130m_model(world_size):
    """The ownership ZeRO-1 and FSDP2 share (row shards, and whole tensors by state bytes on top of them) on the
    paper's 130M model with Llama 3's vocabulary: every rank's state bytes within 10% of the mean."""
    from fastoptim.models import Llama, get_model_config
    from fastoptim.optim.distributed import ownership_spans, params_in_order, state_bytes_of
    from fastoptim.optim.registry import build_optimizer

    with torch.device("meta"):
        model = Llama(dataclasses.replace(get_model_config("130m"), vocab_size=128256))
    for name in MODES["zero1"]:
        optimizer = build_optimizer(name, model, {})
        spans = ownership_spans(optimizer, world_size).spans
        load = [0.0] * world_size
        for cost, param, param_spans in zip(state_bytes_of(optimizer), params_in_order(optimizer), spans):
            for rank, (first, end) in enumerate(param_spans):
                load[rank] += cost * (end - first) / param.numel()
        mean = sum(load) / world_size
        assert max(load) <= 1.1 * mean and min(load) >= 0.9 * mean, (name, [x / mean for x in load])


@pytest.mark.parametrize("name", ["soap", "kron"])
@pytest.mark.parametrize("size", ["130m", "520m"])
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_soap_and_kron_work_is_spread_over_the_ranks(name, size, world_size):
    """Soap's and Kron's per-step products on the paper's models with Llama 3's vocabulary, counted per rank: each
    block axis of size b with a b×b factor (Soap's rotated axes, Kron's triangular ones) costs a fixed number of
    products of each block with a b×b matrix (Soap: rotate g, rotate m, rotate back, the Gram; Kron: QᵀQ·m, and
    on update steps Q·G, the solve and two Grams), so its work is proportional to the block's elements times b.
    The embedding and the head, each two or more blocks of 128256 rows without such a factor and more work than an
    8-rank mean, step as row shards over every rank; every rank's work is within 10% of the mean."""
    import math

    from fastoptim.models import Llama, get_model_config
    from fastoptim.optim.distributed import ownership_spans, params_in_order
    from fastoptim.optim.registry import build_optimizer

    with torch.device("meta"):
        model = Llama(dataclasses.replace(get_model_config(size), vocab_size=128256))
    optimizer = build_optimizer(name, model, {})
    ownership = ownership_spans(optimizer, world_size)
    names = [name for group in optimizer.param_groups for name in group["names"]]
    assert sorted(names[k] for k in ownership.row_axes) == ["embed_tokens.weight", "lm_head.weight"]
    load = [0.0] * world_size
    groups = [group for group in optimizer.param_groups for _ in group["params"]]
    for group, param, spans in zip(groups, params_in_order(optimizer), ownership.spans):
        layout = optimizer.layout(group, param)
        work = layout.num_blocks * math.prod(layout.block) * sum(
            b for b, special in zip(layout.block, layout.special) if not special)
        for rank, (first, end) in enumerate(spans):
            load[rank] += work * (end - first) / param.numel()
    mean = sum(load) / world_size
    assert max(load) <= 1.1 * mean and min(load) >= 0.9 * mean, [x / mean for x in load]


# ---- the trainer: checkpoints that reshard, and the distributed result record ------------------------------------
def run_config(folder, cache_dir, **overrides):
    """A run of a few seconds: tiny model, Muon with its AdamW branch clipped, checkpoints at step 3."""
    from fastoptim.train import TrainConfig

    fields = dict(model="tiny", optimizer="muon", hparams={"lr": 3e-3, "batch_size": 8, "ns_dtype": "float32"},
                  seq_len=32, steps=6, eval_every=3, eval_tokens=1024, vocab_size=512, corpus_bytes=200_000,
                  cache_dir=cache_dir, out_dir=str(folder / "run"), device="cpu", progress=False, log_every=1)
    return TrainConfig(**{**fields, **overrides})


def launch_trainer(world_size, runs, tmp_path):
    results = tmp_path / f"train-results-{world_size}"
    runs = [(_free_port(), *run) for run in runs]
    mp.start_processes(cases.train_worker, args=(world_size, runs, str(results)), nprocs=world_size, join=True,
                       start_method="spawn")
    return [torch.load(f"{results}.{rank}", weights_only=False) for rank in range(world_size)]


def assert_same_run(got, want):
    assert [r["step"] for r in got["history"]] == [r["step"] for r in want.history]
    for a, b in zip(got["history"], want.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5), a["step"]
    assert got["final"] == pytest.approx(want.final_val_loss, rel=1e-5)


def test_checkpoints_reshard_between_world_sizes_and_modes(tmp_path, monkeypatch):
    """DCP checkpoints: ZeRO-1 on 4 ranks, killed after its step-3 checkpoint, resumes on 2 (FSDP2) and on 1 process;
    a single-process checkpoint resumes on 4 (ZeRO-1); each matches the unbroken single-process run. The ZeRO-1 run's
    result.json shows 4 ranks each holding about a quarter of the optimizer state."""
    from fastoptim.train import loop, train

    cache_dir = str(tmp_path / "cache")
    unbroken = train(run_config(tmp_path / "unbroken", cache_dir))
    monkeypatch.setattr(loop, "_forward_backward", _dies_after(loop._forward_backward, 4))
    with pytest.raises(cases.Killed):
        train(run_config(tmp_path / "one-killed", cache_dir, checkpoint_every=3))
    monkeypatch.undo()
    single_checkpoint = tmp_path / "one-killed" / "run" / "checkpoints" / "step_00000003"

    four = launch_trainer(4, [(run_config(tmp_path / "zero1", cache_dir, zero1=True), None, None),
                              (run_config(tmp_path / "four-killed", cache_dir, zero1=True, checkpoint_every=3),
                               None, 4),
                              (run_config(tmp_path / "one-to-four", cache_dir, zero1=True, resume=True),
                               single_checkpoint, None)], tmp_path)
    four_checkpoint = tmp_path / "four-killed" / "run" / "checkpoints" / "step_00000003"
    two = launch_trainer(2, [(run_config(tmp_path / "four-to-two", cache_dir, fsdp=True, resume=True),
                              four_checkpoint, None)], tmp_path)
    cases.place_checkpoint(four_checkpoint, tmp_path / "four-to-one" / "run")
    one = train(run_config(tmp_path / "four-to-one", cache_dir, resume=True))

    for rank in range(4):
        assert_same_run(four[rank][0], unbroken)
        assert four[rank][1] == {"killed": True}
        assert_same_run(four[rank][2], unbroken)
    for rank in range(2):
        assert_same_run(two[rank][0], unbroken)
    assert_same_run({"history": one.history, "final": one.final_val_loss}, unbroken)

    import json

    record = json.loads((tmp_path / "zero1" / "run" / "result.json").read_text())
    assert record["world_size"] == 4 and record["mode"] == "zero1" and record["config"]["mode"] == "zero1"
    total, = unbroken.optimizer_state_bytes
    held = record["optimizer_state_bytes"]
    # Each rank holding rows of a parameter keeps its own 4-byte step counter: at most 3 extra per parameter.
    from fastoptim.models import Llama, get_model_config

    extra = 4 * 3 * len(list(Llama(dataclasses.replace(get_model_config("tiny"), vocab_size=512)).parameters()))
    assert len(held) == 4 and 0 <= sum(held) - total <= extra and max(held) <= total * (1 / 4 + 0.1), (held, total)
    # The logged gradient norm sums the parts each rank owns: after a reduce-scatter, the only averaged ones.
    for got, want in zip(four[0][0]["history"], unbroken.history):
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), got["step"]


def _dies_after(real, steps):
    calls = []

    def forward_backward(*args, **kwargs):
        calls.append(1)
        if len(calls) > steps:
            raise cases.Killed
        return real(*args, **kwargs)

    return forward_backward


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path, monkeypatch):
    from fastoptim.models import get_model_config
    from fastoptim.train import loop, train

    cache_dir = str(tmp_path / "cache")
    monkeypatch.setattr(loop, "_forward_backward", _dies_after(loop._forward_backward, 4))
    with pytest.raises(cases.Killed):
        train(run_config(tmp_path, cache_dir, checkpoint_every=3))
    monkeypatch.undo()
    folder = tmp_path / "run"
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    # The same run identity over a changed model definition (as after an edit of the code).
    monkeypatch.setattr(loop, "get_model_config",
                        lambda name: dataclasses.replace(get_model_config(name), intermediate=128))
    with pytest.raises(ValueError, match=r"step_00000003 holds another model: layers.0.mlp.gate_proj.weight is "
                                         r"\(256, 64\) there, \(128, 64\) here"):
        train(run_config(tmp_path, cache_dir, resume=True))
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before


def test_fsdp_defers_gradient_sync_and_all_gathers_bf16_on_request(tmp_path):
    """FSDP2 on 2 ranks, micro-batches of 2 (two per rank and step): one reduce-scatter per step after the last
    micro-batch gives the losses of one per micro-batch; bf16 all-gathers change the losses by bf16 rounding only."""
    cache_dir = str(tmp_path / "cache")
    runs = {name: run_config(tmp_path / name, cache_dir, fsdp=True, micro_batch=2, **options)
            for name, options in (("each", {}), ("deferred", {"fsdp_defer_grad_sync": True}),
                                  ("bf16", {"fsdp_param_dtype": "bfloat16"}))}
    outcomes = launch_trainer(2, [(cfg, None, None) for cfg in runs.values()], tmp_path)
    for rank in range(2):
        each, deferred, bf16 = ([r["train_loss"] for r in got["history"]] for got in outcomes[rank])
        assert deferred == pytest.approx(each, rel=1e-5), rank
        differ = [abs(a - b) / b for a, b in zip(bf16, each)]
        # bf16 parameters round each weight by up to 2^-9 relative: visible in the loss, and small.
        assert max(differ) > 1e-6 and max(differ) < 2e-2, (rank, differ)


@pytest.mark.parametrize("options", [{"fsdp_param_dtype": "bfloat16"}, {"fsdp_defer_grad_sync": True}])
def test_fsdp_settings_without_fsdp_are_refused(tmp_path, options):
    from fastoptim.train import loop

    with pytest.raises(ValueError, match="FSDP2 settings: they need fsdp=True"):
        loop.plan_run(run_config(tmp_path, str(tmp_path / "cache"), **options))
