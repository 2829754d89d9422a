import importlib
import json
import math
import os
import shutil
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fastoptim.train.loop as loop
from fastoptim.train import TrainConfig, train
from fastoptim.train import checkpoint as ckpt
from fastoptim.train.cli import main as cli_main

RESUME_OPTIMIZERS = ["adamw", "nadamw", "mars", "cautious", "lion", "mini", "muon", "scion", "kron", "soap",
                     "sophia"]
# Small preconditioner blocks keep the block-wise optimizers' CPU cost down; resume exactness is independent of them.
RESUME_HPARAMS = {"kron": {"block_size": 32}, "soap": {"block_size": 32}}


def _standin_registry():
    """torch.optim.AdamW behind the registry's interface, used only while fastoptim.optim is not merged yet."""
    def build_optimizer(name, model, hparams):
        if name != "adamw":
            raise ValueError(f"optimizer: unknown name {name!r}")
        h = dict(hparams)
        if h.pop("max_grad_norm", 0):
            raise ValueError("hparams for adamw: torch.optim.AdamW does not clip")
        betas = (h.pop("beta1", 0.9), h.pop("beta2", 0.999))
        try:
            return torch.optim.AdamW(model.parameters(), betas=betas, **h)
        except TypeError as err:
            raise ValueError(f"hparams for {name}: {err}") from err
    return types.SimpleNamespace(build_optimizer=build_optimizer, OPTIMIZER_NAMES=("adamw",),
                                 optimizer_class=lambda name: torch.optim.AdamW)


def _importable(reg, name):
    try:
        reg.optimizer_class(name)
        return True
    except ImportError:  # the registry names it, but its module is not merged yet
        return False


def registry():
    try:
        reg = importlib.import_module("fastoptim.optim.registry")
    except ImportError:
        return _standin_registry()
    return reg if _importable(reg, "adamw") else _standin_registry()


def optimizer_names():
    reg = registry()
    return tuple(n for n in reg.OPTIMIZER_NAMES if _importable(reg, n))


@pytest.fixture(autouse=True)
def use_registry(monkeypatch):
    monkeypatch.setattr(loop, "optimizer_registry", registry)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# Tiny tensors: intra-op threads only add contention on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token_cache"))


def tiny(tmp_path, cache_dir, **overrides):
    """A run of a few seconds: tiny model, small BPE vocabulary, 32-token sequences."""
    hparams = {"lr": 3e-3, "batch_size": 4, **overrides.pop("hparams", {})}
    fields = dict(model="tiny", optimizer="adamw", hparams=hparams, seq_len=32, steps=6, eval_every=3,
                  eval_batches=2, vocab_size=512, corpus_bytes=200_000, cache_dir=cache_dir,
                  out_dir=str(tmp_path / "run"), device="cpu", progress=False)
    return TrainConfig(**{**fields, **overrides})


def test_run_records_losses_metrics_and_config(tmp_path, cache_dir):
    result = train(tiny(tmp_path, cache_dir, steps=6, eval_every=3))
    assert not result.diverged and result.steps == 6 and len(result.history) == 6
    assert [r["step"] for r in result.history] == list(range(1, 7))
    assert [r["step"] for r in result.history if "val_loss" in r] == [3, 6]
    assert result.final_val_loss == result.history[-1]["val_loss"]
    assert result.tokens == 6 * 4 * 32
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["final_val_loss"] == result.final_val_loss and saved["config"]["optimizer"] == "adamw"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["steps"] == 6 and config["seq_len"] == 32 and config["model_config"]["vocab_size"] == 512
    # the LR follows the schedule: cosine, no warmup, peak 3e-3
    for r in result.history:
        expected = 3e-3 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / 6))
        assert r["lr"] == pytest.approx(expected, rel=1e-12)


def test_eval_every_zero_evaluates_and_checkpoints_at_the_end_only(tmp_path, cache_dir):
    result = train(tiny(tmp_path, cache_dir, steps=4, eval_every=0))
    assert [r["step"] for r in result.history if "val_loss" in r] == [4]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000004.pt"]


def test_validation_loss_falls(tmp_path, cache_dir):
    result = train(tiny(tmp_path, cache_dir, steps=80, eval_every=5, hparams={"lr": 1e-2, "batch_size": 8}))
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    # An untrained model guesses uniformly (init std 0.02): its loss is ln(512) = 6.24.
    assert vals[-1] < math.log(512) - 0.8
    assert vals[-1] < min(vals[:3])


def test_steps_follow_the_chinchilla_budget(tmp_path, cache_dir):
    cfg = tiny(tmp_path, cache_dir, steps=None, chinchilla=0.05, hparams={"batch_size": 64}, seq_len=64)
    plan = loop.plan_run(cfg)
    # tiny: N = 2 layers * (4*64^2 + 3*64*256) = 131072 non-embedding parameters
    assert plan.steps == math.floor(0.05 * 20 * 131072 / (64 * 64))


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in ("kron", "soap") else [])
                                  for n in RESUME_OPTIMIZERS if n in optimizer_names()])
def test_resume_is_bit_identical(tmp_path, cache_dir, name):
    steps = 8
    hparams = RESUME_HPARAMS.get(name, {})
    straight = train(tiny(tmp_path / "a", cache_dir, optimizer=name, steps=steps, eval_every=4,
                          checkpoint_every=steps // 2, keep_checkpoints=5, hparams=hparams))
    assert not straight.diverged
    # A second run is killed after N steps: keep only the checkpoint of step N, then resume.
    killed = tmp_path / "b" / "run"
    (killed / "checkpoints").mkdir(parents=True)
    src = tmp_path / "a" / "run" / "checkpoints" / f"step_{steps // 2:08d}.pt"
    (killed / "checkpoints" / src.name).write_bytes(src.read_bytes())
    resumed = train(tiny(tmp_path / "b", cache_dir, optimizer=name, steps=steps, eval_every=4,
                         checkpoint_every=steps // 2, resume=True, hparams=hparams))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    assert resumed.final_val_loss == straight.final_val_loss
    a_state = ckpt.load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / f"step_{steps:08d}.pt")
    b_state = ckpt.load_checkpoint(killed / "checkpoints" / f"step_{steps:08d}.pt")
    for key, tensor in a_state["model"].items():
        assert torch.equal(tensor, b_state["model"][key]), key
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == list(range(1, steps + 1))


def test_also_resumes_a_finished_run_without_training(tmp_path, cache_dir):
    first = train(tiny(tmp_path, cache_dir, steps=3, eval_every=3))
    again = train(tiny(tmp_path, cache_dir, steps=3, eval_every=3, resume=True))
    assert again.final_val_loss == first.final_val_loss and again.history == first.history


def test_checkpoints_keep_the_last_k(tmp_path, cache_dir):
    train(tiny(tmp_path, cache_dir, steps=6, checkpoint_every=1, keep_checkpoints=2))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000005.pt", "step_00000006.pt"]


def test_failed_write_keeps_the_existing_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(folder, {"step": 3, "payload": torch.arange(5)}, keep=1)
    before = good.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(folder, {"step": 3, "payload": torch.zeros(5)}, keep=1)
    assert good.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000003.pt"]


def test_corrupt_checkpoint_is_a_clear_error_before_any_work(tmp_path, cache_dir):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step_00000004.pt").write_bytes(b"\x00garbage" * 10)
    fresh_cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="step_00000004.pt is corrupt or unreadable"):
        train(tiny(tmp_path, str(fresh_cache), resume=True))
    assert not fresh_cache.exists()


def test_mismatched_checkpoint_names_the_setting(tmp_path, cache_dir):
    train(tiny(tmp_path, cache_dir, steps=3, eval_every=3))
    with pytest.raises(ValueError, match=r"hparams=.*'lr': 0.003.* there, hparams=.*'lr': 0.001"):
        train(tiny(tmp_path, cache_dir, steps=3, eval_every=3, resume=True, hparams={"lr": 1e-3}))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny(tmp_path, cache_dir, steps=3, eval_every=3))


@pytest.mark.parametrize("overrides,error,match", [
    (dict(model="7b"), ValueError, "model='7b'"),
    (dict(optimizer="sgdx"), ValueError, "sgdx"),
    (dict(hparams={"batch_size": 6}, grad_accum=4), ValueError, "batch_size=6"),
    (dict(data="/nonexistent/corpus"), FileNotFoundError, "/nonexistent/corpus"),
    (dict(hparams={"warmup": 100}), ValueError, "warmup=100"),
    (dict(hparams={"not_an_hparam": 1}), ValueError, "not_an_hparam"),
])
def test_bad_config_fails_before_any_work(tmp_path, overrides, error, match):
    fresh_cache = tmp_path / "cache"
    with pytest.raises(error, match=match):
        train(tiny(tmp_path, str(fresh_cache), **overrides))
    assert not fresh_cache.exists() and not (tmp_path / "run").exists()


def test_batch_not_divisible_across_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"batch_size=4 must be a positive multiple .*world_size=3"):
        loop.plan_run(tiny(tmp_path, str(tmp_path / "cache")))


def test_more_tokens_than_the_corpus_holds(tmp_path, cache_dir, capsys):
    with pytest.raises(ValueError, match="allow_repeat"):
        train(tiny(tmp_path, cache_dir, corpus_bytes=20_000, steps=500))
    result = train(tiny(tmp_path / "r", cache_dir, corpus_bytes=20_000, steps=20, eval_every=20,
                        hparams={"batch_size": 16}, allow_repeat=True, checkpoint_every=0))
    assert result.steps == 20
    assert capsys.readouterr().out.count("data repeats") == 1


def test_divergence_rule():
    assert loop.is_diverged(5, float("nan")) and loop.is_diverged(5, float("inf"))
    assert loop.is_diverged(5, 1e4 + 1) and not loop.is_diverged(5, 1e4)
    assert not loop.is_diverged(2000, 7.0) and loop.is_diverged(2001, 6.0) and not loop.is_diverged(2001, 5.99)


def test_divergence_stops_the_run(tmp_path, cache_dir, monkeypatch):
    real_step = loop._train_step
    calls = []

    def step_that_blows_up(*args):
        loss = real_step(*args)
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "_train_step", step_that_blows_up)
    result = train(tiny(tmp_path, cache_dir, steps=6))
    assert result.diverged and result.steps == 3 and result.final_val_loss == math.inf
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_trains_and_reports_errors(tmp_path, cache_dir, capsys):
    out = tmp_path / "cli"
    code = cli_main(["--model", "tiny", "--steps", "3", "--lr", "3e-3", "--batch-size", "4", "--seq-len", "32",
                     "--vocab-size", "512", "--corpus-bytes", "200000", "--cache-dir", cache_dir,
                     "--out-dir", str(out), "--device", "cpu", "--no-progress", "--hp", "beta2=0.95",
                     "--hp", "weight_decay=0.1"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["hparams"] == {"lr": 3e-3, "batch_size": 4, "beta2": 0.95, "weight_decay": 0.1}
    assert cli_main(["--model", "nope", "--out-dir", str(tmp_path / "x")]) == 2
    assert "model='nope' is not a known model" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world_size, runs, results):
    """One rank of a torchrun-like launch: each run gets a fresh process group on its own port."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    loop.optimizer_registry = registry
    outcomes = []
    for port, cfg, resume_from in runs:
        os.environ["MASTER_PORT"] = str(port)
        if resume_from is not None:  # every rank places the checkpoint a killed run left (atomically, idempotent)
            folder = Path(cfg.out_dir) / "checkpoints"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(resume_from, folder / f"tmp{rank}")
            os.replace(folder / f"tmp{rank}", folder / Path(resume_from).name)
        result = train(cfg)
        outcomes.append({"history": result.history, "final": result.final_val_loss})
    torch.save(outcomes, f"{results}.{rank}")


def test_two_cpu_ranks_match_one_process(tmp_path, cache_dir):
    """2 gloo processes give the single-process run's losses (same global batch) with DDP and with FSDP2: AdamW
    (clipped, so one owner holds every parameter) and Muon (matrices spread over owners; until Muon is merged,
    AdamW without clipping spreads everything), also when that last run resumes from its mid-run checkpoint."""
    optimizers = {"clipped": ("adamw", {}),
                  "spread": ("muon", {}) if "muon" in optimizer_names() else ("adamw", {"max_grad_norm": 0})}
    owner_checkpoint = tmp_path / "fsdp2-spread" / "run" / "checkpoints" / "step_00000002.pt"
    kinds = {"ddp": ("clipped", False, None), "fsdp2": ("clipped", True, None),
             "fsdp2-spread": ("spread", True, None), "fsdp2-spread-resumed": ("spread", True, owner_checkpoint)}

    def config(folder, label, **overrides):
        name, hparams = optimizers[label]
        return tiny(folder, cache_dir, optimizer=name, steps=4, eval_every=2,
                    hparams={"batch_size": 8, **hparams}, **overrides)

    single = {label: train(config(tmp_path / f"one-{label}", label)) for label in optimizers}
    runs = [(_free_port(), config(tmp_path / kind, label, fsdp=fsdp, resume=bool(resume_from)), resume_from)
            for kind, (label, fsdp, resume_from) in kinds.items()]
    results = tmp_path / "results"
    # spawn, not fork: a parent that has already run autograd (any earlier test) cannot fork autograd's threads.
    mp.start_processes(_rank_worker, args=(2, runs, str(results)), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        for (label, *_), got in zip(kinds.values(), torch.load(f"{results}.{rank}", weights_only=False)):
            assert len(got["history"]) == 4
            for a, b in zip(got["history"], single[label].history):
                assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
            assert got["final"] == pytest.approx(single[label].final_val_loss, rel=1e-5, abs=1e-6)
    # Every kind writes whole-tensor checkpoints, with every parameter's optimizer state, that one process loads.
    for kind, (label, *_) in kinds.items():
        one = ckpt.load_checkpoint(tmp_path / f"one-{label}" / "run" / "checkpoints" / "step_00000004.pt")
        state = ckpt.load_checkpoint(tmp_path / kind / "run" / "checkpoints" / "step_00000004.pt")
        assert state["model"].keys() == one["model"].keys()
        for key, tensor in one["model"].items():
            # Adam's normalisation turns rounding noise in near-zero gradients into visible (still << lr)
            # differences on a few elements; the losses above are the tight check.
            torch.testing.assert_close(state["model"][key], tensor, rtol=1e-4, atol=1e-4)
        assert len(state["optimizer"]["state"]) == len(one["optimizer"]["state"]) == len(one["model"])


def test_owner_assignment_keeps_the_clipped_branch_on_one_rank_and_spreads_matrices():
    from fastoptim.train.distributed import assign_owners

    sizes = [("embed", 100, False), ("a", 40, True), ("b", 40, True), ("c", 30, True), ("d", 30, True),
             ("norm", 5, False), ("head", 100, False)]
    owners = assign_owners(sizes, world_size=3)
    assert [owners[i] for i, s in enumerate(sizes) if not s[2]] == [0, 0, 0]
    load = [sum(s[1] for s, o in zip(sizes, owners) if o == r) for r in range(3)]
    assert load == [205, 70, 70]  # all matrices avoid rank 0, which already holds the embedding and head


@pytest.mark.cuda
def test_trains_on_cuda_with_bf16_autocast(tmp_path, cache_dir):
    result = train(tiny(tmp_path, cache_dir, device="cuda", steps=30, eval_every=10,
                        hparams={"lr": 1e-2, "batch_size": 8}))
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert not result.diverged and vals[-1] < vals[0] < math.log(512) + 0.5
