"""One live trainer per run folder.

The trainer's rank 0 holds an exclusive lock on OUT_DIR/run.lock for as long as it trains, and the OS drops the lock
when that process ends, however it ends (finished, crashed, killed). A grid driver that died may leave its trainers
running with their claims gone stale; before starting a run, a second driver asks `run_folder_busy` and leaves a
folder alone while its trainer lives, instead of starting a second writer of the same checkpoints. The lock is
flock(2), which Linux also honours on NFS (as POSIX locks), the usual shared file system of a Slurm cluster.
"""

import contextlib
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = "run.lock"


@contextlib.contextmanager
def run_folder_lock(out_dir):
    """Hold out_dir's lock for the body; raises RuntimeError naming the holder if another live process has it."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "a process that did not say"
            raise RuntimeError(f"out_dir={str(out_dir)!r} is being trained by another live process ({holder}); "
                               "wait for it to end or stop it, then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def run_folder_busy(out_dir) -> bool:
    """Whether a live process holds out_dir's lock (a trainer whose driver is gone may still be writing there)."""
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the lock, if it was free and taken here
    return False
