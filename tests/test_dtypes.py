"""sage_core.dtypes: the boundary helpers and DtypeTrace."""

import numpy as np
import pytest
import torch
from torch import nn

from sage_core.dtypes import DtypeTrace, parse_dtype, to_numpy_float32, to_torch_like
from sage_core.studies.repro import rope_buffer as rb

# -- boundary helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float32", torch.float32),
        ("torch.bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("fp64", torch.float64),
        (torch.float64, torch.float64),
    ],
)
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) is dtype


@pytest.mark.parametrize("bad", ["float8", "int64", 32, None, torch.int64])
def test_parse_dtype_rejects(bad):
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype(bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16, torch.float32])
def test_to_numpy_float32_from_tensors(dtype):
    x = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(3, 4).to(dtype).t()
    out = to_numpy_float32(x)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"] and out.shape == (4, 3)
    np.testing.assert_array_equal(out, x.to(torch.float32).numpy())


def test_to_numpy_float32_from_lists_and_float64_arrays():
    assert to_numpy_float32([[1.0, 2.0]]).dtype == np.float32
    assert to_numpy_float32(np.ones(3, dtype=np.float64)).dtype == np.float32


def test_to_numpy_float32_leaves_grad_tensors_alone():
    x = torch.ones(2, requires_grad=True)
    assert to_numpy_float32(x * 2).tolist() == [2.0, 2.0]


@pytest.mark.parametrize("like_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_to_torch_like_follows_the_reference(like_dtype):
    like = torch.zeros(1, dtype=like_dtype)
    for value in (np.array([0.5, 0.25], dtype=np.float64), [0.5, 0.25], torch.tensor([0.5, 0.25])):
        out = to_torch_like(value, like)
        assert out.dtype == like_dtype and out.device == like.device
        assert out.tolist() == [0.5, 0.25]


# -- DtypeTrace -----------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 4, bias=False)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return torch.outer(self.proj(x)[0], self.scale.to(x.device)).softmax(-1)


def test_records_modules_and_ops_in_completion_order():
    model = Tiny()
    with DtypeTrace(model) as trace:
        model(torch.zeros(2, 4))
    names = [(e.kind, e.name) for e in trace.events]
    assert names == [
        ("op", "F.linear"),
        ("module", "proj"),
        ("op", "Tensor.to"),
        ("op", "torch.outer"),
        ("op", "Tensor.softmax"),
        ("module", "Tiny"),
    ]
    assert [e.index for e in trace.events] == list(range(6))
    assert trace.events[0].scope == "proj" and trace.events[3].scope == "Tiny"
    assert trace.events[1].inputs == ("float32",) and trace.events[1].outputs == ("float32",)
    assert trace.first_change() is None


def test_first_change_finds_a_promotion_and_ignores_casts():
    model = Tiny()
    model.scale = model.scale.double()
    with DtypeTrace(model) as trace:
        model(torch.zeros(2, 4))
    first = trace.first_change()
    assert (first.name, first.inputs, first.outputs) == (
        "torch.outer",
        ("float32", "float64"),
        ("float64",),
    )
    # An explicit cast is a change only when asked for.
    with DtypeTrace(model) as trace:
        model(torch.zeros(2, 4)).float()
    assert trace.first_change().name == "torch.outer"
    assert trace.first_change(include_casts=True).name == "torch.outer"
    assert trace.events[-1].name == "Tensor.float" and trace.events[-1].is_cast


def test_first_change_against_an_expected_dtype():
    model = Tiny()
    with DtypeTrace(model, expected="bfloat16") as trace:
        model(torch.zeros(2, 4))
    assert trace.first_change().name == "F.linear"
    assert trace.first_change(expected=torch.float32) is None


def test_ops_can_be_restricted():
    model = Tiny()
    with DtypeTrace(model, ops={"outer"}) as trace:
        model(torch.zeros(2, 4))
    assert [e.name for e in trace.events if e.kind == "op"] == ["torch.outer"]


def test_hooks_removed_and_events_kept_when_forward_raises():
    model = Tiny()
    hooks_before = len(model._forward_hooks) + len(model.proj._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="same dtype") as raised:
        with DtypeTrace(model) as trace:
            assert trace.active_hooks == 4
            model(torch.zeros(2, 4, dtype=torch.float64))
    assert trace.active_hooks == 0
    assert len(model._forward_hooks) + len(model.proj._forward_pre_hooks) == hooks_before
    assert [(e.kind, e.name) for e in trace.events] == [
        ("op", "F.linear"),
        ("module", "proj"),
        ("module", "Tiny"),
    ]
    assert all(e.error == f"RuntimeError: {raised.value}" for e in trace.events)
    assert trace.first_error().index == 0
    # The torch function mode is gone too: nothing more is recorded.
    model(torch.zeros(2, 4))
    assert len(trace.events) == 3


def test_table_is_deterministic_and_readable():
    def run():
        model = Tiny()
        model.scale = model.scale.double()
        with DtypeTrace(model) as trace:
            model(torch.zeros(2, 4))
        return trace

    first, second = run(), run()
    table = first.table()
    assert table == second.table()
    assert "0x" not in table
    lines = table.splitlines()
    assert lines[0].split() == ["#", "kind", "name", "scope", "inputs", "outputs", "note"]
    assert "torch.outer" in lines[4] and lines[4].endswith("FIRST CHANGE")
    assert len(lines) == 1 + len(first.events)


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        DtypeTrace(torch.zeros(1))


# -- DtypeTrace on the bug #1 repro --------------------------------------------------------


@pytest.fixture(scope="module")
def float64_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "block.safetensors"
    return rb.write_checkpoint(rb.make_block("pre-fix"), path, inv_freq_dtype=torch.float64)


def test_first_change_is_torch_outer_on_the_polluted_repro(float64_checkpoint):
    block = rb.load_block("pre-fix", float64_checkpoint, "load_state_dict(sd, assign=True)")
    with pytest.raises(RuntimeError, match="Expected query, key, and value"):
        with DtypeTrace(block) as trace:
            block(rb.make_input())
    first = trace.first_change()
    assert (first.name, first.scope, first.inputs, first.outputs) == (
        "torch.outer",
        "rope",
        ("float32", "float64"),
        ("float64",),
    )
    path = [e.name for e in trace.promotion_path()]
    assert path[:4] == ["torch.outer", "torch.cat", "Tensor.cos", "Tensor.sin"]
    assert path[-1] == "F.scaled_dot_product_attention"
    assert "Tensor.mul" in path
    summary = trace.summary()
    assert summary.startswith("dtype changes at #")
    assert "torch.outer in rope: (float32, float64) -> float64" in summary
    assert "fails at" in summary and "F.scaled_dot_product_attention" in summary
    assert trace.active_hooks == 0


@pytest.mark.parametrize("variant", ["pre-fix", rb.FIXED])
def test_nothing_changes_in_a_clean_run(float64_checkpoint, variant):
    block = rb.load_block(variant, float64_checkpoint, "load_state_dict(sd)")
    with DtypeTrace(block) as trace:
        block(rb.make_input())
    assert trace.first_change() is None
    assert trace.first_error() is None
    assert trace.promotion_path() == []
    assert trace.summary() == "no floating dtype change"


def test_fixed_code_casts_the_polluted_buffer_back(float64_checkpoint):
    block = rb.load_block(rb.FIXED, float64_checkpoint, "load_state_dict(sd, assign=True)")
    assert block.rope.inv_freq.dtype == torch.float64
    with DtypeTrace(block) as trace:
        block(rb.make_input())
    assert trace.first_change() is None
    cast = trace.first_change(include_casts=True)
    assert (cast.name, cast.scope, cast.inputs, cast.outputs) == (
        "Tensor.to",
        "rope",
        ("float64",),
        ("float32",),
    )


def test_plot_dtype_flow(float64_checkpoint):
    import matplotlib

    matplotlib.use("Agg")
    from sage_core.dtypes import plot_dtype_flow

    block = rb.load_block(rb.FIXED, float64_checkpoint, "load_state_dict(sd)")
    with DtypeTrace(block) as trace:
        block(rb.make_input())
    fig = plot_dtype_flow({"fixed": trace})
    n_ops = sum(e.kind == "op" for e in trace.events)
    assert len(fig.axes[0].texts) >= n_ops
    matplotlib.pyplot.close(fig)
