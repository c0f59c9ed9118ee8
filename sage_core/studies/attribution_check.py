"""The attribution estimate against the truth (notebook 05, section on the estimator).

For a few windows of each seed's training stream, on the model broken as notebook 05
breaks it, every served (layer, expert) cell's estimated harm (`attribution_estimates`:
one forward and one backward pass) is set beside its harm measured directly (one real
ablation of that cell, all of them in one batched forward). Two of attribution
patching's known failure modes are measured on purpose:

- large outputs: the broken experts' weights scaled by `LARGE_OUTPUT_SCALE`, so removing
  one moves the residual stream far from where the gradient was taken;
- slots handed between broken experts: with m = 2 broken in a layer, removing one hands
  its slot (for some tokens) to the other, so the pair's joint effect is not the sum of
  its single effects; the joint removal is measured directly beside both sums.
"""

from __future__ import annotations

import math
import random

import numpy as np
import scipy.stats
import torch

from sage_core.corpus import load_corpus
from sage_core.studies import trust_runs
from sage_core.studies.experiments import make_samples
from sage_core.trust import AblationSelector, attribution_estimates, continuation_nll

LARGE_OUTPUT_SCALE = 8.0


def _ablated_nll(model, ids: torch.Tensor, removals: list[dict]) -> torch.Tensor:
    """(R,) mean NLL of the (1, S) window with each removal {layer: [experts]} applied,
    one copy per removal, in one batched forward."""
    c, layers = model.config, sorted(model.sparse_blocks())
    masks = {layer: torch.zeros(len(removals), c.num_experts, dtype=torch.bool) for layer in layers}
    for row, removal in enumerate(removals):
        for layer, experts in removal.items():
            masks[layer][row, experts] = True
    model.set_selector(
        AblationSelector(c.num_experts_per_tok, c.norm_topk_prob, masks, len(removals))
    )
    try:
        with torch.no_grad():
            return continuation_nll(model, ids.expand(len(removals), -1), 1).mean(1).double()
    finally:
        model.set_selector(None)


def check_seed(
    model, tokenizer, seed: int, windows: int = 4, scale: float = 1.0, spec=None, corpus=None
):
    """(cells, pairs) for one seed: one row per (window, served cell) with the estimate,
    the directly measured harm and whether the cell is broken; one row per (window,
    layer) whose two broken experts both served, with the pair's joint harm measured
    directly, the sum of their measured single harms and the sum of their estimates."""
    spec = spec or {"m": 2, "pool": 8, "kind": "noise", "contexts": None}
    corpus = corpus or load_corpus()
    stream = make_samples(
        tokenizer, "train", max(1, math.ceil(windows / 3)) * 4, 32, 32, seed, corpus, "trust"
    )
    random.Random(f"{seed}:stream-order").shuffle(stream)
    usage = trust_runs.expert_usage(model, stream)
    chosen = trust_runs.choose_broken(usage, spec["m"], spec["pool"], seed)
    breakage = trust_runs.Breakage(model, chosen, spec["kind"], seed)
    for key in breakage.broken:
        breakage.broken[key] = breakage.broken[key] * scale
    layers = sorted(model.sparse_blocks())
    cells, pairs = [], []
    for w, window in enumerate(stream[:windows]):
        ids = torch.cat([window.prompt, window.continuation])[None]
        with breakage.active(window.context):
            est = attribution_estimates(model, ids, {})
            served = [(layers[li], e) for li, e in est["served"][0].nonzero().tolist()]
            joint = [
                (layer, chosen[layer])
                for layer in layers
                if all((layer, e) in served for e in chosen[layer]) and len(chosen[layer]) == 2
            ]
            removals = [{layer: [e]} for layer, e in served] + [{layer: es} for layer, es in joint]
            nll = _ablated_nll(model, ids, removals)
        base = float(est["nll"][0])
        single = {}
        for (layer, e), value in zip(served, nll[: len(served)].tolist(), strict=True):
            li = layers.index(layer)
            single[(layer, e)] = base - value
            cells.append(
                {
                    "seed": seed,
                    "window": w,
                    "context": window.context,
                    "layer": layer,
                    "expert": e,
                    "broken": e in chosen[layer],
                    "estimate": float(est["harm"][0, li, e]),
                    "truth": base - value,
                }
            )
        for (layer, es), value in zip(joint, nll[len(served) :].tolist(), strict=True):
            li = layers.index(layer)
            pairs.append(
                {
                    "seed": seed,
                    "window": w,
                    "layer": layer,
                    "joint_truth": base - value,
                    "sum_of_single_truths": sum(single[(layer, e)] for e in es),
                    "sum_of_estimates": float(sum(est["harm"][0, li, e] for e in es)),
                }
            )
    return cells, pairs


def summary(cells: list[dict]) -> dict:
    """Spearman correlation of estimate and truth over every (window, cell) pair; on the
    broken cells, the share whose estimate has the truth's sign, and the share the
    estimate calls harmful (> 0); the share of broken cells among the top 2 of each
    (window, layer) by the estimate."""
    est = np.array([c["estimate"] for c in cells])
    true = np.array([c["truth"] for c in cells])
    broken = np.array([c["broken"] for c in cells])
    groups: dict = {}
    for c in cells:
        groups.setdefault((c["seed"], c["window"], c["layer"]), []).append(c)
    top = [
        c["broken"] for g in groups.values() for c in sorted(g, key=lambda c: -c["estimate"])[:2]
    ]
    return {
        "cells": len(cells),
        "spearman": float(scipy.stats.spearmanr(est, true).statistic),
        "broken_cells": int(broken.sum()),
        "sign_right_on_broken": float(np.mean(np.sign(est[broken]) == np.sign(true[broken]))),
        "broken_called_harmful": float(np.mean(est[broken] > 0)),
        "broken_truly_harmful": float(np.mean(true[broken] > 0)),
        "broken_share_of_top2": float(np.mean(top)),
    }


def run(model, tokenizer, seeds, windows: int = 4, corpus=None) -> dict:
    """{"normal": (cells, pairs), "large": (cells, pairs)} over `seeds`: noise at the usual
    norm, and the same noise `LARGE_OUTPUT_SCALE` times larger."""
    out = {}
    for name, scale in (("normal", 1.0), ("large", LARGE_OUTPUT_SCALE)):
        cells, pairs = [], []
        for seed in seeds:
            c, p = check_seed(model, tokenizer, seed, windows, scale, corpus=corpus)
            cells += c
            pairs += p
        out[name] = (cells, pairs)
    return out


def plot(result: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    for ax, name in zip(axes[:2], ("normal", "large"), strict=True):
        cells = result[name][0]
        for broken, color, label in ((False, "0.6", "healthy"), (True, "C3", "broken")):
            chosen = [c for c in cells if c["broken"] == broken]
            ax.scatter(
                [c["truth"] for c in chosen],
                [c["estimate"] for c in chosen],
                s=8,
                c=color,
                label=label,
                alpha=0.7,
            )
        lim = max(abs(v) for c in cells for v in (c["truth"], c["estimate"]))
        ax.plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
        ax.axhline(0, color="k", lw=0.4)
        ax.axvline(0, color="k", lw=0.4)
        s = summary(cells)
        ax.set_title(f"{name} outputs: Spearman {s['spearman']:.2f}", fontsize=10)
        ax.set_xlabel("harm measured by ablation (nats/token)")
        ax.set_ylabel("attribution estimate")
        ax.legend(fontsize=8)
    pairs = result["normal"][1]
    ax = axes[2]
    ax.scatter(
        [p["joint_truth"] for p in pairs],
        [p["sum_of_single_truths"] for p in pairs],
        s=10,
        label="sum of single ablations",
    )
    ax.scatter(
        [p["joint_truth"] for p in pairs],
        [p["sum_of_estimates"] for p in pairs],
        s=10,
        label="sum of estimates",
    )
    if pairs:
        lim = max(abs(v) for p in pairs for v in p.values() if isinstance(v, float))
        ax.plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
    ax.set_title("two broken experts of one layer removed together", fontsize=10)
    ax.set_xlabel("joint harm measured (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cost_row(layers: int, experts: int, top_k: int, tokens: int) -> dict:
    """Forward equivalents to see every served cell of one window of `tokens` scored
    positions once: by ablation (one forward per cell) and by attribution (one forward and
    one backward, `trust_runs.FORWARD_PER_BACKWARD`). Served cells per layer are counted
    as if the router spread tokens uniformly, experts * (1 - (1 - k/E)^tokens): an
    upper-end count (real routing is skewed), the same for both methods."""
    served = layers * experts * (1 - (1 - top_k / experts) ** tokens)
    return {
        "cells": layers * experts,
        "served_per_window": served,
        "ablation": served,
        "attribution": trust_runs.forward_equivalents(1, 1),
    }


SEEDS = (2000, 2001, 2002)  # evaluation seeds: the estimator is measured, not tuned, here
WINDOWS = 4


def main(argv=None) -> int:
    """`python -m sage_core.studies.attribution_check`: writes
    tables/05_attribution_check.json (cells and pairs of both scales, and their summaries)."""
    import argparse

    from sage_core.atomic import atomic_write_json
    from sage_core.paths import TABLES
    from sage_core.studies import experiments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TABLES / "05_attribution_check.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer, _ = experiments.load_model()
    result = run(model, tokenizer, SEEDS, WINDOWS)
    payload = {
        "seeds": list(SEEDS),
        "windows_per_seed": WINDOWS,
        "large_output_scale": LARGE_OUTPUT_SCALE,
        **{
            name: {"summary": summary(cells), "cells": cells, "pairs": pairs}
            for name, (cells, pairs) in result.items()
        },
    }
    atomic_write_json(args.out, payload, indent=0)
    print({name: payload[name]["summary"] for name in result})
    return 0


def read(path) -> dict:
    """The committed table as {"normal": (cells, pairs), "large": (cells, pairs)}."""
    import json
    from pathlib import Path

    payload = json.loads(Path(path).read_text())
    return {name: (payload[name]["cells"], payload[name]["pairs"]) for name in ("normal", "large")}


if __name__ == "__main__":
    raise SystemExit(main())
