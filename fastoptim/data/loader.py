"""A deterministic, seeded, resumable loader of (input, target) sequences from token shards.

The training split is cut into non-overlapping windows of seq_len + 1 tokens (a window never crosses a shard end).
Each epoch visits the windows in a permutation seeded by (seed, epoch); a step takes the next `batch_size` windows of
that permutation (the global batch) and each rank keeps its contiguous slice, so a run on W ranks sees exactly the
batches of a single-process run. The position (epoch, cursor) is the loader's whole state: it goes into checkpoints.
"""

import numpy as np
import torch


class SequenceIndex:
    """Maps a global window number to (shard, offset) for windows of `window` tokens laid out shard after shard."""

    def __init__(self, shards: list[np.ndarray], window: int):
        self.shards = shards
        self.window = window
        per_shard = [max(0, (s.size - 1) // (window - 1)) for s in shards]
        self.starts = np.cumsum([0] + per_shard)
        self.count = int(self.starts[-1])

    def gather(self, windows: np.ndarray) -> torch.Tensor:
        rows = []
        for w in windows:
            shard = int(np.searchsorted(self.starts, w, side="right")) - 1
            offset = (int(w) - int(self.starts[shard])) * (self.window - 1)  # windows share their boundary token
            rows.append(np.asarray(self.shards[shard][offset: offset + self.window], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


def _split_for_rank(batch: torch.Tensor, rank: int, world_size: int):
    local = batch.shape[0] // world_size
    rows = batch[rank * local: (rank + 1) * local]
    return rows[:, :-1], rows[:, 1:]


def check_batch_divisible(batch_size: int, world_size: int) -> None:
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the number of ranks "
                         f"(world_size={world_size})")


class TrainLoader:
    def __init__(self, shards: list[np.ndarray], seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        check_batch_divisible(batch_size, world_size)
        self.index = SequenceIndex(shards, seq_len + 1)
        if self.index.count < batch_size:
            raise ValueError(f"data: the training split holds {self.index.count} sequences of {seq_len + 1} "
                             f"tokens, fewer than one batch of batch_size={batch_size}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def batches_per_epoch(self) -> int:
        return self.index.count // self.batch_size

    def check_budget(self, steps: int, allow_repeat: bool) -> str | None:
        """Error when `steps` batches exceed one pass over the data, unless repeating is allowed; then a message
        saying how often the data repeats (to print once)."""
        needed = steps * self.batch_size * self.seq_len
        held = self.batches_per_epoch * self.batch_size * self.seq_len
        if steps <= self.batches_per_epoch:
            return None
        if not allow_repeat:
            raise ValueError(f"data: the run needs {needed:,} training tokens ({steps} steps x batch_size "
                             f"{self.batch_size} x seq_len {self.seq_len}) but the training split serves {held:,} "
                             f"per pass; use more data, fewer steps, or allow_repeat (--allow-repeat)")
        return f"data repeats: {steps} steps make {steps / self.batches_per_epoch:.2f} passes over {held:,} tokens"

    def _permutation(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order, self._order_epoch = rng.permutation(self.index.count), self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), each (batch_size / world_size, seq_len) int64."""
        if self.cursor + self.batch_size > self.index.count:  # drop the epoch's incomplete last batch
            self.epoch, self.cursor = self.epoch + 1, 0
        windows = self._permutation()[self.cursor: self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return _split_for_rank(self.index.gather(windows), self.rank, self.world_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "sequences": self.index.count}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "batch_size", "sequences"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state does not match this run: {key}={state[key]} in the checkpoint, "
                                 f"{mine[key]} here")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def validation_batches(shards: list[np.ndarray], seq_len: int, batch_size: int, max_batches: int,
                       rank: int = 0, world_size: int = 1):
    """The same fixed validation batches every time: the split's first windows, in order."""
    check_batch_divisible(batch_size, world_size)
    index = SequenceIndex(shards, seq_len + 1)
    n_batches = min(max_batches, index.count // batch_size)
    if n_batches == 0:
        raise ValueError(f"data: the validation split holds {index.count} sequences of {seq_len + 1} tokens, "
                         f"fewer than one batch of batch_size={batch_size}")
    for b in range(n_batches):
        yield _split_for_rank(index.gather(np.arange(b * batch_size, (b + 1) * batch_size)), rank, world_size)
