"""The micro-batch: how many sequences one forward/backward takes, so that a run fits the device's memory.

A run's global batch (hparam batch_size, the swept one) is split over ranks and then into micro-batches; the
gradients of `batch_size / (world_size · micro_batch)` micro-batches accumulate before each optimizer step, so the
step is the same whatever the micro-batch (up to float rounding). The micro-batch is therefore a setting of the run,
not part of its identity: changing it neither retrains a finished run nor refuses a resume.

`micro_batch` is None (the whole per-rank batch at once), a number that divides the per-rank batch, or "auto": on a
GPU, a short probe trains one step at each divisor of the per-rank batch, largest first, and keeps the first whose
peak memory stays under PROBE_HEADROOM of the device's; the answer is cached per (device, model, sequence length,
optimizer, compile, ranks, torch version) in the cache folder. A CPU has no such limit to find: "auto" is the whole
per-rank batch there.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

PROBE_HEADROOM = 0.9
CACHE_FILE = "micro_batch.json"


def local_batch_of(batch_size: int, world_size: int) -> int:
    return batch_size // world_size


def check_micro_batch(micro_batch, batch_size: int, world_size: int) -> None:
    """A clear error for a micro-batch that is not None, "auto" or a divisor of the per-rank batch."""
    if micro_batch is None or micro_batch == "auto":
        return
    local = local_batch_of(batch_size, world_size)
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1 or local % micro_batch:
        raise ValueError(f"micro_batch={micro_batch!r} must be None, 'auto' or a positive divisor of the per-rank "
                         f"batch (batch_size={batch_size} / world_size={world_size} = {local} sequences)")


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_fitting(local_batch: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of local_batch for which fits(divisor) holds (1 when none does: the caller's run then
    fails on its own with the device's out-of-memory error, naming the real cause)."""
    return next((m for m in divisors_descending(local_batch) if fits(m)), 1)


def cached_probe(cache_dir: Path, key: str, probe: Callable[[], int]) -> int:
    path = Path(cache_dir) / CACHE_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        known[key] = probe()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CACHE_FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return int(known[key])


def fits_on_gpu(device: torch.device, train_one_step: Callable[[int], None]) -> Callable[[int], bool]:
    """fits(m): one training step at micro-batch m runs and its peak memory stays under the headroom."""
    total = torch.cuda.get_device_properties(device).total_memory

    def fits(micro_batch: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            train_one_step(micro_batch)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(device) <= PROBE_HEADROOM * total

    return fits
