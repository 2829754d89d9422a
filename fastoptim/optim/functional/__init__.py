"""Functional optimizer cores: each updates a list of parameters and their state in place.

These pure-torch cores (torch._foreach_* math) are the ``fused=False`` path and the CPU/GPU fallback. A native
(fused) counterpart is a drop-in: the same signature (the same lists of params, grads and state tensors, the same
keyword scalars) registered under the same family name with ``register_fused``; the optimizer classes pick one per
call through ``select``. Native implementations register themselves from ``fastoptim.optim.functional.fused``
(imported on first use; absent or failing to import means "no native ops").

Conventions shared by every core:
- ``lr`` is a python float or a 0-dim tensor on the parameters' device (so a step can be graph-captured).
- ``weight_decay`` is already masked by the caller (0 for parameters the mask excludes); the update is
  ``w ← w − lr·(u + λ·w)`` (apply_update_).
- ``grad_scale`` is the global-norm clip factor (a 0-dim tensor from the clip_scale family) or None. It scales
  the gradient as the core reads it; ``p.grad`` itself is never modified.
- ``steps`` are the per-parameter 0-dim float32 CPU step counters; cores that bias-correct increment them and
  read them on the host. So the pure cores of bias-corrected families are not CUDA-graph capturable (a captured
  step would replay its first bias correction); Lion, signum and momentum are. Native cores read device scalars.
"""

import importlib
from collections.abc import Callable

from fastoptim.optim.functional.adam import adam_, mars_correction
from fastoptim.optim.functional.adam_mini import adam_mini_
from fastoptim.optim.functional.common import apply_update_, clip_scale
from fastoptim.optim.functional.kron import kron_balance_, kron_precondition, kron_update_preconditioner_
from fastoptim.optim.functional.lion import lion_
from fastoptim.optim.functional.momentum import momentum_, signum_
from fastoptim.optim.functional.newton_schulz import newton_schulz, orthogonalized_step_
from fastoptim.optim.functional.soap import soap_init_, soap_step_
from fastoptim.optim.functional.sophia import sophia_, sophia_hessian_

PURE: dict[str, Callable] = {
    "adam": adam_,
    "mars_correction": mars_correction,
    "adam_mini": adam_mini_,
    "lion": lion_,
    "signum": signum_,
    "momentum": momentum_,
    "sophia": sophia_,
    "sophia_hessian": sophia_hessian_,
    "apply_update": apply_update_,
    "clip_scale": clip_scale,
    "newton_schulz": newton_schulz,
    "orthogonalized_step": orthogonalized_step_,
    "soap_init": soap_init_,
    "soap_step": soap_step_,
    "kron_update_preconditioner": kron_update_preconditioner_,
    "kron_precondition": kron_precondition,
    "kron_balance": kron_balance_,
}

# family -> (native core, supports(tensors) -> bool)
_FUSED: dict[str, tuple[Callable, Callable]] = {}
_fused_loaded = False


def register_fused(family: str, core: Callable, supports: Callable | None = None) -> None:
    """Make `core` the native implementation of `family`; `supports(tensors)` says which tensors it can take
    (device, dtype, layout). It must have the pure core's signature and compute the same function."""
    if family not in PURE:
        raise ValueError(f"register_fused: unknown family {family!r}; expected one of {', '.join(PURE)}")
    _FUSED[family] = (core, supports or (lambda tensors: True))


def _load_fused() -> None:
    global _fused_loaded
    if not _fused_loaded:
        _fused_loaded = True
        try:
            importlib.import_module("fastoptim.optim.functional.fused")
        except ImportError:
            pass  # no native library built: every family runs pure torch


def select(family: str, tensors: list, fused: bool | None) -> Callable:
    """The core for `family`: pure torch when fused is False; the native one when fused is None and it supports
    all `tensors`; the native one or a clear error when fused is True."""
    if family not in PURE:
        raise ValueError(f"unknown functional family {family!r}; expected one of {', '.join(PURE)}")
    if fused is False:
        return PURE[family]
    _load_fused()
    native = _FUSED.get(family)
    if native is not None and native[1](tensors):
        return native[0]
    if fused:
        reason = "is not built" if native is None else "does not support these tensors (device/dtype)"
        raise RuntimeError(
            f"fused=True: the native {family!r} op {reason}; build fastoptim._C or pass fused=None/False"
        )
    return PURE[family]


__all__ = ["PURE", "register_fused", "select", "adam_", "mars_correction", "adam_mini_", "apply_update_", "lion_",
           "momentum_", "orthogonalized_step_", "clip_scale", "signum_", "sophia_", "sophia_hessian_", "newton_schulz", "soap_init_",
           "soap_step_", "kron_update_preconditioner_", "kron_precondition", "kron_balance_"]
