"""Notebook 05: the learning curve. As trust learns, what happens to held-out perplexity,
on a healthy model and on one with broken experts, at equal training compute?

Every learning arm (`LEARNING_ARMS`) is trained on the same stream of training windows of
each seed to the same compute budget, counted in forward equivalents (a sequence run
forward counts 1, a backward pass 2: `trust_runs.forward_equivalents`), and scored at the
same checkpoints (`trust_runs.CHECKPOINTS`: fractions of the budget) on the same held-out
windows. Lines that do not learn: the router, the oracle reference (excludes exactly the
broken experts) and the clean model. Two scenarios per seed: the healthy model, and
notebook 07's primary breakage (`BROKEN`).

Also here: the no-harm check that can fail (the counterfactual arm on the healthy model at
budgets where it does exclude experts; an equivalence test against `NO_HARM_MARGIN`; the
cost of its false exclusions bounded by forcing the most suspected healthy experts out;
the calibration of healthy cells' p-values) and the realised false discovery rate of its
exclusions on the broken model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import scipy.stats

from sage_core.atomic import atomic_write_json
from sage_core.paths import TABLES
from sage_core.studies import statistics, trust_runs

ARMS = ("router", "oracle", "counterfactual", "attribution", "learned_bias", "routing_weighted")
LEARNING_ARMS = ("counterfactual", "attribution", "learned_bias", "routing_weighted")
NO_HARM_ARMS = ("router", "counterfactual", "attribution")
BROKEN = {"m": 2, "pool": 8, "kind": "noise", "contexts": None}  # notebook 07's primary
NO_HARM_MARGIN = 0.005  # "no harm": held-out perplexity within +-0.5% of the router's (TOST)
MIN_DAMAGE = 0.01  # recovery is scored on seeds whose breakage raised perplexity by > 1%
EQUIVALENCE_MARGIN = 0.1  # two arms' recoveries "level" when within +-0.1 (TOST)
NO_HARM_CHECKPOINTS = (0.5, 1.0)  # of 2x the curve's windows: 1x and 2x its budget
ARM_COLORS = {
    "counterfactual": "C0",
    "attribution": "C5",
    "learned_bias": "C1",
    "routing_weighted": "C4",
    "counterfactual_forced": "C3",
}


def run(model, tokenizer, seeds, **kwargs) -> dict[str, dict]:
    """`trust_runs.run_arms` for every arm, on the healthy model and on `BROKEN`."""
    return {
        "healthy": trust_runs.run_arms(model, tokenizer, seeds, ARMS, desc="healthy", **kwargs),
        "broken": trust_runs.run_arms(
            model, tokenizer, seeds, ARMS, breakage_spec=BROKEN, desc="broken", **kwargs
        ),
    }


TABLE = TABLES / "05_learning_curve.json"
RECORDS = ("curve", "rows", "exclusion_curve", "exclusions", "cells")


def evaluate(
    model,
    tokenizer,
    seeds,
    num_windows: int,
    no_harm_multiple: int,
    settings=None,
    workers: int = 1,
    **kwargs,
) -> dict[str, dict]:
    """Everything notebook 05 trains: `run` (the curve, healthy and broken), and the
    no-harm run (`NO_HARM_ARMS` on the healthy model, `no_harm_multiple` times the
    windows, checkpoints `NO_HARM_CHECKPOINTS`, with the forced-exclusion line)."""
    settings = settings or trust_runs.ArmSettings()
    common = {"settings": settings, "workers": workers, **kwargs}
    out = run(model, tokenizer, seeds, num_windows=num_windows, **common)
    out["no_harm"] = trust_runs.run_arms(
        model,
        tokenizer,
        seeds,
        NO_HARM_ARMS,
        num_windows=no_harm_multiple * num_windows,
        checkpoints=NO_HARM_CHECKPOINTS,
        forced_per_layer=1,
        desc="healthy, longer",
        **common,
    )
    return {name: {r: records[r] for r in RECORDS} for name, records in out.items()}


def parameters_of(seeds, settings, **kwargs) -> dict:
    """What a run of `evaluate` depends on, as stored beside its records."""
    return {"seeds": list(seeds), "settings": dataclasses.asdict(settings), **kwargs}


def load_or_evaluate(model, tokenizer, seeds, settings, path=TABLE, evaluator=None, **kwargs):
    """(records, source): the committed records when they were computed with these
    parameters (`parameters_of`), else `evaluator` (default `evaluate`) now. Regenerate
    the committed ones with `python -m sage_core.studies.learning_curve` (and
    `--true-ranking` for `evaluate_true_ranking`) after any change to the arms' code."""
    want = parameters_of(seeds, settings, **{k: v for k, v in kwargs.items() if k != "workers"})
    path = Path(path)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["parameters"] == json.loads(json.dumps(want)):
            return stored["records"], f"read from {path.name} (computed with these parameters)"
    records = (evaluator or evaluate)(model, tokenizer, seeds, settings=settings, **kwargs)
    return json.loads(json.dumps(records, default=float)), "computed now"


TRUE_RANKING_TABLE = TABLES / "05_true_ranking.json"
TRUE_RANKING_ARMS = ("router", "oracle", "attribution", "attribution_true_ranking")


def evaluate_true_ranking(
    model, tokenizer, seeds, num_windows: int, settings=None, workers: int = 1, **kwargs
) -> dict[str, list[dict]]:
    """The attribution arm beside `trust_runs.TrueRankingLearner` (the same verification
    and rule to exclude, the broken cells verified first) on `BROKEN`, at the curve's
    checkpoints: how much of the attribution arm's shortfall at a budget a better
    estimate of harm could remove. Returns {"curve": rows, "exclusion_curve": rows}."""
    kwargs.pop("no_harm_multiple", None)
    out = trust_runs.run_arms(
        model,
        tokenizer,
        seeds,
        TRUE_RANKING_ARMS,
        settings or trust_runs.ArmSettings(),
        num_windows=num_windows,
        breakage_spec=BROKEN,
        desc="true ranking",
        workers=workers,
        **kwargs,
    )
    return {name: out[name] for name in ("curve", "exclusion_curve")}


def main(argv=None) -> int:
    """`python -m sage_core.studies.learning_curve`: notebook 05's runs on its default
    parameters, written to tables/05_learning_curve.json."""
    import argparse

    import torch

    from sage_core.studies import experiments, tuning

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=tuning.EVALUATION_SEED)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--true-ranking",
        action="store_true",
        help=f"run evaluate_true_ranking instead (default --out {TRUE_RANKING_TABLE.name})",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = args.out or (TRUE_RANKING_TABLE if args.true_ranking else TABLE)
    evaluator = evaluate_true_ranking if args.true_ranking else evaluate
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = experiments.load_model()
    seeds = list(range(args.seed, args.seed + DEFAULTS["num_seeds"]))
    settings = trust_runs.ArmSettings()
    kwargs = {k: v for k, v in DEFAULTS.items() if k != "num_seeds"}
    records = evaluator(model, tokenizer, seeds, settings=settings, workers=args.workers, **kwargs)
    payload = {"parameters": parameters_of(seeds, settings, **kwargs), "records": records}
    atomic_write_json(out, payload, indent=None, default=float)
    return 0


DEFAULTS = {  # notebook 05's parameters
    "num_seeds": 10,
    "num_windows": 96,
    "no_harm_multiple": 2,
    "heldout_per_context": 8,
    "prompt_tokens": 32,
    "continuation_tokens": 32,
}


def curve_table(curve: list[dict], min_damage: float | None = None) -> list[dict]:
    """One row per (arm, checkpoint): the mean forward equivalents spent, held-out
    perplexity (t interval over seeds), its paired change against the router, and with
    `min_damage` (broken model) the recovery as a ratio of means over the seeds damaged by
    more than `min_damage`, sum(ppl_router - ppl_arm) / sum(ppl_router - ppl_clean), with
    its paired bootstrap interval."""
    out = []
    for budget in trust_runs.budgets(curve):
        rows = trust_runs.at_budget(curve, budget)
        seeds = (
            None if min_damage is None else trust_runs.damaged_seeds(rows, min_damage=min_damage)
        )
        damage = trust_runs.damage(rows)
        for arm in dict.fromkeys(r["arm"] for r in rows):
            mine = [r for r in rows if r["arm"] == arm and r["context"] == "all"]
            row = {
                "arm": arm,
                "budget": budget,
                "forward_equivalents": float(np.mean([r["forward_equivalents"] for r in mine])),
                "perplexity": statistics.t_interval([r["perplexity"] for r in mine]),
                "clean_perplexity": float(np.mean([r["clean_perplexity"] for r in mine])),
                "change": statistics.t_interval(trust_runs.paired(rows, arm, "router")),
            }
            if seeds is not None:
                row["recovery"] = statistics.ratio_of_means(
                    trust_runs.recovered(rows, arm, seeds=seeds), [damage[s] for s in seeds]
                )
            out.append(row)
    return out


def paired_recovery_difference(
    rows: list[dict], arm: str, other: str, seeds, context: str = "all"
) -> dict:
    """Per-seed recovery of `arm` minus `other` in `context` (rows of one checkpoint,
    `seeds` damaged): its t interval and a TOST against +-EQUIVALENCE_MARGIN ("level" when
    equivalent)."""
    a = trust_runs.recovery(rows, arm, context, seeds)
    b = trust_runs.recovery(rows, other, context, seeds)
    differences = [x - y for x, y in zip(a, b, strict=True)]
    return {
        "difference": statistics.t_interval(differences),
        "equivalence": statistics.equivalence(differences, EQUIVALENCE_MARGIN),
        "per_seed": differences,
    }


def exclusion_counts(exclusions: list[dict], arm: str = "counterfactual") -> dict:
    """Over seeds, from exclusion records of one checkpoint: experts excluded and healthy
    experts excluded per seed (lists in seed order), seeds with any exclusion, and the
    realised false discovery rate: false exclusions / exclusions, pooled over seeds (None
    when nothing was excluded)."""
    mine = [r for r in exclusions if r["arm"] == arm]
    seeds = sorted({r["seed"] for r in mine})
    excluded = [sum(len(r["excluded"]) for r in mine if r["seed"] == s) for s in seeds]
    false = [sum(r["false_exclusions"] for r in mine if r["seed"] == s) for s in seeds]
    total = sum(excluded)
    return {
        "seeds": seeds,
        "excluded": excluded,
        "false": false,
        "seeds_with_exclusions": sum(e > 0 for e in excluded),
        "realised_fdr": sum(false) / total if total else None,
    }


def p_value_calibration(cells: list[dict], arm: str = "counterfactual") -> dict:
    """Healthy cells' one-sided p-values against the uniform: a valid test has
    P(p <= a) <= a for every a. One-sided Kolmogorov-Smirnov test of "the p-values' CDF
    lies above the uniform's somewhere" (anti-conservative); healthy experts that help
    give p-values near 1, which is conservative and passes."""
    p = np.array([c["p"] for c in cells if c["arm"] == arm and not c["broken"]])
    if p.size < 2:
        raise ValueError(f"need at least 2 tested healthy cells, got {p.size}")
    test = scipy.stats.kstest(p, "uniform", alternative="greater")
    return {
        "cells": int(p.size),
        "statistic": float(test.statistic),
        "p": float(test.pvalue),
        "share_below_0.05": float(np.mean(p <= 0.05)),
        "values": np.sort(p),
    }


# --- figures ---------------------------------------------------------------------------------


def _band(ax, table, arm, key, scale=1.0, value="mean", **style):
    rows = [r for r in table if r["arm"] == arm]
    x = [max(r["forward_equivalents"], 1.0) for r in rows]
    mid = [scale * r[key][value] for r in rows]
    ax.plot(x, mid, marker="o", ms=3, label=arm, **style)
    ax.fill_between(
        x,
        [scale * r[key]["low"] for r in rows],
        [scale * r[key]["high"] for r in rows],
        alpha=0.15,
        lw=0,
        color=style.get("color"),
    )


def plot_learning_curve(
    healthy: list[dict], broken: list[dict], differences: dict[str, dict], title: str = ""
):
    """Four panels over training compute (forward equivalents per seed, log scale; the
    untrained start drawn at 1): the healthy model's held-out perplexity change against
    the router; the broken model's held-out perplexity with the router, oracle reference
    and clean model as lines; the broken model's recovery (ratio of means); and paired
    differences between arms ({label: {budget: `paired_recovery_difference`}}) with
    their t intervals and the TOST margin."""
    import matplotlib.pyplot as plt

    fig, (a, b, c, d) = plt.subplots(1, 4, figsize=(16, 3.8))
    for arm in LEARNING_ARMS:
        color = ARM_COLORS[arm]
        _band(a, healthy, arm, "change", 100, color=color)
        _band(b, broken, arm, "perplexity", color=color)
        _band(c, broken, arm, "recovery", value="ratio", color=color)
    a.axhspan(-100 * NO_HARM_MARGIN, 100 * NO_HARM_MARGIN, color="C2", alpha=0.15, lw=0)
    a.axhline(0, color="0.3", lw=0.8, label="router")
    a.set_ylabel("healthy: held-out ppl vs router (%)")
    final = [r for r in broken if r["budget"] == max(q["budget"] for q in broken)]
    line = {r["arm"]: r for r in final}
    b.axhline(line["router"]["perplexity"]["mean"], color="0.3", lw=0.8, label="router")
    b.axhline(
        line["oracle"]["perplexity"]["mean"], color="k", ls="--", lw=1, label="oracle reference"
    )
    c.axhline(
        line["oracle"]["recovery"]["ratio"], color="k", ls="--", lw=1, label="oracle reference"
    )
    c.axhline(0, color="0.3", lw=0.8, label="router")
    c.axhline(1, color="C2", ls=":", lw=1, label="clean model")
    b.axhline(line["router"]["clean_perplexity"], color="C2", ls=":", lw=1, label="clean model")
    b.set_ylabel("broken: held-out perplexity")
    c.set_ylabel("broken: recovery (0 router, 1 clean)")
    for (label, by_budget), color in zip(differences.items(), ("k", "C5", "C0"), strict=False):
        x = sorted(by_budget)
        mid = [by_budget[k]["difference"]["mean"] for k in x]
        low = [m - by_budget[k]["difference"]["low"] for m, k in zip(mid, x, strict=True)]
        high = [by_budget[k]["difference"]["high"] - m for m, k in zip(mid, x, strict=True)]
        d.errorbar(x, mid, yerr=[low, high], fmt="o-", color=color, capsize=2, label=label)
    d.axhline(0, color="0.3", lw=0.8)
    d.axhspan(-EQUIVALENCE_MARGIN, EQUIVALENCE_MARGIN, color="C2", alpha=0.15, lw=0)
    d.set_ylabel("broken: paired recovery difference")
    for ax in (a, b, c, d):
        ax.set_xscale("log")
        ax.set_xlabel("training compute per seed (forward equivalents)")
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_calibration(calibration: dict, title: str = ""):
    """QQ plot of healthy cells' p-values against the uniform (below the diagonal at small
    p: anti-conservative)."""
    import matplotlib.pyplot as plt

    p = calibration["values"]
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.plot((np.arange(p.size) + 0.5) / p.size, p, ".", ms=2)
    ax.plot([0, 1], [0, 1], color="0.4", lw=0.8)
    ax.set_xlabel("uniform quantile")
    ax.set_ylabel("healthy cells' p-value")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
