"""Token shards in the nanoGPT / modded-nanogpt .bin layout, read as numpy memmaps.

Layout: a header of 256 int32 (little-endian): [0] magic 20240520, [1] version 1, [2] token count; then the tokens as
uint16. Shards written by those projects' preprocessing scripts load here unchanged, and the corpus cache uses the
same layout.
"""

import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
TOKEN_DTYPE = np.uint16
MAX_VOCAB = np.iinfo(TOKEN_DTYPE).max + 1


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write atomically: a reader never sees a half-written shard, even when two processes prepare the same cache."""
    if tokens.size and int(tokens.max()) >= MAX_VOCAB:
        raise ValueError(f"token id {int(tokens.max())} does not fit the .bin layout's uint16 tokens")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_shard(path: Path) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap; checks the header against the file size."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS or header[0] != MAGIC:
        raise ValueError(f"{path}: not a token shard (expected the .bin header with magic {MAGIC})")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_INTS * 4 + 2 * count
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: header says {count} tokens ({expected} bytes) but the file has "
                         f"{path.stat().st_size} bytes")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(count,))


def find_shards(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, val) .bin files; as in nanoGPT's naming, validation shards have "val" in their file name."""
    files = []
    for path in paths:
        files += sorted(path.glob("*.bin")) if path.is_dir() else [path]
    val = [f for f in files if "val" in f.name]
    train = [f for f in files if "val" not in f.name]
    if not train or not val:
        raise ValueError(f"data: token shards {[str(p) for p in paths]} need both training shards and validation "
                         f"shards (files with 'val' in the name); found {len(train)} train, {len(val)} val")
    return train, val
