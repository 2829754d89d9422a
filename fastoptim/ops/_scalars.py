"""Step scalars as the ops take them: 0-dim float32 tensors on the parameters' device."""

import torch


def step_scalar(value, device) -> torch.Tensor:
    """`value` (a Python number or a tensor) as a 0-dim float32 tensor on `device`.

    A device tensor already in that form is returned as is, so a caller that keeps its lr in a device tensor (for
    CUDA graphs or torch.compile) pays no copy. A host value becomes a fill on the device: torch.tensor(x,
    device="cuda") would copy it from pageable memory and wait for the whole stream, once per op call.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"step scalar: expected a single value, got a tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return value.reshape(()).to(device=device, dtype=torch.float32)
        value = value.item()
    return torch.full((), float(value), dtype=torch.float32, device=device)
