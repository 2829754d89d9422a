"""Clocks, device names and the in-run references that every benchmark's time is divided by.

Clocks
- CUDA: CUDA events recorded on the current stream around the timed call (after warm-up), so the time is the GPU's
  own and excludes host-side jitter; the end event is synchronised before reading.
- CPU: the suite pins torch to ONE intra-op thread by default and times with `time.process_time` (the process's CPU
  time). On a shared, oversubscribed machine wall time also counts the time the process waits for a core; CPU time
  does not, and with one thread it is exactly the work done (no OpenMP spin-waiting counted). With more threads
  (`--bench-threads N`) CPU time would sum the threads, so the clock becomes `time.perf_counter` (wall).

References
A time alone moves by tens of percent between runs on a shared machine; the time divided by a reference measured in
the same run, on the same device, under the same load, moves much less. Memory-bound work is divided by the time of
a device-to-device copy moving the same bytes (read + write); matrix-bound work by the time of a plain square matmul
doing the same FLOPs (bf16 on GPU, fp32 on CPU). Very large amounts are measured on a capped buffer and scaled by
the measured rate, so the reference never competes with the benchmark for memory.
"""

import math
import os
import platform
import re
import time
from dataclasses import dataclass

import torch

COPY_CAP_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}  # per side of the copy
MATMUL_CAP_N = {"cpu": 768, "cuda": 8192}
MATMUL_MIN_N = 64


class _CudaEventStamp:
    """A point on the current CUDA stream; `end - start` is the GPU time between them in seconds."""

    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, start: "_CudaEventStamp") -> float:
        self.event.synchronize()
        return start.event.elapsed_time(self.event) / 1e3


def clock_for(device: torch.device, threads: int):
    """The clock the suite times `device` with: a zero-argument callable whose values subtract to seconds."""
    if device.type == "cuda":
        return _CudaEventStamp
    return time.process_time if threads == 1 else time.perf_counter


def clock_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return "cuda-events"
    return "process_time" if threads == 1 else "perf_counter"


def min_time(fn, clock, rounds: int) -> float:
    """The fastest of `rounds` timed calls of `fn` (noise on a busy machine only ever adds time)."""
    best = math.inf
    for _ in range(rounds):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_slug(device: torch.device) -> str:
    """The folder name of a device's baselines, e.g. `cpu-amd-epyc-2cores` or `nvidia-h100-80gb-hbm3`."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{_slug(cpu_model())}-{cores}cores"


@dataclass(frozen=True)
class Reference:
    """What the same work takes on a plain copy or matmul on this device, measured now."""

    kind: str  # "copy" or "matmul"
    rate: float  # bytes/s moved (read + write) by the copy, or FLOP/s of the matmul
    seconds: float  # work / rate


def copy_reference(traffic_bytes: int, device: torch.device, clock, rounds: int) -> Reference:
    """A device-to-device copy moving `traffic_bytes` in total (half read, half written)."""
    half = max(1, min(traffic_bytes // 2, COPY_CAP_BYTES[device.type]))
    src = torch.empty(half, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch of the pages, allocator, kernel load
    seconds = min_time(lambda: dst.copy_(src), clock, rounds)
    rate = 2 * half / seconds
    return Reference("copy", rate, traffic_bytes / rate)


def matmul_reference(flops: float, device: torch.device, clock, rounds: int) -> Reference:
    """A plain n×n×n matmul (bf16 on GPU, fp32 on CPU) at the rate that does `flops` FLOPs."""
    n = round((flops / 2) ** (1 / 3))
    n = max(MATMUL_MIN_N, min(MATMUL_CAP_N[device.type], n))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    seconds = min_time(lambda: torch.mm(a, b, out=out), clock, rounds)
    rate = 2 * n**3 / seconds
    return Reference("matmul", rate, flops / rate)


REFERENCES = {"memory": copy_reference, "matrix": matmul_reference}
