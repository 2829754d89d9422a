"""A deterministic, seeded, resumable loader of (input, target) sequences from token shards.

The training split is cut into non-overlapping windows of seq_len + 1 tokens (a window never crosses a shard end).
Each epoch visits the windows in a permutation seeded by (seed, epoch); a step takes the next `batch_size` windows of
that permutation (the global batch) and each rank keeps its contiguous slice, so a run on W ranks sees exactly the
batches of a single-process run. The position (epoch, cursor) is the loader's whole state: it goes into checkpoints.
The eval set (EvalSet) is a fixed list of windows, independent of batch size, micro-batch and ranks.
"""

import hashlib
from dataclasses import dataclass

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

    def passes(self, steps: int) -> float:
        """How many passes over the training split `steps` batches make."""
        return steps / self.batches_per_epoch

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
        return f"data repeats: {steps} steps make {self.passes(steps):.2f} passes over {held:,} tokens"

    def _permutation(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order, self._order_epoch = rng.permutation(self.index.count), self.epoch
        return self._order

    def next_rows(self) -> torch.Tensor:
        """This rank's next (batch_size / world_size, seq_len + 1) int64 windows: inputs [:, :-1], targets [:, 1:]."""
        if self.cursor + self.batch_size > self.index.count:  # drop the epoch's incomplete last batch
            self.epoch, self.cursor = self.epoch + 1, 0
        windows = self._permutation()[self.cursor: self.cursor + self.batch_size]
        self.cursor += self.batch_size
        local = self.batch_size // self.world_size
        return self.index.gather(windows[self.rank * local: (self.rank + 1) * local])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), each (batch_size / world_size, seq_len) int64."""
        rows = self.next_rows()
        return rows[:, :-1], rows[:, 1:]

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


@dataclass(frozen=True)
class EvalSet:
    """The fixed eval set: the first `count` windows of seq_len + 1 tokens of its source, in order.

    It depends on the source, seq_len and eval_tokens only, never on batch size, micro-batch or ranks: rank r scores
    windows r, r + W, … and the ranks' loss sums add up to the same total. `sha256` hashes the windows' token ids
    (little-endian int64, concatenated), so two runs can be shown to be scored on the same text.
    """
    windows: np.ndarray  # (count, seq_len + 1) int64

    @property
    def tokens(self) -> int:
        """Predicted tokens: seq_len per window."""
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.windows, dtype="<i8").tobytes()).hexdigest()

    def batches(self, micro_batch: int, rank: int = 0, world_size: int = 1):
        """This rank's windows as (inputs, targets, rows that count) of at most micro_batch rows. Every rank yields
        the same number of batches (FSDP's forward is a collective): a rank with one window fewer ends with a
        stand-in batch whose rows count 0."""
        mine = torch.from_numpy(self.windows[rank::world_size])
        most = -(-self.windows.shape[0] // world_size)
        batches = list(mine.split(micro_batch))
        for rows in batches:
            yield rows[:, :-1], rows[:, 1:], rows.shape[0]
        for _ in range(-(-most // micro_batch) - len(batches)):
            stand_in = torch.from_numpy(self.windows[:1])
            yield stand_in[:, :-1], stand_in[:, 1:], 0


def eval_set(shards: list[np.ndarray], seq_len: int, eval_tokens: int, source: str) -> EvalSet:
    """eval_tokens // seq_len windows from the start of `shards` (named `source` in errors)."""
    count = eval_tokens // seq_len
    if count < 1:
        raise ValueError(f"eval_tokens={eval_tokens} must be at least one sequence of seq_len={seq_len} tokens")
    index = SequenceIndex(shards, seq_len + 1)
    if count > index.count:
        raise ValueError(f"eval_tokens={eval_tokens:,} needs {count:,} windows of {seq_len + 1} tokens but {source} "
                         f"holds {index.count:,} ({index.count * seq_len:,} tokens); lower eval_tokens or give a "
                         f"larger eval set (eval_data, --eval-data)")
    return EvalSet(index.gather(np.arange(count)).numpy())
