"""Low-precision expert weights, as offloading systems ship them and as loaders break them.

`quantize` is round-to-nearest, asymmetric, per group of `group_size` consecutive inputs of
each output row (the layout of GPTQ/AWQ-style checkpoints): a group's codes are integers in
[0, 2**bits - 1], with a float16 scale and a float16 zero point, so that
`(code - zero) * scale` reconstructs the weight. `fake_quantize` is the round trip: the
weights a model computes with when its experts are stored at `bits` bits. The error is at
most half a step per group (plus the float16 rounding of scale and zero).

`float8_unscaled` is the dtype accident: a weight cast through `float8_e4m3fn` with no
per-tensor scale, as a loader that forgets the scale would do. Values beyond +-448
saturate (torch's cast clamps them), and values below the smallest subnormal (2**-9) flush
to zero, so small weights lose everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)
GROUP_SIZE = 64
FLOAT8_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclass(frozen=True)
class Quantized:
    """Codes (..., rows, groups, group_size) as uint8 and per-group float16 scale/zero
    (..., rows, groups, 1); `shape` and `dtype` are the original weight's."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: tuple
    dtype: torch.dtype

    def nbytes(self) -> float:
        """Storage in bytes: bits per weight plus two float16 numbers per group."""
        return self.codes.numel() * self.bits / 8 + 2 * (self.scale.numel() + self.zero.numel())


def _check(weight: torch.Tensor, bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if not weight.is_floating_point() or weight.dim() < 1:
        raise ValueError(f"weight must be a floating tensor of dim >= 1, got {weight.dtype}")
    columns = weight.shape[-1]
    if group_size < 1 or columns % group_size:
        raise ValueError(
            f"the last dimension ({columns}) of a weight of shape {tuple(weight.shape)} must "
            f"be a multiple of group_size={group_size}"
        )


def quantize(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> Quantized:
    _check(weight, bits, group_size)
    w = weight.detach().to(torch.float32)
    grouped = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)  # (..., G, g)
    low = grouped.amin(dim=-1, keepdim=True)
    high = grouped.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    # A constant group has no range: any positive scale reconstructs it through the zero point.
    scale = torch.where(high > low, (high - low) / levels, torch.ones_like(low)).half()
    zero = (-low / scale.float()).half()
    codes = torch.round(grouped / scale.float() + zero.float()).clamp(0, levels)
    return Quantized(codes.to(torch.uint8), scale, zero, bits, tuple(weight.shape), weight.dtype)


def dequantize(q: Quantized) -> torch.Tensor:
    grouped = (q.codes.float() - q.zero.float()) * q.scale.float()
    return grouped.reshape(q.shape).to(q.dtype)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The weight as stored at `bits` bits and read back (same shape and dtype)."""
    return dequantize(quantize(weight, bits, group_size))


def float8_unscaled(weight: torch.Tensor) -> torch.Tensor:
    """The weight cast to float8_e4m3fn and back without a scale (same shape and dtype)."""
    return weight.detach().to(torch.float8_e4m3fn).to(weight.dtype)
