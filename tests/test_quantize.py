"""The low-bit quantiser and the float8 accident (sage_core.dtypes.quantize)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_core.dtypes.quantize import (
    BITS,
    FLOAT8_MAX,
    dequantize,
    fake_quantize,
    float8_unscaled,
    quantize,
)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    rows=st.integers(1, 5),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([1, 4, 64]),
    seed=st.integers(0, 2**16),
    spread=st.floats(1e-3, 1e3),
)
def test_round_trip_error_is_at_most_half_a_step_per_group(
    bits, rows, groups, group_size, seed, spread
):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, groups * group_size, generator=gen) * spread
    q = quantize(weight, bits, group_size)
    back = dequantize(q)
    assert back.shape == weight.shape and back.dtype == weight.dtype
    assert int(q.codes.max()) <= 2**bits - 1
    error = (back - weight).abs().reshape(rows, groups, group_size)
    step = q.scale.float()
    # half a step, plus what float16 scale and zero point cost at this group's magnitude
    slack = 2**-10 * (step * q.zero.float().abs() + weight.abs().reshape_as(error).amax(-1, True))
    assert bool((error <= step / 2 + slack + 1e-7).all()), float((error - step / 2).max())


def test_group_extremes_are_kept_and_more_bits_are_closer():
    weight = torch.tensor([[-1.0, -0.3, 0.1, 0.5], [2.0, 2.0, 2.0, 2.0]])
    for bits in BITS:
        back = fake_quantize(weight, bits, group_size=4)
        assert torch.allclose(back[0, [0, 3]], weight[0, [0, 3]], atol=1e-3)
        assert torch.allclose(back[1], weight[1], atol=1e-3)  # a constant group
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 128, generator=gen)
    errors = [float((fake_quantize(weight, b) - weight).norm()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.02 * errors[0]


def test_storage_counts_bits_and_float16_scale_and_zero():
    q = quantize(torch.randn(8, 128), 3, group_size=64)
    assert q.scale.dtype == q.zero.dtype == torch.float16
    assert q.nbytes() == 8 * 128 * 3 / 8 + 2 * 2 * 8 * 2


def test_bad_bits_and_group_size_name_the_parameter():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(2, 64), 5)
    with pytest.raises(ValueError, match="group_size=64"):
        quantize(torch.randn(2, 96), 4)


def test_float8_without_a_scale_saturates_and_flushes_small_weights():
    weight = torch.tensor([1000.0, -1000.0, 0.5, 1e-4, -1e-4])
    cast = float8_unscaled(weight)
    assert cast.dtype == weight.dtype
    assert cast[:2].tolist() == [FLOAT8_MAX, -FLOAT8_MAX]
    assert float(cast[2]) == 0.5 and cast[3:].tolist() == [0.0, 0.0]
