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
from fastoptim.ops.kron import kron_balance_, kron_precondition, kron_update_preconditioner_
from fastoptim.ops.soap import soap_eigenbasis_, soap_gram_, soap_refresh_, soap_rotated_adam_
from fastoptim.ops.update import decoupled_update_

CUDA_KERNELS_BUILT: bool = _C.cuda_kernels_built

__all__ = [
    "CUDA_KERNELS_BUILT", "decoupled_update_", "step_scalar",
    "kron_balance_", "kron_precondition", "kron_update_preconditioner_",
    "soap_eigenbasis_", "soap_gram_", "soap_refresh_", "soap_rotated_adam_",
]
