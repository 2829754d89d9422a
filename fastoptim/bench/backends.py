"""Backend names and the clean skips for what is not installed or not built yet.

A benchmark is parametrised by `backend`, one of these names; the table of `fastoptim bench` computes the speedup of
each OURS backend over each peer backend of the same group from them.
"""

import importlib

import pytest
import torch

# The default path (fused=None: kernels wherever an op exists, i.e. the ops themselves in op benchmarks), and the
# pure-torch path (fused=False).
OURS = ("fastoptim", "fastoptim-torch")
# Peers by backend name: the module to import and the pip package that provides it (all in the `peers` extra).
PEERS = {
    "torch-foreach": ("torch", "torch"),
    "torch-fused": ("torch", "torch"),
    "torch": ("torch", "torch"),  # torch.optim's own single implementation (e.g. torch.optim.Muon)
    "plain-torch": ("torch", "torch"),  # a plain torch chain written in bench/ (e.g. the matmul chain of NS)
    "heavyball": ("heavyball", "heavyball"),
    "pytorch-optimizer": ("pytorch_optimizer", "pytorch-optimizer"),
    "kron-torch": ("kron_torch", "kron-torch"),
    "emerging-optimizers": ("emerging_optimizers", "emerging-optimizers"),
}
BACKENDS = OURS + tuple(PEERS)


def is_ours(backend: str) -> bool:
    return backend in OURS


def require_peer(backend: str):
    """The peer's module, or a clean skip naming the package to install."""
    if backend not in PEERS:
        raise ValueError(f"backend: unknown peer {backend!r}; known: {', '.join(PEERS)}")
    module, package = PEERS[backend]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.skip(f"peer {backend} not installed (pip install {package}, or the `peers` extra): {err}")


def require_attr(obj, name: str, why: str):
    """`obj.name`, or a clean skip saying which version lacks it (e.g. torch.optim.Muon before torch 2.9)."""
    if not hasattr(obj, name):
        pytest.skip(f"{getattr(obj, '__name__', obj)} has no {name}: {why}")
    return getattr(obj, name)


def require_op(name: str):
    """`torch.ops.fastoptim.<name>`, or a clean skip while the op is not written or not built on this device."""
    import fastoptim.ops  # loads the native library

    if not hasattr(torch.ops.fastoptim, name):
        pytest.skip(f"fastoptim op {name} does not exist in this build yet")
    return getattr(torch.ops.fastoptim, name)


def require_optimizer(name: str):
    """The fastoptim optimizer class registered as `name`, or a clean skip while its module is not written yet."""
    from fastoptim.optim.registry import optimizer_class

    try:
        return optimizer_class(name)
    except (ImportError, AttributeError) as err:
        pytest.skip(f"fastoptim optimizer {name} is not importable yet: {err}")
