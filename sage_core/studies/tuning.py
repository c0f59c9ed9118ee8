"""Choosing every trust arm's hyperparameters on tuning seeds only, before evaluation.

The protocol (pre-registered in code; notebooks 05 and 07 report only evaluation seeds):

- Tuning seeds are `TUNING_SEEDS` (1000-1007). Evaluation seeds start at
  `EVALUATION_SEED` (2000): no commit before the tuning was written used them.
- Tuning never looks at held-out text: the held-out windows of a tuning run are cut from
  *validation* documents of the training split (`experiments.ValidationCorpus`: every fifth
  training document), which the training stream never uses.
- Scenario: notebook 07's primary one (m = 2 experts broken per layer, noise, every
  context) at the evaluation budget (`num_windows` windows of the counterfactual arm;
  every arm gets the same forward equivalents, `trust_runs.budget_of`).
- Criterion, the same for every arm: the damage it wins back over the tuning seeds as a
  ratio of means, sum(ppl_router - ppl_arm) / sum(ppl_router - ppl_clean).
- Each arm's grid (`GRIDS`) is searched in full; the winner per arm is frozen into
  `trust_runs.ArmSettings`' defaults, and a test checks the defaults equal the committed
  choice (`tables/tuning_choice.json`).

Run: `python -m sage_core.studies.tuning` (writes `tables/tuning_arms.{csv,json}`, one row
per (arm, setting, seed), and `tables/tuning_choice.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from sage_core.atomic import atomic_write_json, atomic_write_table
from sage_core.corpus import load_corpus
from sage_core.paths import TABLES
from sage_core.studies import experiments, statistics, trust_runs

TUNING_SEEDS = tuple(range(1000, 1008))
EVALUATION_SEED = 2000
SCENARIO = {"m": 2, "pool": 8, "kind": "noise", "contexts": None}
NUM_WINDOWS = 96
HELDOUT_PER_CONTEXT = 8
# One grid per learning arm: {ArmSettings field: values}.
GRIDS = {
    "counterfactual": {"explore": [0.0, 0.25, 0.5, 1.0, 2.0]},
    "learned_bias": {"bias_learning_rate": [0.01, 0.03, 0.1, 0.3], "bias_l2": [0.0, 1e-3, 1e-2]},
    "routing_weighted": {"learning_rate": [0.1, 0.5, 2.0]},
    # the budget split between estimation (1 forward + 1 backward per window) and
    # verification (real ablations per window)
    "attribution": {"verify_per_window": [1, 2, 4]},
}


def settings_grid(arm: str, base: trust_runs.ArmSettings) -> list[dict]:
    """Every combination of `GRIDS[arm]`, as {field: value} dicts."""
    combos = [{}]
    for field, values in GRIDS[arm].items():
        combos = [{**c, field: v} for c in combos for v in values]
    for c in combos:
        dataclasses.replace(base, **c)  # every field exists
    return combos


def tune(
    model,
    tokenizer,
    seeds=TUNING_SEEDS,
    num_windows: int = NUM_WINDOWS,
    workers: int = 1,
    arms=tuple(GRIDS),
):
    """The grids of `arms` (default: every arm) on the tuning seeds. Returns (rows, choice): one row per (arm,
    setting, seed) with the damage and what the arm won back, and {arm: {"setting",
    "recovery" (ratio of means with its interval)}} for the best setting of each arm."""
    if set(seeds) & set(range(EVALUATION_SEED, EVALUATION_SEED + 1000)):
        raise ValueError(f"tuning seeds {seeds} overlap the evaluation seeds")
    corpus = experiments.ValidationCorpus(load_corpus())
    base = trust_runs.ArmSettings()
    rows, choice = [], {}
    unknown = set(arms) - set(GRIDS)
    if unknown:
        raise ValueError(f"no tuning grid for arms {sorted(unknown)}; grids: {sorted(GRIDS)}")
    for arm in arms:
        best = None
        for setting in settings_grid(arm, base):
            settings = dataclasses.replace(base, **setting)
            out = trust_runs.run_arms(
                model,
                tokenizer,
                list(seeds),
                ("router", arm),
                settings=settings,
                num_windows=num_windows,
                heldout_per_context=HELDOUT_PER_CONTEXT,
                breakage_spec=SCENARIO,
                checkpoints=(1.0,),
                corpus=corpus,
                workers=workers,
                desc=f"{arm} {setting}",
            )
            final = out["rows"]
            damage = trust_runs.damage(final)
            won = trust_runs.recovered(final, arm, seeds=sorted(damage))
            for (seed, d), w in zip(damage.items(), won, strict=True):
                rows.append(
                    {"arm": arm, "setting": setting, "seed": seed, "damage": d, "recovered": w}
                )
            score = statistics.ratio_of_means(won, list(damage.values()))
            if best is None or score["ratio"] > best["recovery"]["ratio"]:
                best = {"setting": setting, "recovery": score}
        choice[arm] = best
    return rows, choice


def frozen_settings(choice: dict) -> dict:
    """{ArmSettings field: value} that the choice sets."""
    return {k: v for arm in choice.values() for k, v in arm["setting"].items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(TABLES))
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(GRIDS),
        help="tune these arms only; the committed rows and choices of the others are kept",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer, _ = experiments.load_model()
    rows, choice = tune(model, tokenizer, workers=args.workers, arms=args.arms)
    if set(args.arms) != set(GRIDS):
        kept = json.loads(Path(f"{args.out}/tuning_choice.json").read_text())["choice"]
        choice = {
            arm: choice.get(arm, kept.get(arm)) for arm in GRIDS if arm in choice or arm in kept
        }
        old = json.loads(Path(f"{args.out}/tuning_arms.json").read_text())
        rows = [r for r in old if r["arm"] not in args.arms] + rows
    atomic_write_table(f"{args.out}/tuning_arms", rows, indent=1)
    payload = {
        "tuning_seeds": list(TUNING_SEEDS),
        "evaluation_seed": EVALUATION_SEED,
        "scenario": SCENARIO,
        "num_windows": NUM_WINDOWS,
        "heldout": "validation documents of the training split (ValidationCorpus)",
        "criterion": "sum(ppl_router - ppl_arm) / sum(ppl_router - ppl_clean) over tuning seeds",
        "choice": choice,
        "frozen": frozen_settings(choice),
    }
    atomic_write_json(f"{args.out}/tuning_choice.json", payload, indent=1)
    print(json.dumps(payload["frozen"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
