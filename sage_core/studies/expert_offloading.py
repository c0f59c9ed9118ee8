"""Experts on demand, measured the way offloading systems are (notebook 09).

The unit of replication is the seed: each seed draws its own held-out windows, and every
number is reported as a mean over seeds with a Student-t interval
(`sage_core.studies.statistics`), comparisons as intervals over per-seed paired differences.

The held-out documents of each context are split in two (`HELDOUT_PARTS`): the odd-indexed
ones are *selection* documents, used only to choose the best online cache policy; the
even-indexed ones are *scoring* documents, on which everything is measured, the chosen
policy included (`choose_and_score`). A choice is never scored on the traces it was made on.

1. Traces: per seed, held-out windows of each context are run through the real load path with
   a `TraceRecorder` as selector; the prompt's forward is the prefill trace, the greedy
   continuation (one token per forward) the decode trace.
2. Policies: every policy of `sage_core.offload.cache_policy`, Belady's MIN and next-layer
   prefetch are simulated on the same traces, token by token (the order a one-token forward
   asks its cache), at several capacities. The simulator is the real cache's policy code
   and is tested to predict the real cache's hits exactly.
3. Cost: bytes moved per token for Q3-Omni's real sizes, turned into an upper bound on
   tokens/s at a link bandwidth (transfers alone; compute, attention and latency ignored),
   extrapolated from the tiny model's miss rates.
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

from sage_core.checkpoint import load_thinker
from sage_core.corpus import CONTEXTS, load_corpus
from sage_core.corpus.heldout import LOG2E, document_stream
from sage_core.dtypes import parse_dtype
from sage_core.model.generation import generate
from sage_core.notebook.progress import progress
from sage_core.offload import cache_policy
from sage_core.offload.cache_selectors import CacheAwareSelector
from sage_core.offload.expert_trace import (
    RoutingTrace,
    TraceRecorder,
    access_sequence,
    concatenate,
    prediction_quality,
    prefetch_plan,
    router_plan,
)
from sage_core.studies.experiments import resolve_model_path
from sage_core.studies.statistics import t_interval

PHASES = ("prefill", "decode")
HELDOUT_PARTS = ("selection", "scoring")  # odd- and even-indexed held-out documents
DEFAULT_SEEDS = 10

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


# --- seeds and per-seed bookkeeping -------------------------------------------------------------


def evaluation_seeds(seed: int, seeds=None, count: int = DEFAULT_SEEDS) -> list[int]:
    """`seeds` as a list, or for None the `count` seeds seed, seed + 1, ..."""
    if seeds is None:
        return list(range(int(seed), int(seed) + count))
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise ValueError(f"seeds must be at least 2 distinct integers, got {seeds}")
    return seeds


def rows_at(rows, **match) -> list[dict]:
    """The rows whose fields equal every `match` value."""
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def seed_values(rows, value: str, **match) -> dict[int, float]:
    """{seed: mean of `value` over the rows matching `match`} (e.g. over contexts, phases)."""
    mine = rows_at(rows, **match)
    if not mine:
        raise ValueError(f"no rows for {match}")
    seeds = sorted({r["seed"] for r in mine})
    return {s: float(np.mean([r[value] for r in mine if r["seed"] == s])) for s in seeds}


def interval(rows, value: str, **match) -> dict:
    """Student-t interval over seeds of the per-seed mean of `value` (see `seed_values`)."""
    return t_interval(list(seed_values(rows, value, **match).values()))


def paired_difference(rows, value: str, arm: dict, reference: dict, **match) -> dict:
    """t interval over seeds of the per-seed mean of `value` at `arm` minus at `reference`
    (both dicts of field values, e.g. {"policy": "lfu"} and {"policy": "lru"})."""
    a = seed_values(rows, value, **match, **arm)
    b = seed_values(rows, value, **match, **reference)
    if a.keys() != b.keys():
        raise ValueError(f"unpaired seeds: {sorted(a)} against {sorted(b)}")
    return t_interval([a[s] - b[s] for s in a])


def per_seed_table(rows, column: str, value: str, spec: str = ".3f", **match) -> str:
    """A text table, one line per seed, one column per value of `column` (in first-seen
    order), of the mean of `value` over the rows matching `match`."""
    mine = rows_at(rows, **match)
    columns = list(dict.fromkeys(r[column] for r in mine))
    by = {c: seed_values(mine, value, **{column: c}) for c in columns}
    seeds = sorted({r["seed"] for r in mine})
    width = max(10, *(len(str(c)) + 2 for c in columns))
    lines = [f"{'seed':>6}" + "".join(f"{str(c):>{width}}" for c in columns)]
    for s in seeds:
        lines.append(f"{s:>6}" + "".join(f"{by[c][s]:>{width}{spec}}" for c in columns))
    return "\n".join(lines)


def interval_table(columns: dict, scale: float = 1.0, spec: str = ".1f", unit: str = "") -> str:
    """A text table of intervals: one line per key of the inner dicts (e.g. (context,
    phase)), one column per outer key; an entry is "mean ±h", h the half-width of the
    (symmetric) t interval, times `scale`, or "mean const" for a sample equal on every seed."""
    names = list(columns)
    keys = list(dict.fromkeys(k for inner in columns.values() for k in inner))

    def label(key):
        return " ".join(key) if isinstance(key, tuple) else str(key)

    def entry(ci):
        mean = f"{scale * ci['mean']:{spec}}{unit}"
        if ci.get("constant"):
            return f"{mean} const"
        half = scale * (ci["high"] - ci["low"]) / 2
        return f"{mean} ±{half:{spec.lstrip('+')}}"

    width = max(14, *(len(str(n)) + 2 for n in names))
    first = max(len(label(k)) for k in keys) + 2
    lines = [f"{'':>{first}}" + "".join(f"{str(n):>{width}}" for n in names)]
    for k in keys:
        row = [entry(columns[n][k]) if k in columns[n] else "-" for n in names]
        lines.append(f"{label(k):>{first}}" + "".join(f"{e:>{width}}" for e in row))
    return "\n".join(lines)


# --- 1. traces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceSettings:
    prompts_per_context: int = 3
    prompt_tokens: int = 64
    decode_tokens: int = 32
    seed: int = 0
    part: str = "scoring"


def heldout_part(documents: list, part: str | None) -> list:
    """`part` of a context's held-out documents: "selection" the odd-indexed, "scoring" the
    even-indexed, None all of them."""
    if part is None:
        return list(documents)
    if part not in HELDOUT_PARTS:
        raise ValueError(f"part must be one of {HELDOUT_PARTS} or None, got {part!r}")
    first = 1 if part == "selection" else 0
    return [d for i, d in enumerate(documents) if i % 2 == first]


def heldout_windows(
    tokenizer, context: str, count: int, length: int, seed: int, corpus=None, part="scoring"
):
    """`count` non-overlapping windows of `length` tokens from the stream of the context's
    held-out documents of `part` (see `heldout_part`), at seeded random positions, in stream
    order. Each part draws from its own random stream. -> list of (length,) int64 tensors."""
    corpus = corpus or load_corpus()
    documents = heldout_part(corpus.documents(context, "heldout"), part)
    ids, _ = document_stream(documents, tokenizer)
    slots = ids.size // length
    if slots < count:
        raise ValueError(
            f"{context} ({part}): held-out text has {ids.size} tokens, too few for {count} "
            f"windows of {length}"
        )
    stream = 0 if part is None else 1 + HELDOUT_PARTS.index(part)
    rng = np.random.default_rng([seed, CONTEXTS.index(context), stream])
    picks = np.sort(rng.choice(slots, size=count, replace=False))
    return [torch.from_numpy(ids[p * length : (p + 1) * length].copy()) for p in picks]


@torch.no_grad()
def _record_context(model, recorder, tokenizer, context, settings, corpus):
    device = model.model.embed_tokens.weight.device
    prompts = heldout_windows(
        tokenizer,
        context,
        settings.prompts_per_context,
        settings.prompt_tokens,
        settings.seed,
        corpus,
        settings.part,
    )
    parts = {phase: [] for phase in PHASES}
    for prompt in prompts:
        recorder.clear()
        generate(model, prompt[None].to(device), settings.decode_tokens + 1)
        trace = recorder.trace()
        first = trace.call_of == 0
        for phase, rows in (("prefill", first), ("decode", ~first)):
            parts[phase].append(trace.rows(rows))
    return {phase: concatenate(parts[phase]) for phase in PHASES}


def record_trace_sets(
    model, tokenizer, settings: TraceSettings, seeds
) -> dict[int, dict[str, dict[str, RoutingTrace]]]:
    """{seed: {context: {"prefill": trace, "decode": trace}}} from the model's own router,
    each seed on its own windows of `settings.part` (settings.seed is replaced by each)."""
    from dataclasses import replace

    recorder = TraceRecorder(model)
    model.set_selector(recorder)
    corpus = load_corpus()
    sets: dict = {}
    work = [(s, c) for s in seeds for c in CONTEXTS]
    try:
        for seed, context in progress(work, desc=f"traces ({settings.part})"):
            mine = replace(settings, seed=seed)
            sets.setdefault(seed, {})[context] = _record_context(
                model, recorder, tokenizer, context, mine, corpus
            )
    finally:
        model.set_selector(None)
    return sets


def save_traces(traces, directory) -> list:
    """One `<context>_<phase>.npz` per trace under `directory`."""
    directory = Path(directory)
    return [
        trace.save(directory / f"{context}_{phase}.npz")
        for context, phases in traces.items()
        for phase, trace in phases.items()
    ]


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


def save_trace_sets(sets, directory) -> list:
    """Each seed's traces under `directory/seed_<seed>/` (see `save_traces`)."""
    directory = Path(directory)
    return [
        p for seed, traces in sets.items() for p in save_traces(traces, directory / f"seed_{seed}")
    ]


def load_trace_sets(directory, seeds) -> dict[int, dict[str, dict[str, RoutingTrace]]]:
    """The trace sets `save_trace_sets` wrote, for `seeds`."""
    return {int(s): load_traces(Path(directory) / f"seed_{s}") for s in seeds}


def trace_directory(traces_dir=None) -> Path:
    """Where traces are written: `traces_dir`, or a fresh temporary directory for None."""
    import tempfile

    if traces_dir is None:
        return Path(tempfile.mkdtemp(prefix="sage_traces_"))
    path = Path(traces_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- 2. policies ----------------------------------------------------------------------------


def capacities(total: int, fractions) -> list[int]:
    """Cache sizes (in experts) for fractions of all experts, at least one each."""
    return [max(1, round(f * total)) for f in fractions]


def nearest_fraction(fractions, capacity: float) -> float:
    """The cache size of `fractions` closest to `capacity` (both fractions of all experts)."""
    return min(fractions, key=lambda f: abs(f - capacity))


def _cells(sets):
    """(seed, context, phase, trace) for every trace of every seed."""
    return [
        (seed, context, phase, trace)
        for seed, traces in sets.items()
        for context, phases in traces.items()
        for phase, trace in phases.items()
    ]


def simulate_policies(
    sets, fractions=(0.1, 0.25, 0.5, 0.75), policies=cache_policy.EXISTING_POLICIES, part="scoring"
) -> list[dict]:
    """One row per (seed, context, phase, capacity, policy incl. "belady") of the trace sets
    {seed: {context: {phase: trace}}}: hit rate and experts read per token (demand misses).
    `part` labels the rows with the documents the traces came from."""
    rows = []
    for seed, context, phase, trace in progress(_cells(sets), desc=f"policies ({part})"):
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
                        "part": part,
                        "seed": seed,
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


def simulate_bounds(sets, fraction: float, horizons: dict[str, float]) -> list[dict]:
    """At one cache size, per (seed, context, phase): the hindsight static cache ("static")
    and Belady restricted to each lookahead horizon ("lookahead <label>"), rows shaped like
    `simulate_policies`' so `gap_closed` reads them beside it."""
    rows = []
    for seed, context, phase, trace in _cells(sets):
        keys, token_of = access_sequence(trace)
        calls = cache_policy.layer_calls(keys, token_of)
        cap = capacities(trace.num_experts * len(trace.layers), [fraction])[0]
        sims = {"static": cache_policy.simulate_static(keys, cap)}
        for label, horizon in horizons.items():
            sims[f"lookahead {label}"] = cache_policy.simulate_lookahead(keys, cap, horizon, calls)
        for name, sim in sims.items():
            rows.append(
                {
                    "seed": seed,
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


def gap_closed(rows, fraction: float, policy: str) -> dict[tuple, float]:
    """{(seed, context, phase): (policy - lru) / (belady - lru)} hit rates at one size."""
    at: dict = {}
    for r in rows:
        if r["fraction"] == fraction:
            at.setdefault((r["seed"], r["context"], r["phase"]), {})[r["policy"]] = r["hit_rate"]
    return {
        key: (h[policy] - h["lru"]) / (h["belady"] - h["lru"])
        for key, h in sorted(at.items())
        if policy in h
    }


def gap_closed_by_cell(rows, fraction: float, policy: str) -> dict[tuple[str, str], dict]:
    """{(context, phase): t interval over seeds of the share of the gap `policy` closes}."""
    shares = gap_closed(rows, fraction, policy)
    cells = sorted({(c, p) for _, c, p in shares})
    return {
        cell: t_interval([v for (_, c, p), v in shares.items() if (c, p) == cell]) for cell in cells
    }


def gap_closed_difference(rows, fraction: float, arm: str, reference: str) -> dict:
    """{(context, phase): t interval over seeds of the paired difference in the share of the
    gap closed, `arm` minus `reference`}."""
    a, b = gap_closed(rows, fraction, arm), gap_closed(rows, fraction, reference)
    if a.keys() != b.keys():
        raise ValueError(f"{arm} and {reference} were not run on the same traces")
    cells = sorted({(c, p) for _, c, p in a})
    return {cell: t_interval([a[k] - b[k] for k in a if (k[1], k[2]) == cell]) for cell in cells}


def gap_closed_overall(rows, fraction: float, policy: str) -> dict:
    """t interval over seeds of the share of the gap closed, averaged per seed over the
    (context, phase) cells."""
    shares = gap_closed(rows, fraction, policy)
    seeds = sorted({s for s, _, _ in shares})
    return t_interval([np.mean([v for k, v in shares.items() if k[0] == s]) for s in seeds])


def best_online_policy(rows, fraction: float, policies=cache_policy.EXISTING_POLICIES) -> str:
    """The demand policy with the highest mean hit rate over every row at `fraction` (every
    seed, context and phase given)."""
    means = {}
    for p in policies:
        rates = [r["hit_rate"] for r in rows if r["policy"] == p and r["fraction"] == fraction]
        if not rates:
            raise ValueError(f"no rows for policy {p!r} at fraction {fraction}")
        means[p] = float(np.mean(rates))
    return max(means, key=means.get)


def choose_and_score(
    selection_rows, scoring_rows, fraction: float, policies=cache_policy.EXISTING_POLICIES
) -> dict:
    """Choose the best online policy on the selection traces, score it on the scoring ones.

    The choice (`best_online_policy`) sees only `selection_rows` (traces of the selection
    documents); everything reported about it comes from `scoring_rows` (other documents),
    as intervals over the scoring seeds. -> {"policy", "selection": {policy: t interval of
    the per-seed mean hit rate on the selection traces}, "scoring": {the same on the scoring
    traces}, "gap_closed": {(context, phase): interval}, "gap_closed_overall": interval,
    "vs_lru": interval of the per-seed hit-rate difference chosen - lru on the scoring
    traces}."""
    for rows, part in ((selection_rows, "selection"), (scoring_rows, "scoring")):
        parts = {r.get("part") for r in rows}
        if parts != {part}:
            raise ValueError(f"{part} rows must all come from {part} traces, got {parts}")
    chosen = best_online_policy(selection_rows, fraction, policies)
    return {
        "policy": chosen,
        "selection": {
            p: interval(selection_rows, "hit_rate", policy=p, fraction=fraction) for p in policies
        },
        "scoring": {
            p: interval(scoring_rows, "hit_rate", policy=p, fraction=fraction)
            for p in (*policies, "belady")
        },
        "gap_closed": gap_closed_by_cell(scoring_rows, fraction, chosen),
        "gap_closed_overall": gap_closed_overall(scoring_rows, fraction, chosen),
        "vs_lru": paired_difference(
            scoring_rows, "hit_rate", {"policy": chosen}, {"policy": "lru"}, fraction=fraction
        ),
    }


def smallest_closing(rows, fraction: float, horizons: dict[str, float], share: float = 0.5):
    """The label of the shortest lookahead whose share of the LRU-to-Belady gap closed has a
    lower interval bound >= `share` in every (context, phase), or None."""
    for label in sorted(horizons, key=horizons.get):
        cells = gap_closed_by_cell(rows, fraction, f"lookahead {label}")
        if min(ci["low"] for ci in cells.values()) >= share:
            return label
    return None


def belady_violations(rows) -> list[dict]:
    """Rows of a demand policy (online, or Belady with a horizon) that beat Belady on the
    same trace and size (none if exact). The static cache bypasses the cache on a miss, so
    Belady does not bound it and it is not checked."""
    belady = {
        (r["seed"], r["context"], r["phase"], r["fraction"]): r["hit_rate"]
        for r in rows
        if r["policy"] == "belady"
    }
    return [
        r
        for r in rows
        if r["policy"] not in ("belady", "static")
        and r["hit_rate"] > belady[(r["seed"], r["context"], r["phase"], r["fraction"])]
    ]


def simulate_prefetch(sets, fraction: float, policies=("lru",)) -> list[dict]:
    """Per (seed, context, phase, policy): demand hit rate, experts read per token (misses
    plus read-aheads) and wasted read-aheads per token, with and without next-layer prefetch."""
    rows = []
    for seed, context, phase, trace in _cells(sets):
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
                        "seed": seed,
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


def prefetch_pairs(prefetch_rows) -> list[tuple[dict, dict]]:
    """(without, with prefetch) rows of the same seed, context, phase and policy."""

    def key(r):
        return (r["seed"], r["context"], r["phase"], r["policy"])

    plain = {key(r): r for r in prefetch_rows if not r["prefetch"]}
    return [(plain[key(r)], r) for r in prefetch_rows if r["prefetch"]]


def prefetch_effect(prefetch_rows, field: str) -> dict[tuple[str, str], dict]:
    """{(context, phase): t interval over seeds of `field` with prefetch minus without}
    (one policy's rows)."""
    if len({r["policy"] for r in prefetch_rows}) != 1:
        raise ValueError("prefetch_effect reads one policy's rows")
    diffs: dict = {}
    for plain, ahead in prefetch_pairs(prefetch_rows):
        diffs.setdefault((plain["context"], plain["phase"]), []).append(ahead[field] - plain[field])
    return {cell: t_interval(v) for cell, v in diffs.items()}


def prefetch_quality(sets) -> dict[int, dict]:
    """Per layer: t interval over seeds of the next-layer guess's precision (= recall with
    as many guesses as choices), each seed's traces pooled."""
    per_seed = [
        prediction_quality(concatenate([t for phases in traces.values() for t in phases.values()]))
        for traces in sets.values()
    ]
    return {layer: t_interval([q[layer]["precision"] for q in per_seed]) for layer in per_seed[0]}


# --- 3. cost on the real model's sizes (an extrapolation) ------------------------------------


def decode_miss_rates(rows, fraction: float, policies) -> dict[str, dict]:
    """{policy: t interval over seeds of the decode miss rate (1 - hit rate), averaged per
    seed over contexts} at one cache size."""
    out = {}
    for p in policies:
        hits = seed_values(rows, "hit_rate", policy=p, fraction=fraction, phase="decode")
        out[p] = t_interval([1.0 - h for h in hits.values()])
    return out


def cost_table(miss_rates: dict[str, dict], links=LINKS) -> list[dict]:
    """Modelled Q3-Omni decode bound per (arm, link) from each arm's miss-rate interval
    (`t_interval` dicts): bytes per token and tokens/s at the mean miss rate, and tokens/s
    at the interval's ends ("tokens_per_s_low" from the highest miss rate)."""
    rows = []
    for arm, miss in miss_rates.items():
        for link, rate in links.items():
            at = modelled_tokens_per_s(miss["mean"], rate)
            rows.append(
                {
                    "arm": arm,
                    "link": link,
                    "miss": miss,
                    **at,
                    "tokens_per_s_low": modelled_tokens_per_s(miss["high"], rate)["tokens_per_s"],
                    "tokens_per_s_high": modelled_tokens_per_s(miss["low"], rate)["tokens_per_s"],
                }
            )
    return rows


# --- 4. cache-aware selection ----------------------------------------------------------------


@dataclass(frozen=True)
class FrontierSettings:
    capacity: int = 32
    policy: str = "lru"
    thresholds: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    seeds: tuple = tuple(range(DEFAULT_SEEDS))
    windows_per_context: int = 1
    window_tokens: int = 48


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


def scoring_windows(tokenizer, seed: int, count: int, length: int, corpus=None, part="scoring"):
    """[(context, window)]: `count` windows of `length` tokens per context from the `part`
    documents (scoring by default), drawn for `seed`."""
    corpus = corpus or load_corpus()
    return [
        (c, w)
        for c in CONTEXTS
        for w in heldout_windows(tokenizer, c, count, length, seed, corpus, part)
    ]


def cache_aware_frontier(
    model_path, tokenizer, settings: FrontierSettings, device="cpu", dtype="float32"
) -> list[dict]:
    """One row per (seed, threshold): perplexity and experts read per token with a
    `CacheAwareSelector` over a fresh bounded cache; each seed scores its own windows of the
    scoring documents."""
    rows = []
    corpus = load_corpus()
    work = [(s, t) for s in settings.seeds for t in settings.thresholds]
    windows = {
        s: [
            w
            for _, w in scoring_windows(
                tokenizer, s, settings.windows_per_context, settings.window_tokens, corpus
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


@dataclass(frozen=True)
class SwapArm:
    """One arm of the tail-swap frontier: a cache policy and a `CacheAwareSelector`'s
    threshold (router logits; 0 is the router itself), `keep_top` and per-token `budget`."""

    name: str
    policy: str = "lru"
    threshold: float = 0.0
    keep_top: int = 0
    budget: int | None = None


def swap_frontier(
    model_path,
    tokenizer,
    arms,
    seeds,
    capacity: int,
    window_tokens: int = 32,
    part: str = "scoring",
    device="cpu",
    dtype="float32",
) -> list[dict]:
    """One row per (seed, arm): perplexity, experts read per token and swaps per token,
    teacher-forced one token at a time through a fresh bounded cache on one window per
    context of the `part` documents drawn for the seed."""
    rows = []
    corpus = load_corpus()
    windows = {
        s: [w for _, w in scoring_windows(tokenizer, s, 1, window_tokens, corpus, part)]
        for s in seeds
    }
    for seed, arm in progress([(s, a) for s in seeds for a in arms], desc="tail swaps"):
        model = bounded_cache_model(model_path, capacity, arm.policy, device, dtype)
        selector = CacheAwareSelector(
            model, arm.threshold, keep_top=arm.keep_top, budget=arm.budget
        )
        model.set_selector(selector)
        run = teacher_forced_run(model, windows[seed])
        rows.append(
            {
                "seed": seed,
                "arm": arm.name,
                "perplexity": float(2.0 ** run["bits"].mean()),
                "experts_read_per_token": run["misses"] / run["tokens"],
                "swapped_per_token": selector.swapped / run["tokens"],
                "tokens": run["tokens"],
            }
        )
    return rows


def swap_summary(rows, reference: str) -> dict[str, dict]:
    """{arm: t intervals over seeds, paired with `reference` on the same seed, of the factor
    by which reads fall ("fewer_reads": reference reads / arm reads), the relative
    perplexity change ("perplexity_cost") and swaps per token}."""
    base = {r["seed"]: r for r in rows if r["arm"] == reference}
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        if {r["seed"] for r in mine} != set(base):
            raise ValueError(f"{arm}: seeds differ from {reference}'s")
        out[arm] = {
            "fewer_reads": t_interval(
                [
                    base[r["seed"]]["experts_read_per_token"] / r["experts_read_per_token"]
                    for r in mine
                ]
            ),
            "perplexity_cost": t_interval(
                [r["perplexity"] / base[r["seed"]]["perplexity"] - 1 for r in mine]
            ),
            "swapped_per_token": t_interval([r["swapped_per_token"] for r in mine]),
        }
    return out


TAIL_SWAP_ARMS = (  # the notebook's arms; threshold, keep_top and budgets from `tune_swaps`
    SwapArm("router, lru", "lru"),
    SwapArm("router, learned", "learned"),
    SwapArm("tail b2, learned", "learned", 1.0, 1, 2),
    SwapArm("tail b4, learned", "learned", 1.0, 1, 4),
)
SWAP_TUNING_SEEDS = (1000, 1001, 1002, 1003)


def tune_swaps(capacity: int = 32, window_tokens: int = 32) -> list[dict]:
    """The grid the tail-swap arms were chosen from, on windows of the *selection*
    documents of tuning seeds (never the scoring documents the notebook reports):
    thresholds 1, 2, 4 x budgets 2, 4, 8, keep_top 1, on the learned policy. Prints the
    summary against the router with LRU; returns the rows."""
    from sage_core.studies.experiments import load_model
    from sage_core.studies.statistics import format_interval

    torch.manual_seed(0)
    torch.set_num_threads(1)
    _, tokenizer, _ = load_model(None, "cpu", "float32")
    arms = [SwapArm("router, lru", "lru"), SwapArm("router, learned", "learned")]
    arms += [
        SwapArm(f"t{t:g} b{b}, learned", "learned", t, 1, b)
        for t in (1.0, 2.0, 4.0)
        for b in (2, 4, 8)
    ]
    rows = swap_frontier(
        None, tokenizer, arms, SWAP_TUNING_SEEDS, capacity, window_tokens, part="selection"
    )
    for arm, s in swap_summary(rows, "router, lru").items():
        print(
            f"{arm:>18}: fewer reads {format_interval(s['fewer_reads'], spec='.3f')}; "
            f"perplexity cost {format_interval(s['perplexity_cost'], 100, '+.2f', '%')}"
        )
    return rows


def frontier_summary(rows) -> list[dict]:
    """Per threshold, paired with threshold 0 on the same seed, t intervals over seeds of:
    the factor by which experts read per token fall ("fewer_reads": reads at 0 / reads),
    the relative perplexity change ("perplexity_cost"), the hit rate, reads per token and
    perplexity. At threshold 0 the paired values are constant (1 and 0)."""
    base = {r["seed"]: r for r in rows if r["threshold"] == 0}
    if not base:
        raise ValueError("the frontier needs threshold 0 (the router itself) as reference")
    out = []
    for threshold in sorted({r["threshold"] for r in rows}):
        mine = [r for r in rows if r["threshold"] == threshold]
        out.append(
            {
                "threshold": threshold,
                "fewer_reads": t_interval(
                    [
                        base[r["seed"]]["experts_read_per_token"] / r["experts_read_per_token"]
                        for r in mine
                    ]
                ),
                "perplexity_cost": t_interval(
                    [r["perplexity"] / base[r["seed"]]["perplexity"] - 1 for r in mine]
                ),
                "hit_rate": t_interval([r["hit_rate"] for r in mine]),
                "reads_per_token": t_interval([r["experts_read_per_token"] for r in mine]),
                "perplexity": t_interval([r["perplexity"] for r in mine]),
            }
        )
    return out


def frontier_steps(rows, field: str = "experts_read_per_token") -> list[dict]:
    """Between consecutive thresholds: t interval over seeds of the paired difference of
    `field` (larger threshold minus smaller)."""
    by = {(r["seed"], r["threshold"]): r[field] for r in rows}
    thresholds = sorted({t for _, t in by})
    seeds = sorted({s for s, _ in by})
    return [
        {
            "from": a,
            "to": b,
            "difference": t_interval([by[(s, b)] - by[(s, a)] for s in seeds]),
        }
        for a, b in zip(thresholds, thresholds[1:], strict=False)
    ]


def target_verdicts(summary, min_fewer: float = 1.5, max_cost: float = 0.01) -> dict:
    """{threshold: verdict} on the target ">= min_fewer x fewer reads at <= max_cost
    perplexity cost", from the 95% intervals: "met" (fewer-reads low >= min_fewer and cost
    high <= max_cost), "too few reads saved" (fewer-reads high < min_fewer), "too costly"
    (cost low > max_cost), else "open" (the intervals straddle the target)."""
    out = {}
    for s in summary:
        f, c = s["fewer_reads"], s["perplexity_cost"]
        if f["low"] >= min_fewer and c["high"] <= max_cost:
            out[s["threshold"]] = "met"
        elif f["high"] < min_fewer:
            out[s["threshold"]] = "too few reads saved"
        elif c["low"] > max_cost:
            out[s["threshold"]] = "too costly"
        else:
            out[s["threshold"]] = "open"
    return out


def meets_target(summary, min_fewer: float = 1.5, max_cost: float = 0.01) -> list[float]:
    """Thresholds whose intervals say >= min_fewer x fewer reads and <= max_cost cost."""
    return [t for t, v in target_verdicts(summary, min_fewer, max_cost).items() if v == "met"]


def first_reaching(summary, factor: float = 1.5) -> dict | None:
    """The smallest threshold whose fewer-reads interval lies at or above `factor` (None if
    none)."""
    reaching = [s for s in summary if s["fewer_reads"]["low"] >= factor]
    return min(reaching, key=lambda s: s["threshold"]) if reaching else None


# --- 4b. trust and the cache together ---------------------------------------------------------


class BrokenOnLoad:
    """An `ExpertSource` whose broken experts' weights are replaced as they are read.

    `trust_runs.Breakage` edits the weights of a resident model; a model with an expert
    cache holds no experts until it reads them, so the same broken weights (built by a
    `Breakage` on the resident model) are written into each broken expert as the cache
    loads it. Perplexity and reads then come from one run through the real cache: the
    bytes read are the file's, and the selector sees the cache as it is. Replaying the
    choices of a resident run through the simulator would not do: a cache-aware selector
    chooses from what is resident, so its choices depend on the cache it runs with."""

    def __init__(self, source, broken: dict):
        self.source = source
        self.broken = {int(e): weights for e, weights in broken.items()}  # {e: {name: w}}

    def __getattr__(self, name):
        return getattr(self.source, name)

    def read(self, expert: int, into=None):
        (gate_up, down), nbytes = self.source.read(expert, into=into)
        read = {"gate_up_proj": gate_up, "down_proj": down}
        with torch.no_grad():
            for name, weight in self.broken.get(int(expert), {}).items():
                read[name].copy_(weight)
        return (gate_up, down), nbytes


def break_on_load(model, breakage) -> None:
    """Install `breakage` (every context broken) in `model`'s on-demand experts."""
    if breakage.contexts is not None:
        raise ValueError("break_on_load needs a breakage of every context (contexts=None)")
    blocks = _on_demand(model)
    by_layer: dict = {}
    for (layer, e, name), weight in breakage.broken.items():
        by_layer.setdefault(layer, {}).setdefault(e, {})[name] = weight
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
    seeds: tuple = tuple(range(DEFAULT_SEEDS))
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
    the broken model through a fresh bounded cache, on the seed's windows of the scoring
    documents (one per context, as the frontier's). "oracle" excludes exactly the broken
    experts (`OracleSelector`, perfect trust); "*cache_aware" wraps the arm's selector in
    `CacheAwareSelector` at `threshold`."""
    from sage_core.trust import OracleSelector, TrustTable

    corpus = load_corpus()
    rows = []
    work = [(s, a) for s in settings.seeds for a in TRUST_CACHE_ARMS]
    breakages, windows = {}, {}
    for seed in settings.seeds:
        breakages[seed] = seed_breakage(resident_model, tokenizer, settings, seed, corpus)
        windows[seed] = scoring_windows(tokenizer, seed, 1, settings.window_tokens, corpus)
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
    by = {(r["seed"], r["arm"]): r[field] for r in rows}
    seeds = sorted({s for s, a in by if a == arm})
    if ratio:
        return t_interval([by[(s, arm)] / by[(s, reference)] - 1 for s in seeds])
    return t_interval([by[(s, arm)] - by[(s, reference)] for s in seeds])


# --- figures -------------------------------------------------------------------------------

POLICY_STYLE = {
    "lru": ("C0", "-", "global LRU (today)"),
    "layer_lru": ("C1", "-", "per-layer LRU"),
    "lfu": ("C2", "-", "LFU"),
    "activation": ("C4", "-", "activation-aware (decayed)"),
    "belady": ("k", "--", "Belady (offline optimum)"),
}


def _errors(ci: dict, scale: float = 1.0) -> list[list[float]]:
    return [[scale * (ci["mean"] - ci["low"])], [scale * (ci["high"] - ci["mean"])]]


def plot_policies(rows):
    """Hit rate against cache size per policy, per phase: the mean over seeds of each seed's
    mean over contexts, with its 95% t interval over seeds as a band."""
    import matplotlib.pyplot as plt

    seeds = len({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, len(PHASES), figsize=(10, 3.6), sharey=True)
    for ax, phase in zip(axes, PHASES, strict=True):
        for policy, (color, ls, label) in POLICY_STYLE.items():
            fractions = sorted({r["fraction"] for r in rows_at(rows, phase=phase, policy=policy)})
            cis = [
                interval(rows, "hit_rate", phase=phase, policy=policy, fraction=f)
                for f in fractions
            ]
            x = [100 * f for f in fractions]
            ax.plot(x, [c["mean"] for c in cis], color=color, ls=ls, marker="o", ms=3, label=label)
            ax.fill_between(
                x, [c["low"] for c in cis], [c["high"] for c in cis], color=color, alpha=0.15, lw=0
            )
        ax.set_title(f"{phase} traces (scoring documents, {seeds} seeds)", fontsize=10)
        ax.set_xlabel("cache size (% of all experts)")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("hit rate (band: 95% t interval)")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_bounds(rows, fraction: float, horizons: dict[str, float], online: str):
    """Share of the LRU-to-Belady gap closed at one cache size, per (context, phase), mean
    and 95% t interval over seeds: by the chosen online policy, the hindsight static cache,
    and Belady with each lookahead horizon."""
    import matplotlib.pyplot as plt

    arms = [online, "static", *(f"lookahead {label}" for label in horizons)]
    labels = [f"{online} (online)", "static (hindsight)", *(f"see {x}" for x in horizons)]
    by_arm = {arm: gap_closed_by_cell(rows, fraction, arm) for arm in arms}
    cells = list(by_arm[arms[0]])
    seeds = len({r["seed"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(cells)
    for i, cell in enumerate(cells):
        x = np.arange(len(arms)) + (i - (len(cells) - 1) / 2) * width
        means = [by_arm[a][cell]["mean"] for a in arms]
        err = np.array([_errors(by_arm[a][cell]) for a in arms])[:, :, 0].T
        ax.errorbar(x, means, yerr=err, fmt="o", ms=3, capsize=2, label=f"{cell[0]} {cell[1]}")
    ax.axhline(0.5, color="0.4", ls=":", lw=1)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(arms)), labels, rotation=20, fontsize=8)
    ax.set_ylabel("share of LRU-to-Belady gap closed")
    ax.set_title(
        f"cache of {100 * fraction:g}% of the experts: mean and 95% t interval over {seeds} seeds",
        fontsize=10,
    )
    ax.legend(frameon=False, fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def plot_prefetch(quality: dict, prefetch_rows, chance: float):
    """Left: next-layer guess precision per layer (95% t interval over seeds) against chance.
    Right: paired per seed, prefetch minus no prefetch, per context and phase: the change in
    stalls (demand misses) and in experts read per token, with 95% t intervals."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    layers = sorted(quality)
    left.errorbar(
        [str(x) for x in layers],
        [quality[x]["mean"] for x in layers],
        yerr=np.array([_errors(quality[x]) for x in layers])[:, :, 0].T,
        fmt="o",
        color="C0",
        capsize=3,
    )
    left.axhline(chance, color="0.5", ls=":", lw=1, label=f"chance ({chance:.3f})")
    left.set_xlabel("layer guessed (from the layer before)")
    left.set_ylabel("precision (= recall)")
    left.set_ylim(0, 1)
    left.legend(frameon=False, fontsize=8)
    policy = prefetch_rows[0]["policy"]
    effects = {
        "stalls per token": prefetch_effect(prefetch_rows, "stalls_per_token"),
        "experts read per token": prefetch_effect(prefetch_rows, "experts_read_per_token"),
    }
    cells = list(effects["stalls per token"])
    for i, (name, by_cell) in enumerate(effects.items()):
        x = np.arange(len(cells)) + (i - 0.5) * 0.3
        right.errorbar(
            x,
            [by_cell[c]["mean"] for c in cells],
            yerr=np.array([_errors(by_cell[c]) for c in cells])[:, :, 0].T,
            fmt="o",
            color=("C3", "C2")[i],
            capsize=2,
            label=name,
        )
    right.axhline(0.0, color="k", lw=0.6)
    right.set_xticks(np.arange(len(cells)), [f"{c} {p}" for c, p in cells], rotation=30, fontsize=8)
    right.set_ylabel("with prefetch - without")
    right.set_title(f"paired per seed ({policy}), 95% t intervals", fontsize=10)
    right.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_frontier(summary):
    """Factor of fewer experts read per token against the perplexity cost, per threshold
    (95% t intervals over seeds, paired with threshold 0), with the issue's target region."""
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
            xerr=_errors(c, 100),
            yerr=_errors(f),
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
    ax.set_xlabel("held-out perplexity cost (%), paired with threshold 0")
    ax.set_ylabel("x fewer experts read per token")
    n = summary[0]["fewer_reads"]["n"]
    ax.set_title(
        f"cache-aware selection, tiny model (labels: logit threshold; {n} seeds)", fontsize=10
    )
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_cost(table):
    """Modelled Q3-Omni decode tokens/s bound per arm and link (log scale): a point at the
    mean miss rate, a bar over the miss rate's 95% interval."""
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in table))
    links = list(dict.fromkeys(r["link"] for r in table))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        mine = [next(r for r in table if r["arm"] == arm and r["link"] == k) for k in links]
        x = np.arange(len(links)) + (i - (len(arms) - 1) / 2) * width
        y = np.array([r["tokens_per_s"] for r in mine])
        err = [
            y - [r["tokens_per_s_low"] for r in mine],
            [r["tokens_per_s_high"] for r in mine] - y,
        ]
        ax.errorbar(x, y, yerr=err, fmt="o", ms=4, capsize=2, label=arm)
    ax.set_xticks(np.arange(len(links)), links)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s upper bound (transfers only)")
    ax.set_title(
        "Q3-Omni decode bound, extrapolated from the tiny model's miss rates (not measured)",
        fontsize=10,
    )
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


# --- 7. eviction by predicted reuse (issue 21) ----------------------------------------------

PREDICTOR_SEED = 1000  # the tuning seed that draws the training windows
PREDICTOR_TUNING_SEED = 1001  # draws the training-text windows the model kind is chosen on
PREDICTOR_SETTINGS = {"prompts_per_context": 96, "prompt_tokens": 64, "decode_tokens": 24}
PREDICTOR_TUNING_PROMPTS = 24
PREDICTOR_MAX_TREE_ROWS = 400_000
PREDICTOR_CAP_STEPS = 32.0


def training_windows(tokenizer, context: str, count: int, length: int, seed: int, corpus=None):
    """`count` windows of `length` tokens from the context's *training* documents (the
    training split without its validation documents, `experiments.ValidationCorpus`), at
    seeded positions: the text the reuse predictor is fitted on, never held-out text."""
    from sage_core.studies.experiments import ValidationCorpus

    corpus = corpus or load_corpus()
    documents = ValidationCorpus(corpus).documents(context, "train")
    ids, _ = document_stream(documents, tokenizer)
    slots = ids.size // length
    rng = np.random.default_rng([seed, CONTEXTS.index(context), 7])
    picks = np.sort(rng.choice(slots, size=min(count, slots), replace=False))
    return [torch.from_numpy(ids[p * length : (p + 1) * length].copy()) for p in picks]


@torch.no_grad()
def record_training_traces(model, tokenizer, seed=PREDICTOR_SEED, settings=None, corpus=None):
    """{context: {phase: trace}} of greedy decodes of training-text windows."""
    settings = dict(PREDICTOR_SETTINGS, **(settings or {}))
    corpus = corpus or load_corpus()
    recorder = TraceRecorder(model)
    model.set_selector(recorder)
    device = model.model.embed_tokens.weight.device
    out = {}
    try:
        for context in CONTEXTS:
            prompts = training_windows(
                tokenizer,
                context,
                settings["prompts_per_context"],
                settings["prompt_tokens"],
                seed,
                corpus,
            )
            parts = {phase: [] for phase in PHASES}
            for prompt in progress(prompts, desc=f"training traces ({context})"):
                recorder.clear()
                generate(model, prompt[None].to(device), settings["decode_tokens"] + 1)
                trace = recorder.trace()
                first = trace.call_of == 0
                for phase, rows in (("prefill", first), ("decode", ~first)):
                    parts[phase].append(trace.rows(rows))
            out[context] = {phase: concatenate(parts[phase]) for phase in PHASES}
    finally:
        model.set_selector(None)
    return out


def predictor_table(traces) -> np.ndarray:
    """The co-occurrence table (`reuse.cooccurrence_table`) counted on every (context,
    phase) trace of `traces`."""
    from sage_core.offload.reuse import cooccurrence_table

    arrays = [t.experts for phases in traces.values() for t in phases.values()]
    return cooccurrence_table(arrays, next(iter(next(iter(traces.values())).values())).num_experts)


def observed_router(trace, predictor=None, router: bool | None = None):
    """The router plan (`expert_trace.router_plan`) a router-fed predictor reads on `trace`,
    None for a predictor without router features (`router` overrides the predictor's)."""
    wanted = predictor.router if router is None else router
    if not wanted:
        return None
    if trace.router is None:
        raise ValueError("a router-fed predictor needs traces with router probabilities")
    return router_plan(trace)


def predictor_rows(
    traces, table, cap: float = PREDICTOR_CAP_STEPS, stride: int = 1, router: bool = False
):
    """(features, labels) of every (context, phase) trace of `traces`, each on its own (the
    clock restarts per trace, as a fresh cache would); with `router`, the router features
    from the traces' recorded probabilities."""
    from sage_core.offload.reuse import training_rows

    xs, ys = [], []
    for phases in traces.values():
        for trace in phases.values():
            keys, _ = access_sequence(trace)
            plan = observed_router(trace, router=router)
            x, y = training_rows(
                keys, trace.layers, trace.num_experts, cap, stride, table=table, router=plan
            )
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def fit_predictor(
    traces,
    cap: float = PREDICTOR_CAP_STEPS,
    stride: int = 1,
    info=None,
    kind: str = "linear",
    max_rows: int | None = None,
    trees: dict | None = None,
    router: bool = False,
):
    """A `ReusePredictor` fitted on every (context, phase) trace of `traces`: the
    co-occurrence table counted on them, then the model (`kind`) on their rows (at most
    `max_rows`, a seeded uniform sample, for the trees); with `router`, on the router
    features too."""
    from sage_core.offload.reuse import ReusePredictor

    table = predictor_table(traces)
    x, y = predictor_rows(traces, table, cap, stride, router)
    if max_rows is not None and y.size > max_rows:
        pick = np.sort(np.random.default_rng(0).choice(y.size, max_rows, replace=False))
        x, y = x[pick], y[pick]
    some = next(iter(next(iter(traces.values())).values()))
    info = dict(info or {}, rows=int(y.size))
    return ReusePredictor.fit(
        x,
        y,
        len(some.layers),
        some.num_experts,
        cap,
        info=info,
        table=table,
        kind=kind,
        trees=trees,
        router=router,
    )


REUSE_FRACTIONS = (0.1, 0.25, 0.5)
REUSE_LOOKAHEAD_TOKENS = (1, 2, 4)


REUSE_ONLINE = (*cache_policy.EXISTING_POLICIES, "layer_aware", "learned")


def simulate_reuse_policies(
    sets, predictor, fractions=REUSE_FRACTIONS, part="scoring", online=REUSE_ONLINE
):
    """Rows as `simulate_policies` for the existing online policies, the layer-aware and
    learned policies (`online`), Belady seeing 1, 2, 4 tokens ahead (`lookahead_<t>tok`) and
    Belady, each with `policy_s_per_token`: the policy's own time per token (wall clock of
    the simulation over the trace's tokens, the bookkeeping included)."""
    import time

    rows = []
    for seed, context, phase, trace in progress(_cells(sets), desc=f"reuse policies ({part})"):
        keys, token_of = access_sequence(trace)
        total = trace.num_experts * len(trace.layers)
        layers = [int(x) for x in trace.layers]
        calls = cache_policy.layer_calls(keys, token_of)
        for cap, fraction in zip(capacities(total, fractions), fractions, strict=True):
            sims = []
            plan = observed_router(trace, predictor)
            for p in online:
                options = {"predictor": predictor} if p == "learned" else {}
                start = time.perf_counter()
                sim = cache_policy.simulate(
                    keys,
                    cache_policy.make_policy(p, cap, layers=layers, **options),
                    router=plan if p == "learned" else None,
                )
                sims.append((sim.policy, sim, time.perf_counter() - start))
            for t in REUSE_LOOKAHEAD_TOKENS:
                sim = cache_policy.simulate_lookahead(keys, cap, t * len(layers), calls)
                sims.append((f"lookahead_{t}tok", sim, float("nan")))
            sims.append(("belady", cache_policy.simulate_belady(keys, cap), float("nan")))
            for name, sim, seconds in sims:
                rows.append(
                    {
                        "part": part,
                        "seed": seed,
                        "context": context,
                        "phase": phase,
                        "fraction": fraction,
                        "capacity": cap,
                        "policy": name,
                        "hit_rate": sim.hit_rate,
                        "experts_read_per_token": sim.experts_read / trace.num_tokens,
                        "policy_s_per_token": seconds / trace.num_tokens,
                    }
                )
    return rows


def markov_prefetch_plan(
    trace: RoutingTrace, table, experts: int, min_probability: float = 0.0
) -> dict[int, list]:
    """{request index: keys to read ahead} in the token-by-token order: before token t's
    first request in layer l (t >= 1), the `experts` experts of layer l the co-occurrence
    table rates most likely for the next token given token t-1's experts in layer l
    (`table[0]`, horizon one token): known one token ahead, so the read can overlap a whole
    token's compute, unlike next-layer prefetch. Only experts rated at least
    `min_probability` are read ahead."""
    n, num_layers, k = trace.experts.shape
    used = np.zeros((n, num_layers, trace.num_experts))
    np.put_along_axis(used, trace.experts.astype(np.int64), 1.0 / k, axis=2)
    scores = np.einsum("nla,lae->nle", used, np.asarray(table)[0])
    top = np.argsort(-scores, axis=2, kind="stable")[:, :, :experts]
    likely = np.take_along_axis(scores, top, axis=2) >= min_probability
    return {
        ((t + 1) * num_layers + li) * k: [
            (int(trace.layers[li]), int(e))
            for e, keep in zip(top[t, li], likely[t, li], strict=True)
            if keep
        ]
        for t in range(n - 1)
        for li in range(num_layers)
    }


PROTECTION_ARMS = ("learned", "learned_protect", "learned_prefetch", "lru", "lru_next_layer")


def simulate_protection(sets, predictor, fraction: float = 0.25, experts: int | None = None):
    """Per (seed, context, phase) at one cache size: the learned policy alone; with the
    `experts` (default: top-k) experts per layer predicted for the next token protected
    from eviction (`learned_protect`, no extra reads); with those experts also read ahead
    one token early, a read-ahead never evicting a protected expert nor a key predicted to
    be needed sooner (`learned_prefetch`); LRU alone and LRU with next-layer prefetch
    (section 3's). Rows: hit rate of demand requests, experts read per token (demand misses
    plus read-aheads) and read-aheads per token."""
    rows = []
    for seed, context, phase, trace in _cells(sets):
        keys, _ = access_sequence(trace)
        cap = capacities(trace.num_experts * len(trace.layers), [fraction])[0]
        layers = [int(x) for x in trace.layers]
        m = trace.top_k if experts is None else experts
        plan = markov_prefetch_plan(trace, predictor.table, m)

        def learned(protect=0, cap=cap, layers=layers):
            return cache_policy.make_policy(
                "learned", cap, layers=layers, predictor=predictor, protect=protect
            )

        seen = observed_router(trace, predictor)
        sims = {
            "learned": cache_policy.simulate(keys, learned(), router=seen),
            "learned_protect": cache_policy.simulate(keys, learned(m), router=seen),
            "learned_prefetch": cache_policy.simulate(keys, learned(m), plan, router=seen),
            "lru": cache_policy.simulate(keys, cache_policy.make_policy("lru", cap)),
            "lru_next_layer": cache_policy.simulate(
                keys, cache_policy.make_policy("lru", cap), prefetch_plan(trace)
            ),
        }
        for name, sim in sims.items():
            rows.append(
                {
                    "seed": seed,
                    "context": context,
                    "phase": phase,
                    "fraction": fraction,
                    "capacity": cap,
                    "policy": name,
                    "hit_rate": sim.hit_rate,
                    "experts_read_per_token": sim.experts_read / trace.num_tokens,
                    "prefetched_per_token": sim.prefetched / trace.num_tokens,
                }
            )
    return rows


def cell_intervals(rows, value: str, policies, fraction: float) -> dict[str, dict]:
    """{policy: {(context, phase): t interval over seeds of `value`}} at one cache size, for
    `interval_table`."""
    cells = sorted({(r["context"], r["phase"]) for r in rows})
    return {
        p: {
            (c, ph): interval(rows, value, policy=p, fraction=fraction, context=c, phase=ph)
            for c, ph in cells
        }
        for p in policies
    }


def gain_over(rows, fraction: float, arm: str, reference: str) -> dict[tuple[str, str], dict]:
    """{(context, phase): t interval over seeds of the paired hit-rate difference}."""
    cells = sorted({(r["context"], r["phase"]) for r in rows})
    return {
        cell: paired_difference(
            rows,
            "hit_rate",
            {"policy": arm},
            {"policy": reference},
            fraction=fraction,
            context=cell[0],
            phase=cell[1],
        )
        for cell in cells
    }


def reads_ratio(rows, fraction: float, arm: str, reference: str = "lru", phase="decode") -> dict:
    """Ratio of means over seeds (paired bootstrap interval) of experts read per token,
    `reference` / `arm` (above 1: `arm` reads fewer), per seed the mean over contexts."""
    from sage_core.studies.statistics import ratio_of_means

    ref = seed_values(
        rows, "experts_read_per_token", policy=reference, fraction=fraction, phase=phase
    )
    mine = seed_values(rows, "experts_read_per_token", policy=arm, fraction=fraction, phase=phase)
    seeds = sorted(ref)
    out = ratio_of_means([ref[s] for s in seeds], [mine[s] for s in seeds])
    return dict(out, mean=out["ratio"])


def distance_auc(traces, predictor, horizons=(1, 2, 4, 8), stride: int = 4) -> dict:
    """{horizon: AUC of the predicted distance for "used within the next `horizon` steps"}
    on every key seen so far at every `stride`-th layer call of `traces` (a list), pooled."""
    from sklearn.metrics import roc_auc_score

    from sage_core.offload.reuse import training_rows

    xs, ys = [], []
    for trace in traces:
        keys, _ = access_sequence(trace)
        x, y = training_rows(
            keys,
            trace.layers,
            trace.num_experts,
            predictor.cap,
            stride,
            table=predictor.table,
            router=observed_router(trace, predictor),
        )
        xs.append(x)
        ys.append(y)
    score = -predictor.predict(np.concatenate(xs))
    steps = np.expm1(np.concatenate(ys))
    return {h: float(roc_auc_score(steps < h, score)) for h in horizons}


def predictor_accuracy(sets, predictor, horizons=(1, 2, 4, 8), stride: int = 4) -> dict:
    """{horizon: t interval over seeds of `distance_auc`}, each seed's traces pooled over
    contexts and phases."""
    per_seed = {h: [] for h in horizons}
    for traces in sets.values():
        auc = distance_auc(
            [t for phases in traces.values() for t in phases.values()], predictor, horizons, stride
        )
        for h in horizons:
            per_seed[h].append(auc[h])
    return {h: t_interval(v) for h, v in per_seed.items()}


def tuning_hit_rates(traces, predictor, fraction: float = 0.25) -> dict[str, float]:
    """{"context phase": hit rate of the learned policy} on `traces` at one cache size."""
    out = {}
    for context, phases in traces.items():
        for phase, trace in phases.items():
            keys, _ = access_sequence(trace)
            cap = capacities(trace.num_experts * len(trace.layers), [fraction])[0]
            layers = [int(x) for x in trace.layers]
            policy = cache_policy.make_policy("learned", cap, layers=layers, predictor=predictor)
            plan = observed_router(trace, predictor)
            out[f"{context} {phase}"] = cache_policy.simulate(keys, policy, router=plan).hit_rate
    return out


PREDICTOR_CANDIDATES = {  # name: (model kind, router features)
    "linear": ("linear", False),
    "trees": ("trees", False),
    "linear+router": ("linear", True),
    "trees+router": ("trees", True),
}


def tuning_report(traces, predictor, fraction: float = 0.25, stride: int = 4) -> dict:
    """On tuning traces {context: {phase: trace}}: the learned policy's hit rate and share of
    the LRU-to-Belady gap closed per "context phase" at `fraction`, and the AUC of the
    predicted distance for "used within h steps" (h = 1, 2, 4, 8), pooled (`distance_auc`)."""
    hits = tuning_hit_rates(traces, predictor, fraction)
    gap = {}
    for context, phases in traces.items():
        for phase, trace in phases.items():
            keys, _ = access_sequence(trace)
            cap = capacities(trace.num_experts * len(trace.layers), [fraction])[0]
            lru = cache_policy.simulate(keys, cache_policy.make_policy("lru", cap)).hit_rate
            belady = cache_policy.simulate_belady(keys, cap).hit_rate
            gap[f"{context} {phase}"] = (hits[f"{context} {phase}"] - lru) / (belady - lru)
    every = [t for phases in traces.values() for t in phases.values()]
    return {
        "hit_rate": hits,
        "gap_closed": gap,
        "auc": distance_auc(every, predictor, stride=stride),
    }


def fit_default_predictor(model_path=None, out=None) -> Path:
    """Record training-text traces on the default model (seed `PREDICTOR_SEED`, the router's
    probabilities included), fit every `PREDICTOR_CANDIDATES` predictor on them (linear or
    trees, with or without the router features), choose the one with the highest mean hit
    rate at 25% on other training-text windows (seed `PREDICTOR_TUNING_SEED`; never
    held-out text), print each one's tuning report (hit rate, gap closed, AUC) and write the
    chosen one with every candidate's tuning scores in its info."""
    from sage_core.offload.reuse import DEFAULT_PREDICTOR
    from sage_core.studies.experiments import load_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, tokenizer, path = load_model(model_path, "cpu", "float32")
    traces = record_training_traces(model, tokenizer)
    tuning = record_training_traces(
        model,
        tokenizer,
        seed=PREDICTOR_TUNING_SEED,
        settings={"prompts_per_context": PREDICTOR_TUNING_PROMPTS},
    )
    info = {
        "text": "training split without validation documents (ValidationCorpus), all contexts",
        "seed": PREDICTOR_SEED,
        **PREDICTOR_SETTINGS,
        "model": path.name,
        "command": "python -m sage_core.studies.expert_offloading fit-predictor",
    }
    fitted = {
        name: fit_predictor(
            traces,
            stride=2,
            info=info,
            kind=kind,
            max_rows=PREDICTOR_MAX_TREE_ROWS if kind == "trees" else None,
            router=router,
        )
        for name, (kind, router) in progress(PREDICTOR_CANDIDATES.items(), desc="fit")
    }
    reports = {name: tuning_report(tuning, p) for name, p in fitted.items()}
    means = {name: float(np.mean(list(r["hit_rate"].values()))) for name, r in reports.items()}
    chosen = max(means, key=means.get)
    for name, r in reports.items():
        print(f"{name}: mean hit rate at 25% on tuning traces {means[name]:.4f}")
        for cell, h in r["hit_rate"].items():
            print(f"  {cell:>17}: hit rate {h:.4f}, gap closed {100 * r['gap_closed'][cell]:+.1f}%")
        print("  AUC " + ", ".join(f"h={h}: {v:.3f}" for h, v in r["auc"].items()))
    print("chosen:", chosen)
    predictor = fitted[chosen]
    predictor.info.update(
        chosen=chosen,
        chosen_kind=predictor.kind,
        tuning={
            "seed": PREDICTOR_TUNING_SEED,
            "prompts_per_context": PREDICTOR_TUNING_PROMPTS,
            "fraction": 0.25,
            "hit_rate": {
                k: {c: round(h, 4) for c, h in r["hit_rate"].items()} for k, r in reports.items()
            },
            "gap_closed": {
                k: {c: round(g, 4) for c, g in r["gap_closed"].items()} for k, r in reports.items()
            },
            "auc": {
                k: {str(h): round(v, 4) for h, v in r["auc"].items()} for k, r in reports.items()
            },
            "mean_hit_rate": {k: round(v, 4) for k, v in means.items()},
        },
    )
    return predictor.save(out or DEFAULT_PREDICTOR)


def per_context_report(model_path=None) -> dict:
    """Per-context predictors, measured on tuning windows only: for each context, trees with
    router features fitted on that context's training traces (seed `PREDICTOR_SEED`,
    table and rows of that context alone) against the one predictor fitted on all contexts,
    both scored on the context's tuning traces (seed `PREDICTOR_TUNING_SEED`); prints and
    returns {context: {"global": report, "own": report}} (`tuning_report`). A measurement,
    not adopted: a cache would need to be told the context."""
    from sage_core.studies.experiments import load_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, tokenizer, _ = load_model(model_path, "cpu", "float32")
    traces = record_training_traces(model, tokenizer)
    tuning = record_training_traces(
        model,
        tokenizer,
        seed=PREDICTOR_TUNING_SEED,
        settings={"prompts_per_context": PREDICTOR_TUNING_PROMPTS},
    )
    common = {"stride": 2, "kind": "trees", "max_rows": PREDICTOR_MAX_TREE_ROWS, "router": True}
    shared = fit_predictor(traces, **common)
    out = {}
    for context in progress(CONTEXTS, desc="per-context fits"):
        own = fit_predictor({context: traces[context]}, **common)
        mine = {context: tuning[context]}
        out[context] = {"global": tuning_report(mine, shared), "own": tuning_report(mine, own)}
        for name, r in out[context].items():
            cells = ", ".join(
                f"{c}: hit {r['hit_rate'][c]:.4f} gap {100 * g:+.1f}%"
                for c, g in r["gap_closed"].items()
            )
            print(f"{context:>9} {name:>6}: {cells}; AUC h=4 {r['auc'][4]:.3f}")
    return out


def policy_time(seeds=(0, 1, 2), fraction: float = 0.25, repeats: int = 3) -> dict:
    """The policies' own time per decoded token (simulation over held-out decode traces of
    `seeds`, bookkeeping included) and as a share of a greedy decode step of the default
    model, all measured in this one process, interleaved over `repeats` rounds (medians)."""
    import time

    from sage_core.offload.reuse import default_predictor
    from sage_core.studies.experiments import load_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, tokenizer, _ = load_model(None, "cpu", "float32")
    settings = TraceSettings(prompts_per_context=2, prompt_tokens=64, decode_tokens=24)
    sets = record_trace_sets(model, tokenizer, settings, list(seeds))
    predictor = default_predictor()
    traces = [phases["decode"] for traces in sets.values() for phases in traces.values()]
    names = ("lru", "lfu", "activation", "layer_aware", "learned")
    times: dict = {n: [] for n in (*names, "decode_step")}
    for _ in range(repeats):
        times["decode_step"].append(decode_step_seconds(model, tokenizer, repeats=1))
        for name in names:
            options = {"predictor": predictor} if name == "learned" else {}
            spent, tokens = 0.0, 0
            for trace in traces:
                keys, _ = access_sequence(trace)
                cap = capacities(trace.num_experts * len(trace.layers), [fraction])[0]
                layers = [int(x) for x in trace.layers]
                policy = cache_policy.make_policy(name, cap, layers=layers, **options)
                plan = observed_router(trace, predictor) if name == "learned" else None
                start = time.perf_counter()
                cache_policy.simulate(keys, policy, router=plan)
                spent += time.perf_counter() - start
                tokens += trace.num_tokens
            times[name].append(spent / tokens)
    out = {n: float(np.median(v)) for n, v in times.items()}
    return {
        "decode_step_s": out["decode_step"],
        "policy_s_per_token": {n: out[n] for n in names},
        "share_of_step": {n: out[n] / out["decode_step"] for n in names},
    }


REUSE_STYLE = {
    "lru": ("C0", "o"),
    "layer_lru": ("C1", "o"),
    "lfu": ("C2", "o"),
    "activation": ("C4", "o"),
    "layer_aware": ("C5", "s"),
    "learned": ("C3", "D"),
    "lookahead_1tok": ("0.65", "^"),
    "lookahead_2tok": ("0.45", "^"),
    "lookahead_4tok": ("0.25", "^"),
    "belady": ("k", "*"),
}


def reuse_summary(selection_rows, rows, fraction: float) -> dict:
    """At one cache size: the best existing online policy chosen on the selection traces,
    then on the scoring traces the learned policy's hit-rate gain over it and its share of
    the LRU-to-Belady gap per (context, phase), and decode reads per token vs LRU."""
    best = best_online_policy(selection_rows, fraction, cache_policy.EXISTING_POLICIES)
    gain = gain_over(rows, fraction, "learned", best)
    return {
        "best_existing": best,
        "gain": gain,
        "gain_over_lru": gain_over(rows, fraction, "learned", "lru"),
        "gap_closed": gap_closed_by_cell(rows, fraction, "learned"),
        "gap_closed_best": gap_closed_by_cell(rows, fraction, best),
        "reads_vs_lru": reads_ratio(rows, fraction, "learned"),
        "gain_target_met": all(ci["mean"] >= 0.05 and ci["low"] > 0 for ci in gain.values()),
    }


def plot_reuse(rows, fractions=REUSE_FRACTIONS):
    """Hit rate per policy at each cache size (mean over seeds of the per-seed mean over
    contexts and phases, 95% t interval), scoring documents."""
    import matplotlib.pyplot as plt

    seeds = len({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, len(fractions), figsize=(12, 3.8), sharey=False)
    for ax, f in zip(axes, fractions, strict=True):
        for i, (policy, (color, marker)) in enumerate(REUSE_STYLE.items()):
            ci = interval(rows, "hit_rate", policy=policy, fraction=f)
            ax.errorbar(
                [i],
                [ci["mean"]],
                yerr=_errors(ci),
                color=color,
                marker=marker,
                capsize=3,
                ls="none",
            )
        ax.set_xticks(range(len(REUSE_STYLE)))
        ax.set_xticklabels(list(REUSE_STYLE), rotation=60, ha="right", fontsize=8)
        ax.set_title(f"cache {100 * f:g}% of experts (held-out, {seeds} seeds)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("hit rate (95% t interval)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def decode_step_seconds(model, tokenizer, tokens: int = 32, repeats: int = 3) -> float:
    """Median over `repeats` of the wall time per token of a greedy decode of `tokens`
    tokens after a 16-token prompt (all experts resident): the step the policy must be
    cheap next to."""
    import time

    prompt = torch.arange(3, 19)[None]
    times = []
    generate(model, prompt, 2)  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, prompt, tokens)
        times.append((time.perf_counter() - start) / tokens)
    return float(np.median(times))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["fit-predictor"]:
        print(fit_default_predictor())
    elif sys.argv[1:] == ["per-context"]:
        per_context_report()
    elif sys.argv[1:] == ["tune-swaps"]:
        tune_swaps()
    elif sys.argv[1:] == ["policy-time"]:
        result = policy_time()
        print(f"decode step {1e3 * result['decode_step_s']:.3f} ms (default model, 1 thread)")
        for name, s in result["policy_s_per_token"].items():
            share = result["share_of_step"][name]
            print(f"{name:>12}: {1e6 * s:8.1f} us per token, {100 * share:6.2f}% of a step")
    else:
        sys.exit(
            "usage: python -m sage_core.studies.expert_offloading "
            "fit-predictor|policy-time|tune-swaps|per-context"
        )
