"""Token shards: fastoptim's own layout (uint16 or uint32 tokens, with the vocabulary in the header) and the
llm.c / modded-nanogpt `.bin` layout (uint16 tokens, no vocabulary), both read as numpy memmaps.

Both layouts start with a header of 256 little-endian int32 (1024 bytes), then the tokens:
- fastoptim:       [0] magic 0x464F5348 ("HSOF"), [1] version 1, [2] bytes per token (2 or 4), [3] vocabulary size,
                   [4:6] token count as one little-endian int64; tokens as uint16 when the vocabulary fits 65,536 ids,
                   else uint32 (Llama-3's 128,256).
- llm.c / modded-nanogpt: [0] magic 20240520, [1] version 1, [2] token count; tokens as uint16. These shards carry no
                   vocabulary: every uint16 id may occur, so unless told otherwise their vocabulary is 65,536.
`write_shard` writes the fastoptim layout; `read_shard` reads both and checks the header against the file's size.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
FASTOPTIM_MAGIC = 0x464F5348
LLMC_MAGIC = 20240520
VERSION = 1
UINT16_VOCAB = 1 << 16
MAX_VOCAB = (1 << 31) - 1  # the header stores it as an int32


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned dtype that holds every id of the vocabulary."""
    if not 0 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} must be between 1 and {MAX_VOCAB:,}")
    return np.dtype("<u2") if vocab_size <= UINT16_VOCAB else np.dtype("<u4")


def shard_header(vocab_size: int, count: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = (FASTOPTIM_MAGIC, VERSION, token_dtype(vocab_size).itemsize, vocab_size)
    header[4:6] = np.array([count], dtype="<i8").view("<i4")
    return header.tobytes()


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write atomically: a reader never sees a half-written shard, even when two processes prepare the same cache."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path}: token id {int(tokens.max())} is outside the vocabulary of {vocab_size:,} ids")
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(shard_header(vocab_size, tokens.size))
        f.write(tokens.astype(token_dtype(vocab_size), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    layout: str              # "fastoptim" | "llm.c"
    dtype: np.dtype
    vocab_size: int | None   # None: the layout does not record it (llm.c)
    tokens: int


def read_header(path: Path) -> ShardInfo:
    """The shard's header, checked against the file's size; a clear error naming the file otherwise."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS or int(header[0]) not in (FASTOPTIM_MAGIC, LLMC_MAGIC):
        raise ValueError(f"{path}: not a token shard (expected a 1024-byte header starting with magic "
                         f"{FASTOPTIM_MAGIC:#x} (fastoptim) or {LLMC_MAGIC} (llm.c / modded-nanogpt))")
    if int(header[1]) != VERSION:
        raise ValueError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    if int(header[0]) == LLMC_MAGIC:
        info = ShardInfo(path, "llm.c", np.dtype("<u2"), None, int(header[2]))
    else:
        width, vocab = int(header[2]), int(header[3])
        count = int(header[4:6].view("<i8")[0])
        if width not in (2, 4) or vocab <= 0 or token_dtype(vocab).itemsize != width or count < 0:
            raise ValueError(f"{path}: corrupt header ({width} bytes per token, vocabulary {vocab}, {count} tokens)")
        info = ShardInfo(path, "fastoptim", token_dtype(vocab), vocab, count)
    expected = HEADER_BYTES + info.dtype.itemsize * info.tokens
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: header says {info.tokens} tokens ({expected} bytes) but the file has "
                         f"{path.stat().st_size} bytes")
    return info


def read_shard(path: Path) -> np.ndarray:
    """The shard's tokens as a read-only memmap (uint16 or uint32)."""
    info = read_header(path)
    if info.tokens == 0:
        return np.zeros(0, dtype=info.dtype)
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=HEADER_BYTES, shape=(info.tokens,))


def max_token(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest id in a (memmapped) shard, read in bounded chunks; -1 when empty."""
    return max((int(tokens[i:i + chunk].max()) for i in range(0, tokens.size, chunk)), default=-1)


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
