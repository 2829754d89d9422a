"""Step scalars as the ops take them: 0-dim float32 tensors on the parameters' device."""

import torch


def step_scalar(value, device) -> torch.Tensor:
    """`value` (a Python number or a tensor) as a 0-dim float32 tensor on `device`.

    A tensor already in that form is returned as is, so a caller that keeps its lr in a device tensor (for CUDA
    graphs or torch.compile) pays no copy and no host synchronisation.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"step scalar: expected a single value, got a tensor of shape {tuple(value.shape)}")
        return value.reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(value), dtype=torch.float32, device=device)
