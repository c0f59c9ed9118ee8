"""Experts on demand, measured the way offloading systems are (notebook 09).

1. Traces: held-out prompts of each context are run through the real load path with a
   `TraceRecorder` as selector; the prompt's forward is the prefill trace, the greedy
   continuation (one token per forward) the decode trace.
2. Policies: every policy of `sage_core.checkpoint.cache_policy`, Belady's MIN and next-layer
   prefetch are simulated on the same traces, token by token (the order a one-token forward
   asks its cache), at several capacities. The simulator is the real cache's policy code
   and is tested to predict the real cache's hits exactly.
3. Cost: bytes moved per token for Q3-Omni's real sizes, turned into an upper bound on
   tokens/s at a link bandwidth (transfers alone; compute, attention and latency ignored).
4. Cache-aware selection: `CacheAwareSelector` at several thresholds, teacher-forced on
   held-out windows one token at a time through a bounded cache: experts read per token
   against perplexity, paired per seed with the threshold-0 run (the router itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sage_core.checkpoint import cache_policy, load_thinker
from sage_core.checkpoint.cache_selectors import CacheAwareSelector
from sage_core.checkpoint.expert_trace import (
    RoutingTrace,
    TraceRecorder,
    access_sequence,
    concatenate,
    prediction_quality,
    prefetch_plan,
)
from sage_core.corpus import CONTEXTS, load_corpus
from sage_core.corpus.heldout import LOG2E, document_stream
from sage_core.dtypes import parse_dtype
from sage_core.model.generation import generate
from sage_core.notebook.progress import progress
from sage_core.studies.experiments import bootstrap_ci, resolve_model_path

PHASES = ("prefill", "decode")

# --- the real model's sizes and links (the arithmetic is shown in notebook 09) ----------------

Q3_OMNI = {
    "layers": 48,
    "experts": 128,
    "top_k": 8,
    "hidden": 2048,
    "moe_intermediate": 768,
    "bytes_per_param": 2,  # bfloat16
}


def expert_bytes(hidden: int, moe_intermediate: int, bytes_per_param: int) -> int:
    """One SwiGLU expert: gate, up [I, H] and down [H, I]."""
    return 3 * hidden * moe_intermediate * bytes_per_param


def pcie_bytes_per_s(gt_per_s: float, lanes: int) -> float:
    """A PCIe 3.0+ link's raw payload rate: transfers/s x lanes x 128b/130b coding / 8 bits."""
    return gt_per_s * 1e9 * lanes * (128 / 130) / 8


LINKS = {  # nominal link rates, before protocol overhead: upper bounds on what moves
    "PCIe 4.0 x16": pcie_bytes_per_s(16, 16),
    "PCIe 5.0 x16": pcie_bytes_per_s(32, 16),
    "NVMe (PCIe 4.0 x4 link)": pcie_bytes_per_s(16, 4),
}


def modelled_tokens_per_s(miss_rate: float, link_bytes_per_s: float, model=Q3_OMNI) -> dict:
    """Upper bound on decode tokens/s when every missed expert crosses the link: bytes per
    token = miss rate x layers x top-k x expert bytes; tokens/s <= link rate / that."""
    per_expert = expert_bytes(model["hidden"], model["moe_intermediate"], model["bytes_per_param"])
    bytes_per_token = miss_rate * model["layers"] * model["top_k"] * per_expert
    tokens_per_s = link_bytes_per_s / bytes_per_token if bytes_per_token > 0 else float("inf")
    return {"bytes_per_token": bytes_per_token, "tokens_per_s": tokens_per_s}


# --- 1. traces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceSettings:
    prompts_per_context: int = 6
    prompt_tokens: int = 96
    decode_tokens: int = 48
    seed: int = 0


def heldout_windows(tokenizer, context: str, count: int, length: int, seed: int, corpus=None):
    """`count` non-overlapping windows of `length` tokens from the context's held-out stream,
    at seeded random positions, in stream order. -> list of (length,) int64 tensors."""
    corpus = corpus or load_corpus()
    ids, _ = document_stream(corpus.documents(context, "heldout"), tokenizer)
    slots = ids.size // length
    if slots < count:
        raise ValueError(
            f"{context}: held-out text has {ids.size} tokens, too few for {count} windows "
            f"of {length}"
        )
    rng = np.random.default_rng([seed, CONTEXTS.index(context)])
    picks = np.sort(rng.choice(slots, size=count, replace=False))
    return [torch.from_numpy(ids[p * length : (p + 1) * length].copy()) for p in picks]


@torch.no_grad()
def record_traces(model, tokenizer, settings: TraceSettings) -> dict[str, dict[str, RoutingTrace]]:
    """{context: {"prefill": trace, "decode": trace}} from the model's own router."""
    recorder = TraceRecorder(model)
    model.set_selector(recorder)
    device = model.model.embed_tokens.weight.device
    corpus = load_corpus()
    traces = {}
    try:
        for context in progress(CONTEXTS, desc="traces"):
            prompts = heldout_windows(
                tokenizer,
                context,
                settings.prompts_per_context,
                settings.prompt_tokens,
                settings.seed,
                corpus,
            )
            parts = {phase: [] for phase in PHASES}
            for prompt in prompts:
                recorder.clear()
                generate(model, prompt[None].to(device), settings.decode_tokens + 1)
                trace = recorder.trace()
                first = trace.call_of == 0
                for phase, rows in (("prefill", first), ("decode", ~first)):
                    parts[phase].append(
                        RoutingTrace(
                            trace.experts[rows],
                            trace.predicted[rows],
                            trace.call_of[rows],
                            trace.layers,
                            trace.num_experts,
                        )
                    )
            traces[context] = {phase: concatenate(parts[phase]) for phase in PHASES}
    finally:
        model.set_selector(None)
    return traces


def save_traces(traces, directory) -> list:
    """One `<context>_<phase>.npz` per trace under `directory`."""
    directory = Path(directory)
    return [
        trace.save(directory / f"{context}_{phase}.npz")
        for context, phases in traces.items()
        for phase, trace in phases.items()
    ]


# --- 2. policies ----------------------------------------------------------------------------


def capacities(total: int, fractions) -> list[int]:
    """Cache sizes (in experts) for fractions of all experts, at least one each."""
    return [max(1, round(f * total)) for f in fractions]


def simulate_policies(
    traces, fractions=(0.1, 0.25, 0.5, 0.75), policies=cache_policy.POLICIES
) -> list[dict]:
    """One row per (context, phase, capacity, policy incl. "belady"): hit rate and experts
    read per token (demand misses)."""
    rows = []
    work = [(c, p) for c in traces for p in traces[c]]
    for context, phase in progress(work, desc="policies"):
        trace = traces[context][phase]
        keys, _ = access_sequence(trace)
        total = trace.num_experts * len(trace.layers)
        layers = [int(x) for x in trace.layers]
        for cap, fraction in zip(capacities(total, fractions), fractions, strict=True):
            sims = [
                cache_policy.simulate(keys, cache_policy.make_policy(p, cap, layers=layers))
                for p in policies
            ]
            sims.append(cache_policy.simulate_belady(keys, cap))
            for sim in sims:
                rows.append(
                    {
                        "context": context,
                        "phase": phase,
                        "fraction": fraction,
                        "capacity": cap,
                        "policy": sim.policy,
                        "hit_rate": sim.hit_rate,
                        "experts_read_per_token": sim.experts_read / trace.num_tokens,
                    }
                )
    return rows


def lookahead_horizons(num_layers: int, tokens=(1, 2, 4, 16)) -> dict[str, float]:
    """{label: horizon in layer calls}: one layer, each of `tokens` tokens (num_layers layer
    calls each), and unlimited (Belady)."""
    out = {"1 layer": 1}
    for t in tokens:
        out[f"{t:g} token{'s' if t != 1 else ''}"] = t * num_layers
    out["unlimited"] = math.inf
    return out


def simulate_bounds(traces, fraction: float, horizons: dict[str, float]) -> list[dict]:
    """At one cache size, per (context, phase): the hindsight static cache ("static") and
    Belady restricted to each lookahead horizon ("lookahead <label>"), rows shaped like
    `simulate_policies`' so `gap_closed` reads them beside it."""
    rows = []
    for context in traces:
        for phase, trace in traces[context].items():
            keys, token_of = access_sequence(trace)
            calls = cache_policy.layer_calls(keys, token_of)
            cap = capacities(trace.num_experts * len(trace.layers), [fraction])[0]
            sims = {"static": cache_policy.simulate_static(keys, cap)}
            for label, horizon in horizons.items():
                sims[f"lookahead {label}"] = cache_policy.simulate_lookahead(
                    keys, cap, horizon, calls
                )
            for name, sim in sims.items():
                rows.append(
                    {
                        "context": context,
                        "phase": phase,
                        "fraction": fraction,
                        "capacity": cap,
                        "policy": name,
                        "hit_rate": sim.hit_rate,
                        "experts_read_per_token": sim.experts_read / trace.num_tokens,
                    }
                )
    return rows


def smallest_closing(rows, fraction: float, horizons: dict[str, float], share: float = 0.5):
    """The label of the shortest lookahead that closes at least `share` of the LRU-to-Belady
    gap in every (context, phase), or None."""
    for label in sorted(horizons, key=horizons.get):
        if min(gap_closed(rows, fraction, f"lookahead {label}").values()) >= share:
            return label
    return None


def gap_closed(rows, fraction: float, policy: str) -> dict[tuple[str, str], float]:
    """{(context, phase): (policy - lru) / (belady - lru)} hit rates at one capacity."""
    out = {}
    for context, phase in {(r["context"], r["phase"]) for r in rows}:
        at = {
            r["policy"]: r["hit_rate"]
            for r in rows
            if r["context"] == context and r["phase"] == phase and r["fraction"] == fraction
        }
        out[(context, phase)] = (at[policy] - at["lru"]) / (at["belady"] - at["lru"])
    return dict(sorted(out.items()))


def best_online_policy(rows, fraction: float) -> str:
    """The demand policy with the highest mean hit rate over contexts and phases."""
    means = {}
    for p in cache_policy.POLICIES:
        rates = [r["hit_rate"] for r in rows if r["policy"] == p and r["fraction"] == fraction]
        means[p] = float(np.mean(rates))
    return max(means, key=means.get)


def simulate_prefetch(traces, fraction: float, policies=("lru",)) -> list[dict]:
    """Per (context, phase, policy): demand hit rate, experts read per token (misses plus
    read-aheads) and wasted read-aheads per token, with and without next-layer prefetch."""
    rows = []
    for context in traces:
        for phase, trace in traces[context].items():
            keys, _ = access_sequence(trace)
            cap = capacities(trace.num_experts * len(trace.layers), [fraction])[0]
            layers = [int(x) for x in trace.layers]
            plan = prefetch_plan(trace)
            for p in policies:
                for ahead in (None, plan):
                    sim = cache_policy.simulate(
                        keys, cache_policy.make_policy(p, cap, layers=layers), prefetch=ahead
                    )
                    n = trace.num_tokens
                    rows.append(
                        {
                            "context": context,
                            "phase": phase,
                            "policy": p,
                            "prefetch": ahead is not None,
                            "hit_rate": sim.hit_rate,
                            "experts_read_per_token": sim.experts_read / n,
                            "stalls_per_token": sim.misses / n,
                            "wasted_per_token": sim.wasted / n,
                        }
                    )
    return rows


def prefetch_quality(traces) -> dict[int, dict[str, float]]:
    """Per layer: precision and recall of the next-layer guess, pooled over all traces."""
    every = concatenate([t for phases in traces.values() for t in phases.values()])
    return prediction_quality(every)


# --- 4. cache-aware selection ----------------------------------------------------------------


@dataclass(frozen=True)
class FrontierSettings:
    capacity: int = 32
    policy: str = "lru"
    thresholds: tuple = (0.0, 0.25, 0.5, 1.0, 2.0)
    seeds: tuple = (0, 1, 2, 3, 4)
    windows_per_context: int = 1
    window_tokens: int = 64


@torch.no_grad()
def teacher_forced_run(model, windows, contexts=None, trust=None) -> dict:
    """Bits of every next token, one token per forward over a KV cache (decode order), and
    the cache's reads: {"bits": (N,), "misses", "tokens"}. With `trust` (a selector with a
    `context`), its context is set to `contexts[i]` before window i."""
    device = model.model.embed_tokens.weight.device
    bits, tokens = [], 0
    for i, window in enumerate(windows):
        if trust is not None:
            trust.context = contexts[i]
        ids = window.to(device)[None]
        cache = model.new_cache(1, ids.shape[1])
        for t in range(ids.shape[1] - 1):
            logits = model(ids[:, t : t + 1], cache=cache)[0, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)[ids[0, t + 1]]
            bits.append(-float(logp) * LOG2E)
            tokens += 1
    return {"bits": np.asarray(bits), "misses": model.expert_cache.misses, "tokens": tokens}


def bounded_cache_model(model_path, capacity: int, policy: str, device="cpu", dtype="float32"):
    """A fresh model (eval mode) holding at most `capacity` experts under `policy`."""
    return load_thinker(
        resolve_model_path(model_path),
        max_resident_experts=capacity,
        cache_policy=policy,
        device=device,
        dtype=parse_dtype(dtype),
    ).eval()


def cache_aware_frontier(
    model_path, tokenizer, settings: FrontierSettings, device="cpu", dtype="float32"
) -> list[dict]:
    """One row per (seed, threshold): perplexity and experts read per token with a
    `CacheAwareSelector` over a fresh bounded cache; windows drawn per seed."""
    rows = []
    corpus = load_corpus()
    work = [(s, t) for s in settings.seeds for t in settings.thresholds]
    windows = {
        s: [
            w
            for c in CONTEXTS
            for w in heldout_windows(
                tokenizer, c, settings.windows_per_context, settings.window_tokens, s, corpus
            )
        ]
        for s in settings.seeds
    }
    for seed, threshold in progress(work, desc="frontier"):
        model = bounded_cache_model(model_path, settings.capacity, settings.policy, device, dtype)
        selector = CacheAwareSelector(model, threshold)
        model.set_selector(selector)
        run = teacher_forced_run(model, windows[seed])
        rows.append(
            {
                "seed": seed,
                "threshold": threshold,
                "perplexity": float(2.0 ** run["bits"].mean()),
                "experts_read_per_token": run["misses"] / run["tokens"],
                "hit_rate": 1
                - run["misses"]
                / (run["tokens"] * model.config.num_experts_per_tok * len(model.sparse_blocks())),
                "swapped_per_token": selector.swapped / run["tokens"],
                "tokens": run["tokens"],
            }
        )
    return rows


# --- 4b. trust and the cache together ---------------------------------------------------------


class BrokenOnLoad:
    """An `ExpertSource` whose broken experts' `down_proj` is replaced as it is read.

    `trust_runs.Breakage` edits the weights of a resident model; a model with an expert
    cache holds no experts until it reads them, so the same broken weights (built by a
    `Breakage` on the resident model) are written into each broken expert as the cache
    loads it. Perplexity and reads then come from one run through the real cache: the
    bytes read are the file's, and the selector sees the cache as it is. Replaying the
    choices of a resident run through the simulator would not do: a cache-aware selector
    chooses from what is resident, so its choices depend on the cache it runs with."""

    def __init__(self, source, broken_down: dict):
        self.source = source
        self.broken_down = {int(e): w for e, w in broken_down.items()}

    def __getattr__(self, name):
        return getattr(self.source, name)

    def read(self, expert: int, into=None):
        (gate_up, down), nbytes = self.source.read(expert, into=into)
        if int(expert) in self.broken_down:
            with torch.no_grad():
                down.copy_(self.broken_down[int(expert)])
        return (gate_up, down), nbytes


def break_on_load(model, breakage) -> None:
    """Install `breakage` (every context broken) in `model`'s on-demand experts."""
    if breakage.contexts is not None:
        raise ValueError("break_on_load needs a breakage of every context (contexts=None)")
    blocks = _on_demand(model)
    by_layer: dict = {}
    for (layer, e), weight in breakage.broken.items():
        by_layer.setdefault(layer, {})[e] = weight
    for layer, broken in by_layer.items():
        blocks[layer].experts.source = BrokenOnLoad(blocks[layer].experts.source, broken)


def _on_demand(model) -> dict:
    if getattr(model, "expert_cache", None) is None:
        raise ValueError("the model has no expert cache (load it with max_resident_experts=N)")
    return model.sparse_blocks()


TRUST_CACHE_ARMS = ("router", "cache_aware", "oracle", "oracle_cache_aware")


@dataclass(frozen=True)
class TrustCacheSettings:
    capacity: int = 32
    policy: str = "lru"
    threshold: float = 0.75
    seeds: tuple = (0, 1, 2, 3, 4)
    window_tokens: int = 48
    broken_per_layer: int = 2  # notebook 07's primary scenario: m = 2, noise
    pool: int = 8
    usage_windows_per_context: int = 8


def seed_breakage(resident_model, tokenizer, settings: TrustCacheSettings, seed: int, corpus=None):
    """Notebook 07's breakage for one seed: `broken_per_layer` experts per layer drawn among
    the `pool` most used on the seed's training stream, their down_proj replaced by noise."""
    from sage_core.studies import trust_runs
    from sage_core.studies.experiments import make_samples

    stream = make_samples(
        tokenizer, "train", settings.usage_windows_per_context, 32, 32, seed, corpus, "trust"
    )
    usage = trust_runs.expert_usage(resident_model, stream)
    chosen = trust_runs.choose_broken(usage, settings.broken_per_layer, settings.pool, seed)
    return trust_runs.Breakage(resident_model, chosen, "noise", seed)


def trust_and_cache(
    model_path,
    resident_model,
    tokenizer,
    settings: TrustCacheSettings,
    device="cpu",
    dtype="float32",
) -> list[dict]:
    """One row per (seed, arm of TRUST_CACHE_ARMS): perplexity and experts read per token on
    the broken model through a fresh bounded cache, on the frontier's held-out windows.
    "oracle" excludes exactly the broken experts (`OracleSelector`, perfect trust);
    "*cache_aware" wraps the arm's selector in `CacheAwareSelector` at `threshold`."""
    from sage_core.trust import OracleSelector, TrustTable

    corpus = load_corpus()
    rows = []
    work = [(s, a) for s in settings.seeds for a in TRUST_CACHE_ARMS]
    breakages, windows = {}, {}
    for seed in settings.seeds:
        breakages[seed] = seed_breakage(resident_model, tokenizer, settings, seed, corpus)
        windows[seed] = [
            (c, w)
            for c in CONTEXTS
            for w in heldout_windows(tokenizer, c, 1, settings.window_tokens, seed, corpus)
        ]
    for seed, arm in progress(work, desc="trust and cache"):
        model = bounded_cache_model(model_path, settings.capacity, settings.policy, device, dtype)
        break_on_load(model, breakages[seed])
        cfg = model.config
        trust = None
        if arm.startswith("oracle"):
            trust = OracleSelector(
                TrustTable.for_model(model, CONTEXTS),
                cfg.num_experts_per_tok,
                cfg.norm_topk_prob,
                breakages[seed].broken_by_context(),
            )
        threshold = settings.threshold if arm.endswith("cache_aware") else 0.0
        selector = CacheAwareSelector(model, threshold, inner=trust)
        model.set_selector(selector)
        contexts = [c for c, _ in windows[seed]]
        run = teacher_forced_run(model, [w for _, w in windows[seed]], contexts, trust)
        rows.append(
            {
                "seed": seed,
                "arm": arm,
                "perplexity": float(2.0 ** run["bits"].mean()),
                "experts_read_per_token": run["misses"] / run["tokens"],
                "swapped_per_token": selector.swapped / run["tokens"],
                "tokens": run["tokens"],
            }
        )
    return rows


def trust_cache_summary(rows, reference: str = "router") -> list[dict]:
    """Per arm, paired per seed with `reference`: relative perplexity change and the factor
    of fewer experts read per token, each a Student-t 95% interval over seeds."""
    from sage_core.studies.trust_runs import t_interval

    base = {r["seed"]: r for r in rows if r["arm"] == reference}
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        out.append(
            {
                "arm": arm,
                "perplexity": t_interval([r["perplexity"] for r in mine]),
                "perplexity_change": t_interval(
                    [r["perplexity"] / base[r["seed"]]["perplexity"] - 1 for r in mine]
                ),
                "reads_per_token": t_interval([r["experts_read_per_token"] for r in mine]),
                "fewer_reads": t_interval(
                    [
                        base[r["seed"]]["experts_read_per_token"] / r["experts_read_per_token"]
                        for r in mine
                    ]
                ),
            }
        )
    return out


def paired_interval(rows, arm: str, reference: str, field: str, ratio: bool = True) -> dict:
    """t interval over seeds of arm / reference - 1 (ratio) or arm - reference, of `field`."""
    from sage_core.studies.trust_runs import t_interval

    by = {(r["seed"], r["arm"]): r[field] for r in rows}
    seeds = sorted({s for s, a in by if a == arm})
    if ratio:
        return t_interval([by[(s, arm)] / by[(s, reference)] - 1 for s in seeds])
    return t_interval([by[(s, arm)] - by[(s, reference)] for s in seeds])


def frontier_summary(rows, seed: int = 0) -> list[dict]:
    """Per threshold, paired with threshold 0 on the same seed: the factor by which experts
    read per token fall, and the relative perplexity change, each with a 95% bootstrap CI."""
    base = {r["seed"]: r for r in rows if r["threshold"] == 0}
    if not base:
        raise ValueError("the frontier needs threshold 0 (the router itself) as reference")
    out = []
    for threshold in sorted({r["threshold"] for r in rows}):
        mine = [r for r in rows if r["threshold"] == threshold]
        fewer = [
            base[r["seed"]]["experts_read_per_token"] / r["experts_read_per_token"] for r in mine
        ]
        cost = [r["perplexity"] / base[r["seed"]]["perplexity"] - 1 for r in mine]
        hit = [r["hit_rate"] for r in mine]
        out.append(
            {
                "threshold": threshold,
                "fewer_reads": bootstrap_ci(fewer, seed=seed),
                "perplexity_cost": bootstrap_ci(cost, seed=seed),
                "hit_rate": bootstrap_ci(hit, seed=seed),
            }
        )
    return out


def meets_target(summary, min_fewer: float = 1.5, max_cost: float = 0.01) -> list[float]:
    """Thresholds whose CI says >= min_fewer x fewer reads and <= max_cost perplexity cost."""
    return [
        s["threshold"]
        for s in summary
        if s["fewer_reads"]["low"] >= min_fewer and s["perplexity_cost"]["high"] <= max_cost
    ]


def cost_table(miss_rates: dict[str, float], links=LINKS) -> list[dict]:
    """Modelled Q3-Omni decode bound per (arm, link) from each arm's measured miss rate."""
    return [
        {"arm": arm, "link": link, "miss_rate": m, **modelled_tokens_per_s(m, rate)}
        for arm, m in miss_rates.items()
        for link, rate in links.items()
    ]


# --- figures -------------------------------------------------------------------------------

POLICY_STYLE = {
    "lru": ("C0", "-", "global LRU (today)"),
    "layer_lru": ("C1", "-", "per-layer LRU"),
    "lfu": ("C2", "-", "LFU"),
    "activation": ("C4", "-", "activation-aware (decayed)"),
    "belady": ("k", "--", "Belady (offline optimum)"),
}


def plot_policies(rows):
    """Hit rate against cache size per policy, mean over contexts (band: min-max), per phase."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PHASES), figsize=(10, 3.6), sharey=True)
    for ax, phase in zip(axes, PHASES, strict=True):
        for policy, (color, ls, label) in POLICY_STYLE.items():
            mine = [r for r in rows if r["phase"] == phase and r["policy"] == policy]
            fractions = sorted({r["fraction"] for r in mine})
            per = [[r["hit_rate"] for r in mine if r["fraction"] == f] for f in fractions]
            x = [100 * f for f in fractions]
            ax.plot(x, [np.mean(p) for p in per], color=color, ls=ls, marker="o", ms=3, label=label)
            ax.fill_between(
                x, [min(p) for p in per], [max(p) for p in per], color=color, alpha=0.12, lw=0
            )
        ax.set_title(f"{phase} traces")
        ax.set_xlabel("cache size (% of all experts)")
    axes[0].set_ylabel("hit rate")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_prefetch(quality: dict, prefetch_rows):
    """Left: next-layer guess precision per layer. Right: experts read per token, split into
    stalls (demand misses) and read-aheads, with and without prefetch, per context and phase."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    layers = sorted(quality)
    left.bar([str(x) for x in layers], [quality[x]["precision"] for x in layers], color="C0")
    left.set_xlabel("layer guessed (from the layer before)")
    left.set_ylabel("precision (= recall)")
    left.set_ylim(0, 1)
    rows = [r for r in prefetch_rows if r["policy"] == prefetch_rows[0]["policy"]]
    labels, stalls, ahead = [], [], []
    for r in rows:
        labels.append(f"{r['context'][:4]} {r['phase'][:3]}{' +pf' if r['prefetch'] else ''}")
        stalls.append(r["stalls_per_token"])
        ahead.append(r["experts_read_per_token"] - r["stalls_per_token"])
    x = np.arange(len(rows))
    right.bar(x, stalls, color="C3", label="demand misses (stall)")
    right.bar(x, ahead, bottom=stalls, color="C2", label="read ahead")
    right.set_xticks(x, labels, rotation=60, fontsize=7)
    right.set_ylabel(f"experts read per token ({rows[0]['policy']})")
    right.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_frontier(summary):
    """Factor of fewer experts read per token against the perplexity cost, per threshold
    (95% CIs over seeds), with the issue's target region."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    top = max(2.0, 1.1 * max(x["fewer_reads"]["high"] for x in summary))
    ax.fill_between([-100, 1.0], 1.5, top, color="0.9", lw=0)  # the target region
    ax.axhline(1.5, color="0.5", ls=":", lw=1)
    ax.axvline(1.0, color="0.5", ls=":", lw=1, label="target: >= 1.5x fewer at <= 1% cost")
    for s in summary:
        c, f = s["perplexity_cost"], s["fewer_reads"]
        ax.errorbar(
            100 * c["mean"],
            f["mean"],
            xerr=[[100 * (c["mean"] - c["low"])], [100 * (c["high"] - c["mean"])]],
            yerr=[[f["mean"] - f["low"]], [f["high"] - f["mean"]]],
            fmt="o",
            color="C0",
            ms=4,
            capsize=2,
        )
        ax.annotate(
            f"{s['threshold']:g}",
            (100 * c["mean"], f["mean"]),
            fontsize=8,
            xytext=(4, -10),
            textcoords="offset points",
        )
    costs = [100 * s["perplexity_cost"]["high"] for s in summary]
    ax.set_xlim(
        min(-0.5, min(100 * s["perplexity_cost"]["low"] for s in summary) - 0.5),
        max(costs) * 1.1 + 0.5,
    )
    ax.set_ylim(0.9, top)
    ax.set_xlabel("held-out perplexity cost (%)")
    ax.set_ylabel("x fewer experts read per token")
    ax.set_title("cache-aware selection (labels: logit threshold)", fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_cost(table):
    """Modelled Q3-Omni decode tokens/s bound per arm and link (log scale)."""
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in table))
    links = list(dict.fromkeys(r["link"] for r in table))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        values = [
            next(r["tokens_per_s"] for r in table if r["arm"] == arm and r["link"] == link)
            for link in links
        ]
        ax.bar(np.arange(len(links)) + i * width, values, width, label=arm)
    ax.set_xticks(np.arange(len(links)) + 0.4 - width / 2, links)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s upper bound (transfers only)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def trace_directory(traces_dir=None) -> Path:
    """Where traces are written: `traces_dir`, or a fresh temporary directory for None."""
    import tempfile

    if traces_dir is None:
        return Path(tempfile.mkdtemp(prefix="sage_traces_"))
    path = Path(traces_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_traces(directory) -> dict[str, dict[str, RoutingTrace]]:
    """The traces `save_traces` wrote, {context: {phase: trace}}."""
    directory = Path(directory)
    traces = {}
    for context in CONTEXTS:
        for phase in PHASES:
            path = directory / f"{context}_{phase}.npz"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no trace for {context}/{phase}")
            traces.setdefault(context, {})[phase] = RoutingTrace.load(path)
    return traces


def rows_at(rows, **match) -> list[dict]:
    """The rows whose fields equal every `match` value."""
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def mean_hit_rate(rows, policy: str, fraction: float, phase: str | None = None) -> float:
    """A policy's hit rate at one size, averaged over contexts (and phases unless given)."""
    match = {"policy": policy, "fraction": fraction}
    if phase is not None:
        match["phase"] = phase
    mine = rows_at(rows, **match)
    if not mine:
        raise ValueError(f"no rows for {match}")
    return float(np.mean([r["hit_rate"] for r in mine]))


def belady_violations(rows) -> list[dict]:
    """Rows of a demand policy (online, or Belady with a horizon) that beat Belady on the
    same trace and size (none if exact). The static cache bypasses the cache on a miss, so
    Belady does not bound it and it is not checked."""
    return [
        r
        for r in rows
        if r["policy"] not in ("belady", "static")
        and r["hit_rate"]
        > rows_at(
            rows, context=r["context"], phase=r["phase"], fraction=r["fraction"], policy="belady"
        )[0]["hit_rate"]
    ]


def prefetch_pairs(prefetch_rows) -> list[tuple[dict, dict]]:
    """(without, with prefetch) rows of the same context, phase and policy."""
    plain = {(r["context"], r["phase"], r["policy"]): r for r in prefetch_rows if not r["prefetch"]}
    return [
        (plain[(r["context"], r["phase"], r["policy"])], r) for r in prefetch_rows if r["prefetch"]
    ]


def best_within_cost(summary, max_cost: float = 0.01) -> dict:
    """The threshold saving the most reads (mean) whose perplexity cost CI stays <= max_cost."""
    cheap = [s for s in summary if s["perplexity_cost"]["high"] <= max_cost]
    if not cheap:
        raise ValueError(f"no threshold keeps the perplexity cost CI within {max_cost}")
    return max(cheap, key=lambda s: s["fewer_reads"]["mean"])


def first_reaching(summary, factor: float = 1.5) -> dict | None:
    """The smallest threshold whose mean reads fall by at least `factor` (None if none)."""
    reaching = [s for s in summary if s["fewer_reads"]["mean"] >= factor]
    return min(reaching, key=lambda s: s["threshold"]) if reaching else None


def plot_bounds(rows, fraction: float, horizons: dict[str, float], online: str):
    """Share of the LRU-to-Belady gap closed at one cache size, per (context, phase): by the
    best online policy, the hindsight static cache, and Belady with each lookahead horizon."""
    import matplotlib.pyplot as plt

    arms = [online, "static", *(f"lookahead {label}" for label in horizons)]
    labels = [f"{online} (online)", "static (hindsight)", *(f"see {x}" for x in horizons)]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    keys = list(gap_closed(rows, fraction, arms[0]))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        shares = [gap_closed(rows, fraction, arm)[key] for arm in arms]
        ax.bar(np.arange(len(arms)) + i * width, shares, width, label=f"{key[0]} {key[1]}")
    ax.axhline(0.5, color="0.4", ls=":", lw=1)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(arms)) + 0.4 - width / 2, labels, rotation=20, fontsize=8)
    ax.set_ylabel("share of LRU-to-Belady gap closed")
    ax.set_title(f"cache of {100 * fraction:g}% of the experts", fontsize=10)
    ax.legend(frameon=False, fontsize=7, ncol=3)
    fig.tight_layout()
    return fig
