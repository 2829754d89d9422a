"""The Python face of torch.ops.fastoptim: wrappers that take Python scalars, and the fake kernels that let every op
trace under torch.compile and run on FakeTensors. Importing this module loads the native library."""

try:
    from fastoptim import _C
except ImportError as err:  # the package was imported from a source tree without a build
    raise ImportError(
        "fastoptim's native library fastoptim._C is missing or failed to load. Install with "
        "`pip install --no-build-isolation -e .`, or build in place with `python setup.py build_ext --inplace`. "
        f"Cause: {err}"
    ) from err

from fastoptim.ops._scalars import step_scalar
from fastoptim.ops.adam import adamw_, cautious_adamw_, mars_adamw_
from fastoptim.ops.adam_mini import adam_mini_
from fastoptim.ops.global_norm import clip_scale, mars_clip_scale
from fastoptim.ops.kron import kron_balance_, kron_precondition, kron_update_preconditioner_
from fastoptim.ops.newton_schulz import newton_schulz, newton_schulz_momentum_, orthogonalized_step_
from fastoptim.ops.sign_momentum import lion_, momentum_, signum_
from fastoptim.ops.soap import soap_eigenbasis_, soap_gram_, soap_refresh_, soap_rotated_adam_
from fastoptim.ops.sophia import sophia_, sophia_hessian_
from fastoptim.ops.update import decoupled_update_

CUDA_KERNELS_BUILT: bool = _C.cuda_kernels_built

__all__ = [
    "CUDA_KERNELS_BUILT",
    "adam_mini_",
    "adamw_",
    "cautious_adamw_",
    "clip_scale",
    "decoupled_update_",
    "kron_balance_",
    "kron_precondition",
    "kron_update_preconditioner_",
    "lion_",
    "mars_adamw_",
    "mars_clip_scale",
    "momentum_",
    "newton_schulz",
    "newton_schulz_momentum_",
    "orthogonalized_step_",
    "signum_",
    "soap_eigenbasis_",
    "soap_gram_",
    "soap_refresh_",
    "soap_rotated_adam_",
    "sophia_",
    "sophia_hessian_",
    "step_scalar",
]
