"""What notebooks 05 and 07 share: the trust arms, one training loop at equal compute,
batched scoring, breakage of experts, and per-seed scores.

Every arm sees the same inputs: per seed, one stream of training-split windows (a prompt
and its real continuation, in mixed contexts) and one fixed set of held-out windows. Every
learning arm is trained on that stream to the same compute budget, counted in forward
equivalents (a sequence forward counts 1, a backward pass FORWARD_PER_BACKWARD), and
scored at the same checkpoints (`Arms.train_to`, `run_seed`). The arms (`ARMS`):

- "router": the model's own top-k; nothing is learned.
- "oracle": rule "exclude" with the truth, i.e. exactly the broken experts of each
  context removed (`OracleSelector`); on a healthy model it is the router.
- "counterfactual": `CounterfactualLearner` evidence per (context, layer, expert) and rule
  "exclude" (the library's default trust).
- "counterfactual_context_free": the same with one pooled context for every window.
- "routing_weighted": the previous default, `TrustLearner` (routing-weighted advantage)
  with rule "bias".
- "report": the report's rule ("report") and update (`report_update`).
- "learned_bias": a per-(context, layer, expert) router-logit bias fitted by Adam with an
  L2 pull to zero (`LearnedBiasLearner`).
- "attribution": every served cell's harm estimated from one forward and one backward
  pass, the most suspect cells verified by real ablations, rule "exclude" on the verified
  evidence only (`AttributionLearner`).

Contexts are the corpus labels: this separates trust from classifier errors (the
classifier's own accuracy is measured in `classifier_validation`).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from sage_core.corpus import CONTEXTS, load_corpus
from sage_core.dtypes.quantize import GROUP_SIZE, fake_quantize, float8_unscaled
from sage_core.model.moe import ResidentExperts
from sage_core.notebook.progress import progress
from sage_core.studies import statistics
from sage_core.studies.experiments import Sample, ValidationCorpus, make_samples
from sage_core.studies.report_protocol import report_quality, report_update
from sage_core.studies.statistics import t_interval
from sage_core.trust import (
    REPORT_PRIOR,
    AttributionLearner,
    CounterfactualLearner,
    LearnedBiasLearner,
    LearnedBiasSelector,
    OracleSelector,
    TrustLearner,
    TrustSelector,
    TrustTable,
    continuation_nll,
    dense_routing,
)

ARMS = (
    "router",
    "oracle",
    "counterfactual",
    "counterfactual_context_free",
    "routing_weighted",
    "report",
    "learned_bias",
    "attribution",
    "attribution_true_ranking",
)
POOLED = "any"  # the one context of context-free trust
KINDS = ("noise", "sign_flip", "int2", "int3", "int4", "float8")
BROKEN_PROJECTIONS = {  # which weights of a broken expert each kind of breakage changes
    "noise": ("down_proj",),
    "sign_flip": ("down_proj",),
    **{kind: ("gate_up_proj", "down_proj") for kind in ("int2", "int3", "int4", "float8")},
}


@dataclass(frozen=True)
class ArmSettings:
    """Hyperparameters of the learning arms. The defaults of the tuned fields are the
    choice of `python -m sage_core.studies.tuning` on the tuning seeds
    (tables/tuning_choice.json; a test checks they agree); batch sizes and the
    counterfactual arm's `ablations_per_window` (the unit of the budget) are fixed."""

    ablations_per_window: int = 12
    explore: float = 0.0  # the counterfactual arm's optimism (SEs) in choosing cells
    harm_alpha: float = 0.05  # exclude at this false discovery rate (Benjamini-Hochberg)
    min_ablations: int = 3
    beta: float = 1.0  # routing_weighted
    learning_rate: float = 0.5  # routing_weighted
    baseline_momentum: float = 0.9  # routing_weighted
    report_learning_rate: float = 0.1
    bias_learning_rate: float = 0.1  # learned_bias (Adam)
    bias_l2: float = 0.0
    bias_batch: int = 8  # learned_bias: windows per Adam step
    scored_batch: int = 8  # routing_weighted and report: windows scored per forward
    verify_per_window: int = 2  # attribution: real ablations per window
    attribution_batch: int = 8  # attribution: windows per forward + backward


# --- breaking experts -----------------------------------------------------------------------


def resident_experts(model, layer: int) -> ResidentExperts:
    blocks = model.sparse_blocks()
    if layer not in blocks:
        raise ValueError(f"layer {layer} is not a sparse layer (sparse layers: {sorted(blocks)})")
    experts = blocks[layer].experts
    if not isinstance(experts, ResidentExperts):
        raise ValueError(
            f"layer {layer}: experts are {type(experts).__name__}; breaking experts needs "
            "resident experts (load with max_resident_experts=None)"
        )
    return experts


class Breakage:
    """Broken weights for `chosen` {layer: [experts]}, applied only while scoring windows
    of `contexts` (None: every context).

    kind "noise": `down_proj` replaced by Gaussian noise rescaled to the weight's Frobenius
    norm (seeded by `seed`, drawn in (layer, expert) order): a vector of the usual size,
    meaningless.
    kind "sign_flip": `down_proj` negated: the expert writes the opposite of its output.
    kinds "int2", "int3", "int4": both projections stored at that many bits and read back
    (`dtypes.quantize.fake_quantize`, groups of 64, float16 scale and zero): the damage is
    whatever quantisation does.
    kind "float8": both projections cast through float8_e4m3fn without a scale.
    """

    def __init__(self, model, chosen: dict, kind: str = "noise", seed: int = 0, contexts=None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        unknown = set(contexts or ()) - set(CONTEXTS)
        if unknown:
            raise ValueError(f"unknown contexts {sorted(unknown)}; contexts are {CONTEXTS}")
        self.model = model
        self.chosen = {int(k): sorted(int(e) for e in v) for k, v in chosen.items()}
        self.kind = kind
        self.contexts = None if contexts is None else tuple(contexts)
        generator = torch.Generator().manual_seed(seed)
        self.clean, self.broken = {}, {}  # {(layer, expert, projection name): weight}
        for layer in sorted(self.chosen):
            experts = resident_experts(model, layer)
            for e in self.chosen[layer]:
                if not 0 <= e < experts.num_experts:
                    raise ValueError(f"layer {layer}: expert {e} out of range")
                for name in BROKEN_PROJECTIONS[kind]:
                    weight = getattr(experts, name)[e].detach()
                    self.clean[(layer, e, name)] = weight.clone()
                    self.broken[(layer, e, name)] = _broken_weight(weight, kind, generator)

    def applies_to(self, context: str) -> bool:
        return self.contexts is None or context in self.contexts

    def broken_by_context(self) -> dict:
        """{context: {layer: [experts]}}: what the oracle excludes."""
        return {c: self.chosen for c in CONTEXTS if self.applies_to(c)}

    def _write(self, weights: dict) -> None:
        with torch.no_grad():
            for (layer, e, name), w in weights.items():
                getattr(resident_experts(self.model, layer), name)[e].copy_(w)

    @contextlib.contextmanager
    def active(self, context: str | None):
        """Broken weights inside the block when `context` is broken (None: clean)."""
        on = context is not None and self.applies_to(context)
        self._write(self.broken if on else self.clean)
        try:
            yield on
        finally:
            self._write(self.clean)


def _broken_weight(weight: torch.Tensor, kind: str, generator) -> torch.Tensor:
    if kind == "noise":
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        scale = weight.to(torch.float64).norm() / noise.norm()
        return (noise * scale).to(weight.dtype)
    if kind == "sign_flip":
        return -weight.clone()
    if kind == "float8":
        return float8_unscaled(weight)
    # Groups of 64 inputs, or of a divisor of a smaller model's width (the test models).
    group_size = math.gcd(GROUP_SIZE, weight.shape[-1])
    return fake_quantize(weight, bits=int(kind.removeprefix("int")), group_size=group_size)


@torch.no_grad()
def expert_usage(model, samples: list[Sample]) -> dict[int, torch.Tensor]:
    """{layer: (E,) int64}: (token, slot) choices of the router per expert over every
    position of `samples`, on the model as it is."""
    E = model.config.num_experts
    usage = {layer: torch.zeros(E, dtype=torch.int64) for layer in model.sparse_blocks()}
    model.set_selector(None)
    device = model.model.embed_tokens.weight.device
    for s in samples:
        with model.routing_trace() as trace:
            model.hidden_states(torch.cat([s.prompt, s.continuation]).to(device)[None])
        for layer, calls in trace.items():
            usage[layer] += torch.bincount(calls[0][0].reshape(-1), minlength=E)
    return usage


def choose_broken(usage: dict, m: int, pool: int, seed: int) -> dict[int, list[int]]:
    """Per layer, `m` experts drawn (seeded) among the `pool` most used (ties: lower index)."""
    chosen = {}
    for layer in sorted(usage):
        counts = usage[layer]
        if not 1 <= m <= pool <= counts.numel():
            raise ValueError(f"need 1 <= m <= pool <= num_experts, got m={m}, pool={pool}")
        order = sorted(range(counts.numel()), key=lambda e: (-int(counts[e]), e))
        chosen[layer] = sorted(random.Random(f"{seed}:corrupt:{layer}").sample(order[:pool], m))
    return chosen


# --- scoring ------------------------------------------------------------------------------


@torch.no_grad()
def score_windows(model, windows: list[Sample], selector=None, breakage=None, pooled=False):
    """One row per window: NLL sum and token count of its continuation, under `selector`
    (None: the router) with its context set to the window's label (or POOLED). Windows are
    scored in one batch per context, with `breakage` applied to broken contexts."""
    device = model.model.embed_tokens.weight.device
    rows: list[dict | None] = [None] * len(windows)
    model.set_selector(selector)
    try:
        for context in CONTEXTS:
            group = [i for i, w in enumerate(windows) if w.context == context]
            if not group:
                continue
            lengths = {(windows[i].prompt.numel(), windows[i].continuation.numel()) for i in group}
            if len(lengths) != 1:
                raise ValueError(f"windows of one batch must share their lengths, got {lengths}")
            P = windows[group[0]].prompt.numel()
            ids = torch.stack(
                [torch.cat([windows[i].prompt, windows[i].continuation]) for i in group]
            )
            if selector is not None:
                selector.context = [POOLED if pooled else context] * len(group)
            with breakage.active(context) if breakage else contextlib.nullcontext():
                nll = continuation_nll(model, ids.to(device), P).double().cpu()
            for row, i in enumerate(group):
                rows[i] = {
                    "window": i,
                    "context": context,
                    "nll_sum": float(nll[row].sum()),
                    "tokens": int(nll.shape[1]),
                }
    finally:
        model.set_selector(None)
    return rows


def perplexity(rows, context: str | None = None) -> float:
    """exp(total NLL / total tokens) over rows (of one context, or all)."""
    chosen = [r for r in rows if context in (None, r["context"])]
    return math.exp(sum(r["nll_sum"] for r in chosen) / sum(r["tokens"] for r in chosen))


# --- one training loop for every arm, at equal compute ---------------------------------------

FORWARD_PER_BACKWARD = 2  # a backward pass costs about two forwards (twice the matmuls)
CHECKPOINTS = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # fractions of the budget scored


def forward_equivalents(forward: int, backward: int) -> int:
    """Training compute in sequence forwards, a backward pass counting FORWARD_PER_BACKWARD."""
    return forward + FORWARD_PER_BACKWARD * backward


def budget_of(num_windows: int, settings: ArmSettings) -> int:
    """The compute budget per seed, in forward equivalents: what the counterfactual arm
    spends on `num_windows` windows at most (one base and `ablations_per_window` ablated
    sequences each). Every arm gets the same."""
    return num_windows * (1 + settings.ablations_per_window)


class TrueRankingLearner(AttributionLearner):
    """`AttributionLearner` told which cells are broken (`broken` {context: {layer:
    [experts]}}): it verifies broken cells first, in the attribution arm's own order
    (harm measured so far, else estimated), healthy cells only when no broken one is left
    to verify. The same verification and the same rule to exclude: its recovery at a
    budget is what a perfect broken-or-healthy classifier on top of the estimate would
    buy there; what it still lacks is the cost of verifying."""

    def __init__(self, table: TrustTable, broken: dict, *verification):
        super().__init__(table, *verification)
        self.broken = broken

    def choose_cells(self, context, candidates, decided=None):
        if decided is None:
            decided = self.decided(context)
        truth = torch.zeros_like(candidates)
        for li, layer in enumerate(self.table.layers):
            truth[li, self.broken.get(context, {}).get(layer, [])] = True
        first = super().choose_cells(context, candidates & truth & ~decided, decided)
        rest = super().choose_cells(context, candidates & ~truth, decided)
        return (first + rest)[: self.ablations_per_window]


class Arms:
    """The learning arms of one seed, each trained on one stream of windows to a common
    compute budget (`train_to`). An arm takes steps of known maximal cost and stops before
    a step would exceed the budget; an arm that has used up the stream starts it again
    (epochs). A step of the counterfactual arm is one window; of the learned bias, one Adam
    step on `bias_batch` windows; of the routing-weighted and report arms, `scored_batch`
    windows scored in one forward, then credited one by one. The windows of one step run
    in one batch (one per context when the breakage is scoped to some contexts)."""

    def __init__(self, model, arms, settings: ArmSettings, breakage=None):
        unknown = set(arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; arms are {ARMS}")
        self.model, self.arms, self.settings, self.breakage = model, tuple(arms), settings, breakage
        s = settings
        self.selectors, self.learners = {}, {}
        self.passes = {arm: {"forward": 0, "backward": 0, "windows": 0} for arm in self.arms}
        self.seconds = dict.fromkeys(self.arms, 0.0)  # wall time spent training each arm
        self.cursor = dict.fromkeys(self.arms, 0)
        top = {"harm_alpha": s.harm_alpha, "min_ablations": s.min_ablations}
        for arm in self.arms:
            if arm == "router":
                self.selectors[arm] = None
            elif arm == "oracle":
                table = TrustTable.for_model(model, CONTEXTS)
                c = model.config
                broken = breakage.broken_by_context() if breakage else {}
                self.selectors[arm] = OracleSelector(
                    table, c.num_experts_per_tok, c.norm_topk_prob, broken
                )
            elif arm.startswith("counterfactual"):
                pooled = arm == "counterfactual_context_free"
                table = TrustTable.for_model(model, [POOLED] if pooled else CONTEXTS)
                self.selectors[arm] = TrustSelector.for_model(model, table, rule="exclude", **top)
                self.learners[arm] = CounterfactualLearner(
                    table, s.ablations_per_window, s.harm_alpha, s.explore, s.min_ablations
                )
            elif arm == "routing_weighted":
                table = TrustTable.for_model(model, CONTEXTS)
                self.selectors[arm] = TrustSelector.for_model(
                    model, table, rule="bias", beta=s.beta
                )
                self.learners[arm] = TrustLearner(table, s.learning_rate, s.baseline_momentum)
            elif arm.startswith("attribution"):
                table = TrustTable.for_model(model, CONTEXTS)
                self.selectors[arm] = TrustSelector.for_model(model, table, rule="exclude", **top)
                verification = (s.verify_per_window, s.harm_alpha, s.min_ablations)
                if arm == "attribution":
                    self.learners[arm] = AttributionLearner(table, *verification)
                else:
                    broken = breakage.broken_by_context() if breakage else {}
                    self.learners[arm] = TrueRankingLearner(table, broken, *verification)
            elif arm == "report":
                table = TrustTable.for_model(model, CONTEXTS, prior=REPORT_PRIOR)
                self.selectors[arm] = TrustSelector.for_model(model, table, rule="report")
            else:
                selector = LearnedBiasSelector.for_model(model, CONTEXTS)
                self.selectors[arm] = selector
                self.learners[arm] = LearnedBiasLearner(selector, s.bias_learning_rate, s.bias_l2)

    def step_cost(self, arm: str) -> int:
        """The most forward equivalents one step of `arm` can cost (0: it does not learn)."""
        s = self.settings
        if arm.startswith("counterfactual"):
            return 1 + s.ablations_per_window
        if arm == "learned_bias":
            return forward_equivalents(s.bias_batch, s.bias_batch)
        if arm.startswith("attribution"):
            batch = s.attribution_batch
            return forward_equivalents(batch * (1 + s.verify_per_window), batch)
        if arm in ("routing_weighted", "report"):
            return s.scored_batch
        return 0

    def spent(self, arm: str) -> int:
        return forward_equivalents(self.passes[arm]["forward"], self.passes[arm]["backward"])

    def train_to(self, stream: list[Sample], budget: int) -> None:
        """Every learning arm takes steps while the next one fits within `budget`."""
        for arm in self.arms:
            cost = self.step_cost(arm)
            while cost and self.spent(arm) + cost <= budget:
                start = time.perf_counter()
                self._step(arm, stream)
                self.seconds[arm] += time.perf_counter() - start

    def _take(self, arm: str, stream: list[Sample], count: int) -> list[Sample]:
        start = self.cursor[arm]
        self.cursor[arm] += count
        self.passes[arm]["windows"] += count
        return [stream[(start + i) % len(stream)] for i in range(count)]

    def _batches(self, windows: list[Sample]):
        """(contexts, (B, S) ids, breakage scope): the windows in one batch, or one batch
        per context when the breakage applies to some contexts only."""
        one_scope = self.breakage is None or self.breakage.contexts is None
        groups = (
            [windows] if one_scope else [[w for w in windows if w.context == c] for c in CONTEXTS]
        )
        for group in groups:
            if group:
                ids = torch.stack([torch.cat([w.prompt, w.continuation]) for w in group])
                context = group[0].context
                scope = self.breakage.active(context) if self.breakage else contextlib.nullcontext()
                yield [w.context for w in group], ids, scope

    def _step(self, arm: str, stream: list[Sample]) -> None:
        s, passes = self.settings, self.passes[arm]
        if arm.startswith("counterfactual"):
            (window,) = self._take(arm, stream, 1)
            key = POOLED if arm == "counterfactual_context_free" else window.context
            learner = self.learners[arm]
            before = learner.sequence_forwards
            with (
                self.breakage.active(window.context) if self.breakage else contextlib.nullcontext()
            ):
                learner.update(self.model, window.prompt, window.continuation, key)
            passes["forward"] += learner.sequence_forwards - before
        elif arm.startswith("attribution"):
            windows = self._take(arm, stream, s.attribution_batch)
            learner = self.learners[arm]
            forwards, backwards = learner.sequence_forwards, learner.sequence_backwards
            for contexts, ids, scope in self._batches(windows):
                with scope:
                    learner.update_batch(self.model, ids, contexts)
            passes["forward"] += learner.sequence_forwards - forwards
            passes["backward"] += learner.sequence_backwards - backwards
        elif arm == "learned_bias":
            windows = self._take(arm, stream, s.bias_batch)
            learner = self.learners[arm]
            for contexts, ids, scope in self._batches(windows):
                with scope:
                    learner.accumulate(self.model, ids, contexts, len(contexts) / len(windows))
            learner.step()
            passes["forward"] += len(windows)
            passes["backward"] += len(windows)
        else:
            windows = self._take(arm, stream, s.scored_batch)
            for contexts, ids, scope in self._batches(windows):
                with scope:
                    self._train_scored(arm, ids, contexts)
            passes["forward"] += len(windows)

    @torch.no_grad()
    def _train_scored(self, arm: str, ids: torch.Tensor, contexts: list[str]) -> None:
        """The previous protocol, batched: score (B, S) windows (sequence b in contexts[b])
        with the arm's selector active, then credit them one by one (every next-token
        prediction)."""
        selector = self.selectors[arm]
        selector.context = list(contexts)
        device = self.model.model.embed_tokens.weight.device
        B, S = ids.shape
        self.model.set_selector(selector)
        try:
            with self.model.routing_trace() as trace:
                nll = continuation_nll(self.model, ids.to(device), 1).cpu()  # (B, S - 1)
        finally:
            self.model.set_selector(None)
        E = self.model.config.num_experts
        for b in range(B):
            if arm == "report":
                quality = report_quality(math.exp(float(nll[b].mean())))
                report_update(
                    selector.table,
                    contexts[b],
                    quality,
                    learning_rate=self.settings.report_learning_rate,
                )
                continue
            routing = {}
            for layer, calls in trace.items():
                indices, weights = calls[0]
                k = indices.shape[-1]
                # (B * S, k) -> (B, S, k): the positions 0 .. S - 2 predict the scored tokens
                routing[layer] = dense_routing(
                    indices.reshape(B, S, k)[b, :-1], weights.reshape(B, S, k)[b, :-1], E
                )
            self.learners[arm].update(contexts[b], nll[b], routing)


def forced_exclusion_selector(model, selector: TrustSelector, per_layer: int, broken=None):
    """An oracle-style selector that excludes, per (context, layer), the `per_layer`
    healthy experts (not in `broken` {context: {layer: [experts]}}) with the smallest
    p-values of harm in `selector`'s table: what excluding the most suspected healthy
    experts would cost, whatever the test decided (a bound on the cost of false
    exclusions)."""
    table = selector.table
    p = table.harm_p_values()
    chosen = {}
    for context in table.contexts:
        ci = table.context_pos(context)
        chosen[context] = {}
        for li, layer in enumerate(table.layers):
            bad = set((broken or {}).get(context, {}).get(layer, []))
            order = sorted(
                (e for e in range(table.num_experts) if e not in bad),
                key=lambda e: (float(p[li, ci, e]), -float(table.harm_mean[li, ci, e]), e),
            )
            chosen[context][layer] = order[:per_layer]
    c = model.config
    return OracleSelector(table, c.num_experts_per_tok, c.norm_topk_prob, chosen)


def run_seed(
    model,
    tokenizer,
    seed: int,
    arms,
    settings: ArmSettings,
    num_windows: int,
    heldout_per_context: int,
    prompt_tokens: int,
    continuation_tokens: int,
    breakage_spec: dict | None = None,
    corpus=None,
    checkpoints=CHECKPOINTS,
    forced_per_layer: int = 0,
) -> dict:
    """One seed: held-out windows, a stream of `num_windows` training windows, optional
    breakage; every arm trained on the stream to each checkpoint (a fraction of
    `budget_of(num_windows, settings)` forward equivalents) and scored there on the
    held-out windows.

    breakage_spec: {"m", "pool", "kind", "contexts"} or None (healthy model).
    forced_per_layer > 0 adds the arm "counterfactual_forced" at the last checkpoint
    (`forced_exclusion_selector` of the counterfactual arm). Returns {"rows": one row per
    (checkpoint, arm, context incl. "all"), "arms": the trained Arms, "breakage",
    "clean": the clean model's rows}."""
    fractions = sorted(set(float(f) for f in checkpoints))
    if not fractions or fractions[0] < 0 or fractions[-1] > 1:
        raise ValueError(
            f"checkpoints must be fractions of the budget in [0, 1], got {checkpoints}"
        )
    corpus = corpus or load_corpus()
    kw = {"prompt_tokens": prompt_tokens, "continuation_tokens": continuation_tokens}
    kw.update(seed=seed, corpus=corpus)
    heldout = make_samples(tokenizer, "heldout", heldout_per_context, stream="eval", **kw)
    per_context = max(1, math.ceil(num_windows / len(CONTEXTS)))
    stream = make_samples(tokenizer, "train", per_context, stream="trust", **kw)
    random.Random(f"{seed}:stream-order").shuffle(stream)
    stream = stream[:num_windows]
    breakage = None
    if breakage_spec is not None:
        usage = expert_usage(model, stream)
        chosen = choose_broken(usage, breakage_spec["m"], breakage_spec["pool"], seed)
        breakage = Breakage(
            model, chosen, breakage_spec["kind"], seed, breakage_spec.get("contexts")
        )
    torch.manual_seed(seed)
    trained = Arms(model, arms, settings, breakage)
    budget = budget_of(num_windows, settings)
    clean = score_windows(model, heldout)
    fixed = {}  # the router and the oracle do not learn: scored once
    rows = []

    exclusions = []

    def record(arm, scored, target, paid_by=None):
        passes = trained.passes[paid_by or arm]
        for context in (*CONTEXTS, None):
            rows.append(
                {
                    "seed": seed,
                    "arm": arm,
                    "context": context or "all",
                    "budget": target,
                    "forward_equivalents": trained.spent(paid_by or arm),
                    "forward": passes["forward"],
                    "backward": passes["backward"],
                    "windows": passes["windows"],
                    # wall time: the one field that varies from run to run
                    "train_seconds": trained.seconds[paid_by or arm],
                    "perplexity": perplexity(scored, context),
                    "clean_perplexity": perplexity(clean, context),
                }
            )

    for fraction in fractions:
        target = round(fraction * budget)
        trained.train_to(stream, target)
        for arm in trained.arms:
            pooled = arm == "counterfactual_context_free"
            if arm not in fixed:
                scored = score_windows(model, heldout, trained.selectors[arm], breakage, pooled)
                if not trained.step_cost(arm):
                    fixed[arm] = scored
            record(arm, fixed.get(arm) or scored, target)
        exclusions += exclusion_records(trained, breakage, seed, target)
    if forced_per_layer and "counterfactual" in trained.arms:
        broken = breakage.broken_by_context() if breakage else {}
        forced = forced_exclusion_selector(
            model, trained.selectors["counterfactual"], forced_per_layer, broken
        )
        scored = score_windows(model, heldout, forced, breakage)
        record("counterfactual_forced", scored, target, paid_by="counterfactual")
    return {
        "rows": rows,
        "exclusions": exclusions,
        "cells": cell_records(trained, breakage, seed),
        "arms": trained,
        "breakage": breakage,
        "clean": clean,
    }


EXCLUDING_ARMS = (
    "counterfactual",
    "counterfactual_context_free",
    "attribution",
    "attribution_true_ranking",
)


def _excluding_arms(trained: Arms, breakage):
    """(arm, its selector, context, key in its table, broken {layer: experts} in that
    context) for every arm that excludes on ablation evidence, and every context."""
    for arm in trained.arms:
        if arm in EXCLUDING_ARMS:
            for context in CONTEXTS:
                key = POOLED if arm == "counterfactual_context_free" else context
                broken = breakage.broken_by_context().get(context, {}) if breakage else {}
                yield arm, trained.selectors[arm], context, key, broken


def exclusion_records(trained: Arms, breakage, seed: int, budget: int) -> list[dict]:
    """One row per (counterfactual arm, context, layer): the experts it excludes now, the
    broken ones, the healthy ones excluded (false exclusions) and precision@m."""
    out = []
    for arm, selector, context, key, broken in _excluding_arms(trained, breakage):
        excluded = excluded_experts(selector, key)
        alpha = selector.harm_alpha
        precision = precision_at_m(selector.table, key, broken, alpha) if broken else math.nan
        for layer in selector.table.layers:
            wrong = [e for e in excluded[layer] if e not in broken.get(layer, [])]
            out.append(
                {
                    "seed": seed,
                    "arm": arm,
                    "context": context,
                    "layer": layer,
                    "budget": budget,
                    "excluded": excluded[layer],
                    "broken": broken.get(layer, []),
                    "false_exclusions": len(wrong),
                    "precision_at_m": precision,
                }
            )
    return out


def cell_records(trained: Arms, breakage, seed: int) -> list[dict]:
    """One row per (counterfactual arm, context, layer, expert) measured at least twice:
    its ablation count, mean harm, one-sided p-value of "harm > 0" in its context, and
    whether it is broken (for calibration: healthy cells' p-values should not be smaller
    than uniform ones)."""
    out = []
    for arm, selector, context, key, broken in _excluding_arms(trained, breakage):
        table = selector.table
        ci = table.context_pos(key)
        p = table.harm_p_values()
        for li, layer in enumerate(table.layers):
            for e in range(table.num_experts):
                n = int(table.harm_count[li, ci, e])
                if n >= 2:
                    out.append(
                        {
                            "seed": seed,
                            "arm": arm,
                            "context": context,
                            "layer": layer,
                            "expert": e,
                            "count": n,
                            "harm": float(table.harm_mean[li, ci, e]),
                            "p": float(p[li, ci, e]),
                            "broken": e in broken.get(layer, []),
                        }
                    )
    return out


def excluded_experts(selector: TrustSelector, context: str) -> dict[int, list[int]]:
    """{layer: experts rule "exclude" removes} for one context."""
    return {
        layer: selector.excluded(layer, context).nonzero().flatten().tolist()
        for layer in selector.table.layers
    }


def precision_at_m(table: TrustTable, context: str, chosen: dict, alpha: float) -> float:
    """Mean over layers of the share of the m experts with the highest harm lower bound
    (in `context`) that are broken; m = the number broken in that layer."""
    ci = table.context_pos(context)
    lower = table.harm_lower_bound(alpha)[:, ci]
    mean = table.harm_mean[:, ci]
    values = []
    for layer, broken in chosen.items():
        li = table.layer_pos(layer)
        order = sorted(
            range(table.num_experts), key=lambda e: (-float(lower[li, e]), -float(mean[li, e]), e)
        )
        values.append(len(set(order[: len(broken)]) & set(broken)) / len(broken))
    return float(np.mean(values))


def precision_by_chance(m: int, pool: int, num_experts: int) -> float:
    """precision@m of m experts ranked at random, when the m broken ones are drawn among
    the `pool` most used: m / E if the ranking ignores usage; a ranking that only knew the
    pool would reach m / pool. Returns the latter, the stronger baseline."""
    if not 1 <= m <= pool <= num_experts:
        raise ValueError(f"need 1 <= m <= pool <= num_experts, got {m}, {pool}, {num_experts}")
    return m / pool


# --- per-seed scores -------------------------------------------------------------------------


def budgets(rows: list[dict]) -> list[int]:
    """The checkpoints (forward equivalents) present in `rows`, ascending."""
    return sorted({r["budget"] for r in rows})


def at_budget(rows: list[dict], budget: int | None = None) -> list[dict]:
    """The rows of one checkpoint (None: the largest; no rows give no rows)."""
    if budget is None:
        budget = max((r["budget"] for r in rows), default=None)
    return [r for r in rows if r["budget"] == budget]


def _by_seed_arm(rows: list[dict], context: str) -> dict:
    by = {}
    for r in rows:
        if r["context"] == context:
            key = (r["seed"], r["arm"])
            if key in by:
                raise ValueError(
                    f"rows hold several checkpoints of seed {key[0]}, arm {key[1]!r}: "
                    "select one with at_budget"
                )
            by[key] = r
    return by


def paired(rows: list[dict], arm: str, reference: str, context: str = "all") -> list[float]:
    """Per seed: relative perplexity change of `arm` against `reference`, ppl_a / ppl_r - 1
    (rows of one checkpoint)."""
    by = _by_seed_arm(rows, context)
    seeds = sorted({s for s, a in by if a == arm})
    return [by[(s, arm)]["perplexity"] / by[(s, reference)]["perplexity"] - 1 for s in seeds]


def damage(rows: list[dict], context: str = "all") -> dict[int, float]:
    """{seed: ppl_router - ppl_clean}: what the breakage cost, per seed (rows of one
    checkpoint)."""
    by = _by_seed_arm(rows, context)
    return {
        s: r["perplexity"] - r["clean_perplexity"]
        for (s, a), r in sorted(by.items())
        if a == "router"
    }


def damaged_seeds(rows: list[dict], context: str = "all", min_damage: float = 0.0) -> list[int]:
    """Seeds where the broken model's router is worse than the clean model's by more than
    `min_damage` (relative perplexity), declared before results."""
    by = _by_seed_arm(rows, context)
    return sorted(
        s
        for (s, a), r in by.items()
        if a == "router" and r["perplexity"] > r["clean_perplexity"] * (1 + min_damage)
    )


def recovered(rows: list[dict], arm: str, context: str = "all", seeds=None) -> list[float]:
    """Per seed: ppl_router - ppl_arm, the damage the arm won back (the numerator of
    recovery; its denominator is `damage`)."""
    by = _by_seed_arm(rows, context)
    chosen = sorted({s for s, a in by if a == arm}) if seeds is None else list(seeds)
    return [by[(s, "router")]["perplexity"] - by[(s, arm)]["perplexity"] for s in chosen]


def recovery(rows: list[dict], arm: str, context: str = "all", seeds=None) -> list[float]:
    """Per seed (all, or `seeds`): (ppl_router - ppl_arm) / (ppl_router - ppl_clean): the
    share of the damage recovered (0: none, 1: the clean model). Undefined, an error, for
    a seed whose breakage did not raise perplexity (pass `seeds=damaged_seeds(rows)`)."""
    by = _by_seed_arm(rows, context)
    chosen = sorted({s for s, a in by if a == arm}) if seeds is None else list(seeds)
    out = []
    for s in chosen:
        router, clean = by[(s, "router")]["perplexity"], by[(s, arm)]["clean_perplexity"]
        if not router > clean:
            raise ValueError(f"seed {s}: breakage did not raise perplexity ({clean} -> {router})")
        out.append((router - by[(s, arm)]["perplexity"]) / (router - clean))
    return out


def relative_to_oracle(rows: list[dict], arm: str, context: str = "all", seeds=None) -> dict:
    """The arm's recovery relative to the oracle's, as a ratio of means over seeds:
    sum(ppl_router - ppl_arm) / sum(ppl_router - ppl_oracle), with a paired bootstrap
    interval (`statistics.ratio_of_means`). Per-seed ratios are not averaged: they are
    undefined where the oracle recovers little."""
    return statistics.ratio_of_means(
        recovered(rows, arm, context, seeds), recovered(rows, "oracle", context, seeds)
    )


# --- many seeds ------------------------------------------------------------------------------

RECORDS = ("rows", "exclusions", "cells")


def seed_records(model, tokenizer, seed: int, **kwargs) -> dict[str, list[dict]]:
    """`run_seed` (same keyword arguments), reduced to its plain records."""
    out = run_seed(model, tokenizer, seed, **kwargs)
    return {name: out[name] for name in RECORDS}


_FORKED: dict = {}  # what forked seed workers inherit: model, tokenizer, arguments


def _forked_seed(seed: int) -> dict[str, list[dict]]:
    model, tokenizer, kwargs = _FORKED["job"]
    return seed_records(model, tokenizer, seed, **kwargs)


def run_arms(
    model,
    tokenizer,
    seeds,
    arms,
    settings: ArmSettings = ArmSettings(),
    num_windows: int = 24,
    heldout_per_context: int = 4,
    prompt_tokens: int = 32,
    continuation_tokens: int = 32,
    breakage_spec: dict | None = None,
    checkpoints=CHECKPOINTS,
    forced_per_layer: int = 0,
    desc: str = "arms",
    show_progress: bool = True,
    workers: int = 1,
    corpus=None,
) -> dict[str, list[dict]]:
    """`run_seed` for each seed. Returns {"curve": (seed, arm, checkpoint, context)
    perplexities and training compute, "rows": the last checkpoint's, "exclusion_curve":
    one row per (seed, counterfactual arm, context, layer, checkpoint) with the experts
    excluded and the broken ones, "exclusions": the last checkpoint's, "cells": the
    counterfactual arms' tested cells at the end (p-values)}.

    workers > 1 runs seeds in that many forked processes (each with its own copy of the
    model; torch must be single-threaded): every seed is computed from its own seed alone,
    so the records are the same for any number of workers (tested); they are gathered in
    seed order."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"need at least 2 distinct seeds, got {seeds}")
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if workers > 1 and torch.get_num_threads() != 1:
        # A forked child of a multi-threaded OpenMP parent can hang, and records computed
        # with other thread counts can differ in the last bits.
        raise ValueError(
            f"workers={workers} needs torch.set_num_threads(1) first "
            f"(torch uses {torch.get_num_threads()} threads)"
        )
    kwargs = {
        "arms": arms,
        "settings": settings,
        "num_windows": num_windows,
        "heldout_per_context": heldout_per_context,
        "prompt_tokens": prompt_tokens,
        "continuation_tokens": continuation_tokens,
        "breakage_spec": breakage_spec,
        "corpus": corpus or load_corpus(),
        "checkpoints": checkpoints,
        "forced_per_layer": forced_per_layer,
    }
    seeds = list(seeds)
    bar = progress(total=len(seeds), desc=desc, disable=not show_progress)
    results = []
    if workers == 1 or len(seeds) == 1:
        for seed in seeds:
            results.append(seed_records(model, tokenizer, seed, **kwargs))
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _FORKED["job"] = (model, tokenizer, kwargs)
        try:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(min(workers, len(seeds)), mp_context=context) as pool:
                for result in pool.map(_forked_seed, seeds):
                    results.append(result)
                    bar.update(1)
        finally:
            _FORKED.clear()
    bar.close()
    gathered = {name: [r for result in results for r in result[name]] for name in RECORDS}
    return {
        "curve": gathered["rows"],
        "rows": at_budget(gathered["rows"]),
        "exclusion_curve": gathered["exclusions"],
        "exclusions": at_budget(gathered["exclusions"]),
        "cells": gathered["cells"],
    }


def arm_summary(rows: list[dict], reference: str = "router", context: str = "all") -> list[dict]:
    """Per arm (rows of one checkpoint): mean perplexity, the paired relative change
    against `reference` (its `statistics.t_interval`), and the training compute per seed."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm and r["context"] == context]
        out.append(
            {
                "arm": arm,
                "context": context,
                "perplexity": float(np.mean([r["perplexity"] for r in mine])),
                "change": t_interval(paired(rows, arm, reference, context)),
                "forward_equivalents": mine[0]["forward_equivalents"],
                "forward": mine[0]["forward"],
                "backward": mine[0]["backward"],
                "windows": mine[0]["windows"],
            }
        )
    return out


# --- the context classifier: which features? ---------------------------------------------


@torch.no_grad()
def pooled_features_by_layer(model, windows: list[Sample]) -> dict[str, np.ndarray]:
    """{"moe_in_<layer>": (N, H) float32 features of each window's prompt: the hidden
    states entering that sparse layer's MoE block, mean-pooled and L2-normalised (the
    classifier's `features`)}, plus "moe_in_all": those of every sparse layer side by side
    (N, layers * H), from one batched forward (prompts of one length)."""
    from sage_core.trust.classifier import features

    blocks = model.sparse_blocks()
    captured: dict[str, np.ndarray] = {}
    handles = [
        block.register_forward_pre_hook(
            lambda module, args, key=f"moe_in_{layer}": captured.__setitem__(key, features(args[0]))
        )
        for layer, block in sorted(blocks.items())
    ]
    device = model.model.embed_tokens.weight.device
    model.set_selector(None)
    try:
        model.hidden_states(torch.stack([w.prompt for w in windows]).to(device))
    finally:
        for handle in handles:
            handle.remove()
    out = {f"moe_in_{layer}": captured[f"moe_in_{layer}"] for layer in sorted(blocks)}
    out["moe_in_all"] = np.concatenate(list(out.values()), axis=1)
    return out


def classifier_validation(
    model,
    tokenizer,
    seeds,
    per_context: int = 12,
    prompt_tokens=32,
    fit_per_context: int = 96,
    modes=("supervised", "kmeans", "logistic"),
):
    """Per seed and feature choice (which layer's MoE input, or all of them side by side;
    supervised centroids, k-means or logistic regression): fitted on `fit_per_context`
    training-split prompts per context, then accuracy on `per_context` validation prompts
    per context (training split, from documents no fit prompt comes from: every fifth
    document is kept for validation, so validation does not reward memorised documents)
    and on `per_context` held-out prompts per context. Returns one row per (seed, features, mode), with the held-out confusion
    matrix (rows: true context, columns: predicted, in `CONTEXTS` order)."""
    from sage_core.trust.classifier import ContextClassifier

    corpus = load_corpus()

    validation_corpus = ValidationCorpus(corpus)
    kw = {"prompt_tokens": prompt_tokens, "continuation_tokens": 1}
    k = len(CONTEXTS)
    rows = []
    for seed in seeds:
        parts = {
            "fit": make_samples(
                tokenizer,
                "train",
                fit_per_context,
                seed=seed,
                stream="classifier",
                corpus=validation_corpus,
                **kw,
            ),
            "validation": make_samples(
                tokenizer,
                "heldout",
                per_context,
                seed=seed,
                stream="validation",
                corpus=validation_corpus,
                **kw,
            ),
            "heldout": make_samples(
                tokenizer, "heldout", per_context, seed=seed, stream="eval", corpus=corpus, **kw
            ),
        }
        feats = {name: pooled_features_by_layer(model, w) for name, w in parts.items()}
        labels = {
            name: np.array([CONTEXTS.index(s.context) for s in w]) for name, w in parts.items()
        }
        for key in feats["fit"]:
            for mode in modes:
                classifier = ContextClassifier(k, list(CONTEXTS), mode, seed)
                if (
                    mode == "kmeans"
                ):  # a cluster is named after the majority label of its fit prompts
                    classifier.fit(feats["fit"][key])
                    clusters = classifier.predict(feats["fit"][key])
                    names = [
                        int(np.bincount(labels["fit"][clusters == c], minlength=k).argmax())
                        if (clusters == c).any()
                        else c
                        for c in range(k)
                    ]
                else:
                    classifier.fit(feats["fit"][key], labels["fit"])
                    names = list(range(k))
                predicted = {
                    part: np.array(names)[classifier.predict(feats[part][key])]
                    for part in ("validation", "heldout")
                }
                accuracy = {
                    part: float(np.mean(predicted[part] == labels[part]))
                    for part in ("validation", "heldout")
                }
                confusion = np.zeros((k, k), dtype=np.int64)
                np.add.at(confusion, (labels["heldout"], predicted["heldout"]), 1)
                rows.append(
                    {
                        "seed": seed,
                        "features": key,
                        "mode": mode,
                        **accuracy,
                        "heldout_confusion": confusion.tolist(),
                    }
                )
    return rows


def choose_features(rows: list[dict]) -> dict:
    """The (features, mode) with the highest mean validation accuracy over seeds (ties:
    the earlier row), with its mean validation and held-out accuracy, its per-seed held-out
    accuracies ("heldout_by_seed") and, where the rows carry them, its held-out confusion
    counts summed over seeds ("heldout_confusion": rows true, columns predicted)."""
    choices = list(dict.fromkeys((r["features"], r["mode"]) for r in rows))
    scored = []
    for features_, mode in choices:
        mine = [r for r in rows if (r["features"], r["mode"]) == (features_, mode)]
        entry = {
            "features": features_,
            "mode": mode,
            "validation": float(np.mean([r["validation"] for r in mine])),
            "heldout": float(np.mean([r["heldout"] for r in mine])),
            "heldout_by_seed": [r["heldout"] for r in mine],
        }
        if all("heldout_confusion" in r for r in mine):
            confusion = np.sum([r["heldout_confusion"] for r in mine], axis=0)
            entry["heldout_confusion"] = confusion.astype(np.int64).tolist()
        scored.append(entry)
    return max(scored, key=lambda r: r["validation"])
