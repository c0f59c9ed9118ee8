"""Notebook 05: on a healthy model, does any trust arm lower held-out perplexity, and does
the library's default (counterfactual evidence + exclusion) do no harm?

Every arm of `trust_runs.ARMS` that learns (the oracle has nothing to exclude on a healthy
model, so it is the router) is trained on the same stream of training windows and scored
on the same held-out windows per seed; effects are paired against the router per seed.
The primary endpoint: the counterfactual arm's relative change in held-out perplexity.
"""

from __future__ import annotations

from sage_core.studies import trust_runs

ARMS = ("router", "counterfactual", "routing_weighted", "report", "learned_bias")
NO_HARM_MARGIN = 0.005  # the target: upper 95% bound of the change <= +0.5%


def plot_arm_changes(summary: list[dict], title: str = ""):
    """Each arm's paired relative change in held-out perplexity against the router
    (mean over seeds, t 95% interval), on a symmetric-log axis (the report's rule is off
    the scale of the others)."""
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r["arm"] != "router"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    y = range(len(rows))
    ax.errorbar(
        [100 * r["change"] for r in rows],
        list(y),
        xerr=[
            [100 * (r["change"] - r["low"]) for r in rows],
            [100 * (r["high"] - r["change"]) for r in rows],
        ],
        fmt="o",
        capsize=3,
    )
    ax.axvline(0, color="0.4", lw=0.8)
    ax.axvspan(-100 * NO_HARM_MARGIN, 100 * NO_HARM_MARGIN, color="C2", alpha=0.15, lw=0)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yticks(list(y), [r["arm"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("held-out perplexity vs router (%), t 95% interval; green: +-0.5%")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def run(model, tokenizer, seeds, arms=ARMS, **kwargs) -> dict:
    """`trust_runs.run_arms` on the healthy model."""
    return trust_runs.run_arms(model, tokenizer, seeds, arms, desc="healthy model", **kwargs)
