"""Checkpoints that survive a kill and reshard: torch.distributed.checkpoint (DCP) folders, the last k kept,
checked against the run on load.

A checkpoint holds everything a resumed run needs to continue bit for bit: model and optimizer tensors, the loader's
position, every RNG state (torch, CUDA, numpy, Python), the step, the metrics history, the time spent so far and the
run's identity (the config fields that shape the computation; not the micro-batch, the device, compile, the number of
ranks or the mode (DDP, ZeRO-1, FSDP2), which change only rounding and speed).

It is a folder ``step_XXXXXXXX``: the tensors as DCP writes them (every rank its share: FSDP2 shards, ZeRO-1 owners'
state; replicated tensors once), under names that do not depend on the ranks (``model.<parameter>`` and
``optimizer.<parameter>.<state key>``), and ``meta.pt`` (rank 0: everything else). So a run saved on 4 ranks resumes
on 2 or 1, and the reverse: each rank reads what it holds under the new layout. The folder is written under a
temporary name and renamed once complete, so a failed or interrupted write never replaces a good checkpoint. A run
that ends removes its checkpoints (loop.py).
"""

import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

FORMAT = 3
META = "meta.pt"
_NAME = re.compile(r"step_(\d+)(\.pt)?$")  # a .pt file: format 2 (one torch.save), refused on load
REQUIRED = ("format", "step", "identity", "optimizer", "loader", "rng", "history", "timing")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextmanager
def _dcp_call(what: str):
    """DCP's failures as OSError naming the ranks and their errors (DCP raises a BaseException, which would pass
    every `except Exception`); and quiet about the single process it assumes without a process group, by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        try:
            yield
        except CheckpointException as err:
            causes = "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in err.failures.items())
            raise OSError(f"{what} failed ({causes})") from None


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first (temporary folders of unfinished writes are not checkpoints)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict, keep: int) -> Path:
    """Write a checkpoint of step meta["step"]: a collective call, every rank passing its `tensors`; rank 0's `meta`
    is kept. Returns its path."""
    path = folder / f"step_{meta['step']:08d}"
    tmp = folder / f".{path.name}.tmp"
    if _is_main():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a write that died before
    _barrier()
    try:
        with _dcp_call(f"writing checkpoint {path}"):
            dcp.save(tensors, checkpoint_id=tmp, no_dist=not _distributed())
        if _is_main():
            with open(tmp / META, "wb") as f:
                torch.save({"format": FORMAT, **meta}, f)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():  # the same step written again (a resumed run that saves where it resumed)
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
    if _is_main():
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    _barrier()
    return path


def load_checkpoint(path: Path) -> dict:
    """The checkpoint's meta (everything but the tensors, which `load_tensors` reads once the model exists)."""
    if path.is_file():
        raise ValueError(f"checkpoint {path} is a format-2 checkpoint (one torch.save file); this trainer reads "
                         f"format {FORMAT} (DCP folders): finish that run with the trainer that wrote it, or delete it")
    try:
        # Checkpoints are trusted files this trainer wrote; optimizer state may hold arbitrary Python objects.
        state = torch.load(path / META, map_location="cpu", weights_only=False)
        tensors = tensor_shapes(path)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err}); "
                         f"delete it to resume from an older one") from err
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED):
        raise ValueError(f"checkpoint {path} is not a fastoptim training checkpoint (missing keys)")
    if state["format"] != FORMAT:
        raise ValueError(f"checkpoint {path} has format {state['format']}, this trainer reads format {FORMAT}")
    return {**state, "path": path, "tensors": tensors}


def tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor the checkpoint holds: name → (global shape, dtype)."""
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {name: (tuple(m.size), m.properties.dtype) for name, m in metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def load_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` (this rank's, plain or DTensor shards) in place from the checkpoint: a collective call."""
    with _dcp_call(f"reading checkpoint {path}"):
        dcp.load(tensors, checkpoint_id=path, no_dist=not _distributed())


def check_identity(state: dict, identity: dict, path: Path) -> None:
    """A checkpoint resumes only the run that wrote it: name the first setting that differs."""
    for key in sorted(set(identity) | set(state["identity"])):
        theirs, ours = state["identity"].get(key), identity.get(key)
        if theirs != ours:
            raise ValueError(f"checkpoint {path} belongs to a different run: {key}={theirs!r} there, "
                             f"{key}={ours!r} here")


def capture_rng() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            # Only a process that used CUDA has CUDA RNG state; asking otherwise would initialise CUDA (and fail in
            # forked children).
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
