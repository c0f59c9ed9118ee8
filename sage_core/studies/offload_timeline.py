"""Notebook 09, on real hardware: Q3-Omni's decode step as a per-layer timeline of compute
and expert transfers (`offload.timeline`), so that next-layer prefetch is judged with the
overlap it buys, not by the bytes it moves. An extrapolation, not a measurement.

What is measured: each policy's demand reads and read-aheads per sparse layer and token,
simulated on the default model's held-out decode traces (`timeline.layer_reads`), as rates
of its top-k. What is assumed, and said so wherever a figure appears:

- Q3-Omni's sizes (48 layers, 128 experts, top-8, bfloat16; its attention and router
  weights from its configuration), layer 0 at the default model's first-layer rates and
  every later layer at the mean of its later layers' rates (the first layer is the one no
  guess precedes);
- decode is bound by reading weights: a layer's compute takes its weights' bytes over a
  GPU's nominal memory rate (`GPU_BYTES_PER_S`), its expert compute those of top-k
  experts; the attention's KV-cache reads are left out (short contexts);
- one link moves one expert at a time at its nominal rate (`expert_offloading.LINKS`).
"""

from __future__ import annotations

import numpy as np

from sage_core.offload import cache_policy
from sage_core.offload.expert_trace import access_sequence, prefetch_plan
from sage_core.offload.timeline import decode_timeline, layer_reads
from sage_core.studies import expert_offloading as offloading
from sage_core.studies.statistics import t_interval

# Q3-Omni's thinker attention (its configuration: 32 query heads, 4 KV heads of 128)
Q3_OMNI_ATTENTION = {"heads": 32, "kv_heads": 4, "head_dim": 128}
GPU_BYTES_PER_S = 3.35e12  # H100 SXM, HBM3 nominal: an upper bound on the read rate
TOKENS = 8  # laid out per step; the last half is reported (the link's backlog settled)
ARMS = {  # label: (policy, next-layer prefetch)
    "LRU": ("lru", False),
    "LRU + next-layer prefetch": ("lru", True),
    "layer-aware": ("layer_aware", False),
    "learned": (cache_policy.LEARNED, False),
}


def q3omni_layer_costs(link_bytes_per_s: float, gpu_bytes_per_s: float = GPU_BYTES_PER_S):
    """(attention_s, experts_s, transfer_s) per sparse layer of Q3-Omni in bfloat16: its
    attention + router weights and its top-k experts read at `gpu_bytes_per_s`, one expert
    moved at `link_bytes_per_s`."""
    m, a = offloading.Q3_OMNI, Q3_OMNI_ATTENTION
    width = m["hidden"]
    attention = width * a["head_dim"] * (2 * a["heads"] + 2 * a["kv_heads"])  # q, o; k, v
    router = width * m["experts"]
    per_expert = offloading.expert_bytes(width, m["moe_intermediate"], m["bytes_per_param"])
    return (
        (attention + router) * m["bytes_per_param"] / gpu_bytes_per_s,
        m["top_k"] * per_expert / gpu_bytes_per_s,
        per_expert / link_bytes_per_s,
    )


def read_rates(sets, fraction: float, policy: str, prefetch: bool) -> dict[int, np.ndarray]:
    """{seed: (2, L) demand reads and read-aheads per token and sparse layer, as shares of
    top-k}, decode traces of every context pooled (token-weighted)."""
    out = {}
    for seed, traces in sets.items():
        totals, tokens = 0.0, 0
        for phases in traces.values():
            trace = phases["decode"]
            keys, _ = access_sequence(trace)
            cap = offloading.capacities(trace.num_experts * len(trace.layers), [fraction])[0]
            made = cache_policy.make_policy(policy, cap, layers=[int(x) for x in trace.layers])
            predictor = getattr(made, "predictor", None)  # the learned policy reads the router
            sim = cache_policy.simulate(
                keys,
                made,
                prefetch=prefetch_plan(trace) if prefetch else None,
                router=offloading.observed_router(trace, predictor) if predictor else None,
            )
            demand, ahead = layer_reads(trace, sim)
            totals = totals + np.stack([demand.sum(0), ahead.sum(0)])
            tokens += trace.num_tokens
        out[seed] = totals / tokens / trace.experts.shape[2]
    return out


def q3omni_reads(rates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(48,) demand reads and read-aheads per token for Q3-Omni's layers from (2, L) rates of
    the default model (see the module docstring), times its top-k."""
    m = offloading.Q3_OMNI
    layer = np.r_[0, np.ones(m["layers"] - 1, dtype=int)]
    per_layer = np.stack([rates[:, 0], rates[:, 1:].mean(1)], 1)  # (2, first / later)
    demand, ahead = per_layer[0][layer], per_layer[1][layer]
    ahead[0] = 0.0  # nothing is guessed before the first layer
    return m["top_k"] * demand, m["top_k"] * ahead


def _steps(rates: np.ndarray, link_bytes_per_s: float) -> dict:
    """`decode_timeline` of `TOKENS` identical Q3-Omni steps from (2, L) rates."""
    demand, ahead = q3omni_reads(rates)
    costs = q3omni_layer_costs(link_bytes_per_s)
    return decode_timeline(np.tile(demand, (TOKENS, 1)), np.tile(ahead, (TOKENS, 1)), *costs)


def step(rates: np.ndarray, link_bytes_per_s: float) -> dict:
    """One arm's Q3-Omni decode step over one link: tokens/s from the timeline, and the two
    one-sided bounds (transfers alone, compute alone), with the share of time stalled."""
    demand, ahead = q3omni_reads(rates)
    attention_s, experts_s, transfer_s = q3omni_layer_costs(link_bytes_per_s)
    out = _steps(rates, link_bytes_per_s)
    token_s = float(out["token_s"][TOKENS // 2 :].mean())
    compute_s = len(demand) * (attention_s + experts_s)
    moved = float(demand.sum() + ahead.sum())
    return {
        "tokens_per_s": 1.0 / token_s,
        "transfer_bound": 1.0 / (moved * transfer_s) if moved else float("inf"),
        "compute_bound": 1.0 / compute_s,
        "stalled": 1.0 - compute_s / token_s,
        "experts_per_token": moved,
    }


def timeline_rows(sets, fraction: float = 0.25, arms=ARMS, links=None) -> list[dict]:
    """One row per (seed, arm, link): `step` on that seed's read rates."""
    links = links or offloading.LINKS
    rows = []
    for label, (policy, prefetch) in arms.items():
        for seed, rates in read_rates(sets, fraction, policy, prefetch).items():
            for link, rate in links.items():
                rows.append({"seed": seed, "arm": label, "link": link, **step(rates, rate)})
    return rows


def slower_on_every_link(rows, arm: str, reference: str) -> list[int]:
    """The seeds on which `arm`'s timeline tokens/s is below `reference`'s on every link."""
    speed = {(r["arm"], r["link"], r["seed"]): r["tokens_per_s"] for r in rows}
    links = dict.fromkeys(r["link"] for r in rows)
    return [
        seed
        for seed in dict.fromkeys(r["seed"] for r in rows)
        if all(speed[(arm, link, seed)] < speed[(reference, link, seed)] for link in links)
    ]


def timeline_table(rows) -> list[dict]:
    """Per (arm, link): t intervals over seeds of every `step` field."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        for link in dict.fromkeys(r["link"] for r in rows):
            mine = [r for r in rows if r["arm"] == arm and r["link"] == link]
            fields = ("tokens_per_s", "transfer_bound", "stalled", "experts_per_token")
            out.append(
                {
                    "arm": arm,
                    "link": link,
                    "compute_bound": mine[0]["compute_bound"],
                    **{f: t_interval([r[f] for r in mine]) for f in fields},
                }
            )
    return out


def plot_step(rates_by_arm: dict, link: str, layers: int = 6):
    """Gantt chart of the first `layers` sparse layers of one settled Q3-Omni decode step per
    arm ({label: (2, L) rates}) over `link`: compute, stalls and the link's transfers."""
    import matplotlib.pyplot as plt

    colors = {"attention": "C7", "experts": "C0", "stall": "C3", "demand": "C1", "ahead": "C2"}
    fig, axes = plt.subplots(len(rates_by_arm), 1, figsize=(10, 1.6 * len(rates_by_arm) + 0.8))
    axes = np.atleast_1d(axes)
    for ax, (label, rates) in zip(axes, rates_by_arm.items(), strict=True):
        out = _steps(rates, offloading.LINKS[link])
        t = TOKENS - 1
        mine = [e for e in out["events"] if e[0] == t and e[1] < layers]
        origin = min(e[3] for e in mine)
        for _, _, kind, start, end in mine:
            row = 1 if kind in ("demand", "ahead") else 0
            ax.barh(row, (end - start) * 1e3, left=(start - origin) * 1e3, color=colors[kind])
        ax.set_yticks([0, 1], ["GPU", "link"])
        ax.set_title(f"{label}: first {layers} of 48 layers of one decode step", fontsize=9)
    axes[-1].set_xlabel("ms from the step's start")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.suptitle(f"Q3-Omni over {link} (extrapolated from the default model's traces)")
    fig.legend(
        handles, list(colors), loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=len(colors)
    )
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    return fig
