"""Registers the native cores of fastoptim._C with functional.register_fused; `select` imports this on first use.
Each kernel family registers from its own module."""

from fastoptim.optim.functional import fused_soap_kron  # noqa: F401  (Soap, Kron)
