"""Notebook 07: experts known to be broken. Which arm routes around them, and at what cost?

Ground truth is made: in every sparse layer, `m` experts drawn among the `pool` most used
(router usage on the seed's training stream) are broken (`trust_runs.Breakage`: noise of
the same Frobenius norm, or the sign flipped), for every context or for one context's
windows only. Every arm of `trust_runs.ARMS` learns on the same stream of the broken model
and is scored on the same held-out windows; the clean model's router is the target.

Scores per seed: recovery = (ppl_router - ppl_arm) / (ppl_router - ppl_clean), and the
primary endpoint, the counterfactual arm's recovery divided by the oracle's (the oracle
excludes exactly the broken experts: no routing-only method can be expected to beat it).
"""

from __future__ import annotations

from sage_core.studies import trust_runs

PRIMARY = {"m": 2, "kind": "noise", "contexts": None}
PRIMARY_ARMS = ("router", "oracle", "counterfactual", "routing_weighted", "learned_bias")
CONTEXT_ONLY_ARMS = ("router", "oracle", "counterfactual", "counterfactual_context_free")


def scenarios(grid: str, broken_context: str = "code") -> list[dict]:
    """grid "primary": m = 2, noise, every context. grid "context": that, plus m = 2 noise
    in `broken_context` only. grid "full": m in {1, 2, 4} x kinds {noise, sign_flip} for
    every context, plus m = 2 noise in `broken_context` only."""
    context_only = {"m": 2, "kind": "noise", "contexts": (broken_context,)}
    if grid == "primary":
        return [dict(PRIMARY)]
    if grid == "context":
        return [dict(PRIMARY), context_only]
    if grid != "full":
        raise ValueError(f"grid must be 'primary', 'context' or 'full', got {grid!r}")
    out = [{"m": m, "kind": kind, "contexts": None} for kind in trust_runs.KINDS for m in (1, 2, 4)]
    return [*out, context_only]


def scenario_name(spec: dict) -> str:
    where = "all contexts" if spec["contexts"] is None else f"{spec['contexts'][0]} only"
    return f"m={spec['m']} {spec['kind']} ({where})"


def run_scenario(model, tokenizer, seeds, spec: dict, arms, pool: int = 8, **kwargs) -> dict:
    """`trust_runs.run_arms` with the breakage of `spec`; rows tagged with the scenario."""
    breakage = {"m": spec["m"], "pool": pool, "kind": spec["kind"], "contexts": spec["contexts"]}
    out = trust_runs.run_arms(
        model, tokenizer, seeds, arms, breakage_spec=breakage, desc=scenario_name(spec), **kwargs
    )
    for rows in out.values():
        for r in rows:
            r["scenario"] = scenario_name(spec)
    return out


def scenario_table(rows: list[dict], exclusions: list[dict], arm="counterfactual") -> dict:
    """One scenario's headline numbers: oracle and `arm` recovery (t intervals over the
    seeds whose breakage raised perplexity: recovery is undefined on the others, counted
    in "undamaged_seeds"), `arm` recovery / oracle recovery, precision@m and false
    exclusions per seed (all seeds)."""
    mine = [r for r in exclusions if r["arm"] == arm]
    seeds = sorted({r["seed"] for r in rows})
    damaged = trust_runs.damaged_seeds(rows)
    precision = [
        next(r["precision_at_m"] for r in mine if r["seed"] == s and r["broken"]) for s in seeds
    ]
    false = [sum(r["false_exclusions"] for r in mine if r["seed"] == s) for s in seeds]
    return {
        "undamaged_seeds": len(seeds) - len(damaged),
        "oracle_recovery": trust_runs.t_interval(
            trust_runs.recovery(rows, "oracle", seeds=damaged)
        ),
        "arm_recovery": trust_runs.t_interval(trust_runs.recovery(rows, arm, seeds=damaged)),
        "relative_to_oracle": trust_runs.t_interval(
            trust_runs.relative_to_oracle(rows, arm, seeds=damaged)
        ),
        "precision_at_m": trust_runs.t_interval(precision),
        "false_exclusions_per_seed": float(sum(false) / len(false)),
    }


def context_only_table(rows: list[dict], broken_context: str) -> dict[str, dict]:
    """For breakage in one context: per arm (context-keyed and context-free counterfactual
    trust, and the oracle), recovery in the broken context (t interval over the seeds whose
    breakage raised perplexity there) and, for every other context, the paired relative
    perplexity change against the router (what trust costs where nothing is broken)."""
    damaged = trust_runs.damaged_seeds(rows, broken_context)
    out = {}
    for arm in ("oracle", "counterfactual", "counterfactual_context_free"):
        if arm not in {r["arm"] for r in rows}:
            continue
        out[arm] = {
            "recovery": trust_runs.t_interval(
                trust_runs.recovery(rows, arm, broken_context, seeds=damaged)
            ),
            "other_contexts": {
                c: trust_runs.t_interval(trust_runs.paired(rows, arm, "router", c))
                for c in dict.fromkeys(r["context"] for r in rows)
                if c not in (broken_context, "all")
            },
        }
    return out


def plot_arms(rows: list[dict], scenario: str):
    """Left: held-out perplexity per arm (mean over seeds, t 95% interval), with the clean
    model's router. Right: each arm's recovery with its interval; 0 = the broken model's
    router, 1 = the clean model."""
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["scenario"] == scenario and r["context"] == "all"]
    arms = list(dict.fromkeys(r["arm"] for r in mine))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    ppl = [trust_runs.t_interval([r["perplexity"] for r in mine if r["arm"] == a]) for a in arms]
    clean = trust_runs.t_interval([r["clean_perplexity"] for r in mine if r["arm"] == "router"])
    x = range(len(arms))
    left.bar(x, [p["mean"] for p in ppl], color="0.7")
    left.errorbar(
        x,
        [p["mean"] for p in ppl],
        yerr=[[p["mean"] - p["low"] for p in ppl], [p["high"] - p["mean"] for p in ppl]],
        fmt="none",
        color="k",
        capsize=3,
    )
    left.axhline(clean["mean"], color="C2", ls="--", label="clean model, router")
    left.set_ylim(min(p["low"] for p in ppl) * 0.95, max(p["high"] for p in ppl) * 1.02)
    left.set_xticks(list(x), arms, rotation=25, ha="right", fontsize=8)
    left.set_ylabel("held-out perplexity")
    left.legend(frameon=False, fontsize=8)
    learners = [a for a in arms if a != "router"]
    sub = [r for r in rows if r["scenario"] == scenario]
    rec = [trust_runs.t_interval(trust_runs.recovery(sub, a)) for a in learners]
    xs = range(len(learners))
    right.axhline(0, color="C3", lw=0.8)
    right.axhline(1, color="C2", ls="--", lw=0.8, label="clean model")
    right.errorbar(
        xs,
        [r["mean"] for r in rec],
        yerr=[[r["mean"] - r["low"] for r in rec], [r["high"] - r["mean"] for r in rec]],
        fmt="o",
        capsize=3,
    )
    right.set_xticks(list(xs), learners, rotation=25, ha="right", fontsize=8)
    right.set_ylabel("recovery (0: router, 1: clean)")
    right.legend(frameon=False, fontsize=8)
    fig.suptitle(scenario, fontsize=9)
    fig.tight_layout()
    return fig
