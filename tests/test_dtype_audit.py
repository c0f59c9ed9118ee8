"""The dtype audit matrix (sage_core.studies.dtype_audit): one test per cell, each under strict().

A failing cell's test id and message name the entry point, the activation dtype and the
checkpoint. Below the matrix: the library boundary round trip, and tests that the audit
itself can fail (a promotion, a wrapped violation, a wrong dtype, a crash).
"""

import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

from sage_core.dtypes import strict, to_numpy_float32, to_torch_like
from sage_core.model.rope import MultimodalRotaryEmbedding
from sage_core.studies import dtype_audit as audit


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return audit.write_checkpoints(tmp_path_factory.mktemp("audit_checkpoints"))


@pytest.fixture(scope="module")
def float16():
    return audit.float16_support()


def _param(cell):
    # Known bugs are declared in audit.expectation(); they do not depend on the float16 probe.
    bug = audit.expectation(cell, float16=(True, "")).bug
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(cell, id=cell.id, marks=marks)


@pytest.mark.parametrize("cell", [_param(c) for c in audit.cells()])
def test_cell(cell, checkpoints, float16, tmp_path):
    expected = audit.expectation(cell, float16)
    if expected.outcome == "skipped":
        pytest.skip(f"{cell.id}: {expected.reason}")
    result = audit.run_cell(cell, checkpoints, tmp_path, float16=float16)
    assert result.meets(expected), (
        f"{cell.id}: expected {expected.outcome} ({expected.reason}), "
        f"got {result.outcome}: {result.detail}"
    )


def test_matrix_shape_and_declarations():
    cells = audit.cells()
    columns = len(audit.ACTIVATIONS) * len(audit.CHECKPOINTS) + 1
    assert len(cells) == len(audit.ENTRY_POINTS) * columns
    assert len({c.id for c in cells}) == len(cells)
    for cell in cells:
        expected = audit.expectation(cell, float16=(False, "no float16 here"))
        assert expected.outcome in ("policy", "rejected", "skipped") and expected.reason
        if expected.outcome == "rejected":
            assert expected.error in (TypeError, ValueError) and expected.match
        if cell.activation == "float16":
            assert expected.outcome == "skipped" and "no float16 here" in expected.reason


# -- the library boundary, both sides asserted ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_torch_numpy_sklearn_round_trip(dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 8, generator=gen).to(dtype)
    with strict(dtype), threadpool_limits(limits=1):
        features = to_numpy_float32(hidden)  # torch side: dtype in, float32 numpy out
        assert hidden.dtype == dtype and features.dtype == np.float32
        kmeans = MiniBatchKMeans(n_clusters=3, random_state=0, n_init=1).fit(features)
        assert kmeans.cluster_centers_.dtype == np.float32  # sklearn kept float32
        labels = kmeans.predict(to_numpy_float32(hidden))
        centres = to_torch_like(kmeans.cluster_centers_, hidden)  # back: the activations' dtype
        assigned = torch.as_tensor(labels)
    assert centres.dtype == dtype and assigned.dtype in (torch.int32, torch.int64)


def test_report_boundary_is_a_violation():
    """The report's path: a torch tensor straight into sklearn becomes float64."""
    hidden = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"Tensor\.__array__.*\(float32\) -> float64"):
        with strict(torch.float32), threadpool_limits(limits=1):
            MiniBatchKMeans(n_clusters=3, random_state=0, n_init=1).fit(hidden)


# -- the audit itself can fail ----------------------------------------------------------------


def _run_with(monkeypatch, checkpoints, tmp_path, entry, fn, activation="bfloat16"):
    monkeypatch.setitem(audit.ENTRY_POINTS, entry, fn)
    return audit.run_cell(audit.Cell(entry, activation, "float32"), checkpoints, tmp_path)


def test_a_promotion_is_a_violation(monkeypatch, checkpoints, tmp_path):
    def promote(ctx):
        buffer = torch.ones(2, dtype=torch.float64)  # made outside, like a checkpoint buffer
        with strict(ctx.activation):
            torch.ones(2, dtype=ctx.activation) * buffer

    result = _run_with(monkeypatch, checkpoints, tmp_path, "forward", promote)
    assert result.outcome == "violation" and "Tensor.mul" in result.detail
    assert not result.meets(audit.expectation(result.cell))


def test_a_violation_wrapped_by_library_code_is_still_a_violation(monkeypatch, checkpoints,
                                                                   tmp_path):  # fmt: skip
    def wrapped(ctx):
        try:
            with strict(ctx.activation):
                torch.zeros(2)  # float32 made in bfloat16 activations
        except TypeError as exc:
            raise ValueError("cannot read the thing") from exc

    result = _run_with(monkeypatch, checkpoints, tmp_path, "forward", wrapped)
    assert result.outcome == "violation" and "torch.zeros" in result.detail


def test_wrong_dtype_and_crash(monkeypatch, checkpoints, tmp_path):
    def wrong(ctx):
        audit._expect("logits", torch.zeros(1, dtype=torch.float64), ctx.activation)

    def crash(ctx):
        raise RuntimeError("deep inside")

    assert _run_with(monkeypatch, checkpoints, tmp_path, "forward", wrong).outcome == "wrong dtype"
    assert _run_with(monkeypatch, checkpoints, tmp_path, "forward", crash).outcome == "crash"


def test_a_rejection_must_match_its_declaration(monkeypatch, checkpoints, tmp_path):
    def other_error(ctx):
        raise ValueError("some other complaint")

    result = audit.run_cell(audit.Cell("forward", audit.UNSUPPORTED, audit.ANY_CHECKPOINT),
                            checkpoints, tmp_path)  # fmt: skip
    assert result.outcome == "rejected" and result.meets(audit.expectation(result.cell))
    monkeypatch.setitem(audit.ENTRY_POINTS, "forward", other_error)
    result = audit.run_cell(result.cell, checkpoints, tmp_path)
    assert result.outcome == "rejected" and not result.meets(audit.expectation(result.cell))


def test_the_pre_fix_rope_fails_its_cell(monkeypatch, checkpoints, tmp_path):
    """Bug #1 reintroduced (`.to(x.device)` at use): the float64-buffer rope cell fails."""

    def pre_fix_forward(self, x, position_ids):
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        freqs = position_ids.to(device=x.device, dtype=torch.float32)[..., None] * self.inv_freq.to(
            x.device
        )
        emb = torch.cat((freqs[0], freqs[0]), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    monkeypatch.setattr(MultimodalRotaryEmbedding, "forward", pre_fix_forward)
    result = audit.run_cell(audit.Cell("rope", "float32", audit.ROPE_BUFFER), checkpoints,
                            tmp_path)  # fmt: skip
    assert result.outcome == "violation"
    assert "(float32, float64) -> float64" in result.detail


def test_plot_and_summary(checkpoints, tmp_path):
    cells = [c for c in audit.cells() if c.entry in ("rope", "forward")][:6]
    results = [audit.run_cell(c, checkpoints, tmp_path) for c in cells]
    counts = audit.summary(results)
    assert list(counts) == list(audit.OUTCOMES) and sum(counts.values()) == len(results)
    fig = audit.plot_matrix(results)
    assert fig.axes
    import matplotlib.pyplot as plt

    plt.close(fig)
