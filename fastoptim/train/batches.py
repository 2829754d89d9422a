"""Training batches on the device, one step ahead.

The next step's windows are gathered from the shards (host work) and their copy to the device is issued while the
device still runs the current step: on CUDA from pinned memory with non_blocking=True, so the copy overlaps compute
and the host never waits for it. Nothing here synchronises. `state_dict()` is the loader's position after the last
batch handed out (not after the one fetched ahead), which is what a checkpoint must resume from.
"""

import torch

from fastoptim.data import TrainLoader


class DeviceBatches:
    def __init__(self, loader: TrainLoader, device: torch.device, steps: int):
        """`steps`: how many batches will be asked for (no batch is fetched beyond the last)."""
        self.loader, self.device, self.left = loader, device, steps
        self._state = loader.state_dict()
        self._ahead = self._fetch() if steps > 0 else None

    def _fetch(self) -> torch.Tensor:
        rows = self.loader.next_rows()
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the next step, on the device."""
        if self._ahead is None:
            raise RuntimeError("DeviceBatches: every batch it was made for has been taken")
        rows, self._state = self._ahead, self.loader.state_dict()
        self.left -= 1
        self._ahead = self._fetch() if self.left > 0 else None
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return self._state
