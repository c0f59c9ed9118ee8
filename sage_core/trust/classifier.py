"""Context classifier: which context (code, reasoning, text, ...) a sequence belongs to.

Features are mean-pooled, L2-normalised hidden states, converted to float32 numpy at the
boundary (bug #2 of the report: scikit-learn turns a torch tensor into float64, and a
float64 model then refuses float32 input). Three modes:

- "kmeans": unsupervised MiniBatchKMeans, as in the report. It cannot use labels, so
  passing labels to it is an error (the report's `fit(embeddings, labels)` put them in
  sklearn's ignored `y`).
- "supervised": nearest class centroid on the normalised features. Chosen over a
  logistic regression because it has no solver, no tolerance and no iteration order to
  make results depend on, it is exact in float32, and it leaves the same state as k-means
  (one centre per context), so both modes share predict, save and load.
- "logistic": multinomial logistic regression (scikit-learn `LogisticRegression`, lbfgs,
  fixed C, tolerance and iteration cap, one thread, seeded), for when a linear boundary
  between contexts beats nearest centroid (more fit data, concatenated layer features).
  Fitted on float32 features; its weights are kept as float32 `coef_` (contexts, H) and
  `intercept_` (contexts,), and predict is argmax of the float32 scores. A fit that does
  not converge is an error, not a warning.

State is one safetensors file (centres, or coef and intercept for "logistic", + JSON
metadata with a schema version and a checksum), written atomically. Nothing is pickled.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from sklearn.cluster import MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from sage_core.dtypes import to_numpy_float32
from sage_core.errors import ClassifierStateError
from sage_core.trust.state import load_state, save_state

SCHEMA_VERSION = 3  # 2: the shared state format (kind checked, one sha256); 3: + "logistic"
KIND = "sage_core.ContextClassifier"
MODES = ("kmeans", "supervised", "logistic")
# The tensors each mode saves (schema 3).
TENSORS = {"kmeans": ("centers",), "supervised": ("centers",), "logistic": ("coef", "intercept")}
# "logistic": inverse L2 strength, tolerance and iteration cap, fixed (C chosen from
# {1, 10, 100} on the tuning seeds 1000-1009 only, never on evaluation seeds).
LOGISTIC_C = 1.0
LOGISTIC_TOL = 1e-6
LOGISTIC_MAX_ITER = 1000


def features(hidden_states, attention_mask=None) -> np.ndarray:
    """Mean-pooled, L2-normalised float32 features, shape (N, H).

    `hidden_states`: (B, S, H) (pooled over S, counting only positions where
    `attention_mask` (B, S) is nonzero) or (N, H) already pooled. Torch tensors of any
    float dtype and device (bf16 included) or numpy arrays of any float dtype.
    """
    x = _float_input(hidden_states, "hidden_states")
    if x.ndim == 3:
        if attention_mask is None:
            pooled = x.mean(axis=1)
        else:
            mask = _mask_input(attention_mask, x.shape[:2])
            counts = mask.sum(axis=1, keepdims=True)
            if np.any(counts == 0):
                rows = np.flatnonzero(counts[:, 0] == 0).tolist()
                raise ValueError(f"attention_mask has no nonzero position in rows {rows}")
            pooled = (x * mask[:, :, None]).sum(axis=1) / counts
    elif x.ndim == 2:
        if attention_mask is not None:
            raise ValueError("attention_mask is only meaningful for (B, S, H) hidden_states")
        pooled = x
    else:
        raise ValueError(f"hidden_states must be (B, S, H) or (N, H), got shape {tuple(x.shape)}")
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    # A zero vector has no direction; it stays zero rather than becoming NaN.
    return np.ascontiguousarray(pooled / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


def gaussian_contexts(
    num_contexts: int, per_context: int, hidden_size: int, spread: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded data with real class structure: one Gaussian cloud per context.

    Returns (embeddings (num_contexts * per_context, hidden_size) float32, labels int64).
    Each context has a random unit-norm mean scaled by sqrt(hidden_size) so its distance
    from the other means is comparable to the noise norm times 1/spread.
    """
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_contexts, hidden_size, generator=gen)
    means = means / means.norm(dim=1, keepdim=True) * hidden_size**0.5
    labels = torch.arange(num_contexts).repeat_interleave(per_context)
    noise = torch.randn(labels.numel(), hidden_size, generator=gen) * spread
    order = torch.randperm(labels.numel(), generator=gen)
    return (means[labels] + noise)[order], labels[order]


class ContextClassifier:
    """Assigns a context index to hidden states; float32 inside, whatever the input dtype."""

    def __init__(self, num_contexts: int, context_names=None, mode: str = "kmeans", seed: int = 0):
        if not isinstance(num_contexts, int) or num_contexts < 1:
            raise ValueError(f"num_contexts must be a positive int, got {num_contexts!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if context_names is None:
            context_names = [f"context_{i}" for i in range(num_contexts)]
        context_names = [str(name) for name in context_names]
        if len(context_names) != num_contexts or len(set(context_names)) != num_contexts:
            raise ValueError(
                f"context_names must be {num_contexts} distinct names, got {context_names!r}"
            )
        self.num_contexts = num_contexts
        self.context_names = context_names
        self.mode = mode
        self.seed = int(seed)
        self.centers_: np.ndarray | None = None  # (num_contexts, H) float32 after fit
        self.coef_: np.ndarray | None = None  # "logistic": (num_contexts, H) float32
        self.intercept_: np.ndarray | None = None  # "logistic": (num_contexts,) float32

    def features(self, hidden_states, attention_mask=None) -> np.ndarray:
        return features(hidden_states, attention_mask)

    def fit(self, X, labels=None, attention_mask=None) -> "ContextClassifier":
        """Fit on hidden states (B, S, H) or pooled (N, H). Labels are used or refused, never dropped."""
        feats = features(X, attention_mask)
        if self.mode == "kmeans":
            if labels is not None:
                raise ValueError(
                    "labels were passed to a mode='kmeans' ContextClassifier; k-means cannot "
                    "use them (sklearn's KMeans.fit(X, y) ignores y). Use mode='supervised'."
                )
            if feats.shape[0] < self.num_contexts:
                raise ValueError(
                    f"k-means needs at least num_contexts={self.num_contexts} samples, "
                    f"got {feats.shape[0]}"
                )
            kmeans = MiniBatchKMeans(n_clusters=self.num_contexts, random_state=self.seed, n_init=3)
            # One thread: these fits are small, and OpenMP threads spinning on a shared,
            # loaded machine cost far more than the work itself.
            with threadpool_limits(limits=1):
                kmeans.fit(feats)
            centers = kmeans.cluster_centers_
        else:
            if labels is None:
                raise ValueError(f"mode={self.mode!r} needs labels in fit(X, labels)")
            y = self._label_indices(labels, feats.shape[0])
            missing = sorted(set(range(self.num_contexts)) - set(y.tolist()))
            if missing:
                names = [self.context_names[i] for i in missing]
                raise ValueError(f"labels have no sample for contexts {names}")
            if self.mode == "logistic":
                return self._fit_logistic(feats, y)
            centers = np.stack([feats[y == k].mean(axis=0) for k in range(self.num_contexts)])
        if centers.dtype != np.float32:
            raise AssertionError(f"fit produced {centers.dtype} centres; expected float32")
        self.centers_ = np.ascontiguousarray(centers, dtype=np.float32)
        return self

    def _fit_logistic(self, feats: np.ndarray, y: np.ndarray) -> "ContextClassifier":
        if self.num_contexts < 2:
            raise ValueError("mode='logistic' needs at least 2 contexts")
        model = LogisticRegression(
            C=LOGISTIC_C,
            solver="lbfgs",
            tol=LOGISTIC_TOL,
            max_iter=LOGISTIC_MAX_ITER,
            random_state=self.seed,
        )
        with threadpool_limits(limits=1), warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            try:
                model.fit(feats, y)  # feats are float32 (`features`), never a torch tensor
            except ConvergenceWarning as exc:
                raise ValueError(
                    f"mode='logistic' did not converge in {LOGISTIC_MAX_ITER} iterations"
                ) from exc
        coef = np.asarray(model.coef_, dtype=np.float32)
        intercept = np.asarray(model.intercept_, dtype=np.float32)
        if self.num_contexts == 2:  # sklearn's binary form: one row for class 1
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        if list(model.classes_) != list(range(self.num_contexts)):
            raise AssertionError(f"unexpected classes {model.classes_}")
        self.coef_ = np.ascontiguousarray(coef)
        self.intercept_ = np.ascontiguousarray(intercept)
        return self

    def decision_function(self, X, attention_mask=None) -> np.ndarray:
        """(N, num_contexts) float32 scores; predict is their argmax. "logistic": logits;
        centroid modes: minus the squared distance to each centre, up to a per-row constant."""
        feats = features(X, attention_mask)
        if self.mode == "logistic":
            if self.coef_ is None or self.intercept_ is None:
                raise ValueError("ContextClassifier is not fitted; call fit() first")
            self._check_width(feats, self.coef_)
            return feats @ self.coef_.T + self.intercept_[None, :]
        centers = self._fitted_centers()
        self._check_width(feats, centers)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every centre.
        return 2.0 * feats @ centers.T - (centers * centers).sum(axis=1)[None, :]

    @staticmethod
    def _check_width(feats: np.ndarray, weights: np.ndarray) -> None:
        if feats.shape[1] != weights.shape[1]:
            raise ValueError(
                f"hidden size {feats.shape[1]} does not match the fitted {weights.shape[1]}"
            )

    def predict(self, X, attention_mask=None) -> np.ndarray:
        """Context index per sample, int64: the nearest centre in squared Euclidean distance
        (centroid modes) or the highest logistic score ("logistic")."""
        if self.mode == "logistic":
            return self.decision_function(X, attention_mask).argmax(axis=1).astype(np.int64)
        centers = self._fitted_centers()
        feats = features(X, attention_mask)
        self._check_width(feats, centers)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every centre.
        distances = (centers * centers).sum(axis=1)[None, :] - 2.0 * feats @ centers.T
        return distances.argmin(axis=1).astype(np.int64)

    def predict_names(self, X, attention_mask=None) -> list[str]:
        return [self.context_names[i] for i in self.predict(X, attention_mask)]

    def score(self, X, labels, attention_mask=None) -> float:
        """Accuracy against labels (supervised mode; cluster indices of k-means are arbitrary)."""
        if self.mode == "kmeans":
            raise ValueError(
                "score() is accuracy and needs mode='supervised' or 'logistic'; use purity()"
            )
        predicted = self.predict(X, attention_mask)
        return float(np.mean(predicted == self._label_indices(labels, predicted.shape[0])))

    def purity(self, X, labels, attention_mask=None) -> float:
        """Fraction of samples whose label is the majority label of their predicted context."""
        predicted = self.predict(X, attention_mask)
        y = self._label_indices(labels, predicted.shape[0])
        majority_total = sum(np.bincount(y[predicted == k]).max() for k in np.unique(predicted))
        return float(majority_total / predicted.shape[0])

    def save(self, path) -> Path:
        """Write the classifier to one safetensors file, atomically (`sage_core.trust.state`)."""
        metadata = {
            "mode": self.mode,
            "seed": str(self.seed),
            "context_names": json.dumps(self.context_names),
        }
        if self.mode == "logistic":
            if self.coef_ is None or self.intercept_ is None:
                raise ValueError("ContextClassifier is not fitted; call fit() first")
            metadata.update(
                C=repr(LOGISTIC_C), tol=repr(LOGISTIC_TOL), max_iter=str(LOGISTIC_MAX_ITER)
            )
            tensors = {
                "coef": torch.from_numpy(self.coef_),
                "intercept": torch.from_numpy(self.intercept_),
            }
        else:
            tensors = {"centers": torch.from_numpy(self._fitted_centers())}
        return save_state(path, KIND, SCHEMA_VERSION, tensors, metadata)

    @classmethod
    def load(cls, path) -> "ContextClassifier":
        """Read a file written by save(); any defect is a ClassifierStateError naming the file."""
        path = Path(path)
        names = TENSORS.get(_stored_mode(path), TENSORS["kmeans"])
        tensors, metadata = load_state(
            path, KIND, SCHEMA_VERSION, names, ClassifierStateError, "classifier"
        )
        arrays = {name: tensors[name].numpy() for name in names}
        for name, ndim in (("centers", 2), ("coef", 2), ("intercept", 1)):
            array = arrays.get(name)
            if array is not None and (array.dtype != np.float32 or array.ndim != ndim):
                raise ClassifierStateError(
                    f"{path}: {name!r} must be {ndim}-D float32, got {array.dtype} {array.shape}"
                )
        rows = arrays["coef" if "coef" in arrays else "centers"].shape[0]
        if "intercept" in arrays and arrays["intercept"].shape != (rows,):
            raise ClassifierStateError(
                f"{path}: 'intercept' must have shape ({rows},), got {arrays['intercept'].shape}"
            )
        try:
            context_names = json.loads(metadata["context_names"])
            classifier = cls(
                num_contexts=rows,
                context_names=context_names,
                mode=metadata["mode"],
                seed=int(metadata["seed"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ClassifierStateError(f"{path}: bad metadata ({exc})") from exc
        if classifier.mode == "logistic":
            classifier.coef_ = np.ascontiguousarray(arrays["coef"])
            classifier.intercept_ = np.ascontiguousarray(arrays["intercept"])
        else:
            classifier.centers_ = np.ascontiguousarray(arrays["centers"])
        return classifier

    def _fitted_centers(self) -> np.ndarray:
        if self.centers_ is None:
            raise ValueError("ContextClassifier is not fitted; call fit() first")
        return self.centers_

    def _label_indices(self, labels, n: int) -> np.ndarray:
        """Labels as int64 indices: ints in [0, num_contexts) or names from context_names."""
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        if labels.dtype.kind in "US":
            index = {name: i for i, name in enumerate(self.context_names)}
            unknown = sorted(set(labels.tolist()) - set(index))
            if unknown:
                raise ValueError(f"labels {unknown} are not in context_names {self.context_names}")
            return np.array([index[name] for name in labels.tolist()], dtype=np.int64)
        if labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers or context names, got dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_contexts):
            raise ValueError(
                f"labels must lie in [0, {self.num_contexts}), got {labels.min()}..{labels.max()}"
            )
        return labels.astype(np.int64)


def _stored_mode(path: Path):
    """The "mode" a classifier file says it holds (None when unreadable: `load_state` then
    reports what is wrong with the file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("mode")
    except Exception:  # noqa: BLE001 - any defect is reported by load_state, naming the file
        return None


def _float_input(x, name: str) -> np.ndarray:
    """Any float tensor/array -> float32 numpy through the one boundary helper; refuse the rest."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {x.dtype}")
    else:
        kind = np.asarray(x).dtype.kind
        if kind != "f":
            raise ValueError(f"{name} must be a floating point array, got dtype kind {kind!r}")
    out = to_numpy_float32(x)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinity")
    return out


def _mask_input(mask, shape) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask must have shape {tuple(shape)}, got {mask.shape}")
    return (mask != 0).astype(np.float32)
