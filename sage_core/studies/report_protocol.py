"""The report's measurement, as it was, and what it could show (notebook 06).

The original dtype investigation report ran 10 router-only and 10 trust-augmented
"generations" on one layer of Q3-Omni and read a learning effect off their "perplexity":
15.27 (mean of the first three trust runs) -> 9.96 (mean of the last three), "+34.8%".
Its measurement, rebuilt here from what the report says:

- input: random token ids of length 10, no tokenizer, a fresh draw per run; one layer;
- "perplexity": exp(CE(logits, argmax(logits))), the model scored against its own argmax
  (`argmax_perplexity`); no real text is involved;
- selection: `TrustSelector` rule "report" (alpha * raw router logits + (1 - alpha) *
  trust, chosen once from the first token), trust on the report's 0..1 scale, prior 0.5;
  the context comes from a k-means classifier fitted on the hidden states of random ids
  (the report fitted its classifier on random vectors);
- update: quality = 0.7 if ppl < 100 else 0.5, and the trust of experts 0-3 moves toward it
  whichever experts were used (`report_update`). The report does not give its update
  rule or learning rate; an exponential moving average with `learning_rate` is assumed;
- "learning effect": (mean of the first 3 - mean of the last 3) / mean of the first 3.

`run_report_protocol` repeats that for one seed, with a router-only arm, the trust arm and
the trust arm with updates switched off, all on the same inputs; `effect_distribution`
repeats it over many seeds. `bound_rows` checks, on real held-out text, that the report's
metric never exceeds the teacher-forced perplexity (see `argmax_perplexity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sage_core.corpus import CONTEXTS
from sage_core.notebook.progress import progress
from sage_core.studies.experiments import moe_features
from sage_core.trust import REPORT_PRIOR, TrustSelector, TrustTable
from sage_core.trust.classifier import ContextClassifier

ARMS = ("baseline", "trust", "trust_no_update")
REPORT_FIRST = 15.27  # the report's trust arm, mean of its first three runs
REPORT_FINAL = 9.96  # the report's "final performance": mean of its last three trust runs
REPORT_BASELINE = 13.24  # the report's router-only baseline
REPORT_EFFECT = (REPORT_FIRST - REPORT_FINAL) / REPORT_FIRST  # the report's "+34.8%"


# --- the metric ---------------------------------------------------------------------------


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3) or logits.numel() == 0:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
        raise ValueError(f"logits must be a non-empty (S, V) or (B, S, V) tensor, got {shape}")
    return logits.reshape(-1, logits.shape[-1]).to(torch.float64)


def argmax_perplexity(logits: torch.Tensor) -> float:
    """The report's "perplexity": exp(mean over positions of CE(logits, argmax(logits))).

    CE against the argmax is -log p_max: the score measures how peaked the predictions are,
    not how well they predict anything. At each position CE(l, y) = logsumexp(l) - l_y >=
    logsumexp(l) - max(l) = CE(l, argmax l) for every target y, so the mean and its exp are
    at most the teacher-forced perplexity of ANY target sequence, the real text included.
    """
    flat = _check_logits(logits)
    return math.exp(float(F.cross_entropy(flat, flat.argmax(-1))))


def teacher_forced_perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean CE(logits, targets)): the honest perplexity of the real next tokens."""
    flat = _check_logits(logits)
    targets = targets.reshape(-1).to(flat.device)
    if targets.numel() != flat.shape[0]:
        raise ValueError(f"targets has {targets.numel()} tokens, logits {flat.shape[0]} positions")
    return math.exp(float(F.cross_entropy(flat, targets)))


def report_quality(
    ppl: float, threshold: float = 100.0, good: float = 0.7, bad: float = 0.5
) -> float:
    """The report's quality signal: `good` if ppl < threshold else `bad`."""
    if math.isnan(ppl):
        raise ValueError("ppl is NaN")
    return good if ppl < threshold else bad


def report_update(
    table: TrustTable,
    context: str,
    quality: float,
    experts=(0, 1, 2, 3),
    learning_rate: float = 0.1,
) -> None:
    """The report's update: in every layer of `table`, the trust of `experts` (0-3, whatever
    was actually used) moves `learning_rate` of the way toward `quality`."""
    if not 0 < learning_rate <= 1:
        raise ValueError(f"learning_rate must be in (0, 1], got {learning_rate!r}")
    experts = list(experts)
    if not experts or min(experts) < 0 or max(experts) >= table.num_experts:
        raise ValueError(f"experts must be indices in [0, {table.num_experts}), got {experts}")
    ci = table.context_pos(context)
    idx = torch.tensor(experts)
    row = table.trust[:, ci, idx]
    table.trust[:, ci, idx] = row + learning_rate * (quality - row)
    table.updates[ci] += 1


def learning_effect(ppls, window: int = 3) -> float:
    """The report's "learning effect": (mean first `window` - mean last `window`) / mean
    first `window`; positive reads as "improvement"."""
    ppls = [float(p) for p in ppls]
    if window < 1 or len(ppls) < window:
        raise ValueError(f"need at least window={window} values, got {len(ppls)}")
    first, last = np.mean(ppls[:window]), np.mean(ppls[-window:])
    return float((first - last) / first)


# --- the protocol -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportProtocol:
    """The report's run, with its numbers as defaults."""

    num_runs: int = 10
    seq_len: int = 10
    alpha: float = 0.3
    learning_rate: float = 0.1  # not given by the report: an assumption
    quality_threshold: float = 100.0
    quality_good: float = 0.7
    quality_bad: float = 0.5
    updated_experts: tuple[int, ...] = (0, 1, 2, 3)
    window: int = 3
    classifier_samples: int = 30  # random sequences the k-means classifier is fitted on

    def __post_init__(self):
        if self.num_runs < 2 * self.window or self.window < 1:
            raise ValueError(
                f"num_runs ({self.num_runs}) must be at least 2 * window "
                f"({self.window}) so first and last runs do not overlap"
            )
        if self.seq_len < 1 or self.classifier_samples < len(CONTEXTS):
            raise ValueError(
                f"seq_len must be >= 1 and classifier_samples >= {len(CONTEXTS)}, "
                f"got {self.seq_len}, {self.classifier_samples}"
            )


def random_inputs(vocab_size: int, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """(count, seq_len) int64 random token ids from a torch.Generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, seq_len), generator=generator)


@torch.no_grad()
def run_report_protocol(model, protocol: ReportProtocol, seed: int) -> dict[str, list]:
    """One rerun of the report's experiment: the three arms on the same random inputs.

    Returns {"runs": one row per (arm, run): context, ppl, quality, mean trust of the
    updated experts after the run; "effects": one row per arm, with its runs' values in
    order ("ppls"); "tables": {arm: final TrustTable} for the trust arms}.
    """
    if not model.sparse_blocks():
        raise ValueError("the model holds no sparse (MoE) layer; the report's run needs one")
    vocab, device = model.config.vocab_size, model.model.embed_tokens.weight.device
    ids = random_inputs(
        vocab, protocol.classifier_samples + protocol.num_runs, protocol.seq_len, seed
    ).to(device)
    fit_ids, run_ids = ids[: protocol.classifier_samples], ids[protocol.classifier_samples :]
    classifier = ContextClassifier(len(CONTEXTS), list(CONTEXTS), "kmeans", seed)
    classifier.fit(moe_features(model, fit_ids))
    contexts = [CONTEXTS[i] for i in classifier.predict(moe_features(model, run_ids))]

    runs, effects, tables = [], [], {}
    try:
        for arm in ARMS:
            selector = table = None
            if arm != "baseline":
                table = TrustTable.for_model(model, CONTEXTS, prior=REPORT_PRIOR)
                selector = TrustSelector.for_model(
                    model, table, rule="report", alpha=protocol.alpha
                )
                tables[arm] = table
            model.set_selector(selector)
            ppls = []
            for i in range(protocol.num_runs):
                if selector is not None:
                    selector.context = contexts[i]
                ppl = argmax_perplexity(model(run_ids[i : i + 1]))
                quality = report_quality(
                    ppl, protocol.quality_threshold, protocol.quality_good, protocol.quality_bad
                )
                if arm == "trust":
                    report_update(
                        table,
                        contexts[i],
                        quality,
                        protocol.updated_experts,
                        protocol.learning_rate,
                    )
                ppls.append(ppl)
                runs.append(
                    {
                        "seed": seed,
                        "arm": arm,
                        "run": i + 1,
                        "context": contexts[i],
                        "ppl": ppl,
                        "quality": quality,
                        "trust_updated_experts": None
                        if table is None
                        else float(table.trust[:, :, list(protocol.updated_experts)].mean()),
                    }
                )
            w = protocol.window
            effects.append(
                {
                    "seed": seed,
                    "arm": arm,
                    "first_mean": float(np.mean(ppls[:w])),
                    "last_mean": float(np.mean(ppls[-w:])),
                    "mean": float(np.mean(ppls)),
                    "effect": learning_effect(ppls, w),
                    "ppls": list(ppls),
                }
            )
    finally:
        model.set_selector(None)
    return {"runs": runs, "effects": effects, "tables": tables}


def effect_distribution(
    model,
    protocol: ReportProtocol,
    seeds,
    show_progress: bool = True,
    desc: str = "report protocol",
) -> list[dict]:
    """`run_report_protocol` over many seeds: one effect row per (seed, arm)."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {len(seeds)} values")
    rows = []
    for seed in progress(seeds, desc=desc, disable=not show_progress):
        rows += run_report_protocol(model, protocol, seed)["effects"]
    return rows


def summarise_effects(rows: list[dict], observed: float = REPORT_EFFECT) -> list[dict]:
    """Per arm: mean, sd, 2.5/50/97.5% quantiles of the effect over seeds, and the share of
    seeds whose effect is at least `observed` (the report's +34.8% by default)."""
    out = []
    for arm in ARMS:
        x = np.array([r["effect"] for r in rows if r["arm"] == arm], dtype=np.float64)
        if x.size == 0:
            continue
        q = np.quantile(x, [0.025, 0.5, 0.975])
        out.append(
            {
                "arm": arm,
                "seeds": int(x.size),
                "mean": float(x.mean()),
                "sd": float(x.std(ddof=1)) if x.size > 1 else 0.0,
                "q025": float(q[0]),
                "median": float(q[1]),
                "q975": float(q[2]),
                "share_at_least_observed": float(np.mean(x >= observed)),
            }
        )
    return out


def different_draws_gap(rows: list[dict], arm: str = "baseline") -> dict:
    """The report's "9.96 < 13.24" as it ran it, with nothing differing between the arms:
    seeds are paired (first with second, third with fourth, ...), each pair being two runs
    of the same `arm` on different random draws; "final" is one run's mean of its last
    `window` values, "baseline" the other run's mean over all its values. Returns the
    share of pairs where final <= (1 - gap) * baseline, gap = 1 - 9.96 / 13.24 (the
    report's, 24.8%), and the share where one of the two comes out at least that much
    lower than the other, with the number of pairs."""
    ordered = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
    pairs = list(zip(ordered[0::2], ordered[1::2]))
    if not pairs:
        raise ValueError(f"need at least two seeds of arm {arm!r}")
    ratio = REPORT_FINAL / REPORT_BASELINE
    lower = [a["last_mean"] <= ratio * b["mean"] for a, b in pairs]
    either = [
        a["last_mean"] <= ratio * b["mean"] or b["mean"] <= ratio * a["last_mean"] for a, b in pairs
    ]
    return {
        "pairs": len(pairs),
        "gap": 1 - ratio,
        "share_final_lower": float(np.mean(lower)),
        "share_either_lower": float(np.mean(either)),
    }


def paired_differences(
    rows: list[dict], arm: str = "trust", null: str = "trust_no_update"
) -> list[float]:
    """Per seed: effect(arm) - effect(null) on the same inputs."""
    by = {(r["seed"], r["arm"]): r["effect"] for r in rows}
    seeds = sorted({s for s, a in by if a == arm and (s, null) in by})
    return [by[(s, arm)] - by[(s, null)] for s in seeds]


# --- the bound on real text ----------------------------------------------------------------


@torch.no_grad()
def bound_rows(model, samples) -> list[dict]:
    """Per held-out sample: the report's metric and the teacher-forced perplexity over the
    same positions (those predicting the real continuation), with the router alone."""
    device = model.model.embed_tokens.weight.device
    rows = []
    for i, s in enumerate(samples):
        ids = torch.cat([s.prompt, s.continuation]).to(device)[None]
        P, C = s.prompt.numel(), s.continuation.numel()
        logits = model(ids)[0, P - 1 : P + C - 1]
        rows.append(
            {
                "sample": i,
                "context": s.context,
                "report_metric": argmax_perplexity(logits),
                "teacher_forced_ppl": teacher_forced_perplexity(logits, s.continuation),
            }
        )
    return rows


# --- figures ------------------------------------------------------------------------------


def plot_effect_distribution(
    rows: list[dict], observed: float = REPORT_EFFECT, example: dict | None = None
):
    """Histograms of the "learning effect" over seeds, per arm, with the report's value."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    values = {arm: 100 * np.array([r["effect"] for r in rows if r["arm"] == arm]) for arm in ARMS}
    everything = np.concatenate(list(values.values()))
    bins = np.linspace(
        min(everything.min(), 100 * observed), max(everything.max(), 100 * observed), 41
    )
    labels = {
        "baseline": "router alone (no trust)",
        "trust": "trust, updates on",
        "trust_no_update": "trust, updates off",
    }
    styles = {
        "baseline": ("0.45", "stepfilled", 0.25),
        "trust": ("C0", "step", 1.0),
        "trust_no_update": ("C3", "step", 1.0),
    }
    for arm in ARMS:
        color, kind, alpha = styles[arm]
        ax.hist(
            values[arm],
            bins=bins,
            histtype=kind,
            color=color,
            alpha=alpha,
            lw=1.4,
            label=f"{labels[arm]} (n={values[arm].size})",
        )
    ax.axvline(100 * observed, color="k", ls="--", lw=1)
    ax.annotate(
        f"report: +{100 * observed:.1f}%",
        (100 * observed, ax.get_ylim()[1] * 0.92),
        xytext=(4, 0),
        textcoords="offset points",
        fontsize=8,
    )
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_xlabel(
        '"learning effect" = (first 3 - last 3) / first 3 of exp(CE(logits, argmax)) (%)',
        fontsize=8,
    )
    ax.set_ylabel("seeds")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def protocol_draws(rows: list[dict], arm: str = "trust_no_update", draws: int = 20) -> list[dict]:
    """The effect rows of `arm` for the `draws` lowest seeds (one random draw of inputs
    each), in seed order: the runs a reader of one such protocol would have been shown."""
    chosen = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])[:draws]
    if draws < 1 or len(chosen) < draws:
        raise ValueError(f"asked for {draws} draws of arm {arm!r}, the rows hold {len(chosen)}")
    return chosen


def plot_protocol_draws(
    rows: list[dict], arm: str = "trust_no_update", draws: int = 20, window: int = 3
):
    """The report's protocol as its reader saw it, when nothing learns: one thin line per
    random draw (`protocol_draws`) of the per-run "perplexity" over runs 1..n. Left: the
    values as printed; right: each draw divided by the mean of its first `window` runs,
    with the report's trust run (15.27 over its first three runs, 9.96 over its last
    three) on the same scale. Draws whose "learning effect" reaches the report's +34.8%
    are drawn in red."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    chosen = protocol_draws(rows, arm, draws)
    fig, (raw_ax, rel_ax) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    n = len(chosen[0]["ppls"])
    runs = np.arange(1, n + 1)
    reached = 0
    for r in chosen:
        ppls = np.asarray(r["ppls"], dtype=np.float64)
        hit = r["effect"] >= REPORT_EFFECT
        reached += hit
        color, lw, alpha = ("C3", 1.3, 0.95) if hit else ("0.4", 0.7, 0.55)
        raw_ax.plot(runs, ppls, color=color, lw=lw, alpha=alpha)
        rel_ax.plot(runs, ppls / ppls[:window].mean(), color=color, lw=lw, alpha=alpha)
    report = REPORT_FINAL / REPORT_FIRST
    rel_ax.hlines(1.0, 1, window, color="k", lw=3)
    rel_ax.hlines(report, n - window + 1, n, color="k", lw=3)
    rel_ax.plot([window, n - window + 1], [1.0, report], color="k", ls=":", lw=1)
    for ax in (raw_ax, rel_ax):
        ax.set_xticks(runs)
        ax.set_xlabel("run")
    raw_ax.set_ylabel('"perplexity" exp(CE(logits, argmax))')
    raw_ax.set_title(f"{len(chosen)} draws of random inputs, as printed", fontsize=9)
    rel_ax.set_ylabel(f"relative to the mean of runs 1-{window}")
    rel_ax.set_title(
        f"the same draws, scaled; the report's {REPORT_FIRST} -> {REPORT_FINAL}", fontsize=9
    )
    handles = [
        Line2D([], [], color="0.4", lw=0.7, label="one draw, nothing learns"),
        Line2D(
            [],
            [],
            color="C3",
            lw=1.3,
            label=f"effect >= +{100 * REPORT_EFFECT:.1f}%: {reached} draws",
        ),
        Line2D([], [], color="k", lw=3, label=f"report: {REPORT_FIRST} -> {REPORT_FINAL}"),
    ]
    rel_ax.legend(handles=handles, frameon=False, fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def plot_bound(rows_by_model: dict[str, list[dict]]):
    """The report's metric against the teacher-forced perplexity, one point per held-out
    sample, one panel per model (e.g. the report's 1-layer model and the full one)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(rows_by_model), figsize=(4.2 * len(rows_by_model), 4), squeeze=False
    )
    for ax, (title, rows) in zip(axes[0], rows_by_model.items(), strict=True):
        for j, context in enumerate(CONTEXTS):
            chosen = [r for r in rows if r["context"] == context]
            ax.scatter(
                [r["teacher_forced_ppl"] for r in chosen],
                [r["report_metric"] for r in chosen],
                s=14,
                color=f"C{j}",
                label=context,
            )
        hi = max(max(r["teacher_forced_ppl"] for r in rows), max(r["report_metric"] for r in rows))
        ax.plot([1, hi], [1, hi], color="0.4", lw=0.8, ls="--", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("teacher-forced perplexity of the real text")
    axes[0, 0].set_ylabel("report metric exp(CE(logits, argmax))")
    axes[0, 0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
