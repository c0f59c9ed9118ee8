"""Regression: bug #2 still reproduces through sage_core.studies.repro, and never through the fix."""

import numpy as np
import pytest
import torch

from sage_core.dtypes import to_torch_like
from sage_core.studies.repro import sklearn_boundary as sb
from sage_core.trust.classifier import ContextClassifier, gaussian_contexts

HIDDEN = 16
CONTEXTS = 5

AS_INPUT = {
    "torch_float32": lambda t: t.to(torch.float32),
    "torch_bfloat16": lambda t: t.to(torch.bfloat16),
    "torch_float64": lambda t: t.to(torch.float64),
    "numpy_float32": lambda t: t.numpy().astype(np.float32),
    "numpy_float64": lambda t: t.numpy().astype(np.float64),
}

BF16 = "TypeError: Got unsupported ScalarType BFloat16"
FLOAT_INTO_DOUBLE = f"ValueError: {sb.REPORTED_ERROR}"
DOUBLE_INTO_FLOAT = "ValueError: Buffer dtype mismatch, expected 'const double' but got 'float'"

# What the pre-fix path does, observed with scikit-learn 1.9.1: fit input -> centres,
# then predict input -> result. Any torch tensor becomes float64 inside sklearn.
PRE_FIX_FIT = {
    "torch_float32": "centres float64",
    "torch_bfloat16": BF16,
    "torch_float64": "centres float64",
    "numpy_float32": "centres float32",
    "numpy_float64": "centres float64",
}
PREDICT_WITH_FLOAT64_CENTRES = {
    "torch_float32": "int32",
    "torch_bfloat16": BF16,
    "torch_float64": "int32",
    "numpy_float32": FLOAT_INTO_DOUBLE,
    "numpy_float64": "int32",
}
# The report's fix #3 alone (float32 numpy before fit) moves the boundary, it does not remove it.
PREDICT_WITH_FLOAT32_CENTRES = {
    "torch_float32": DOUBLE_INTO_FLOAT,
    "torch_bfloat16": BF16,
    "torch_float64": DOUBLE_INTO_FLOAT,
    "numpy_float32": "int32",
    "numpy_float64": DOUBLE_INTO_FLOAT,
}


@pytest.fixture(scope="module")
def report_data():
    return sb.report_training_data(num_samples=40, hidden_size=HIDDEN, num_contexts=CONTEXTS)


@pytest.fixture(scope="module")
def context_data():
    return gaussian_contexts(CONTEXTS, per_context=12, hidden_size=HIDDEN, spread=0.5, seed=3)


def test_report_path_raises_the_reported_error_exactly(report_data):
    embeddings, labels = report_data
    classifier = sb.fit_report_classifier(embeddings, labels, CONTEXTS)
    assert classifier.cluster_centers_.dtype == np.float64
    hidden_states = torch.randn(2, 3, HIDDEN)
    with pytest.raises(ValueError) as info:
        sb.classify_hidden_states_report(classifier, hidden_states)
    assert type(info.value) is ValueError
    assert str(info.value) == sb.REPORTED_ERROR


@pytest.mark.parametrize("fit_kind", list(AS_INPUT))
def test_pre_fix_fit_outcome(report_data, fit_kind):
    embeddings, labels = report_data
    result = sb.outcome(sb.fit_report_classifier, AS_INPUT[fit_kind](embeddings), labels, CONTEXTS)
    assert result == PRE_FIX_FIT[fit_kind]


@pytest.mark.parametrize("predict_kind", list(AS_INPUT))
@pytest.mark.parametrize("fit_kind", [k for k, v in PRE_FIX_FIT.items() if v.startswith("centres")])
def test_pre_fix_predict_outcome(report_data, fit_kind, predict_kind):
    embeddings, labels = report_data
    classifier = sb.fit_report_classifier(AS_INPUT[fit_kind](embeddings), labels, CONTEXTS)
    expected = (
        PREDICT_WITH_FLOAT32_CENTRES
        if classifier.cluster_centers_.dtype == np.float32
        else PREDICT_WITH_FLOAT64_CENTRES
    )[predict_kind]
    queries = AS_INPUT[predict_kind](torch.randn(3, HIDDEN))
    assert sb.outcome(sb.predict_report, classifier, queries) == expected


@pytest.mark.parametrize("predict_kind", list(AS_INPUT))
@pytest.mark.parametrize("fit_kind", list(AS_INPUT))
@pytest.mark.parametrize("mode", ["kmeans", "supervised"])
def test_context_classifier_never_hits_the_boundary(context_data, mode, fit_kind, predict_kind):
    embeddings, labels = context_data
    classifier = ContextClassifier(CONTEXTS, mode=mode, seed=0)
    classifier.fit(AS_INPUT[fit_kind](embeddings), labels if mode == "supervised" else None)
    assert classifier.centers_.dtype == np.float32
    predicted = classifier.predict(AS_INPUT[predict_kind](embeddings))
    assert predicted.dtype == np.int64
    # Well-separated data: every input dtype (bf16 rounding included) gives the same answer.
    reference = classifier.predict(embeddings.numpy().astype(np.float32))
    np.testing.assert_array_equal(predicted, reference)


def test_report_fit_ignores_its_labels(report_data):
    embeddings, labels = report_data
    shuffled = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(1))]
    with_labels = sb.fit_report_classifier(embeddings, labels, CONTEXTS)
    with_shuffled = sb.fit_report_classifier(embeddings, shuffled, CONTEXTS)
    without = sb.fit_report_classifier(embeddings, None, CONTEXTS)
    np.testing.assert_array_equal(with_labels.cluster_centers_, with_shuffled.cluster_centers_)
    np.testing.assert_array_equal(with_labels.cluster_centers_, without.cluster_centers_)


def test_hard_coded_weights_break_a_bf16_mix_and_the_fix_keeps_bf16():
    hidden = torch.randn(2, 3, HIDDEN).to(torch.bfloat16)
    experts = sb.make_experts(4, HIDDEN, torch.bfloat16)
    scores, expert_ids = [0.5, 0.3, 0.2], [0, 2, 3]
    pre_fix = sb.selection_weights_report(scores, hidden)
    fixed = to_torch_like(scores, hidden)
    assert pre_fix.dtype == torch.float32
    assert fixed.dtype == torch.bfloat16

    # A weight vector broadcast against bf16 expert outputs promotes them to float32 ...
    assert (pre_fix[None, :, None] * torch.ones(1, 3, HIDDEN, dtype=torch.bfloat16)).dtype == (
        torch.float32
    )
    # ... and the vectorised mix fails where it adds them into the bf16 output.
    with pytest.raises(RuntimeError) as info:
        sb.mix_index_add(hidden, expert_ids, pre_fix, experts)
    assert str(info.value) == sb.INDEX_ADD_ERROR
    mixed = sb.mix_index_add(hidden, expert_ids, fixed, experts)
    assert mixed.dtype == torch.bfloat16 and mixed.shape == hidden.shape

    # The report's own per-token loop never failed: a 0-dim float32 weight does not promote.
    looped = sb.mix_report_loop(hidden, expert_ids, pre_fix, experts)
    assert looped.dtype == torch.bfloat16
    torch.testing.assert_close(looped, sb.mix_report_loop(hidden, expert_ids, fixed, experts))


def test_fixed_weights_follow_every_hidden_dtype():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        hidden = torch.zeros(1, 2, HIDDEN, dtype=dtype)
        assert to_torch_like([0.7, 0.3], hidden).dtype == dtype
        assert sb.selection_weights_report([0.7, 0.3], hidden).dtype == torch.float32


def test_pipeline_stages_record_prefix_failures_and_fixed_dtypes():
    stages = sb.pipeline_stages(hidden_size=HIDDEN)
    assert stages["fit on torch float32"] == {
        "pre-fix": "centres float64",
        "fixed": "centres float32",
    }
    assert stages["predict float32 hidden"] == {"pre-fix": FLOAT_INTO_DOUBLE, "fixed": "int64"}
    assert stages["selection weights (bfloat16 hidden)"] == {
        "pre-fix": "float32",
        "fixed": "bfloat16",
    }
    assert stages["report's per-token loop mix (bfloat16)"] == {
        "pre-fix": "bfloat16",
        "fixed": "bfloat16",
    }
    assert stages["index_add_ mix into bfloat16 output"] == {
        "pre-fix": f"RuntimeError: {sb.INDEX_ADD_ERROR}",
        "fixed": "bfloat16",
    }


def test_sklearn_converts_torch_tensors_to_float64_but_keeps_numpy_float32():
    assert sb.sklearn_sees(torch.randn(3, HIDDEN)) == "float64"
    assert sb.sklearn_sees(torch.randn(3, HIDDEN).numpy()) == "float32"
    assert sb.sklearn_sees(torch.randn(3, HIDDEN).to(torch.bfloat16)) == BF16


def test_boundary_matrix_matches_the_tables_above():
    matrix = sb.boundary_matrix(hidden_size=HIDDEN)
    kinds = {k.replace(" ", "_"): k for k in sb.INPUT_KINDS}
    assert list(kinds) == list(AS_INPUT)
    for fit_kind, fit_name in kinds.items():
        row = matrix["pre-fix"][fit_name]
        assert row["fit"] == PRE_FIX_FIT[fit_kind]
        if row["fit"].startswith("centres"):
            table = (
                PREDICT_WITH_FLOAT32_CENTRES
                if row["fit"] == "centres float32"
                else PREDICT_WITH_FLOAT64_CENTRES
            )
            assert {k: row[n] for k, n in kinds.items()} == table
        fixed = matrix["fixed"][fit_name]
        assert fixed == {"fit": "centres float32", **{n: "int64" for n in kinds.values()}}
    text = sb.format_matrix(matrix["pre-fix"])
    assert "ValueError" in text and "TypeError" in text
