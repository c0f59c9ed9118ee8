"""Dtypes: the torch/numpy/scikit-learn boundary helpers, the dtype trace and strict mode."""

from sage_core.dtypes.boundary import (
    FLOAT_DTYPES,
    dtype_name,
    parse_dtype,
    to_numpy_float32,
    to_torch_like,
)
from sage_core.dtypes.strict_mode import DELIBERATE_SITES, DtypePolicyError, strict
from sage_core.dtypes.trace import DtypeTrace, plot_dtype_flow

__all__ = [
    "DELIBERATE_SITES",
    "FLOAT_DTYPES",
    "DtypePolicyError",
    "DtypeTrace",
    "dtype_name",
    "parse_dtype",
    "plot_dtype_flow",
    "strict",
    "to_numpy_float32",
    "to_torch_like",
]
