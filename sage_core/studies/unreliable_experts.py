"""Notebook 07: experts known to be broken, scenario by scenario. Which arm routes around
them, what does it exclude, and how often is an exclusion wrong?

Ground truth is made: in every sparse layer, `m` experts drawn among the `pool` most used
(router usage on the seed's training stream) are broken (`trust_runs.Breakage`: noise of
the same Frobenius norm, the sign flipped, or stored at low precision), for every context
or for one context's windows only. The arms of `arms_for` learn on the same stream of the broken model to the
same compute budget and are scored on the same held-out windows; the clean model's router
is the target. Notebook 05 draws the learning curve of the primary scenario; this notebook
scores one scenario per run (its parameters) and reads the committed sweep over the grid.

Scores: recovery = (ppl_router - ppl_arm) / (ppl_router - ppl_clean), pooled over seeds
as a ratio of means over the seeds damaged by more than `MIN_DAMAGE`; an arm relative to
the oracle reference as sum(ppl_router - ppl_arm) / sum(ppl_router - ppl_oracle) (paired
bootstrap interval); precision@m; the realised false discovery rate of the exclusions.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sage_core.studies import learning_curve, statistics, trust_runs

PRIMARY = {"m": 2, "kind": "noise", "contexts": None}
MIN_DAMAGE = learning_curve.MIN_DAMAGE
GRID_TABLE = "07_grid"  # tables/07_grid.csv: the sweep over m x kind, every context
BUDGET_TABLE = "07_budget"  # tables/07_budget.csv: the sweep over num_windows, primary


def arms_for(spec: dict) -> tuple[str, ...]:
    """The router, the oracle reference, the counterfactual and attribution arms and the
    compute-matched learned bias; context-free counterfactual trust as well when one
    context is broken."""
    arms = ("router", "oracle", "counterfactual", "attribution", "learned_bias")
    return arms if spec["contexts"] is None else (*arms, "counterfactual_context_free")


def scenario(m: int, kind: str, broken_context: str | None) -> dict:
    """A breakage spec from notebook parameters (broken_context None: every context)."""
    if kind not in trust_runs.KINDS:
        raise ValueError(f"kind must be one of {trust_runs.KINDS}, got {kind!r}")
    return {
        "m": int(m),
        "kind": kind,
        "contexts": None if broken_context is None else (broken_context,),
    }


def scenario_name(spec: dict) -> str:
    where = "all contexts" if spec["contexts"] is None else f"{spec['contexts'][0]} only"
    return f"m={spec['m']} {spec['kind']} ({where})"


def run_scenario(model, tokenizer, seeds, spec: dict, arms, pool: int = 8, **kwargs) -> dict:
    """`trust_runs.run_arms` with the breakage of `spec`; rows tagged with the scenario."""
    breakage = {"m": spec["m"], "pool": pool, "kind": spec["kind"], "contexts": spec["contexts"]}
    out = trust_runs.run_arms(
        model, tokenizer, seeds, arms, breakage_spec=breakage, desc=scenario_name(spec), **kwargs
    )
    for records in out.values():
        for r in records:
            r["scenario"] = scenario_name(spec)
    return out


def scenario_table(rows, exclusions, context: str = "all", arm: str = "counterfactual") -> dict:
    """One scenario's numbers at one checkpoint, scored in `context` ("all", or the broken
    context of a one-context breakage): the damaged seeds (> MIN_DAMAGE), the oracle's and
    the arms' recovery (ratio of means), `arm` relative to the oracle (ratio of means),
    `arm` minus the learned bias (per-seed recoveries, t interval and TOST), precision@m,
    and the exclusions in every context (a healthy expert excluded where nothing is
    broken is a false one too): per seed, false ones per seed, realised false discovery
    rate."""
    damaged = trust_runs.damaged_seeds(rows, context, MIN_DAMAGE)
    damage = trust_runs.damage(rows, context)
    out = {"seeds": len(damage), "damaged_seeds": damaged}
    if len(damaged) < 2:
        return out
    for name in dict.fromkeys(r["arm"] for r in rows if r["arm"] != "router"):
        out[f"{name}_recovery"] = statistics.ratio_of_means(
            trust_runs.recovered(rows, name, context, damaged), [damage[s] for s in damaged]
        )
        if name != "oracle":
            out[f"{name}_relative_to_oracle"] = trust_runs.relative_to_oracle(
                rows, name, context, damaged
            )
    if "learned_bias" in {r["arm"] for r in rows}:
        out["minus_learned_bias"] = learning_curve.paired_recovery_difference(
            rows, arm, "learned_bias", damaged, context
        )
    mine = [r for r in exclusions if r["arm"] == arm]  # every context: any exclusion counts
    counts = learning_curve.exclusion_counts(mine, arm)
    out["exclusions"] = counts
    with_broken = [r for r in mine if r["broken"]]
    out["precision_at_m"] = statistics.t_interval(
        [next(r["precision_at_m"] for r in with_broken if r["seed"] == s) for s in counts["seeds"]]
    )
    return out


def context_only_table(rows: list[dict], broken_context: str) -> dict[str, dict]:
    """For breakage in one context: per arm, the paired relative perplexity change against
    the router in every other context (what trust costs where nothing is broken), with a
    TOST against learning_curve.NO_HARM_MARGIN."""
    out = {}
    for arm in ("oracle", "counterfactual", "counterfactual_context_free", "learned_bias"):
        if arm not in {r["arm"] for r in rows}:
            continue
        out[arm] = {
            c: statistics.equivalence(
                trust_runs.paired(rows, arm, "router", c), learning_curve.NO_HARM_MARGIN
            )
            for c in dict.fromkeys(r["context"] for r in rows)
            if c not in (broken_context, "all")
        }
    return out


def read_table(path) -> list[dict]:
    """A committed sweep table (`OUT/sweep.csv` of `python -m sage_core sweep`), with
    numbers parsed."""
    rows = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = json.loads(value)
                except (json.JSONDecodeError, TypeError):
                    parsed[key] = value
            rows.append(parsed)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def interval_of(row: dict, key: str) -> dict:
    """A sweep-table row's `key`, `key`_low and `key`_high as an interval for
    `statistics.format_interval`."""
    return {
        "mean": row[key],
        "low": row[f"{key}_low"],
        "high": row[f"{key}_high"],
        "confidence": 0.95,
    }


def _errorbar(ax, x, rows, key: str, fmt: str, color: str, label: str) -> None:
    """Sweep-table rows' `key` at `x` with their `key`_low .. `key`_high intervals."""
    mid = [r[key] for r in rows]
    low = [m - r[f"{key}_low"] for m, r in zip(mid, rows, strict=True)]
    high = [r[f"{key}_high"] - m for m, r in zip(mid, rows, strict=True)]
    ax.errorbar(x, mid, yerr=[low, high], fmt=fmt, color=color, capsize=2, label=label)


def plot_grid(grid: list[dict], budget: list[dict]):
    """Left: recovery (ratio of means, 95% interval) of the oracle reference, the
    counterfactual arm and the learned bias per scenario of the committed grid. Right: the
    counterfactual arm's and the learned bias's share of the oracle's recovery against the
    training budget (committed budget sweep)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    grid = sorted(grid, key=lambda r: (r["kind"], r["m"]))
    x = range(len(grid))
    for offset, (arm, color) in enumerate(
        (("oracle", "k"), ("counterfactual", "C0"), ("learned_bias", "C1"))
    ):
        _errorbar(
            left, [i + 0.15 * (offset - 1) for i in x], grid, f"{arm}_recovery", "o", color, arm
        )
    left.set_xticks(list(x), [f"m={r['m']}\n{r['kind']}" for r in grid], fontsize=8)
    left.axhline(0, color="0.4", lw=0.8)
    left.set_ylabel("recovery (ratio of means)")
    left.legend(frameon=False, fontsize=8)
    budget = sorted(budget, key=lambda r: r["num_windows"])
    fe = [r["forward_equivalents"] for r in budget]
    for arm, color in (("counterfactual", "C0"), ("learned_bias", "C1")):
        _errorbar(right, fe, budget, f"{arm}_relative_to_oracle", "o-", color, arm)
    right.axhline(1, color="k", ls="--", lw=1, label="oracle reference")
    right.set_xscale("log")
    right.set_xlabel("training compute per seed (forward equivalents)")
    right.set_ylabel("recovery / oracle's (ratio of means)")
    right.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
