"""Regression: bug #1 (float64 RoPE buffer) reproduces through sage_core.studies.repro.rope_buffer,
exactly, and never through the fixed sage_core.model.rope."""

import pytest
import torch

from sage_core.model.rope import rope_inv_freq
from sage_core.studies.repro import rope_buffer as rb

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
ASSIGN = "load_state_dict(sd, assign=True)"
COPY = "load_state_dict(sd)"
CONFIG = rb.BlockConfig()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(buffer dtype, weight dtype): checkpoint}, the same seeded weights in each."""
    root = tmp_path_factory.mktemp("rope_ckpt")
    files = {}
    for weights in (F32, BF16, F64):
        block = rb.make_block("pre-fix", CONFIG, dtype=weights)
        for buffer in (F32, F64, BF16):
            name = f"{buffer}-{weights}.safetensors".replace("torch.", "")
            files[(buffer, weights)] = rb.write_checkpoint(block, root / name, buffer)
    return files


# The pre-fix code never casts cos/sin to the activation dtype, so q and k take
# promote(x, promote(float32, buffer)); SDPA fails whenever that is not v's dtype (x's).
# Written out rather than computed, so the test does not share the code's reasoning.
PRE_FIX_EXPECTED = {
    # (buffer, input): None (runs) or the dtype q and k end up in
    (F32, F32): None,
    (F64, F32): F64,  # bug #1
    (BF16, F32): None,  # outer(float32, bfloat16) is float32
    (F32, BF16): F32,  # fails even with a clean buffer: cos/sin are float32
    (F64, BF16): F64,
    (BF16, BF16): F32,
    (F32, F64): None,
    (F64, F64): None,  # all float64: nothing to mismatch
    (BF16, F64): None,
}


@pytest.mark.parametrize(("buffer", "activations"), list(PRE_FIX_EXPECTED))
def test_pre_fix_block_on_the_polluting_load(checkpoints, buffer, activations):
    block = rb.load_block(
        "pre-fix", checkpoints[(buffer, activations)], ASSIGN, CONFIG, activations
    )
    assert block.rope.inv_freq.dtype == buffer  # assign=True keeps the file's dtype
    x = rb.make_input(CONFIG, dtype=activations)
    qk_dtype = PRE_FIX_EXPECTED[(buffer, activations)]
    if qk_dtype is None:
        with torch.no_grad():
            assert block(x).dtype == activations
        return
    with pytest.raises(RuntimeError) as raised:
        with torch.no_grad():
            block(x)
    assert type(raised.value) is RuntimeError
    assert f"RuntimeError: {raised.value}" == rb.sdpa_dtype_error(qk_dtype, activations)


def test_bug_1_exact_message(checkpoints):
    block = rb.load_block("pre-fix", checkpoints[(F64, F32)], ASSIGN, CONFIG)
    with pytest.raises(RuntimeError) as raised:
        block(rb.make_input(CONFIG))
    assert str(raised.value) == (
        "Expected query, key, and value to have the same dtype, but got query.dtype: double "
        "key.dtype: double and value.dtype: float instead."
    )


def test_pre_fix_cos_sin_are_float64_after_the_polluting_load(checkpoints):
    block = rb.load_block("pre-fix", checkpoints[(F64, F32)], ASSIGN, CONFIG)
    cos, sin = rb.rope_tables(block, rb.make_input(CONFIG))
    assert cos.dtype == sin.dtype == F64


@pytest.mark.parametrize("buffer", [F32, F64, BF16])
@pytest.mark.parametrize("how", [COPY, "safetensors load_model"])
def test_copying_loads_keep_the_buffer_float32(checkpoints, buffer, how):
    block = rb.load_block("pre-fix", checkpoints[(buffer, F32)], how, CONFIG)
    assert block.rope.inv_freq.dtype == F32
    with torch.no_grad():
        assert block(rb.make_input(CONFIG)).dtype == F32


def test_checkpoint_really_holds_a_float64_table(checkpoints):
    from safetensors import safe_open

    with safe_open(checkpoints[(F64, F32)], "pt") as f:
        assert f.get_slice("rope.inv_freq").get_dtype() == "F64"
        assert f.get_slice("q_proj.weight").get_dtype() == "F32"


# -- the defence, half by half ---------------------------------------------------------------


def test_two_layer_defence_table(checkpoints):
    outcomes = rb.evaluate_defence(checkpoints[(F64, F32)], rb.make_input(CONFIG), config=CONFIG)
    survived = {(o.variant, o.how): o.survived for o in outcomes}
    polluting = {ASSIGN, "meta device + assign=True", ".double(), params back"}
    for (variant, how), ok in survived.items():
        if variant in ("pre-fix", "creation-only fix"):
            assert ok is (how not in polluting), (variant, how)
        else:
            assert ok, (variant, how)


@pytest.mark.parametrize("default", [F32, F64])
def test_creation_fix_is_the_same_table_as_dot_float(default):
    pre = rb.inv_freq_under_default_dtype("pre-fix", default, CONFIG)
    fixed = rb.inv_freq_under_default_dtype("creation-only fix", default, CONFIG)
    assert pre.dtype == fixed.dtype == F32
    assert torch.equal(pre, fixed)
    assert torch.get_default_dtype() == F32  # restored


# -- the fixed code -----------------------------------------------------------------------


def reference_tables(x, seq):
    """float32 cos/sin from the float32 table, then cast to the activation dtype."""
    angles = torch.arange(seq, dtype=F32)[:, None] * rope_inv_freq(CONFIG.head_dim, CONFIG.base)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@pytest.mark.parametrize("buffer", [F32, F64, BF16])
@pytest.mark.parametrize("activations", [F32, BF16, F64])
@pytest.mark.parametrize("how", list(rb.LOADING_PATHS))
def test_fixed_block_never_fails(checkpoints, buffer, activations, how):
    block = rb.load_block(rb.FIXED, checkpoints[(buffer, activations)], how, CONFIG, activations)
    x = rb.make_input(CONFIG, dtype=activations)
    cos, sin = rb.rope_tables(block, x)
    assert cos.dtype == sin.dtype == activations
    with torch.no_grad():
        out = block(x)
    assert out.dtype == activations and torch.isfinite(out.float()).all()
    table_dtype = block.rope.inv_freq.dtype
    if table_dtype == BF16:
        return  # see test_a_bfloat16_table_keeps_its_rounding
    ref_cos, ref_sin = reference_tables(x, x.shape[1])
    tol = {F32: 1e-6, F64: 1e-6, BF16: 1e-2}[activations]
    torch.testing.assert_close(cos[0], ref_cos, rtol=0, atol=tol)
    torch.testing.assert_close(sin[0], ref_sin, rtol=0, atol=tol)


def test_fixed_block_output_matches_a_clean_float32_run(checkpoints):
    clean = rb.load_block(rb.FIXED, checkpoints[(F32, F32)], COPY, CONFIG)
    polluted = rb.load_block(rb.FIXED, checkpoints[(F64, F32)], ASSIGN, CONFIG)
    assert polluted.rope.inv_freq.dtype == F64
    x = rb.make_input(CONFIG)
    with torch.no_grad():
        torch.testing.assert_close(polluted(x), clean(x), rtol=0, atol=1e-6)


def test_fixed_and_pre_fix_agree_on_a_clean_float32_run(checkpoints):
    x = rb.make_input(CONFIG)
    with torch.no_grad():
        pre = rb.load_block("pre-fix", checkpoints[(F32, F32)], COPY, CONFIG)(x)
        fixed = rb.load_block(rb.FIXED, checkpoints[(F32, F32)], COPY, CONFIG)(x)
    torch.testing.assert_close(fixed, pre, rtol=0, atol=1e-6)


def test_a_bfloat16_table_keeps_its_rounding(checkpoints):
    """The use-site cast fixes the dtype, not lost precision: a table already rounded to
    bfloat16 stays rounded (sage_core.model.thinker rebuilds its table after `.to()` for this)."""
    block = rb.load_block(rb.FIXED, checkpoints[(BF16, F32)], ASSIGN, CONFIG)
    x = rb.make_input(CONFIG, seq=64)
    cos, _ = rb.rope_tables(block, x)
    ref_cos, _ = reference_tables(x, 64)
    assert (cos[0] - ref_cos).abs().max() > 1e-3
    block.rope.reset_buffers()
    cos, _ = rb.rope_tables(block, x)
    torch.testing.assert_close(cos[0], ref_cos, rtol=0, atol=1e-6)


def test_bad_arguments_are_named(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="unknown loading path 'pickle'"):
        rb.load_block("pre-fix", checkpoints[(F32, F32)], "pickle")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        rb.load_block("pre-fix", tmp_path / "missing.safetensors", COPY)
    with pytest.raises(ValueError, match="unknown rope variant 'post-fix'"):
        rb.make_block("post-fix")
