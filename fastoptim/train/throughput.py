"""What a step costs: model FLOPs per token, the accelerator's bf16 peak, MFU, and peak memory.

FLOPs per training token (forward and backward), the PaLM convention:
    6·(N + V·d)  for the matmuls: the non-embedding matrices N (Chinchilla's N) and the output head V·d (the input
                 embedding is a lookup, no FLOPs);
  + 12·L·d·T     for attention's two score/value products at sequence length T, counted in full as PaLM does
                 (a causal kernel skips about half of them, so this overstates the work done by up to 6·L·d·T).
MFU = FLOPs per token · tokens/s / (peak bf16 dense FLOP/s · devices). Peaks come from the vendors' data sheets
(dense, no sparsity); an unknown accelerator has no peak (MFU null) unless one is given.
"""

import resource
import sys

import torch

from fastoptim.models import LlamaConfig, non_embedding_params

# bf16 dense tensor-core peaks in FLOP/s, by a name fragment of torch.cuda.get_device_name (first match wins).
BF16_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "GH200": 989e12,
    "H100": 989e12,   # SXM
    "H200": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "MI300X": 1307e12,
}


def train_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    return 6.0 * (non_embedding_params(cfg) + cfg.vocab_size * cfg.dim) + 12.0 * cfg.n_layers * cfg.dim * seq_len


def peak_flops_of(name: str) -> float | None:
    """The bf16 dense peak of an accelerator named `name` (a fragment of its device name suffices), or None."""
    return next((peak for fragment, peak in BF16_PEAK_FLOPS.items() if fragment.lower() in name.lower()), None)


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated by this process (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
