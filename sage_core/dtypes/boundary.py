"""Dtype boundary helpers.

Every crossing between torch, numpy and scikit-learn goes through these, so the
dtype on each side is a decision written in one place rather than a library default.
"""

import numpy as np
import torch

FLOAT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype:
    """Accept a torch float dtype or its name ("bfloat16", "torch.float32", "bf16", ...)."""
    if isinstance(dtype, torch.dtype):
        # Only the four dtypes the models compute in: float8 is "floating point" to torch
        # but has no matmul, so accepting it here would crash deep inside a forward.
        if dtype not in FLOAT_DTYPES.values():
            raise ValueError(
                f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype} "
                "(a floating point dtype the models compute in)"
            )
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "fp64": "float64"}.get(
            name, name
        )
        if name in FLOAT_DTYPES:
            return FLOAT_DTYPES[name]
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(FLOAT_DTYPES)}")


def to_numpy_float32(x) -> np.ndarray:
    """torch tensor (any float dtype, any device) or array-like -> contiguous float32 numpy.

    This is the fix for bug #2: scikit-learn does not read torch dtypes, and an
    array it builds itself from a tensor or a list is float64.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def to_torch_like(x, like: torch.Tensor) -> torch.Tensor:
    """numpy or tensor -> tensor on `like`'s device with `like`'s dtype (never a hard-coded one).

    Converted in one step: no intermediate float64 tensor from a float64 array or a list.
    """
    if isinstance(x, torch.Tensor):
        return x.to(device=like.device, dtype=like.dtype)
    return torch.as_tensor(np.asarray(x), dtype=like.dtype, device=like.device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
