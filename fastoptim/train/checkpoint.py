"""Checkpoints that survive a kill: written atomically, the last k kept, checked against the run on load.

A checkpoint holds everything a resumed run needs to continue bit for bit: model and optimizer state, the loader's
position, every RNG state (torch, CUDA, numpy, Python), the step, the metrics history and the run's identity (the
config fields that shape the computation). It is written to a temporary file and renamed over the final name, so a
failed or interrupted write never replaces a good checkpoint.
"""

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

FORMAT = 1
_NAME = re.compile(r"step_(\d+)\.pt$")
REQUIRED = ("format", "step", "identity", "model", "optimizer", "loader", "rng", "history")


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, state: dict, keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:08d}.pt"
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        # Checkpoints are trusted files this trainer wrote; optimizer state may hold arbitrary Python objects.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err}); "
                         f"delete it to resume from an older one") from err
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED):
        raise ValueError(f"checkpoint {path} is not a fastoptim training checkpoint (missing keys)")
    if state["format"] != FORMAT:
        raise ValueError(f"checkpoint {path} has format {state['format']}, this trainer reads format {FORMAT}")
    return state


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
