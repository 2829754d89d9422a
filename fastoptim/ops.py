"""fastoptim's native ops as Python sees them: `torch.ops.fastoptim.*` (schemas declared once, in csrc/ops.cpp), the
fake (meta) kernels that let them trace under torch.compile and run on FakeTensors, and the one question the
functional cores ask before calling them: do the kernels take these tensors?

Every argument rule is checked once, in C++ (csrc/common/checks.h and each op's header). The fakes compute only the
shapes and dtypes of what an op returns, checking with torch._check only what those depend on.

Importing this module loads the native library fastoptim._C. If it is missing or fails to load, AVAILABLE is False,
UNAVAILABLE_REASON says why, and that is warned once, here; the cores then run pure torch where `fused=None` and
raise with that reason where `fused=True`. Nothing else is caught.
"""

import warnings

import torch

try:
    from fastoptim import _C
except ImportError as err:  # only the library's own import: a missing build or an unloadable .so
    _C = None
    UNAVAILABLE_REASON = (
        f"fastoptim's native library fastoptim._C did not load ({err}); build it with `pip install "
        "--no-build-isolation -e .` or `python setup.py build_ext --inplace`"
    )
    warnings.warn(UNAVAILABLE_REASON + "; every optimizer runs its pure-torch path", RuntimeWarning, stacklevel=2)
else:
    UNAVAILABLE_REASON = None

AVAILABLE: bool = _C is not None
CUDA_KERNELS_BUILT: bool = AVAILABLE and bool(_C.cuda_kernels_built)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(tensors, *, mixed_dtypes: bool = False) -> str | None:
    """Why the native kernels cannot take `tensors` (None: they can). They take dense, contiguous float32, bfloat16
    or float16 tensors of one dtype (any mix of those with `mixed_dtypes`) on one device: the CPU, or a GPU when the
    CUDA kernels were built."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    if not tensors:
        return None
    device = tensors[0].device
    if device.type == "cuda" and not CUDA_KERNELS_BUILT:
        return "has no CUDA kernels in this build (torch without CUDA or nvcc missing at build time)"
    if device.type not in ("cpu", "cuda"):
        return f"has no kernels for device {device}"
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device != device:
            return f"takes tensors on one device; got {device} and {t.device}"
        if t.layout != torch.strided or not t.is_contiguous():
            return "takes dense contiguous tensors only"
        if t.dtype not in KERNEL_DTYPES or (t.dtype != dtype and not mixed_dtypes):
            return f"takes float32, bfloat16 or float16 tensors of one dtype; got {t.dtype}" + (
                f" beside {dtype}" if t.dtype != dtype else "")
    return None


def supports(tensors, *, mixed_dtypes: bool = False) -> bool:
    """Whether the native kernels take `tensors` (see unsupported_reason)."""
    return unsupported_reason(tensors, mixed_dtypes=mixed_dtypes) is None


def use_native(fused: bool | None, op: str, tensors, *, mixed_dtypes: bool = False,
               unsupported: str | None = None) -> bool:
    """The fused switch of every functional core: False → pure torch; None → native where it takes the tensors;
    True → native, or an error naming the op and why it cannot run. `unsupported` is a further reason the caller
    found (a block shape or state dtype the op does not take)."""
    if fused is False:
        return False
    reason = unsupported_reason(tensors, mixed_dtypes=mixed_dtypes) or unsupported
    if reason is None and not hasattr(torch.ops.fastoptim, op):
        reason = "is not registered by this build of fastoptim._C (rebuild it)"
    if reason is None:
        return True
    if fused:
        raise RuntimeError(f"fused=True: the native op fastoptim::{op} {reason}; pass fused=None (native where "
                           "possible) or fused=False (pure torch)")
    return False


def device_scalar(value, device) -> torch.Tensor:
    """`value` (a number or a one-element tensor) as the 0-dim float32 tensor on `device` that the ops take for lr
    and other step scalars.

    A device tensor already in that form is returned as is, so a caller that keeps lr in a device tensor (for CUDA
    graphs, torch.compile or a scheduler that fills it) pays nothing. A host number becomes a fill on the device:
    torch.tensor(x, device="cuda") would copy from pageable memory and wait for the whole stream.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a single value, got a tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu" or torch.device(device).type == "cpu":
            return value.reshape(()).to(device=device, dtype=torch.float32)
        value = value.item()
    return torch.full((), float(value), dtype=torch.float32, device=device)


# ---- fakes: what each op returns, for torch.compile and FakeTensor (in-place ops return nothing) ----------------
if AVAILABLE:

    def _returns_nothing(*names):
        for name in names:
            torch.library.register_fake(f"fastoptim::{name}")(lambda *args, **kwargs: None)

    _returns_nothing("decoupled_update_", "adamw_", "cautious_adamw_", "mars_adamw_", "adam_mini_", "lion_",
                     "signum_", "momentum_", "sophia_", "sophia_hessian_", "soap_gram_", "soap_eigenbasis_",
                     "soap_refresh_", "kron_update_preconditioner_", "kron_balance_")

    @torch.library.register_fake("fastoptim::clip_scale")
    def _(tensors, max_norm):
        torch._check(len(tensors) > 0, lambda: "fastoptim: clip_scale: tensors is empty")
        return tensors[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fastoptim::cautious_mask_counts")
    def _(params, grads, exp_avgs, exp_avg_sqs, lr, steps, beta1, beta2, eps, weight_decay, nesterov, grad_scale):
        return (grads[0].new_empty if grads else torch.empty)((len(grads),), dtype=torch.int64)

    @torch.library.register_fake("fastoptim::mars_clip_scale")
    def _(grads, prev_grads, gamma, beta1, max_norm):
        torch._check(len(grads) > 0, lambda: "fastoptim: mars_clip_scale: grads is empty")
        return grads[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fastoptim::newton_schulz_momentum_")
    def _(momentum_buffers, grads, beta, nesterov, ema, dtype):
        if not momentum_buffers:
            return torch.empty(0, 0, 0, dtype=dtype), torch.empty(0, dtype=torch.float32)
        first = momentum_buffers[0]
        torch._check(first.dim() >= 2, lambda: "fastoptim: momentum_buffers[0] must have ≥ 2 dims")
        rows = first.size(0)
        cols = first.numel() // rows if rows else 0
        return (first.new_empty((len(momentum_buffers), rows, cols), dtype=dtype),
                first.new_empty((len(momentum_buffers),), dtype=torch.float32))

    @torch.library.register_fake("fastoptim::newton_schulz")
    def _(x, steps, eps, coefficients=None, norms=None, method="auto"):
        torch._check(x.dim() == 3, lambda: f"fastoptim: newton_schulz: x has {x.dim()} dims; expected (batch, m, n)")
        return torch.empty_like(x)

    @torch.library.register_fake("fastoptim::soap_rotated_adam_")
    def _(grads, exp_avg, exp_avg_sq, q_left, q_right, bias_correction, beta1, beta2, eps):
        return torch.empty_like(grads)

    @torch.library.register_fake("fastoptim::kron_precondition")
    def _(grads, factors):
        return torch.empty_like(grads)
