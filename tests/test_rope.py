"""Unit and property tests of sage_core.model.rope (M-RoPE of the Qwen3-Omni thinker)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen3_omni_moe import (
    configuration_qwen3_omni_moe,
    modeling_qwen3_omni_moe,
)

from sage_core.model.rope import (
    MultimodalRotaryEmbedding,
    apply_rotary,
    interleave_mrope,
    rope_inv_freq,
    rotate_half,
)

HEAD_DIM, SECTION, THETA = 32, (8, 4, 4), 1_000_000.0
FAST = settings(max_examples=25, deadline=None)


def rope():
    return MultimodalRotaryEmbedding(HEAD_DIM, THETA, SECTION)


def tables(position_ids, dtype=torch.float32):
    x = torch.zeros(1, dtype=dtype)
    return rope()(x, position_ids)


def test_inv_freq_formula_and_dtype():
    inv = rope_inv_freq(HEAD_DIM, THETA)
    assert inv.dtype == torch.float32 and inv.shape == (HEAD_DIM // 2,)
    expected = [1.0 / THETA ** (2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)]
    torch.testing.assert_close(inv, torch.tensor(expected, dtype=torch.float32))


def test_inv_freq_is_float32_under_float64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert rope().inv_freq.dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)


def test_shapes_for_2d_and_3d_positions():
    pos = torch.arange(7).expand(2, -1)
    cos2, sin2 = tables(pos)
    cos3, sin3 = tables(pos.expand(3, -1, -1))
    assert cos2.shape == sin2.shape == (2, 7, HEAD_DIM)
    torch.testing.assert_close(cos2, cos3, rtol=0, atol=0)
    torch.testing.assert_close(sin2, sin3, rtol=0, atol=0)


def turned(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The RoPE definition, written independently of rotate_half: pair i of a head vector,
    (x_i, x_{i + half}), read as the complex number x_i + j x_{i + half}, is multiplied by
    exp(j * position * inv_freq[i]) (a counter-clockwise turn). positions (S,) for x (..., S, D).
    """
    half = HEAD_DIM // 2
    # The angle is rounded to float32 as the model's table is, then taken in float64.
    angle = (positions.to(torch.float32)[:, None] * rope_inv_freq(HEAD_DIM, THETA)).double()
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


@given(
    seed=st.integers(0, 2**16),
    seq=st.integers(1, 9),
    heads=st.integers(1, 3),
    offset=st.integers(0, 10_000),
)
@FAST
def test_rotation_turns_each_pair_by_position_times_frequency(seed, seq, heads, offset):
    """Norm-preserving and in the right direction: a turn the other way (rotate_half's sign
    flipped) preserves norms too, so the result is compared with the definition."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq, HEAD_DIM, generator=g, dtype=torch.float64)
    k = torch.randn(1, heads, seq, HEAD_DIM, generator=g, dtype=torch.float64)
    positions = torch.arange(offset, offset + seq)
    cos, sin = tables(positions[None], dtype=torch.float64)
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k_rot.norm(dim=-1), k.norm(dim=-1))
    # cos/sin are float32 values (then cast): agreement to float32 precision.
    torch.testing.assert_close(q_rot, turned(q, positions), rtol=0, atol=1e-5)
    torch.testing.assert_close(k_rot, turned(k, positions), rtol=0, atol=1e-5)


@given(
    seed=st.integers(0, 2**16),
    m=st.integers(0, 500),
    n=st.integers(0, 500),
    shift=st.integers(1, 500),
)
@FAST
def test_score_depends_only_on_relative_position(seed, m, n, shift):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 1, HEAD_DIM, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, HEAD_DIM, generator=g, dtype=torch.float64)

    def score(pos_q, pos_k):
        cos_q, sin_q = tables(torch.tensor([[pos_q]]), dtype=torch.float64)
        cos_k, sin_k = tables(torch.tensor([[pos_k]]), dtype=torch.float64)
        q_rot, _ = apply_rotary(q, q, cos_q, sin_q)
        _, k_rot = apply_rotary(k, k, cos_k, sin_k)
        return (q_rot * k_rot).sum()

    # The table is float32 before the cast, so agreement is to float32 angle precision.
    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-4, atol=1e-3)
    # ... and it is the definition's score. A turn the other way keeps the invariance but
    # depends on n - m where RoPE depends on m - n: only this comparison catches it.
    relative = (turned(q, torch.tensor([m])) * turned(k, torch.tensor([n]))).sum()
    torch.testing.assert_close(score(m, n), relative, rtol=1e-4, atol=1e-3)


def test_rotation_angle_is_position_times_frequency():
    # One head vector e_0 at position p, rotated: component 0 is cos(p * inv_freq[0]).
    pos = 5
    q = torch.zeros(1, 1, 1, HEAD_DIM, dtype=torch.float64)
    q[..., 0] = 1.0
    cos, sin = tables(torch.tensor([[pos]]), dtype=torch.float64)
    q_rot, _ = apply_rotary(q, q, cos, sin)
    angle = torch.tensor(pos * rope_inv_freq(HEAD_DIM, THETA)[0].item(), dtype=torch.float64)
    torch.testing.assert_close(q_rot[0, 0, 0, 0], angle.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(q_rot[0, 0, 0, HEAD_DIM // 2], angle.sin(), rtol=0, atol=1e-6)


def test_rotate_half():
    x = torch.arange(6.0)
    torch.testing.assert_close(rotate_half(x), torch.tensor([-3.0, -4.0, -5.0, 0.0, 1.0, 2.0]))


@pytest.mark.parametrize("section", [SECTION, (6, 5, 5), (4, 6, 6), (16, 0, 0)])
def test_interleave_takes_height_and_width_at_the_right_indices(section):
    """Three different position rows: each frequency index must come from its own row."""
    half = HEAD_DIM // 2
    rotary = MultimodalRotaryEmbedding(HEAD_DIM, THETA, section)
    t, h, w = 3.0, 50.0, 700.0  # distinct positions, so each row gives a distinct angle
    position_ids = torch.tensor([t, h, w]).view(3, 1, 1).long()
    cos, _ = rotary(torch.zeros(1), position_ids)
    inv = rope_inv_freq(HEAD_DIM, THETA)
    for i in range(half):
        if i % 3 == 1 and i < 3 * section[1]:
            row = h
        elif i % 3 == 2 and i < 3 * section[2]:
            row = w
        else:
            row = t
        expected = torch.cos(torch.tensor(row) * inv[i])
        assert cos[0, 0, i] == pytest.approx(expected.item(), abs=1e-6), f"index {i}"
        assert cos[0, 0, half + i] == cos[0, 0, i]  # cat(f, f) layout


def test_interleave_mrope_directly():
    freqs = torch.stack([torch.full((1, 1, 16), float(r)) for r in range(3)])
    merged = interleave_mrope(freqs, SECTION)[0, 0]
    expected = [0.0] * 16
    for i in range(1, 12, 3):
        expected[i] = 1.0
    for i in range(2, 12, 3):
        expected[i] = 2.0
    assert merged.tolist() == expected


def _transformers_rope():
    config = configuration_qwen3_omni_moe.Qwen3OmniMoeTextConfig(
        hidden_size=64,
        num_attention_heads=2,
        head_dim=HEAD_DIM,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": THETA,
            "mrope_section": list(SECTION),
            "interleaved": True,
        },
    )
    return modeling_qwen3_omni_moe.Qwen3OmniMoeThinkerTextRotaryEmbedding(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_parity_with_transformers(layout, dtype):
    reference = _transformers_rope()
    g = torch.Generator().manual_seed(0)
    if layout == "2d":
        position_ids = torch.arange(11).expand(2, -1) + torch.tensor([[0], [37]])
    else:  # three different rows, as for vision/audio tokens
        position_ids = torch.randint(0, 4096, (3, 2, 11), generator=g)
    x = torch.zeros(2, 11, 64, dtype=dtype)
    cos_ref, sin_ref = reference(x, position_ids)
    cos, sin = rope()(x, position_ids)
    assert cos.dtype == sin.dtype == cos_ref.dtype == dtype
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_dim": 31, "mrope_section": (8, 4, 4)}, "head_dim must be even"),
        ({"head_dim": 32, "mrope_section": (8, 4, 3)}, "must sum to head_dim // 2 = 16"),
        ({"head_dim": 32, "mrope_section": (8, 4, 4), "interleaved": False}, "interleaved"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultimodalRotaryEmbedding(theta=THETA, **kwargs)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5), (4, 1, 5), (3, 1, 1, 5)])
def test_bad_position_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"position_ids must be \(B, S\) or \(3, B, S\), got"):
        rope()(torch.zeros(1), torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_float64_buffer_does_not_change_output(dtype):
    clean = rope()
    polluted = rope()
    polluted.inv_freq = rope_inv_freq(HEAD_DIM, THETA).double()  # what assign=True would do
    assert polluted.inv_freq.dtype == torch.float64
    x = torch.zeros(1, 6, 4, dtype=dtype)
    pos = torch.arange(6)[None]
    cos_clean, sin_clean = clean(x, pos)
    cos, sin = polluted(x, pos)
    assert cos.dtype == sin.dtype == dtype
    torch.testing.assert_close(cos, cos_clean, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_clean, rtol=0, atol=0)


def test_reset_buffers_restores_float32():
    rotary = rope()
    rotary.inv_freq = rotary.inv_freq.double()
    rotary.reset_buffers()
    assert rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq, rope_inv_freq(HEAD_DIM, THETA), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_parent_cast_does_not_round_the_table(dtype):
    parent = torch.nn.Sequential(rope())
    parent.to(dtype)
    rotary = parent[0]
    assert rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq, rope_inv_freq(HEAD_DIM, THETA), rtol=0, atol=0)


def test_a_device_move_keeps_a_polluted_buffer_and_use_still_casts():
    # Only a cast rebuilds the table: a float64 buffer that rides along on `.to(device)`
    # stays as loaded, and the cast at use is what keeps the output in the activation dtype.
    rotary = rope()
    rotary.inv_freq = rotary.inv_freq.double()
    rotary.to("cpu")
    assert rotary.inv_freq.dtype == torch.float64
    cos, _ = rotary(torch.zeros(1, 3, 4), torch.arange(3)[None])
    assert cos.dtype == torch.float32
