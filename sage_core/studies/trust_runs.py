"""What notebooks 05 and 07 share: the trust arms, one training loop, batched scoring,
breakage of experts, and the statistics.

Every arm sees the same inputs: per seed, one stream of training-split windows (a prompt
and its real continuation, in mixed contexts) and one fixed set of held-out windows. The
arms (`ARMS`):

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

Each arm's training cost is counted in sequences run forward and backward (`passes`).
Contexts are the corpus labels: this separates trust from classifier errors (the
classifier's own accuracy is measured in `classifier_validation`).
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch

from sage_core.corpus import CONTEXTS, load_corpus
from sage_core.model.moe import ResidentExperts
from sage_core.notebook.progress import progress
from sage_core.studies.experiments import Sample, make_samples
from sage_core.studies.report_protocol import report_quality, report_update
from sage_core.trust import (
    REPORT_PRIOR,
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
)
POOLED = "any"  # the one context of context-free trust
KINDS = ("noise", "sign_flip")


@dataclass(frozen=True)
class ArmSettings:
    """Hyperparameters of the learning arms, fixed before any evaluation seed was run."""

    ablations_per_window: int = 12
    explore: float = 1.0  # the counterfactual arm's optimism (SEs) in choosing cells
    harm_alpha: float = 0.05  # exclude at this false discovery rate (Benjamini-Hochberg)
    min_ablations: int = 3
    beta: float = 1.0  # routing_weighted
    learning_rate: float = 0.5  # routing_weighted
    baseline_momentum: float = 0.9  # routing_weighted
    report_learning_rate: float = 0.1
    bias_learning_rate: float = 0.05  # learned_bias (Adam)
    bias_l2: float = 1e-3


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
    """Broken `down_proj` for `chosen` {layer: [experts]}, applied only while scoring
    windows of `contexts` (None: every context).

    kind "noise": Gaussian noise rescaled to the weight's Frobenius norm (seeded by `seed`,
    drawn in (layer, expert) order): a vector of the usual size, meaningless.
    kind "sign_flip": the weight negated: the expert writes the opposite of its output.
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
        self.clean, self.broken = {}, {}
        for layer in sorted(self.chosen):
            experts = resident_experts(model, layer)
            for e in self.chosen[layer]:
                if not 0 <= e < experts.num_experts:
                    raise ValueError(f"layer {layer}: expert {e} out of range")
                weight = experts.down_proj[e].detach()
                self.clean[(layer, e)] = weight.clone()
                if kind == "noise":
                    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
                    scale = weight.to(torch.float64).norm() / noise.norm()
                    self.broken[(layer, e)] = (noise * scale).to(weight.dtype)
                else:
                    self.broken[(layer, e)] = -weight.clone()

    def applies_to(self, context: str) -> bool:
        return self.contexts is None or context in self.contexts

    def broken_by_context(self) -> dict:
        """{context: {layer: [experts]}}: what the oracle excludes."""
        return {c: self.chosen for c in CONTEXTS if self.applies_to(c)}

    @contextlib.contextmanager
    def active(self, context: str | None):
        """Broken weights inside the block when `context` is broken (None: clean)."""
        on = context is not None and self.applies_to(context)
        with torch.no_grad():
            for (layer, e), w in (self.broken if on else self.clean).items():
                resident_experts(self.model, layer).down_proj[e].copy_(w)
        try:
            yield on
        finally:
            with torch.no_grad():
                for (layer, e), w in self.clean.items():
                    resident_experts(self.model, layer).down_proj[e].copy_(w)


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


# --- one training loop for every arm --------------------------------------------------------


class Arms:
    """The learning arms of one seed, trained window by window on one stream."""

    def __init__(self, model, arms, settings: ArmSettings, breakage=None):
        unknown = set(arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; arms are {ARMS}")
        self.model, self.arms, self.settings, self.breakage = model, tuple(arms), settings, breakage
        s = settings
        self.selectors, self.learners, self.passes = {}, {}, {}
        top = {"harm_alpha": s.harm_alpha, "min_ablations": s.min_ablations}
        for arm in self.arms:
            self.passes[arm] = {"forward": 0, "backward": 0}
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
            elif arm == "report":
                table = TrustTable.for_model(model, CONTEXTS, prior=REPORT_PRIOR)
                self.selectors[arm] = TrustSelector.for_model(model, table, rule="report")
            else:
                selector = LearnedBiasSelector.for_model(model, CONTEXTS)
                self.selectors[arm] = selector
                self.learners[arm] = LearnedBiasLearner(selector, s.bias_learning_rate, s.bias_l2)

    def train(self, window: Sample) -> None:
        """Every learning arm learns from this one window (its context: the label)."""
        context = window.context
        with self.breakage.active(context) if self.breakage else contextlib.nullcontext():
            for arm in self.arms:
                if arm.startswith("counterfactual"):
                    learner = self.learners[arm]
                    key = POOLED if arm == "counterfactual_context_free" else context
                    before = learner.sequence_forwards
                    learner.update(self.model, window.prompt, window.continuation, key)
                    self.passes[arm]["forward"] += learner.sequence_forwards - before
                elif arm in ("routing_weighted", "report"):
                    self._train_scored(arm, window, context)
                elif arm == "learned_bias":
                    self.learners[arm].update(
                        self.model, window.prompt, window.continuation, context
                    )
                    self.passes[arm]["forward"] += 1
                    self.passes[arm]["backward"] += 1

    @torch.no_grad()
    def _train_scored(self, arm: str, window: Sample, context: str) -> None:
        """The previous protocol: score the window with the arm's selector active, update."""
        selector = self.selectors[arm]
        selector.context = context
        device = self.model.model.embed_tokens.weight.device
        ids = torch.cat([window.prompt, window.continuation]).to(device)[None]
        P = window.prompt.numel()
        self.model.set_selector(selector)
        try:
            with self.model.routing_trace() as trace:
                nll = continuation_nll(self.model, ids, P)[0].cpu()
        finally:
            self.model.set_selector(None)
        self.passes[arm]["forward"] += 1
        if arm == "report":
            quality = report_quality(math.exp(float(nll.mean())))
            report_update(
                selector.table, context, quality, learning_rate=self.settings.report_learning_rate
            )
            return
        E = self.model.config.num_experts
        routing = {
            layer: dense_routing(calls[0][0][P - 1 : -1], calls[0][1][P - 1 : -1], E)
            for layer, calls in trace.items()
        }
        self.learners[arm].update(context, nll, routing)


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
) -> dict:
    """One seed: held-out windows, a training stream, optional breakage, every arm trained
    on the stream and scored on the held-out windows.

    breakage_spec: {"m", "pool", "kind", "contexts"} or None (healthy model). Returns
    {"rows": one row per (arm, context incl. "all"), "arms": the trained Arms,
    "breakage": the Breakage or None, "clean": clean-model rows (router)}."""
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
    for window in stream:
        trained.train(window)
    clean = score_windows(model, heldout)
    rows = []
    for arm in trained.arms:
        scored = score_windows(
            model,
            heldout,
            trained.selectors[arm],
            breakage,
            pooled=arm == "counterfactual_context_free",
        )
        for context in (*CONTEXTS, None):
            rows.append(
                {
                    "seed": seed,
                    "arm": arm,
                    "context": context or "all",
                    "perplexity": perplexity(scored, context),
                    "clean_perplexity": perplexity(clean, context),
                    "train_forward": trained.passes[arm]["forward"],
                    "train_backward": trained.passes[arm]["backward"],
                    "windows": len(stream),
                }
            )
    return {"rows": rows, "arms": trained, "breakage": breakage, "clean": clean}


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


# --- statistics ---------------------------------------------------------------------------


def t_interval(values, confidence: float = 0.95) -> dict:
    """Mean and Student-t interval of the mean over seeds (paired values: one per seed).
    Returns {"mean", "low", "high", "n"}; needs at least 2 values."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval needs at least 2 finite values, got {x.tolist()}")
    mean = float(x.mean())
    if np.all(x == x[0]):
        return {"mean": mean, "low": mean, "high": mean, "n": int(x.size)}
    ci = scipy.stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return {"mean": mean, "low": float(ci.low), "high": float(ci.high), "n": int(x.size)}


def bca_interval(values, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean and BCa bootstrap interval (scipy.stats.bootstrap, 9999 resamples, seeded)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    mean = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        return {"mean": mean, "low": mean, "high": mean, "n": int(x.size)}
    result = scipy.stats.bootstrap(
        (x,), np.mean, confidence_level=confidence, method="BCa", rng=np.random.default_rng(seed)
    )
    ci = result.confidence_interval
    return {"mean": mean, "low": float(ci.low), "high": float(ci.high), "n": int(x.size)}


def paired(rows: list[dict], arm: str, reference: str, context: str = "all") -> list[float]:
    """Per seed: relative perplexity change of `arm` against `reference`, ppl_a / ppl_r - 1."""
    by = {(r["seed"], r["arm"]): r for r in rows if r["context"] == context}
    seeds = sorted({s for s, a in by if a == arm})
    return [by[(s, arm)]["perplexity"] / by[(s, reference)]["perplexity"] - 1 for s in seeds]


def damaged_seeds(rows: list[dict], context: str = "all") -> list[int]:
    """Seeds where the broken model's router is worse than the clean model's."""
    return sorted(
        r["seed"]
        for r in rows
        if r["arm"] == "router"
        and r["context"] == context
        and r["perplexity"] > r["clean_perplexity"]
    )


def recovery(rows: list[dict], arm: str, context: str = "all", seeds=None) -> list[float]:
    """Per seed (all, or `seeds`): (ppl_router - ppl_arm) / (ppl_router - ppl_clean): the
    share of the damage recovered (0: none, 1: the clean model). Undefined, an error, for
    a seed whose breakage did not raise perplexity (pass `seeds=damaged_seeds(rows)`)."""
    by = {(r["seed"], r["arm"]): r for r in rows if r["context"] == context}
    chosen = sorted({s for s, a in by if a == arm}) if seeds is None else list(seeds)
    out = []
    for s in chosen:
        router, clean = by[(s, "router")]["perplexity"], by[(s, arm)]["clean_perplexity"]
        if not router > clean:
            raise ValueError(f"seed {s}: breakage did not raise perplexity ({clean} -> {router})")
        out.append((router - by[(s, arm)]["perplexity"]) / (router - clean))
    return out


def relative_to_oracle(rows: list[dict], arm: str, context: str = "all", seeds=None) -> list[float]:
    """Per seed: the arm's recovery divided by the oracle's."""
    return [
        a / o
        for a, o in zip(
            recovery(rows, arm, context, seeds),
            recovery(rows, "oracle", context, seeds),
            strict=True,
        )
    ]


def seed_records(model, tokenizer, seed: int, **kwargs) -> tuple[list[dict], list[dict]]:
    """`run_seed` (same keyword arguments), reduced to plain records: (rows, exclusions)
    as `run_arms` returns them."""
    settings = kwargs["settings"]
    out = run_seed(model, tokenizer, seed, **kwargs)
    breakage, exclusions = out["breakage"], []
    for arm in out["arms"].arms:
        if not arm.startswith("counterfactual"):
            continue
        selector = out["arms"].selectors[arm]
        for context in CONTEXTS:
            key = POOLED if arm == "counterfactual_context_free" else context
            broken = breakage.broken_by_context().get(context, {}) if breakage else {}
            excluded = excluded_experts(selector, key)
            precision = (
                precision_at_m(selector.table, key, broken, settings.harm_alpha)
                if broken
                else math.nan
            )
            for layer in selector.table.layers:
                wrong = [e for e in excluded[layer] if e not in broken.get(layer, [])]
                exclusions.append(
                    {
                        "seed": seed,
                        "arm": arm,
                        "context": context,
                        "layer": layer,
                        "excluded": excluded[layer],
                        "broken": broken.get(layer, []),
                        "false_exclusions": len(wrong),
                        "precision_at_m": precision,
                    }
                )
    return out["rows"], exclusions


_FORKED: dict = {}  # what forked seed workers inherit: model, tokenizer, arguments


def _forked_seed(seed: int) -> tuple[list[dict], list[dict]]:
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
    desc: str = "arms",
    show_progress: bool = True,
    workers: int = 1,
) -> dict[str, list[dict]]:
    """`run_seed` for each seed. Returns {"rows": (seed, arm, context) perplexities and
    training passes, "exclusions": one row per (seed, arm, context, layer) with the experts
    each counterfactual arm excludes, the broken ones and precision@m}.

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
        "corpus": load_corpus(),
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
    return {
        "rows": [r for rows, _ in results for r in rows],
        "exclusions": [r for _, exclusions in results for r in exclusions],
    }


def arm_summary(rows: list[dict], reference: str = "router", context: str = "all") -> list[dict]:
    """Per arm: mean perplexity, the paired relative change against `reference` with its
    t interval, and the training passes per seed."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm and r["context"] == context]
        change = t_interval(paired(rows, arm, reference, context))
        out.append(
            {
                "arm": arm,
                "context": context,
                "seeds": change["n"],
                "perplexity": float(np.mean([r["perplexity"] for r in mine])),
                "change": change["mean"],
                "low": change["low"],
                "high": change["high"],
                "train_forward": mine[0]["train_forward"],
                "train_backward": mine[0]["train_backward"],
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

    class TrainDocuments:  # the training split's documents i % 5 == 0 (validation) or not (fit)
        def __init__(self, validation: bool):
            self.validation = validation

        def documents(self, context, split):
            docs = corpus.documents(context, split)
            if split != "train":
                return docs
            return [d for i, d in enumerate(docs) if (i % 5 == 0) == self.validation]

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
                corpus=TrainDocuments(validation=False),
                **kw,
            ),
            "validation": make_samples(
                tokenizer,
                "train",
                per_context,
                seed=seed,
                stream="validation",
                corpus=TrainDocuments(validation=True),
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
