"""PRE-FIX CODE PATHS for bug #2 (the scikit-learn float64 boundary). Do not use these.

Kept only so notebook 02 and tests/test_repro_sklearn.py can show the bug as it was.
The fixed paths are `sage_core.trust.classifier.ContextClassifier` (float32 numpy before
sklearn) and `sage_core.dtypes.boundary.to_torch_like` (weights take hidden_states' dtype).

What happens, measured with scikit-learn 1.9.1:

- sklearn validates input with an accepted-dtype list (float64, float32). It keeps a
  numpy float32 array as float32, but a torch tensor's dtype is not a numpy dtype, so
  sklearn does not recognise it and converts to the first entry: float64. A float32
  tensor passed to `fit` therefore gives float64 cluster centres.
- `predict` on float32 numpy then reaches a Cython routine typed for the centres'
  dtype: `ValueError: Buffer dtype mismatch, expected 'const float' but got 'double'`.
- The report's `fit(embeddings, labels)` on (MiniBatch)KMeans passes the labels as `y`,
  which KMeans ignores ("not used, present here for API consistency").
- The hard-coded `dtype=torch.float32` selection weights: in the report's per-token loop
  a 0-dim float32 weight times a bf16 tensor stays bf16 (0-dim tensors do not promote
  dimensioned ones), so nothing fails there; a vectorised mix (weights broadcast against
  expert outputs, then `index_add_` into a bf16 buffer) fails with
  `index_add_(): self (BFloat16) and source (Float) must have the same scalar type`.
"""

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

from sage_core.dtypes import to_numpy_float32, to_torch_like
from sage_core.trust.classifier import ContextClassifier, gaussian_contexts

REPORTED_ERROR = "Buffer dtype mismatch, expected 'const float' but got 'double'"
INDEX_ADD_ERROR = "index_add_(): self (BFloat16) and source (Float) must have the same scalar type"


# ---------------------------------------------------------------- PRE-FIX: classifier


def report_training_data(
    num_samples: int = 100, hidden_size: int = 2048, num_contexts: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The report's training set: `torch.randn(100, 2048)` and `torch.randint(0, 5, (100,))`.

    Seeded through a generator (the report used the global RNG) so reruns are identical.
    """
    gen = torch.Generator().manual_seed(seed)
    training_embeddings = torch.randn(num_samples, hidden_size, generator=gen)
    training_labels = torch.randint(0, num_contexts, (num_samples,), generator=gen)
    return training_embeddings, training_labels


def fit_report_classifier(
    training_embeddings, training_labels=None, num_contexts: int = 5, seed: int = 0
) -> MiniBatchKMeans:
    """PRE-FIX: `classifier.fit(training_embeddings, training_labels)` with torch tensors.

    The tensors go straight into sklearn; the labels land in KMeans' unused `y`.
    `random_state` is added (the report had none) only to make reruns identical.
    """
    classifier = MiniBatchKMeans(n_clusters=num_contexts, random_state=seed)
    with threadpool_limits(
        limits=1
    ):  # speed only (see sage_core.trust.classifier); the bug is unchanged
        classifier.fit(training_embeddings, training_labels)
    return classifier


def predict_report(classifier: MiniBatchKMeans, embeddings) -> np.ndarray:
    """PRE-FIX: whatever the caller holds goes straight into `predict`."""
    return classifier.predict(embeddings)


def classify_hidden_states_report(classifier: MiniBatchKMeans, hidden_states: torch.Tensor):
    """PRE-FIX: the report's MoE-layer path: mean embedding as float32 numpy, then predict."""
    mean_embedding = hidden_states.mean(dim=(0, 1)).detach().cpu().numpy()
    return classifier.predict(mean_embedding.reshape(1, -1))


# ---------------------------------------------------------------- PRE-FIX: selection weights


def selection_weights_report(selection_scores, hidden_states: torch.Tensor) -> torch.Tensor:
    """PRE-FIX: `torch.tensor(result.selection_scores, ..., dtype=torch.float32)`, hard-coded."""
    return torch.tensor(selection_scores, device=hidden_states.device, dtype=torch.float32)


def make_experts(num_experts: int, hidden_size: int, dtype, seed: int = 0) -> torch.Tensor:
    """Stand-in experts for the mixing demonstrations: one (H, H) linear map each."""
    gen = torch.Generator().manual_seed(seed)
    experts = torch.randn(num_experts, hidden_size, hidden_size, generator=gen) / hidden_size**0.5
    return experts.to(dtype)


def mix_report_loop(hidden_states, expert_ids, weights, experts) -> torch.Tensor:
    """PRE-FIX: the report's per-token loop, `token_output += token_weights[i] * expert_out`."""
    batch_size, seq_length, _ = hidden_states.shape
    router_weights = weights.unsqueeze(0).unsqueeze(0).expand(batch_size, seq_length, -1)
    output = torch.zeros_like(hidden_states)
    for b in range(batch_size):
        for s in range(seq_length):
            token_hidden = hidden_states[b, s : s + 1, :]
            token_output = torch.zeros_like(token_hidden)
            for i, expert_id in enumerate(expert_ids):
                expert_out = token_hidden @ experts[int(expert_id)].T
                token_output += router_weights[b, s][i] * expert_out
            output[b, s] = token_output[0]
    return output


def mix_index_add(hidden_states, expert_ids, weights, experts) -> torch.Tensor:
    """Vectorised mix as most MoE code does it: weight each expert's outputs, index_add_ them.

    (transformers casts with `.to(hidden_states.dtype)` before its index_add_; this does not.)
    """
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    tokens = torch.arange(flat.shape[0], device=flat.device)
    router_weights = weights.unsqueeze(0).expand(flat.shape[0], -1)
    output = torch.zeros_like(flat)
    for slot, expert_id in enumerate(expert_ids):
        expert_out = flat @ experts[int(expert_id)].T
        output.index_add_(0, tokens, expert_out * router_weights[:, slot, None])
    return output.view_as(hidden_states)


# ---------------------------------------------------------------- evidence for notebook 02


def outcome(fn, *args, **kwargs) -> str:
    """Run fn and describe what came out: the result's dtype, or the exception type and text."""
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # any failure is the observation being reported
        return f"{type(exc).__name__}: {exc}"
    if isinstance(result, MiniBatchKMeans):
        return f"centres {np.dtype(result.cluster_centers_.dtype).name}"
    if isinstance(result, ContextClassifier):
        return f"centres {np.dtype(result.centers_.dtype).name}"
    dtype = result.dtype
    return (
        str(dtype).removeprefix("torch.")
        if isinstance(dtype, torch.dtype)
        else np.dtype(dtype).name
    )


INPUT_KINDS = {
    "torch float32": lambda t: t.to(torch.float32),
    "torch bfloat16": lambda t: t.to(torch.bfloat16),
    "torch float64": lambda t: t.to(torch.float64),
    "numpy float32": lambda t: t.detach().cpu().float().numpy().astype(np.float32),
    "numpy float64": lambda t: t.detach().cpu().float().numpy().astype(np.float64),
}


def sklearn_sees(x) -> str:
    """The dtype scikit-learn converts `x` to in KMeans.fit/predict (accepted: float64, float32).

    A numpy float32 array is kept; a torch tensor's dtype is not a numpy dtype, so sklearn
    falls back to the first accepted dtype, float64.
    """
    from sklearn.utils import check_array

    try:
        return np.dtype(check_array(x, dtype=[np.float64, np.float32]).dtype).name
    except Exception as exc:  # any failure is the observation being reported
        return f"{type(exc).__name__}: {exc}"


def boundary_matrix(
    hidden_size: int = 2048, num_contexts: int = 5, seed: int = 0
) -> dict[str, dict[str, dict[str, str]]]:
    """Outcome of fit then predict for every pair of input kinds, pre-fix and fixed.

    Returns {"pre-fix" | "fixed": {fit kind: {"fit": outcome, predict kind: outcome}}}.
    """
    embeddings, labels = report_training_data(100, hidden_size, num_contexts, seed)
    queries = torch.randn(4, hidden_size, generator=torch.Generator().manual_seed(seed + 2))
    fitters = {
        "pre-fix": lambda x: fit_report_classifier(x, labels, num_contexts, seed),
        "fixed": lambda x: ContextClassifier(num_contexts, seed=seed).fit(x),
    }
    matrix = {}
    for path, fit in fitters.items():
        matrix[path] = {}
        for fit_kind, as_fit_input in INPUT_KINDS.items():
            row = {"fit": outcome(fit, as_fit_input(embeddings))}
            if row["fit"].startswith("centres"):
                model = fit(as_fit_input(embeddings))
                for predict_kind, as_query in INPUT_KINDS.items():
                    row[predict_kind] = outcome(model.predict, as_query(queries))
            matrix[path][fit_kind] = row
    return matrix


def format_matrix(rows: dict[str, dict[str, str]]) -> str:
    """One `boundary_matrix` half as a fixed-width table; exceptions shortened to their type."""
    columns = ["fit", *INPUT_KINDS]
    header = f"{'fit input':<16}" + "".join(f"{c:<16}" for c in columns)
    lines = [header, "-" * len(header)]
    for fit_kind, row in rows.items():
        cells = [row.get(c, "-").split(":")[0].removeprefix("centres ") for c in columns]
        lines.append(f"{fit_kind:<16}" + "".join(f"{c:<16}" for c in cells))
    return "\n".join(lines)


def pipeline_stages(
    hidden_size: int = 2048, num_contexts: int = 5, seed: int = 0, hidden_dtype=torch.bfloat16
) -> dict[str, dict[str, str]]:
    """What comes out of each stage of the classifier + mixing pipeline, pre-fix and fixed.

    Stages: fit, predict on float32 hidden states, selection weights against
    `hidden_dtype` hidden states, the report's per-token mixing loop and a vectorised
    index_add_ mix. Every entry is measured.
    """
    embeddings, labels = report_training_data(100, hidden_size, num_contexts, seed)
    hidden = torch.randn(2, 4, hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    scores = [0.5, 0.3, 0.2]
    expert_ids = [0, 2, 3]
    experts = make_experts(4, hidden_size, hidden_dtype, seed)
    hidden_low = hidden.to(hidden_dtype)

    report = fit_report_classifier(embeddings, labels, num_contexts, seed)
    fixed = ContextClassifier(num_contexts, seed=seed).fit(to_numpy_float32(embeddings))
    prefix_weights = selection_weights_report(scores, hidden_low)
    fixed_weights = to_torch_like(scores, hidden_low)
    low = str(hidden_dtype).removeprefix("torch.")
    return {
        "fit on torch float32": {
            "pre-fix": outcome(fit_report_classifier, embeddings, labels, num_contexts, seed),
            "fixed": outcome(ContextClassifier(num_contexts, seed=seed).fit, embeddings),
        },
        "predict float32 hidden": {
            "pre-fix": outcome(classify_hidden_states_report, report, hidden),
            "fixed": outcome(fixed.predict, hidden),
        },
        f"selection weights ({low} hidden)": {
            "pre-fix": outcome(lambda: prefix_weights),
            "fixed": outcome(lambda: fixed_weights),
        },
        f"report's per-token loop mix ({low})": {
            "pre-fix": outcome(mix_report_loop, hidden_low, expert_ids, prefix_weights, experts),
            "fixed": outcome(mix_report_loop, hidden_low, expert_ids, fixed_weights, experts),
        },
        f"index_add_ mix into {low} output": {
            "pre-fix": outcome(mix_index_add, hidden_low, expert_ids, prefix_weights, experts),
            "fixed": outcome(mix_index_add, hidden_low, expert_ids, fixed_weights, experts),
        },
    }


def label_evidence(
    hidden_size: int = 2048,
    num_contexts: int = 5,
    per_context: int = 40,
    spread: float = 2.0,
    seed: int = 0,
) -> dict[str, float]:
    """Did the labels matter? Measured on the report's random data and on structured data.

    Held-out halves throughout. Chance is 1 / num_contexts.
    """
    report_x, report_y = report_training_data(2 * 100, hidden_size, num_contexts, seed)
    blob_x, blob_y = gaussian_contexts(num_contexts, per_context, hidden_size, spread, seed)
    results = {"chance": 1.0 / num_contexts}
    for name, x, y in (("report data", report_x, report_y), ("context data", blob_x, blob_y)):
        half = x.shape[0] // 2
        supervised = ContextClassifier(num_contexts, mode="supervised", seed=seed)
        supervised.fit(x[:half], y[:half])
        kmeans = ContextClassifier(num_contexts, seed=seed).fit(x[:half])
        results[f"supervised accuracy, {name}"] = supervised.score(x[half:], y[half:])
        results[f"k-means purity, {name}"] = kmeans.purity(x[half:], y[half:])
    return results


def plot_boundary(stages: dict, evidence: dict):
    """Two panels: the dtype at each stage (pre-fix vs fixed), and the labels evidence."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, (ax_stages, ax_labels) = plt.subplots(
        1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.5, 1]}
    )
    columns = ("pre-fix", "fixed")
    for row, (stage, cells) in enumerate(stages.items()):
        y = len(stages) - 1 - row
        ax_stages.text(-0.05, y + 0.5, stage, ha="right", va="center", fontsize=9)
        for col, name in enumerate(columns):
            text = cells[name]
            failed = "Error" in text.split(":")[0]
            # Amber: no exception, but a different dtype from the fixed path (silent drift).
            drifted = not failed and text != cells["fixed"]
            color = "#e8a0a0" if failed else ("#f3d38b" if drifted else "#a8d5a2")
            ax_stages.add_patch(Rectangle((col, y), 1, 1, facecolor=color, edgecolor="white", lw=2))
            short = text.split(":")[0] if failed else text
            ax_stages.text(col + 0.5, y + 0.5, short, ha="center", va="center", fontsize=9)
    for col, name in enumerate(columns):
        ax_stages.text(col + 0.5, len(stages) + 0.1, name, ha="center", va="bottom", weight="bold")
    ax_stages.set_xlim(0, 2)
    ax_stages.set_ylim(0, len(stages) + 0.6)
    ax_stages.axis("off")
    ax_stages.set_title(
        "dtype out of each stage (red: exception, amber: differs from fixed)", fontsize=10
    )

    bars = {k: v for k, v in evidence.items() if k != "chance"}
    names = list(bars)
    ax_labels.barh(range(len(names)), [bars[n] for n in names], color="#6c8ebf")
    ax_labels.axvline(evidence["chance"], color="black", ls="--", lw=1, label="chance")
    ax_labels.set_yticks(range(len(names)), names, fontsize=9)
    ax_labels.invert_yaxis()
    ax_labels.set_xlim(0, 1)
    ax_labels.set_xlabel("held-out accuracy / purity")
    ax_labels.set_title("labels: used by the supervised fit, useless on random data", fontsize=10)
    ax_labels.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = [
    "REPORTED_ERROR",
    "INDEX_ADD_ERROR",
    "report_training_data",
    "fit_report_classifier",
    "predict_report",
    "classify_hidden_states_report",
    "selection_weights_report",
    "make_experts",
    "mix_report_loop",
    "mix_index_add",
    "outcome",
    "INPUT_KINDS",
    "sklearn_sees",
    "boundary_matrix",
    "format_matrix",
    "pipeline_stages",
    "label_evidence",
    "plot_boundary",
]
