"""What a grid ran on, so a report can be cited: code, libraries, device, data and tokenizer, per grid session.

`session_facts` is recorded in the store when a grid session starts and again when it ends (store.record_session);
the report gathers every session's facts with what each run folder recorded (eval set and its hash, device) and the
runs' own start and end times.
"""

import hashlib
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastoptim


def code_facts() -> dict:
    """fastoptim's version and, when it runs from a git checkout, its commit and whether the tree had changes."""
    root = Path(fastoptim.__file__).resolve().parent.parent
    commit, dirty = _git(root, "rev-parse", "HEAD"), _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"fastoptim_version": fastoptim.__version__, "fastoptim_commit": commit,
            "fastoptim_dirty": None if commit is None else bool(dirty), "torch_version": torch.__version__,
            "python_version": platform.python_version()}


def _git(root: Path, *args) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_facts(device: str, executor: str, gpus: int | None = None) -> dict:
    """The device runs train on: the GPU's name and how many (executor gpus/slurm or a CUDA device), else the CPU's
    model and core count, and the torch threads a sequential run gets."""
    cuda = device == "cuda" or executor in ("gpus", "slurm") or (device == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.is_available():
        return {"device_name": torch.cuda.get_device_name(0), "device_count": gpus or torch.cuda.device_count(),
                "device_kind": "cuda"}
    if cuda:  # a Slurm grid submitted from a machine without a GPU: the nodes' GPUs are known to the runs only
        return {"device_name": None, "device_count": gpus, "device_kind": "cuda"}
    return {"device_name": _cpu_model(), "device_count": os.cpu_count(), "device_kind": "cpu",
            "torch_threads": torch.get_num_threads()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def data_facts(preset, cache_dir=None) -> dict:
    """The training data (spec, tokens per split, vocabulary) and its tokenizer with the file's SHA-256."""
    from fastoptim.data import prepare_data
    from fastoptim.train import TrainConfig

    spec = preset.data or TrainConfig.data
    data = prepare_data(spec, cache_dir, preset.vocab_size)
    tokenizer = data.tokenizer if data.tokenizer is not None and Path(data.tokenizer).exists() else None
    return {"data": spec, "data_description": data.description, "train_tokens": int(data.train_tokens),
            "val_tokens": int(sum(split.size for split in data.val)), "vocab_size": int(data.vocab_size),
            "tokenizer": None if tokenizer is None else str(tokenizer),
            "tokenizer_sha256": None if tokenizer is None else hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
            "eval_data": preset.eval_data}


def session_facts(preset, device: str, executor: str, cache_dir=None, gpus: int | None = None) -> dict:
    return {"host": socket.gethostname(), "started": time.time(), "ended": None, "command": sys.argv,
            "preset": preset.name, "executor": executor, **code_facts(), **device_facts(device, executor, gpus),
            **data_facts(preset, cache_dir)}
