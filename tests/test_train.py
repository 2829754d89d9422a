import contextlib
import importlib
import json
import math
import os
import shutil
import socket
import sys
import types
from pathlib import Path

import numpy as np
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
    """A run of a few seconds: tiny model, small BPE vocabulary, 32-token sequences, a record every step."""
    hparams = {"lr": 3e-3, "batch_size": 4, **overrides.pop("hparams", {})}
    fields = dict(model="tiny", optimizer="adamw", hparams=hparams, seq_len=32, steps=6, eval_every=3,
                  eval_tokens=1024, vocab_size=512, corpus_bytes=200_000, cache_dir=cache_dir,
                  out_dir=str(tmp_path / "run"), device="cpu", progress=False, log_every=1)
    return TrainConfig(**{**fields, **overrides})


class Killed(Exception):
    """Stands in for a kill: raised from inside the training step."""


def killed_after(monkeypatch, steps):
    """Make the next run die during step `steps` + 1, after `steps` optimizer steps (a kill -9 stand-in: the run's
    folder is left as a killed run leaves it)."""
    real = loop._forward_backward
    calls = []

    def forward_backward(*args, **kwargs):
        calls.append(1)
        if len(calls) > steps:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_forward_backward", forward_backward)
    return lambda: monkeypatch.setattr(loop, "_forward_backward", real)


METRIC_FIELDS = {"step", "tokens", "train_loss", "lr", "tokens_per_s", "step_time_s", "optimizer_step_time_s", "mfu",
                 "peak_memory_bytes", "grad_norm", "param_norm"}
RESULT_FIELDS = {"final_val_loss", "diverged", "diverged_reason", "steps", "tokens", "wall_time_s", "tokens_per_s",
                 "optimizer_step_share", "peak_memory_bytes", "eval_tokens", "eval_sha256", "world_size", "mode",
                 "optimizer_state_bytes", "config"}


def read_metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def test_run_records_the_contracts_metrics_result_and_config(tmp_path, cache_dir):
    """run-records.md: every field of metrics.jsonl and result.json, with values that mean what they say."""
    result = train(tiny(tmp_path, cache_dir, steps=6, eval_every=3))
    assert not result.diverged and result.diverged_reason is None and result.steps == 6
    assert [r["step"] for r in result.history] == list(range(1, 7))
    assert [r["step"] for r in result.history if "val_loss" in r] == [3, 6]
    assert result.final_val_loss == result.history[-1]["val_loss"]
    lines = read_metrics(tmp_path / "run")
    assert lines == result.history
    for record in lines:
        assert METRIC_FIELDS <= set(record), METRIC_FIELDS - set(record)
        assert record["tokens"] == record["step"] * 4 * 32
        assert record["mfu"] is None  # CPU: no bf16 peak to measure against
        assert record["tokens_per_s"] == pytest.approx(4 * 32 / record["step_time_s"], rel=1e-6)
        assert 0 < record["optimizer_step_time_s"] < record["step_time_s"]
        assert record["peak_memory_bytes"] > 10_000_000  # the process's peak RSS: torch alone holds more
        assert math.isfinite(record["train_loss"]) and record["grad_norm"] > 0
    # The parameter norm after each step, from the saved final weights of a same-seed rerun.
    again = train(tiny(tmp_path / "w", cache_dir, steps=6, eval_every=3, keep_final_weights=True))
    weights = torch.load(tmp_path / "w" / "run" / "final_model.pt")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in weights.values()]))
    assert again.history[-1]["param_norm"] == pytest.approx(norm.item(), rel=1e-6)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert RESULT_FIELDS <= set(saved), RESULT_FIELDS - set(saved)
    assert saved["final_val_loss"] == result.final_val_loss and saved["config"]["optimizer"] == "adamw"
    assert saved["tokens"] == 6 * 4 * 32 and saved["world_size"] == 1 and saved["eval_tokens"] == 1024
    assert 0 < saved["optimizer_step_share"] < 1 and saved["wall_time_s"] > 0 and saved["tokens_per_s"] > 0
    assert saved["peak_memory_bytes"] >= max(r["peak_memory_bytes"] for r in lines)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["steps"] == 6 and config["seq_len"] == 32 and config["model_config"]["vocab_size"] == 512
    assert config["micro_batch"] == 4 and config["grad_accum"] == 1 and config["compile"] is False
    # the LR follows the schedule: cosine, no warmup, peak 3e-3
    for r in result.history:
        expected = 3e-3 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / 6))
        assert r["lr"] == pytest.approx(expected, rel=1e-12)


def test_log_steps_are_the_first_every_log_every_the_evaluations_and_the_last(tmp_path, cache_dir):
    result = train(tiny(tmp_path, cache_dir, steps=11, eval_every=4, log_every=5))
    assert [r["step"] for r in result.history] == [1, 4, 5, 8, 10, 11]
    assert [r["step"] for r in result.history if "val_loss" in r] == [4, 8, 11]
    # tokens/s and step time cover each record's interval: 4 steps between steps 1 and 5.
    assert result.history[2]["tokens_per_s"] == pytest.approx(4 * 32 / result.history[2]["step_time_s"], rel=1e-6)


def test_no_host_reads_between_log_steps(tmp_path, cache_dir, monkeypatch):
    """The trainer reads the device (loss, norms, all-reduces) on log steps only: the .item()/.tolist() calls made
    from the trainer, model and data code do not grow with the steps between two log steps. (The optimizers' own
    reads of their CPU step counters are not device syncs and are not counted.)"""
    ours = str(Path(loop.__file__).parent.parent)
    reads = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)

        def read(self, _real=real):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours) and Path(caller).relative_to(ours).parts[0] in ("train", "models", "data"):
                reads.append(caller)
            return _real(self)

        monkeypatch.setattr(torch.Tensor, name, read)

    def count(steps):
        reads.clear()
        train(tiny(tmp_path / str(steps), cache_dir, steps=steps, eval_every=0, log_every=steps // 2))
        return len(reads)

    assert count(8) == count(24) > 0


def test_eval_every_zero_evaluates_at_the_end_and_a_finished_run_keeps_no_checkpoints(tmp_path, cache_dir):
    result = train(tiny(tmp_path, cache_dir, steps=4, eval_every=0, checkpoint_every=1))
    assert [r["step"] for r in result.history if "val_loss" in r] == [4]
    # run.lock stays: unlinking a lock file lets a second process lock a fresh inode beside one still holding it.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "metrics.jsonl", "result.json",
                                                                    "run.lock"]


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


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_micro_batches_give_the_whole_batchs_step(tmp_path, cache_dir, name):
    """Batch 16 in micro-batches of 4 is the step of micro-batch 16, to float rounding, over 20 steps."""
    # Muon iterates in float32 here: in bfloat16 (the default where the CPU multiplies it natively) the gradients'
    # last-bit differences move elements across bf16 roundings, and 20 steps of that reach 1e-5 of the loss.
    hparams = {"batch_size": 16, **({"ns_dtype": "float32"} if name == "muon" else {})}
    whole, parts = (train(tiny(tmp_path / str(m), cache_dir, optimizer=name, steps=20, eval_every=10,
                               micro_batch=m, hparams=hparams)) for m in (16, 4))
    assert parts.config["grad_accum"] == 4 and whole.config["grad_accum"] == 1
    for a, b in zip(whole.history, parts.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert parts.final_val_loss == pytest.approx(whole.final_val_loss, rel=1e-5)
    assert parts.eval_sha256 == whole.eval_sha256


def test_sophia_sums_its_hessian_vector_product_over_micro_batches(rng):
    """The trainer's Hessian step over 4 micro-batches (one probe per step) gives the gradients and the Hessian
    estimate of the whole batch's loss, in float64: Sophia's step is then the whole batch's (its update itself,
    clip(m / max(γh, ε)), turns last-bit differences of m near 0 into ±1, so its losses are not compared)."""
    import dataclasses

    from fastoptim.models import MODEL_CONFIGS, Llama
    from fastoptim.optim.sophia import SophiaH

    cfg = dataclasses.replace(MODEL_CONFIGS["tiny"], vocab_size=97)
    tokens = torch.randint(97, (8, 17), generator=rng)
    seed = int(torch.randint(2**31, (), generator=rng))
    results = []
    for micro_batch in (8, 2):
        torch.manual_seed(0)
        model = Llama(cfg).double()
        optimizer = SophiaH(model, lr=1e-3)
        assert optimizer.hessian_due
        torch.manual_seed(seed)  # the probe comes from the global generator, as in training
        loop._forward_backward(model, optimizer, tokens[:, :-1], tokens[:, 1:], micro_batch,
                               contextlib.nullcontext(), hessian=True)
        results.append(({n: p.grad.clone() for n, p in model.named_parameters()},
                        {n: optimizer.state[p]["hessian"].clone() for n, p in model.named_parameters()}))
    (grads, hessians), (micro_grads, micro_hessians) = results
    for name in grads:
        torch.testing.assert_close(micro_grads[name], grads[name], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(micro_hessians[name], hessians[name], rtol=1e-8, atol=1e-14)
    assert any(h.abs().max() > 0 for h in hessians.values())


def test_the_eval_set_is_fixed_text_whatever_the_batch(tmp_path, cache_dir):
    runs = [train(tiny(tmp_path / f"b{b}", cache_dir, steps=2, hparams={"batch_size": b}, micro_batch=m))
            for b, m in ((4, 2), (8, 8))]
    assert runs[0].eval_sha256 == runs[1].eval_sha256 and runs[0].eval_tokens == runs[1].eval_tokens == 1024
    other = train(tiny(tmp_path / "other", cache_dir, steps=2, eval_tokens=2048))
    assert other.eval_sha256 != runs[0].eval_sha256


def test_eval_set_larger_than_the_held_out_split_fails_before_training(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(loop, "_forward_backward", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"eval_tokens=10,000,000 needs .* held-out split of stdlib holds"):
        train(tiny(tmp_path, cache_dir, eval_tokens=10_000_000))


@pytest.mark.slow
def test_compile_runs_on_cpu(tmp_path, cache_dir):
    """--compile (each block through torch.compile) on the CPU: the same losses as eager, to float rounding."""
    eager, compiled = (train(tiny(tmp_path / str(c), cache_dir, steps=2, eval_every=0, compile=c))
                       for c in (False, True))
    assert compiled.config["compile"] is True
    for a, b in zip(eager.history, compiled.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-5)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in ("kron", "soap") else [])
                                  for n in RESUME_OPTIMIZERS if n in optimizer_names()])
def test_a_killed_run_resumes_bit_identically(tmp_path, cache_dir, monkeypatch, name):
    steps = 8
    hparams = RESUME_HPARAMS.get(name, {})

    def config(folder, **overrides):
        return tiny(folder, cache_dir, optimizer=name, steps=steps, eval_every=4, checkpoint_every=steps // 2,
                    keep_final_weights=True, hparams=hparams, **overrides)

    straight = train(config(tmp_path / "a"))
    assert not straight.diverged
    restore = killed_after(monkeypatch, steps // 2 + 1)  # dies during step 6, after the checkpoint of step 4
    with pytest.raises(Killed):
        train(config(tmp_path / "b"))
    restore()
    killed = tmp_path / "b" / "run"
    assert [p.name for p in (killed / "checkpoints").iterdir()] == [f"step_{steps // 2:08d}"]
    resumed = train(config(tmp_path / "b", resume=True))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    assert resumed.final_val_loss == straight.final_val_loss
    a_state = torch.load(tmp_path / "a" / "run" / "final_model.pt")
    b_state = torch.load(killed / "final_model.pt")
    for key, tensor in a_state.items():
        assert torch.equal(tensor, b_state[key]), key
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, steps + 1))
    assert not (killed / "checkpoints").exists()


def test_resume_with_another_micro_batch_is_allowed(tmp_path, cache_dir, monkeypatch):
    """The micro-batch is a setting, not the run's identity: a killed run resumes with another one."""
    cfg = dict(steps=6, eval_every=3, hparams={"batch_size": 8})
    straight = train(tiny(tmp_path / "a", cache_dir, micro_batch=8, **cfg))
    restore = killed_after(monkeypatch, 4)
    with pytest.raises(Killed):
        train(tiny(tmp_path / "b", cache_dir, micro_batch=8, **cfg))
    restore()
    resumed = train(tiny(tmp_path / "b", cache_dir, micro_batch=2, resume=True, **cfg))
    assert resumed.config["micro_batch"] == 2
    assert resumed.final_val_loss == pytest.approx(straight.final_val_loss, rel=1e-5)


def test_also_resumes_a_finished_run_without_training(tmp_path, cache_dir, monkeypatch):
    first = train(tiny(tmp_path, cache_dir, steps=3, eval_every=3))
    monkeypatch.setattr(loop, "_forward_backward", lambda *a, **k: pytest.fail("trained again"))
    again = train(tiny(tmp_path, cache_dir, steps=3, eval_every=3, resume=True, micro_batch=2))
    assert again.final_val_loss == first.final_val_loss and again.history == first.history
    assert again.eval_sha256 == first.eval_sha256


def test_checkpoints_keep_the_last_k(tmp_path, cache_dir, monkeypatch):
    killed_after(monkeypatch, 6)
    with pytest.raises(Killed):
        train(tiny(tmp_path, cache_dir, steps=8, checkpoint_every=1, keep_checkpoints=2))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000005", "step_00000006"]


def test_checkpoints_on_a_time_interval(tmp_path, cache_dir, monkeypatch):
    """checkpoint_every_s: a checkpoint at the first log step after the interval (0 s here: every log step)."""
    killed_after(monkeypatch, 7)
    with pytest.raises(Killed):
        train(tiny(tmp_path, cache_dir, steps=9, eval_every=0, checkpoint_every=0, checkpoint_every_s=0.0,
                   log_every=3, keep_checkpoints=10))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000001", "step_00000003", "step_00000006"]


def test_failed_write_keeps_the_existing_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(folder, {"payload": torch.arange(5)}, {"step": 3}, keep=1)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match=r"writing checkpoint .*step_00000003 failed \(rank 0: OSError: disk full\)"):
        ckpt.save_checkpoint(folder, {"payload": torch.zeros(5)}, {"step": 3}, keep=1)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000003"]


def test_corrupt_checkpoint_is_a_clear_error_before_any_work(tmp_path, cache_dir):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step_00000004").mkdir()
    (folder / "step_00000004" / ckpt.META).write_bytes(b"\x00garbage" * 10)
    fresh_cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="step_00000004 is corrupt or unreadable"):
        train(tiny(tmp_path, str(fresh_cache), resume=True))
    assert not fresh_cache.exists()


def test_mismatched_run_names_the_setting(tmp_path, cache_dir, monkeypatch):
    train(tiny(tmp_path / "done", cache_dir, steps=3, eval_every=3))
    with pytest.raises(ValueError, match=r"result.json belongs to a different run: hparams=.*'lr': 0.003.* there, "
                                         r"hparams=.*'lr': 0.001"):
        train(tiny(tmp_path / "done", cache_dir, steps=3, eval_every=3, resume=True, hparams={"lr": 1e-3}))
    with pytest.raises(ValueError, match="already holds a finished run"):
        train(tiny(tmp_path / "done", cache_dir, steps=3, eval_every=3))
    killed_after(monkeypatch, 2)
    with pytest.raises(Killed):
        train(tiny(tmp_path / "killed", cache_dir, steps=4, checkpoint_every=1))
    with pytest.raises(ValueError, match=r"step_00000002 belongs to a different run: eval_tokens=1024 there, "
                                         r"eval_tokens=2048 here"):
        train(tiny(tmp_path / "killed", cache_dir, steps=4, resume=True, eval_tokens=2048))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny(tmp_path / "killed", cache_dir, steps=4))


@pytest.mark.parametrize("overrides,error,match", [
    (dict(model="7b"), ValueError, "model='7b'"),
    (dict(optimizer="sgdx"), ValueError, "sgdx"),
    (dict(hparams={"batch_size": 6}, micro_batch=4), ValueError, r"micro_batch=4 must be .* divisor of the per-rank "
                                                                 r"batch \(batch_size=6"),
    (dict(micro_batch="some"), ValueError, "micro_batch='some'"),
    (dict(data="/nonexistent/corpus"), FileNotFoundError, "/nonexistent/corpus"),
    (dict(eval_data="/nonexistent/eval"), FileNotFoundError, "eval_data: path '/nonexistent/eval'"),
    (dict(eval_tokens=16), ValueError, "eval_tokens=16 must be at least one sequence of seq_len=32"),
    (dict(hparams={"warmup": 100}), ValueError, "warmup=100"),
    (dict(hparams={"not_an_hparam": 1}), ValueError, "not_an_hparam"),
    (dict(log_every=0), ValueError, "log_every=0"),
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
    result = train(tiny(tmp_path / "r", cache_dir, corpus_bytes=20_000, steps=20, eval_every=20, eval_tokens=256,
                        hparams={"batch_size": 16}, allow_repeat=True, checkpoint_every=0))
    assert result.steps == 20 and result.data_passes > 1
    assert capsys.readouterr().out.count("data repeats") == 1


def test_divergence_rule_reads_the_eval_loss():
    assert loop.divergence_reason(1200, float("nan")) == "eval loss NaN at step 1200"
    assert loop.divergence_reason(5, float("inf")) == "eval loss inf at step 5"
    assert loop.divergence_reason(5, 1e4 + 1) == "eval loss 1e+04 > 1e4 at step 5"
    assert loop.divergence_reason(5, 1e4) is None
    assert loop.divergence_reason(2000, 7.0) is None and loop.divergence_reason(2001, 5.99) is None
    assert loop.divergence_reason(2001, 6.31) == "eval loss 6.31 ≥ 6 after step 2000 (at step 2001)"


def test_a_training_loss_spike_is_not_divergence(tmp_path, cache_dir, monkeypatch):
    """The study judges the eval history: one huge training loss (finite, parameters unharmed) does not stop a run."""
    real = loop._forward_backward
    calls = []

    def spiky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * 1e6 if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "_forward_backward", spiky)
    result = train(tiny(tmp_path, cache_dir, steps=4, eval_every=0))
    assert result.history[1]["train_loss"] > 1e4
    assert not result.diverged and result.steps == 4 and math.isfinite(result.final_val_loss)


def test_divergence_stops_the_run_at_the_evaluation_that_sees_it(tmp_path, cache_dir, monkeypatch):
    """NaN gradients at step 3 wreck the parameters; step 4's loss is NaN, so the trainer evaluates at once, the
    rule fires there, the run stops and keeps its records (not its checkpoints), with the reason."""
    real = loop._forward_backward
    calls = []

    def poisoned(model, *args, **kwargs):
        calls.append(1)
        loss = real(model, *args, **kwargs)
        if len(calls) == 3:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(loop, "_forward_backward", poisoned)
    result = train(tiny(tmp_path, cache_dir, steps=8, eval_every=6, checkpoint_every=1, log_every=1))
    assert result.diverged and result.steps == 4 and result.final_val_loss == math.inf
    assert result.diverged_reason == "eval loss NaN at step 4"
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["diverged"] and saved["diverged_reason"] == "eval loss NaN at step 4"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_trains_and_reports_errors(tmp_path, cache_dir, capsys):
    out = tmp_path / "cli"
    code = cli_main(["--model", "tiny", "--steps", "3", "--lr", "3e-3", "--batch-size", "4", "--seq-len", "32",
                     "--vocab-size", "512", "--corpus-bytes", "200000", "--cache-dir", cache_dir,
                     "--eval-tokens", "512", "--micro-batch", "2", "--out-dir", str(out), "--device", "cpu",
                     "--no-progress", "--hp", "beta2=0.95", "--hp", "weight_decay=0.1"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["hparams"] == {"lr": 3e-3, "batch_size": 4, "beta2": 0.95, "weight_decay": 0.1}
    assert config["micro_batch"] == 2 and config["grad_accum"] == 2
    assert cli_main(["--model", "nope", "--out-dir", str(tmp_path / "x")]) == 2
    assert "model='nope' is not a known model" in capsys.readouterr().err


def test_micro_batch_search_takes_the_largest_divisor_that_fits(tmp_path):
    from fastoptim.train.micro_batch import cached_probe, largest_fitting

    tried = []
    assert largest_fitting(24, lambda m: tried.append(m) or m <= 5) == 4
    assert tried == [24, 12, 8, 6, 4]
    assert largest_fitting(8, lambda m: False) == 1
    probes = []
    assert cached_probe(tmp_path, "gpu|130m", lambda: probes.append(1) or 16) == 16
    assert cached_probe(tmp_path, "gpu|130m", lambda: probes.append(1) or 8) == 16  # cached: not probed again
    assert cached_probe(tmp_path, "gpu|300m", lambda: probes.append(1) or 8) == 8 and len(probes) == 2


def test_micro_batch_auto_on_cpu_is_the_whole_batch(tmp_path, cache_dir):
    result = train(tiny(tmp_path, cache_dir, steps=1, micro_batch="auto", hparams={"batch_size": 8}))
    assert result.config["micro_batch"] == 8


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
        if resume_from is not None:  # every rank places the checkpoint a killed run left (the first one wins)
            folder = Path(cfg.out_dir) / "checkpoints"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copytree(resume_from, folder / f"tmp{rank}")
            try:
                os.rename(folder / f"tmp{rank}", folder / Path(resume_from).name)
            except OSError:  # another rank placed it
                shutil.rmtree(folder / f"tmp{rank}")
        result = train(cfg)
        outcomes.append({"history": result.history, "final": result.final_val_loss, "sha": result.eval_sha256})
    torch.save(outcomes, f"{results}.{rank}")


def test_two_cpu_ranks_match_one_process(tmp_path, cache_dir, monkeypatch):
    """2 gloo processes give the single-process run's losses (same global batch, same eval set) with DDP and with
    FSDP2, in micro-batches: AdamW and Muon (both clipped: the global norm over owners), also when that last run
    resumes from the mid-run checkpoint of a killed single-process run. The eval set's 33 windows do not split evenly."""
    optimizers = {"clipped": ("adamw", {}),
                  # float32 Newton–Schulz: bf16 would round the ranks' last-bit gradient differences visibly
                  "spread": ("muon", {"ns_dtype": "float32"})}

    def config(folder, label, **overrides):
        name, hparams = optimizers[label]
        return tiny(folder, cache_dir, optimizer=name, steps=4, eval_every=2, eval_tokens=33 * 32, micro_batch=2,
                    keep_final_weights=True, hparams={"batch_size": 8, **hparams}, **overrides)

    single = {label: train(config(tmp_path / f"one-{label}", label)) for label in optimizers}
    restore = killed_after(monkeypatch, 3)
    with pytest.raises(Killed):
        train(config(tmp_path / "killed", "spread", checkpoint_every=2))
    restore()
    owner_checkpoint = tmp_path / "killed" / "run" / "checkpoints" / "step_00000002"
    kinds = {"ddp": ("clipped", False, None), "fsdp2": ("clipped", True, None),
             "fsdp2-spread": ("spread", True, None), "fsdp2-spread-resumed": ("spread", True, owner_checkpoint)}
    runs = [(_free_port(), config(tmp_path / kind, label, fsdp=fsdp, resume=bool(resume_from)), resume_from)
            for kind, (label, fsdp, resume_from) in kinds.items()]
    results = tmp_path / "results"
    # spawn, not fork: a parent that has already run autograd (any earlier test) cannot fork autograd's threads.
    mp.start_processes(_rank_worker, args=(2, runs, str(results)), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        for (label, *_), got in zip(kinds.values(), torch.load(f"{results}.{rank}", weights_only=False)):
            assert len(got["history"]) == 4 and got["sha"] == single[label].eval_sha256
            for a, b in zip(got["history"], single[label].history):
                assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
                assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
                assert a["param_norm"] == pytest.approx(b["param_norm"], rel=1e-5)
            assert got["final"] == pytest.approx(single[label].final_val_loss, rel=1e-5, abs=1e-6)
    # Every kind writes whole-tensor final weights that one process loads.
    for kind, (label, *_) in kinds.items():
        one = torch.load(tmp_path / f"one-{label}" / "run" / "final_model.pt")
        state = torch.load(tmp_path / kind / "run" / "final_model.pt")
        assert state.keys() == one.keys()
        for key, tensor in one.items():
            # Adam's normalisation turns rounding noise in near-zero gradients into visible (still << lr)
            # differences on a few elements; the losses above are the tight check.
            torch.testing.assert_close(state[key], tensor, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_trains_on_cuda_with_bf16_autocast(tmp_path, cache_dir):
    result = train(tiny(tmp_path, cache_dir, device="cuda", steps=30, eval_every=10,
                        hparams={"lr": 1e-2, "batch_size": 8}))
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert not result.diverged and vals[-1] < vals[0] < math.log(512) + 0.5


def random_shards(folder, vocab, train_tokens, val_tokens, seed=0):
    """uint32 shards of uniform random ids: data whose loss cannot fall below ln(vocab), enough for memory and
    throughput checks."""
    from fastoptim.data.shards import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_shard(folder / "train_000000.bin", rng.integers(0, vocab, size=train_tokens), vocab)
    write_shard(folder / "val_000000.bin", rng.integers(0, vocab, size=val_tokens), vocab)
    return folder


@pytest.mark.cuda
def test_130m_at_batch_128_trains_50_steps_with_peak_memory_logged(tmp_path):
    """The paper's smallest model at its batch (128 × 4096 tokens) in the presets' micro-batches, compiled, on
    Llama-3's vocabulary: 50 steps finish, every record carries peak memory and MFU."""
    from fastoptim.grid.presets import MICRO_BATCH

    vocab, seq, batch = 128_256, 4096, 128
    data = random_shards(tmp_path / "shards", vocab, 51 * batch * (seq + 1), 16 * (seq + 1))
    result = train(TrainConfig(model="130m", optimizer="adamw", hparams={"lr": 8e-3, "batch_size": batch,
                                                                         "warmup": 10},
                               steps=50, eval_every=0, eval_tokens=16 * seq, data=str(data), device="cuda",
                               micro_batch=MICRO_BATCH["130m"], out_dir=str(tmp_path / "run"), progress=False))
    assert result.steps == 50 and not result.diverged and math.isfinite(result.final_val_loss)
    assert result.config["grad_accum"] == batch // MICRO_BATCH["130m"] and result.config["compile"] is True
    total = torch.cuda.get_device_properties(0).total_memory
    for record in result.history:
        assert 0 < record["peak_memory_bytes"] < total
        assert record["mfu"] is None or 0 < record["mfu"] < 1
    print(f"130m, batch 128 x 4096: {result.tokens_per_s:,.0f} tokens/s, peak memory "
          f"{result.peak_memory_bytes / 2**30:.1f} GiB, MFU {result.history[-1]['mfu']}")


@pytest.mark.cuda
def test_micro_batch_probe_finds_a_fitting_divisor_on_the_gpu(tmp_path):
    vocab, seq, batch = 128_256, 4096, 128
    data = random_shards(tmp_path / "shards", vocab, 3 * batch * (seq + 1), 4 * (seq + 1))
    cfg = TrainConfig(model="130m", optimizer="adamw", hparams={"lr": 1e-3, "batch_size": batch}, steps=1,
                      eval_every=0, eval_tokens=4 * seq, data=str(data), device="cuda", micro_batch="auto",
                      compile=False, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"),
                      progress=False)
    result = train(cfg)
    chosen = result.config["micro_batch"]
    assert batch % chosen == 0 and result.peak_memory_bytes < torch.cuda.get_device_properties(0).total_memory
    cached = json.loads((tmp_path / "cache" / "micro_batch.json").read_text())
    assert list(cached.values()) == [chosen]
