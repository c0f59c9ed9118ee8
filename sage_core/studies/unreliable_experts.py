"""Experts known to be broken: a controlled test of what trust can do (notebook 07).

Ground truth is made, not guessed: in every sparse layer, `m` experts drawn among the most
used ones (measured on training-split routing of the clean model) get their `down_proj`
replaced by Gaussian noise of the same Frobenius norm, so each still writes a vector of
the usual size into the residual stream, only a meaningless one. Then, on held-out text:

- ppl_clean:   the clean model, router alone;
- ppl_corrupt: the corrupted model, router alone (the baseline);
- ppl_trust:   the corrupted model with trust learned on a training stream (rule "bias",
               `TrustLearner`, exactly the protocol of `sage_core.studies.experiments`).

`recovery_fraction` = (ppl_corrupt - ppl_trust) / (ppl_corrupt - ppl_clean): 0 when trust
does nothing, 1 when it recovers the clean model. `precision_at_m` asks whether the m
lowest-trust experts of a layer are the corrupted ones; chance is m / num_experts.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from sage_core.corpus import CONTEXTS, load_corpus
from sage_core.model.moe import ResidentExperts
from sage_core.notebook.progress import progress
from sage_core.studies import experiments as ex
from sage_core.trust import TrustLearner, TrustSelector, TrustTable

# --- which experts ------------------------------------------------------------------------


@torch.no_grad()
def expert_usage(model, samples) -> dict[int, torch.Tensor]:
    """{layer: (E,) int64}: how many (token, slot) choices of the model's own router went to
    each expert, over every position of every sample (prompt and continuation)."""
    device = model.model.embed_tokens.weight.device
    E = model.config.num_experts
    usage = {layer: torch.zeros(E, dtype=torch.int64) for layer in model.sparse_blocks()}
    if not usage:
        raise ValueError("the model holds no sparse (MoE) layer")
    model.set_selector(None)
    for s in samples:
        with model.routing_trace() as trace:
            model.hidden_states(torch.cat([s.prompt, s.continuation]).to(device)[None])
        for layer, calls in trace.items():
            for indices, _ in calls:
                usage[layer] += torch.bincount(indices.reshape(-1), minlength=E)
    return usage


def choose_corrupted(
    usage: dict[int, torch.Tensor], m: int, pool: int, seed: int
) -> dict[int, list[int]]:
    """Per layer, `m` experts drawn (seeded) among the `pool` most used (ties: lower index
    first). Returns {layer: sorted expert indices}."""
    chosen = {}
    for layer in sorted(usage):
        counts = usage[layer]
        E = counts.numel()
        if not 1 <= m <= pool <= E:
            raise ValueError(
                f"need 1 <= m <= pool <= num_experts, got m={m}, pool={pool}, num_experts={E}"
            )
        order = sorted(range(E), key=lambda e: (-int(counts[e]), e))
        rng = random.Random(f"{seed}:corrupt:{layer}")
        chosen[layer] = sorted(rng.sample(order[:pool], m))
    return chosen


# --- breaking them ------------------------------------------------------------------------


def _resident_experts(model, layer: int) -> ResidentExperts:
    blocks = model.sparse_blocks()
    if layer not in blocks:
        raise ValueError(
            f"layer {layer} is not a sparse layer of the model (sparse layers: {sorted(blocks)})"
        )
    experts = blocks[layer].experts
    if not isinstance(experts, ResidentExperts):
        raise ValueError(
            f"layer {layer}: experts are {type(experts).__name__}; corruption "
            "needs resident experts (load with max_resident_experts=None)"
        )
    return experts


@torch.no_grad()
def corrupt_experts(model, chosen: dict[int, list[int]], seed: int) -> dict:
    """Replace `down_proj` of the chosen experts, in place, by Gaussian noise rescaled to the
    same Frobenius norm. Noise comes from a torch.Generator seeded with `seed`, drawn in
    (layer, expert) order. Returns the original weights {(layer, expert): tensor}."""
    generator = torch.Generator().manual_seed(seed)
    originals = {}
    for layer in sorted(chosen):
        experts = _resident_experts(model, layer)
        for e in sorted(chosen[layer]):
            if not 0 <= e < experts.num_experts:
                raise ValueError(
                    f"layer {layer}: expert {e} out of range [0, {experts.num_experts})"
                )
            weight = experts.down_proj[e]
            originals[(layer, e)] = weight.detach().clone()
            noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
            norm = weight.detach().to(torch.float64).norm()
            weight.copy_((noise * (norm / noise.norm())).to(weight.dtype))
    return originals


@torch.no_grad()
def restore_experts(model, originals: dict) -> None:
    """Undo `corrupt_experts`."""
    for (layer, e), weight in originals.items():
        _resident_experts(model, layer).down_proj[e].copy_(weight)


@contextlib.contextmanager
def corrupted(model, chosen: dict[int, list[int]], seed: int):
    """`corrupt_experts` for the duration of a with-block; the clean weights come back after."""
    originals = corrupt_experts(model, chosen, seed)
    try:
        yield originals
    finally:
        restore_experts(model, originals)


# --- scores -------------------------------------------------------------------------------


def recovery_fraction(ppl_clean: float, ppl_corrupt: float, ppl_trust: float) -> float:
    """(ppl_corrupt - ppl_trust) / (ppl_corrupt - ppl_clean); undefined (ValueError) when the
    corruption did not raise perplexity."""
    for name, v in (
        ("ppl_clean", ppl_clean),
        ("ppl_corrupt", ppl_corrupt),
        ("ppl_trust", ppl_trust),
    ):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
    if not ppl_corrupt > ppl_clean:
        raise ValueError(
            f"corruption did not raise perplexity ({ppl_clean} -> {ppl_corrupt}); "
            "the recovery fraction is undefined"
        )
    return (ppl_corrupt - ppl_trust) / (ppl_corrupt - ppl_clean)


def expert_trust(table: TrustTable, layer: int) -> torch.Tensor:
    """(E,) trust deviation of one layer, averaged over contexts (corruption is
    context-free)."""
    return table.trust[table.layer_pos(layer)].mean(0) - table.prior


def lowest_trust(table: TrustTable, layer: int, m: int) -> list[int]:
    """The `m` experts of `layer` with the lowest trust (ties: lower index first)."""
    trust = expert_trust(table, layer).tolist()
    return sorted(range(len(trust)), key=lambda e: (trust[e], e))[:m]


def precision_at_m(predicted, corrupted_set) -> float:
    """|predicted ∩ corrupted| / |corrupted|, with |predicted| == |corrupted| == m."""
    predicted, corrupted_set = list(predicted), set(corrupted_set)
    if (
        not corrupted_set
        or len(predicted) != len(corrupted_set)
        or len(set(predicted)) != len(predicted)
    ):
        raise ValueError(
            f"need m distinct predictions for m corrupted experts, got "
            f"{len(predicted)} predictions for {len(corrupted_set)}"
        )
    return len(set(predicted) & corrupted_set) / len(corrupted_set)


@torch.no_grad()
def corrupted_share(
    model, samples, chosen, selector=None, context_source="label", assigner=None
) -> float:
    """Share of the routing weight, over every predicting position of the held-out
    continuations, that goes to corrupted experts (all layers pooled)."""
    model.set_selector(selector)
    total = corrupt = 0.0
    try:
        for s in samples:
            context = s.context if context_source == "label" else assigner.assign(model, s.prompt)
            if selector is not None:
                selector.context = context
            _, routing = ex.score_continuation(model, s, with_routing=True)
            for layer, dense in routing.items():
                total += float(dense.sum())
                corrupt += float(dense[:, chosen[layer]].sum())
    finally:
        model.set_selector(None)
    return corrupt / total


# --- the protocol -------------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptionProtocol:
    m: int = 2  # corrupted experts per layer
    pool: int = 8  # drawn among this many most used experts
    usage_per_context: int = 8  # training windows per context to measure usage on
    beta: float = 1.0
    learning_rate: float = 0.5
    baseline_momentum: float = 0.9
    num_updates: int = 90
    eval_every: int = 30
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    context_source: str = "label"
    classifier_mode: str = "supervised"
    classifier_per_context: int = 12
    heldout_per_context: int = 6
    prompt_tokens: int = 64
    continuation_tokens: int = 64

    def __post_init__(self):
        ex.check_run_settings(self.context_source, self.seeds)
        if not 1 <= self.m <= self.pool:
            raise ValueError(f"need 1 <= m <= pool, got m={self.m}, pool={self.pool}")
        if self.num_updates < 1 or self.eval_every < 1:
            raise ValueError(
                f"num_updates and eval_every must be >= 1, got "
                f"{self.num_updates}, {self.eval_every}"
            )

    def eval_steps(self) -> list[int]:
        return ex.eval_schedule(self.num_updates, self.eval_every)


def _ppl(rows) -> float:
    return ex.perplexity_by_context(rows)[ex.ALL]["perplexity"]


def run_corruption(
    model,
    tokenizer,
    protocol: CorruptionProtocol,
    corpus=None,
    show_progress: bool = True,
    desc: str = "corruption",
) -> dict[str, list]:
    """For each seed: measure usage on the clean model, corrupt m experts per layer, score
    the router alone clean and corrupted, learn trust on the corrupted model, score it.

    Returns {"seeds": one row per seed (perplexities, recovery, precision@m, routing share
    of corrupted experts), "curve": held-out perplexity of the trust arm per eval step,
    "experts": one row per (seed, layer, expert): usage, corrupted, final trust}.
    The model's weights are restored on return.
    """
    corpus = corpus or load_corpus()
    steps = protocol.eval_steps()
    E = model.config.num_experts
    per_stream_context = math.ceil(protocol.num_updates / len(CONTEXTS))
    seed_rows, curve, expert_rows = [], [], []
    bar = progress(
        total=len(protocol.seeds) * (protocol.num_updates + len(steps)),
        desc=desc,
        disable=not show_progress,
    )
    try:
        for seed in protocol.seeds:
            torch.manual_seed(seed)
            sample = {
                "prompt_tokens": protocol.prompt_tokens,
                "continuation_tokens": protocol.continuation_tokens,
                "seed": seed,
                "corpus": corpus,
            }
            heldout = ex.make_samples(
                tokenizer, "heldout", protocol.heldout_per_context, stream="eval", **sample
            )
            stream = ex.make_samples(
                tokenizer, "train", per_stream_context, stream="trust", **sample
            )
            random.Random(f"{seed}:stream-order").shuffle(stream)
            stream = stream[: protocol.num_updates]
            usage = expert_usage(
                model,
                ex.make_samples(
                    tokenizer, "train", protocol.usage_per_context, stream="usage", **sample
                ),
            )
            chosen = choose_corrupted(usage, protocol.m, protocol.pool, seed)
            assigner = None
            if protocol.context_source == "classifier":
                fit_on = ex.make_samples(
                    tokenizer,
                    "train",
                    protocol.classifier_per_context,
                    stream="classifier",
                    **sample,
                )
                assigner = ex.ContextAssigner.fit(model, fit_on, protocol.classifier_mode, seed)

            ppl_clean = _ppl(ex.evaluate(model, heldout))
            share_clean = corrupted_share(model, heldout, chosen)
            with corrupted(model, chosen, seed):
                ppl_corrupt = _ppl(ex.evaluate(model, heldout))
                table = TrustTable.for_model(model, CONTEXTS)
                selector = TrustSelector.for_model(model, table, rule="bias", beta=protocol.beta)
                learner = TrustLearner(table, protocol.learning_rate, protocol.baseline_momentum)
                for step in range(protocol.num_updates + 1):
                    if step in steps:
                        rows = ex.evaluate(
                            model, heldout, selector, protocol.context_source, assigner
                        )
                        curve.append(
                            {
                                "seed": seed,
                                "step": step,
                                "perplexity": _ppl(rows),
                                "ppl_clean": ppl_clean,
                                "ppl_corrupt": ppl_corrupt,
                            }
                        )
                        bar.update(1)
                    if step == protocol.num_updates:
                        break
                    s = stream[step]
                    context = s.context if assigner is None else assigner.assign(model, s.prompt)
                    selector.context = context
                    model.set_selector(selector)
                    try:
                        nll, routing = ex.score_continuation(model, s, with_routing=True)
                    finally:
                        model.set_selector(None)
                    learner.update(context, nll, routing)
                    bar.update(1)
                ppl_trust = curve[-1]["perplexity"]
                share_router = corrupted_share(model, heldout, chosen)
                share_trust = corrupted_share(
                    model, heldout, chosen, selector, protocol.context_source, assigner
                )
            precisions = {
                layer: precision_at_m(lowest_trust(table, layer, protocol.m), chosen[layer])
                for layer in sorted(chosen)
            }
            seed_rows.append(
                {
                    "seed": seed,
                    "m": protocol.m,
                    "num_experts": E,
                    "ppl_clean": ppl_clean,
                    "ppl_corrupt": ppl_corrupt,
                    "ppl_trust": ppl_trust,
                    "recovery": (
                        recovery_fraction(ppl_clean, ppl_corrupt, ppl_trust)
                        if ppl_corrupt > ppl_clean
                        else math.nan
                    ),
                    "precision_at_m": float(np.mean(list(precisions.values()))),
                    "precision_by_layer": precisions,
                    "chance": protocol.m / E,
                    "share_clean_router": share_clean,
                    "share_corrupt_router": share_router,
                    "share_corrupt_trust": share_trust,
                }
            )
            for layer in sorted(chosen):
                trust = expert_trust(table, layer)
                expert_rows += [
                    {
                        "seed": seed,
                        "layer": layer,
                        "expert": e,
                        "usage": int(usage[layer][e]),
                        "corrupted": e in chosen[layer],
                        "trust": float(trust[e]),
                    }
                    for e in range(E)
                ]
    finally:
        bar.close()
        model.set_selector(None)
    return {"seeds": seed_rows, "curve": curve, "experts": expert_rows}


# --- figures ------------------------------------------------------------------------------


def plot_recovery(curve: list[dict], seed: int = 0):
    """Left: held-out perplexity of the trust arm per update step (mean over seeds, bootstrap
    95% band), against the clean and the corrupted model with the router alone. Right: the
    recovery fraction per step, paired per seed, with its band (0: nothing recovered, 1:
    the clean model)."""
    import matplotlib.pyplot as plt

    steps = sorted({r["step"] for r in curve})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    cis = [
        ex.bootstrap_ci([r["perplexity"] for r in curve if r["step"] == s], seed=seed)
        for s in steps
    ]
    left.plot(
        steps,
        [c["mean"] for c in cis],
        color="C0",
        marker="o",
        ms=3,
        label="corrupted, trust (rule bias)",
    )
    left.fill_between(
        steps, [c["low"] for c in cis], [c["high"] for c in cis], color="C0", alpha=0.2, lw=0
    )
    first = {r["seed"]: r for r in curve if r["step"] == steps[0]}
    for key, color, label in (
        ("ppl_corrupt", "C3", "corrupted, router alone"),
        ("ppl_clean", "0.3", "clean, router alone"),
    ):
        ci = ex.bootstrap_ci([r[key] for r in first.values()], seed=seed)
        left.axhline(ci["mean"], color=color, ls="--", lw=1, label=label)
        left.axhspan(ci["low"], ci["high"], color=color, alpha=0.12, lw=0)
    left.set_ylabel("held-out perplexity")
    left.legend(frameon=False, fontsize=8, loc="center right")

    fractions = [
        ex.bootstrap_ci(
            [
                recovery_fraction(r["ppl_clean"], r["ppl_corrupt"], r["perplexity"])
                for r in curve
                if r["step"] == s
            ],
            seed=seed,
        )
        for s in steps
    ]
    right.axhline(0, color="C3", ls="--", lw=1, label="corrupted (nothing recovered)")
    right.axhline(1, color="0.3", ls="--", lw=1, label="clean (all recovered)")
    right.plot(steps, [c["mean"] for c in fractions], color="C0", marker="o", ms=3, label="trust")
    right.fill_between(
        steps,
        [c["low"] for c in fractions],
        [c["high"] for c in fractions],
        color="C0",
        alpha=0.2,
        lw=0,
    )
    right.set_ylabel("recovery fraction")
    right.legend(frameon=False, fontsize=8, loc="center right")
    for ax in (left, right):
        ax.set_xlabel("trust updates (training windows)")
    fig.tight_layout()
    return fig


def plot_expert_trust(expert_rows: list[dict], seed: int):
    """One seed: final trust (nats, mean over contexts) per expert and layer, corrupted
    experts marked."""
    import matplotlib.pyplot as plt

    rows = [r for r in expert_rows if r["seed"] == seed]
    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(
        len(layers), 1, figsize=(7, 1.2 + 1.3 * len(layers)), sharex=True, squeeze=False
    )
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        chosen = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["expert"])
        ax.bar(
            [r["expert"] for r in chosen],
            [r["trust"] for r in chosen],
            color=["C3" if r["corrupted"] else "0.6" for r in chosen],
        )
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_ylabel(f"layer {layer}", fontsize=8)
    axes[0, 0].set_title(
        f"seed {seed}: trust - prior (nats) per expert; red: corrupted", fontsize=9
    )
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    return fig
