"""Unit tests for sage_core.trust.classifier.ContextClassifier."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save as safetensors_save
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import LogisticRegression

from sage_core.trust.classifier import (
    ClassifierStateError,
    ContextClassifier,
    features,
    gaussian_contexts,
)

HIDDEN = 16
CONTEXTS = 4
NAMES = ["code", "reasoning", "text", "other"]


@pytest.fixture(scope="module")
def data():
    x, y = gaussian_contexts(CONTEXTS, per_context=20, hidden_size=HIDDEN, spread=0.6, seed=1)
    return x[:40], y[:40], x[40:], y[40:]


@pytest.fixture(scope="module")
def fitted(data):
    x, y, _, _ = data
    return ContextClassifier(CONTEXTS, NAMES, mode="supervised", seed=0).fit(x, y)


# ---------------------------------------------------------------- features


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t,
        lambda t: t.to(torch.bfloat16),
        lambda t: t.to(torch.float64),
        lambda t: t.numpy().astype(np.float64),
        lambda t: t.numpy().astype(np.float16),
    ],
)
def test_features_are_float32_and_unit_norm(make):
    out = features(make(torch.randn(5, 7, HIDDEN) * 3))
    assert out.dtype == np.float32 and out.shape == (5, HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_mean_pooling_without_mask():
    x = torch.randn(3, 5, HIDDEN)
    expected = x.mean(dim=1)
    expected = expected / expected.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(features(x), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_mean_pooling_with_mask_ignores_padding():
    x = torch.randn(2, 5, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = x.clone()
    padded[0, 3:] = 1e3  # padding content must not matter
    out = features(padded, mask)
    first = x[0, :3].mean(dim=0)
    np.testing.assert_allclose(out[0], (first / first.norm()).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], features(x[1:])[0], rtol=1e-5, atol=1e-6)


def test_pooled_input_is_only_normalised():
    x = np.array([[3.0, 4.0] + [0.0] * (HIDDEN - 2)])
    np.testing.assert_allclose(features(x)[0, :2], [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(2, 3, dtype=torch.int64),), "floating point tensor"),
        ((np.ones((2, 3), dtype=np.int32),), "floating point array"),
        ((torch.ones(HIDDEN),), r"\(B, S, H\) or \(N, H\)"),
        ((torch.tensor([[float("nan"), 1.0]]),), "NaN"),
        ((torch.ones(2, 3, HIDDEN), torch.ones(2, 4)), "attention_mask must have shape"),
        ((torch.ones(2, 3, HIDDEN), torch.tensor([[1, 1, 1], [0, 0, 0]])), r"rows \[1\]"),
        ((torch.ones(2, HIDDEN), torch.ones(2, 1)), "only meaningful"),
    ],
)
def test_features_reject_bad_input_clearly(args, match):
    with pytest.raises(ValueError, match=match):
        features(*args)


# ---------------------------------------------------------------- fit / predict


def test_kmeans_centres_are_float32_and_match_sklearn_predict(data):
    x, _, x_test, _ = data
    classifier = ContextClassifier(CONTEXTS, seed=0).fit(x)
    assert classifier.centers_.dtype == np.float32
    assert classifier.centers_.shape == (CONTEXTS, HIDDEN)
    # Own predict equals sklearn's on the same float32 centres.
    reference = MiniBatchKMeans(n_clusters=CONTEXTS, random_state=0, n_init=3).fit(features(x))
    np.testing.assert_array_equal(classifier.centers_, reference.cluster_centers_)
    np.testing.assert_array_equal(classifier.predict(x_test), reference.predict(features(x_test)))


def test_deterministic_with_a_seed(data):
    x = data[0]
    first = ContextClassifier(CONTEXTS, seed=7).fit(x).centers_
    second = ContextClassifier(CONTEXTS, seed=7).fit(x).centers_
    np.testing.assert_array_equal(first, second)
    x_random = torch.randn(60, HIDDEN, generator=torch.Generator().manual_seed(0))
    seeds = [ContextClassifier(CONTEXTS, seed=s).fit(x_random).centers_ for s in (0, 1, 2)]
    assert not all(np.array_equal(seeds[0], other) for other in seeds[1:])


def test_supervised_fit_uses_labels(data, fitted):
    x, y, x_test, y_test = data
    assert fitted.centers_.dtype == np.float32
    assert fitted.score(x_test, y_test) >= 0.95  # chance is 0.25
    # Permuting the label names permutes the centres: the labels drive the fit.
    permutation = torch.tensor([1, 2, 3, 0])
    relabelled = ContextClassifier(CONTEXTS, mode="supervised").fit(x, permutation[y])
    np.testing.assert_array_equal(relabelled.centers_[permutation.numpy()], fitted.centers_)
    assert fitted.predict_names(x_test) == [NAMES[i] for i in fitted.predict(x_test).tolist()]
    assert fitted.score(x_test, [NAMES[i] for i in y_test.tolist()]) == fitted.score(x_test, y_test)


def test_kmeans_purity_on_structured_and_random_data(data):
    x, _, x_test, y_test = data
    classifier = ContextClassifier(CONTEXTS, seed=0).fit(x)
    assert classifier.purity(x_test, y_test) >= 0.95
    random_labels = torch.randint(
        0, CONTEXTS, y_test.shape, generator=torch.Generator().manual_seed(2)
    )
    assert classifier.purity(x_test, random_labels) < 0.7


def test_labels_are_never_silently_ignored(data):
    x, y, _, _ = data
    with pytest.raises(ValueError, match="mode='supervised'"):
        ContextClassifier(CONTEXTS, mode="kmeans").fit(x, y)
    with pytest.raises(ValueError, match="needs labels"):
        ContextClassifier(CONTEXTS, mode="supervised").fit(x)
    with pytest.raises(ValueError, match="no sample for contexts"):
        ContextClassifier(CONTEXTS, NAMES, mode="supervised").fit(x, torch.zeros_like(y))
    with pytest.raises(ValueError, match="must lie in"):
        ContextClassifier(CONTEXTS, mode="supervised").fit(x, y + CONTEXTS)
    with pytest.raises(ValueError, match="shape"):
        ContextClassifier(CONTEXTS, mode="supervised").fit(x, y[:-1])
    with pytest.raises(ValueError, match="use purity"):
        ContextClassifier(CONTEXTS).fit(x).score(x, y)


def test_bad_construction_and_unfitted_use():
    with pytest.raises(ValueError, match="mode"):
        ContextClassifier(CONTEXTS, mode="svm")
    with pytest.raises(ValueError, match="distinct names"):
        ContextClassifier(CONTEXTS, ["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="not fitted"):
        ContextClassifier(CONTEXTS).predict(torch.randn(2, HIDDEN))


def test_predict_rejects_wrong_hidden_size(fitted):
    with pytest.raises(ValueError, match="hidden size 8 does not match the fitted 16"):
        fitted.predict(torch.randn(2, 8))


# ---------------------------------------------------------------- logistic mode


@pytest.fixture(scope="module")
def logistic(data):
    x, y, _, _ = data
    return ContextClassifier(CONTEXTS, NAMES, mode="logistic", seed=0).fit(x, y)


def test_logistic_fits_separable_contexts_and_fails_on_shuffled_labels(data, logistic):
    x, y, x_test, y_test = data
    assert logistic.coef_.dtype == np.float32 and logistic.coef_.shape == (CONTEXTS, HIDDEN)
    assert logistic.intercept_.dtype == np.float32 and logistic.intercept_.shape == (CONTEXTS,)
    assert logistic.centers_ is None
    assert logistic.score(x_test, y_test) >= 0.95  # chance is 0.25
    shuffled = y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(3))]
    assert not torch.equal(shuffled, y)
    blind = ContextClassifier(CONTEXTS, NAMES, mode="logistic", seed=0).fit(x, shuffled)
    assert blind.score(x_test, y_test) < 0.7


def test_logistic_matches_sklearn_on_float32_features(data, logistic):
    from sage_core.trust.classifier import LOGISTIC_C, LOGISTIC_MAX_ITER, LOGISTIC_TOL

    x, y, x_test, _ = data
    reference = LogisticRegression(
        C=LOGISTIC_C, tol=LOGISTIC_TOL, max_iter=LOGISTIC_MAX_ITER, random_state=0
    ).fit(features(x), y.numpy())
    np.testing.assert_allclose(logistic.coef_, reference.coef_, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(logistic.predict(x_test), reference.predict(features(x_test)))
    scores = logistic.decision_function(x_test)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores.argmax(axis=1), logistic.predict(x_test))


@pytest.mark.parametrize(
    "make",
    [lambda t: t.to(torch.bfloat16), lambda t: t.to(torch.float64), lambda t: t.numpy()],
)
def test_logistic_is_float32_whatever_the_input_dtype(data, make):
    x, y, x_test, _ = data
    classifier = ContextClassifier(CONTEXTS, mode="logistic").fit(make(x), y)
    assert classifier.coef_.dtype == np.float32 and classifier.intercept_.dtype == np.float32
    assert classifier.predict(make(x_test)).dtype == np.int64
    assert classifier.decision_function(make(x_test)).dtype == np.float32


def test_logistic_is_deterministic_and_uses_labels(data, logistic):
    x, y, _, _ = data
    again = ContextClassifier(CONTEXTS, NAMES, mode="logistic", seed=0).fit(x, y)
    np.testing.assert_array_equal(again.coef_, logistic.coef_)
    np.testing.assert_array_equal(again.intercept_, logistic.intercept_)
    permutation = torch.tensor([1, 2, 3, 0])
    relabelled = ContextClassifier(CONTEXTS, mode="logistic").fit(x, permutation[y])
    # Relabelling reorders the classes, so lbfgs stops at a slightly different iterate (and
    # coefficients are stored in float32): equal to 1e-4, where ignoring the labels or
    # mis-permuting them moves coefficients by O(0.1).
    np.testing.assert_allclose(
        relabelled.coef_[permutation.numpy()], logistic.coef_, rtol=1e-3, atol=1e-4
    )
    assert not np.allclose(relabelled.coef_, logistic.coef_, atol=1e-2)  # the order matters
    with pytest.raises(ValueError, match="mode='logistic' needs labels"):
        ContextClassifier(CONTEXTS, mode="logistic").fit(x)
    with pytest.raises(ValueError, match="no sample for contexts"):
        ContextClassifier(CONTEXTS, NAMES, mode="logistic").fit(x, torch.zeros_like(y))
    with pytest.raises(ValueError, match="not fitted"):
        ContextClassifier(CONTEXTS, mode="logistic").predict(x)
    with pytest.raises(ValueError, match="hidden size 8 does not match the fitted 16"):
        logistic.predict(torch.randn(2, 8))


def test_logistic_with_two_contexts_predicts_like_sklearn():
    x, y = gaussian_contexts(2, per_context=30, hidden_size=HIDDEN, spread=1.5, seed=4)
    classifier = ContextClassifier(2, mode="logistic").fit(x[:40], y[:40])
    assert classifier.coef_.shape == (2, HIDDEN)
    reference = LogisticRegression(tol=1e-6, max_iter=1000).fit(features(x[:40]), y[:40].numpy())
    np.testing.assert_array_equal(classifier.predict(x[40:]), reference.predict(features(x[40:])))


# ---------------------------------------------------------------- persistence


def test_round_trip_gives_identical_predictions(tmp_path, data, fitted):
    x_test = data[2]
    path = fitted.save(tmp_path / "classifier.safetensors")
    loaded = ContextClassifier.load(path)
    assert (loaded.mode, loaded.context_names, loaded.seed) == ("supervised", NAMES, 0)
    np.testing.assert_array_equal(loaded.centers_, fitted.centers_)
    np.testing.assert_array_equal(loaded.predict(x_test), fitted.predict(x_test))
    assert loaded.predict_names(x_test) == fitted.predict_names(x_test)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.safetensors"]


def test_logistic_round_trip_is_exact(tmp_path, data, logistic):
    x_test = data[2]
    path = logistic.save(tmp_path / "logistic.safetensors")
    loaded = ContextClassifier.load(path)
    assert (loaded.mode, loaded.context_names, loaded.seed) == ("logistic", NAMES, 0)
    np.testing.assert_array_equal(loaded.coef_, logistic.coef_)
    np.testing.assert_array_equal(loaded.intercept_, logistic.intercept_)
    np.testing.assert_array_equal(
        loaded.decision_function(x_test), logistic.decision_function(x_test)
    )
    np.testing.assert_array_equal(loaded.predict(x_test), logistic.predict(x_test))
    header, _ = _header(path)
    assert sorted(k for k in header if k != "__metadata__") == ["coef", "intercept"]
    assert header["__metadata__"]["C"] == "1.0"


def test_logistic_file_with_wrong_tensors_is_refused(tmp_path, logistic):
    from sage_core.trust.classifier import KIND, SCHEMA_VERSION
    from sage_core.trust.state import save_state

    path = tmp_path / "c.safetensors"
    meta = {"mode": "logistic", "seed": "0", "context_names": json.dumps(NAMES)}
    save_state(path, KIND, SCHEMA_VERSION, {"centers": torch.from_numpy(logistic.coef_)}, meta)
    with pytest.raises(ClassifierStateError, match=rf"{path}.*\['coef', 'intercept'\]"):
        ContextClassifier.load(path)
    tensors = {"coef": torch.from_numpy(logistic.coef_), "intercept": torch.zeros(3)}
    save_state(path, KIND, SCHEMA_VERSION, tensors, meta)
    with pytest.raises(ClassifierStateError, match=rf"{path}.*'intercept' must have shape"):
        ContextClassifier.load(path)


def test_schema_2_files_are_refused_by_name(tmp_path, fitted):
    from sage_core.trust.classifier import KIND
    from sage_core.trust.state import save_state

    path = tmp_path / "schema2.safetensors"  # exactly what the previous version wrote
    meta = {"mode": "supervised", "seed": "0", "context_names": json.dumps(NAMES)}
    save_state(path, KIND, 2, {"centers": torch.from_numpy(fitted.centers_)}, meta)
    with pytest.raises(ClassifierStateError, match=f"{path}.*schema_version '2'"):
        ContextClassifier.load(path)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path, data, fitted):
    path = tmp_path / "sub" / "c.safetensors"
    fitted.save(path)
    ContextClassifier(CONTEXTS, seed=0).fit(data[0]).save(path)  # overwrite
    assert ContextClassifier.load(path).mode == "kmeans"
    assert [p.name for p in path.parent.iterdir()] == ["c.safetensors"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, fitted, monkeypatch):
    path = fitted.save(tmp_path / "c.safetensors")
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("sage_core.atomic.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def _header(path):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _rewrite(path, header, body):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def test_truncated_file_is_a_clear_error(tmp_path, fitted):
    path = fitted.save(tmp_path / "c.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ClassifierStateError, match=str(path)):
        ContextClassifier.load(path)


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ClassifierStateError, match=str(path)):
        ContextClassifier.load(path)


def test_corrupt_centres_fail_the_checksum(tmp_path, fitted):
    path = fitted.save(tmp_path / "c.safetensors")
    header, body = _header(path)
    flipped = bytearray(body)
    flipped[5] ^= 0xFF
    _rewrite(path, header, bytes(flipped))
    with pytest.raises(ClassifierStateError, match=f"{path}.*checksum"):
        ContextClassifier.load(path)


def test_wrong_schema_version_is_a_clear_error(tmp_path, fitted):
    path = fitted.save(tmp_path / "c.safetensors")
    header, body = _header(path)
    header["__metadata__"]["schema_version"] = "99"
    _rewrite(path, header, body)
    with pytest.raises(ClassifierStateError, match=f"{path}.*schema_version '99'"):
        ContextClassifier.load(path)


def test_wrong_contents_are_clear_errors(tmp_path):
    from sage_core.trust.classifier import KIND, SCHEMA_VERSION
    from sage_core.trust.state import save_state

    path = tmp_path / "c.safetensors"
    save_state(path, KIND, SCHEMA_VERSION, {"weights": torch.zeros(2, 3)}, {})
    with pytest.raises(ClassifierStateError, match=r"expected tensors \['centers'\]"):
        ContextClassifier.load(path)
    meta = {"mode": "kmeans", "seed": "0", "context_names": '["a", "b"]'}
    save_state(
        path, KIND, SCHEMA_VERSION, {"centers": torch.zeros(2, 3, dtype=torch.float64)}, meta
    )
    with pytest.raises(ClassifierStateError, match="2-D float32"):
        ContextClassifier.load(path)


def test_old_files_and_other_kinds_are_refused(tmp_path, fitted):
    from sage_core.trust import TrustTable

    old = tmp_path / "old.safetensors"  # what schema 1 wrote: its own checksum key
    old.write_bytes(
        safetensors_save(
            {"centers": fitted.centers_},
            {"schema_version": "1", "kind": "sage_core.ContextClassifier"},
        )
    )
    with pytest.raises(ClassifierStateError, match=f"{old}.*schema_version '1'"):
        ContextClassifier.load(old)
    trust = TrustTable([0], ["a"], 3).save(tmp_path / "trust.safetensors")
    with pytest.raises(ClassifierStateError, match=f"{trust}.*not a classifier file"):
        ContextClassifier.load(trust)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ContextClassifier.load(tmp_path / "missing.safetensors")
