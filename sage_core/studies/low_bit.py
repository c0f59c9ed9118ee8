"""Notebook 10: low-bit experts as a practical fault, and precision as a second actuator.

Three questions, on the model as offloading systems ship it (experts stored at a few bits,
`dtypes.quantize`: per-group-of-64 asymmetric round-to-nearest, float16 scale and zero) and
as a loader breaks it (float8_e4m3fn without a scale):

1. **Damage** (`damage_records`): held-out perplexity with every expert, or a `fraction` of
   each layer's experts (drawn per seed), at int4 / int3 / int2 / float8, against full
   precision, per context.
2. **Exclusion on the 3-bit model** (`arm_records`): the reference arms of issue 20: the
   router on the quantised model, the full-precision model (the upper reference), the
   *measured oracle* and trust. Every expert is "broken", so the oracle cannot exclude the
   broken ones: it excludes, per (context, layer), the `oracle_per_layer` cells with the
   largest positive harm measured by exhaustive single-cell ablation
   (`exhaustive_harm`: every served cell removed in turn, on the very windows that are
   scored, so it is an in-sample upper reference, not a method). Trust is the
   counterfactual arm of `trust_runs` (and any other trust arm `TRUST_ARMS` finds there),
   trained on the seed's stream to its budget (`trust_runs.budget_of`).
3. **Precision instead of exclusion** (`precision_records`): under the bytes of every
   expert at 3 bits (`Quantized.nbytes`: bits per weight plus a float16 scale and zero per
   group of 64, so 8b + 4 bytes per group: 28 at 3 bits, 68 at 8, 20 at 2), each layer's
   experts are ranked and the first `plan.eight` get 8 bits, the next `plan.three` 3 bits
   and the rest 2 bits (`mixed_plan`: for 32 experts 5 / 2 / 25, exactly the bytes of 32
   at 3 bits). Rankings (`ALLOCATIONS`): "harm" (trust's harm estimates: the counterfactual
   arm's pooled per-cell harm learnt on the all-2-bit model, at its budget), "usage" (the
   common heuristic: how often the router picks the expert on the stream), "attribution"
   (`upgrade_attribution`: the first-order estimate of each expert's upgrade gain from one
   forward and one backward pass per batch of the same stream, the quantity the actuator
   needs, from the machinery of the attribution arm), "measured" (a
   reference: the NLL gain of upgrading that one expert from 2 to 8 bits, measured cell by
   cell on the stream), "random" (seeded draws); and "uniform" (every expert at 3 bits).

Seeds follow notebooks 05/07: per seed, the held-out windows (`stream="eval"`) and the
training stream (`stream="trust"`, shuffled, cut to `num_windows`) of `trust_runs.run_seed`;
the only setting of this study, `oracle_per_layer`, is chosen on the tuning seeds with
validation windows (`tune_oracle`). Run `python -m sage_core.studies.low_bit` for the
committed tables (tables/low_bit_*.{csv,json}); the notebook reads them and recomputes
its first seed live.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from sage_core.atomic import atomic_write_json
from sage_core.corpus import CONTEXTS, load_corpus
from sage_core.dtypes.quantize import GROUP_SIZE, fake_quantize, quantize
from sage_core.notebook.progress import progress
from sage_core.paths import TABLES
from sage_core.studies import experiments, statistics, trust_runs, tuning
from sage_core.trust import OracleSelector, TrustTable
from sage_core.trust.learners import AblationSelector, continuation_nll, window_nll_gradients

KINDS = ("int4", "int3", "int2", "float8")
SCOPES = ("all", "fraction")
FRACTION = 0.25  # the share of each layer's experts quantised in the "fraction" scope
PROJECTIONS = ("gate_up_proj", "down_proj")
ALLOCATIONS = ("uniform", "usage", "harm", "attribution", "measured", "random")
ORACLE_GRID = (1, 2, 4, 8, 28)  # excluded cells per (context, layer), tuned
RANDOM_DRAWS = 4
NUM_WINDOWS = 96
HELDOUT_PER_CONTEXT = 8
UPGRADE_WINDOWS_PER_CONTEXT = 8  # stream windows the "measured" ranking is measured on
MIN_DAMAGE = 0.01  # seeds damaged by more than this (relative) enter the recovery ratio
TABLE_NAMES = ("low_bit_damage", "low_bit_arms", "low_bit_precision")
TUNING_TABLE = "low_bit_tuning"


def trust_arms() -> tuple[str, ...]:
    """The trust arms scored on the 3-bit model: the counterfactual arm, and the
    attribution arm where `trust_runs.ARMS` has one."""
    return tuple(a for a in ("counterfactual", "attribution") if a in trust_runs.ARMS)


# --- which experts, at which precision ------------------------------------------------------


def all_experts(model) -> dict[int, list[int]]:
    return {layer: list(range(model.config.num_experts)) for layer in model.sparse_blocks()}


def some_experts(model, fraction: float, seed: int) -> dict[int, list[int]]:
    """Per sparse layer, round(fraction * E) experts drawn (seeded by seed and layer)."""
    E = model.config.num_experts
    count = round(fraction * E)
    if not 1 <= count <= E:
        raise ValueError(f"fraction {fraction} of {E} experts is {count} experts")
    return {
        layer: sorted(random.Random(f"{seed}:low-bit:{layer}").sample(range(E), count))
        for layer in sorted(model.sparse_blocks())
    }


def group_size_of(weight: torch.Tensor) -> int:
    """The group size `trust_runs.Breakage` quantises with (64, or a divisor of a smaller
    width)."""
    return math.gcd(GROUP_SIZE, weight.shape[-1])


class Precision(trust_runs.Breakage):
    """Every expert stored at its own precision: `bits` {layer: [bits of expert 0, 1, ...]}
    (2, 3, 4 or 8), both projections, in every context. A `trust_runs.Breakage` (same
    `active`), so it scores with `trust_runs.score_windows`."""

    def __init__(self, model, bits: dict):
        self.model = model
        self.kind = "mixed"
        self.contexts = None
        self.bits = {int(layer): [int(b) for b in v] for layer, v in bits.items()}
        self.chosen = {layer: list(range(len(v))) for layer, v in self.bits.items()}
        self.clean, self.broken = {}, {}
        for layer, per_expert in sorted(self.bits.items()):
            experts = trust_runs.resident_experts(model, layer)
            if len(per_expert) != experts.num_experts:
                raise ValueError(
                    f"layer {layer}: {len(per_expert)} bit widths for {experts.num_experts} experts"
                )
            for e, b in enumerate(per_expert):
                for name in PROJECTIONS:
                    weight = getattr(experts, name)[e].detach()
                    self.clean[(layer, e, name)] = weight.clone()
                    self.broken[(layer, e, name)] = fake_quantize(weight, b, group_size_of(weight))

    def nbytes(self) -> float:
        return allocation_bytes(self.model, self.bits)


def allocation_bytes(model, bits: dict) -> float:
    """Storage of the experts at `bits` {layer: [bits per expert]}: the sum of
    `Quantized.nbytes()` over both projections of every expert."""
    total = 0.0
    for layer, per_expert in bits.items():
        experts = trust_runs.resident_experts(model, layer)
        for e, b in enumerate(per_expert):
            for name in PROJECTIONS:
                weight = getattr(experts, name)[e]
                total += quantize(weight, int(b), group_size_of(weight)).nbytes()
    return total


def expert_bytes(model, bits: int) -> float:
    """The bytes of one expert (both projections) at `bits` bits (every expert has the
    same shapes)."""
    layer = min(model.sparse_blocks())
    return allocation_bytes(model, {layer: [bits]})


@dataclass(frozen=True)
class Plan:
    """Per layer: the first `eight` ranked experts at 8 bits, the next `three` at 3 bits,
    the rest at 2 bits."""

    eight: int
    three: int
    two: int


def mixed_plan(num_experts: int, bytes_8: float, bytes_3: float, bytes_2: float) -> Plan:
    """The most 8-bit experts per layer such that the layer stays within the bytes of all
    its experts at 3 bits, then as many of the others at 3 instead of 2 bits as the
    remaining bytes allow."""
    if not bytes_2 < bytes_3 < bytes_8:
        raise ValueError(f"need bytes_2 < bytes_3 < bytes_8, got {bytes_2}, {bytes_3}, {bytes_8}")
    budget = num_experts * bytes_3
    eight = int((budget - num_experts * bytes_2) // (bytes_8 - bytes_2))
    left = budget - eight * bytes_8 - (num_experts - eight) * bytes_2
    three = min(int(left // (bytes_3 - bytes_2)), num_experts - eight)
    return Plan(eight, three, num_experts - eight - three)


def plan_for(model) -> Plan:
    return mixed_plan(model.config.num_experts, *(expert_bytes(model, b) for b in (8, 3, 2)))


def allocate(ranking: dict, plan: Plan) -> dict[int, list[int]]:
    """{layer: bits per expert} from {layer: experts, most deserving first}."""
    out = {}
    for layer, order in ranking.items():
        order = [int(e) for e in order]
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"layer {layer}: a ranking must list every expert once, got {order}")
        if plan.eight + plan.three + plan.two != len(order):
            raise ValueError(f"plan {plan} does not cover {len(order)} experts")
        bits = [2] * len(order)
        for rank, e in enumerate(order):
            bits[e] = 8 if rank < plan.eight else 3 if rank < plan.eight + plan.three else 2
        out[int(layer)] = bits
    return out


def rank_by(scores: dict, tie=None) -> dict[int, list[int]]:
    """{layer: experts by descending score}; ties by descending `tie` (same layout), then
    the lower index."""
    out = {}
    for layer, s in scores.items():
        s = torch.as_tensor(s, dtype=torch.float64)
        t = torch.zeros_like(s) if tie is None else torch.as_tensor(tie[layer], dtype=torch.float64)
        out[int(layer)] = sorted(range(s.numel()), key=lambda e: (-float(s[e]), -float(t[e]), e))
    return out


def random_ranking(model, seed: int, draw: int) -> dict[int, list[int]]:
    E = model.config.num_experts
    out = {}
    for layer in sorted(model.sparse_blocks()):
        order = list(range(E))
        random.Random(f"{seed}:low-bit-random:{draw}:{layer}").shuffle(order)
        out[layer] = order
    return out


def uniform_bits(model, bits: int) -> dict[int, list[int]]:
    return {layer: [bits] * len(v) for layer, v in all_experts(model).items()}


def pooled_harm(table: TrustTable) -> dict[int, torch.Tensor]:
    """{layer: (E,) mean harm of every context's ablations pooled} (0 where unmeasured)."""
    n, mean, _ = table.pooled_harm()
    mean = torch.where(n > 0, mean, torch.zeros_like(mean))
    return {layer: mean[li] for li, layer in enumerate(table.layers)}


# --- exhaustive measurements ---------------------------------------------------------------


def _by_context(windows) -> dict[str, list]:
    return {c: [w for w in windows if w.context == c] for c in CONTEXTS}


def _ids(windows) -> torch.Tensor:
    return torch.stack([torch.cat([w.prompt, w.continuation]) for w in windows])


@torch.no_grad()
def exhaustive_harm(model, windows, breakage=None, max_batch: int = 128) -> dict:
    """{context: {layer: (E,) float64}}: for every (layer, expert) cell, the change of the
    windows' continuation NLL per token when that one expert is removed from every token
    (its slot going to the token's next router choice, as `AblationSelector` does), with
    the sign of the trust table: NLL with the expert minus NLL without it (positive:
    the expert harms). Cells the router never chose at a position that feeds a scored
    logit (every position but the last) are exactly 0 and are not run. `breakage` is applied per context; windows of one context share
    their lengths."""
    device = model.model.embed_tokens.weight.device
    c = model.config
    E, layers = c.num_experts, sorted(model.sparse_blocks())
    out = {}
    for context, group in _by_context(windows).items():
        if not group:
            continue
        P = group[0].prompt.numel()
        ids = _ids(group).to(device)
        B, S = ids.shape
        harm = {layer: torch.zeros(E, dtype=torch.float64) for layer in layers}
        scope = breakage.active(context) if breakage else _null()
        with scope:
            model.set_selector(None)
            with model.routing_trace() as trace:
                base = continuation_nll(model, ids, P).double().cpu()  # (B, C)
            cells = []
            for layer in layers:
                # positions 0 .. S-2 feed the scored logits (the prompt's through attention)
                chosen = trace[layer][0][0].reshape(B, S, -1)[:, : S - 1].reshape(-1)
                served = torch.bincount(chosen.cpu(), minlength=E) > 0
                cells += [(layer, int(e)) for e in served.nonzero().flatten()]
            per_forward = max(1, max_batch // B)
            for start in range(0, len(cells), per_forward):
                chunk = cells[start : start + per_forward]
                masks = {
                    layer: torch.zeros(len(chunk) * B, E, dtype=torch.bool) for layer in layers
                }
                for j, (layer, e) in enumerate(chunk):
                    masks[layer][j * B : (j + 1) * B, e] = True
                selector = AblationSelector(
                    c.num_experts_per_tok, c.norm_topk_prob, masks, len(chunk) * B
                )
                model.set_selector(selector)
                try:
                    nll = continuation_nll(model, ids.repeat(len(chunk), 1), P).double().cpu()
                finally:
                    model.set_selector(None)
                for j, (layer, e) in enumerate(chunk):
                    without = nll[j * B : (j + 1) * B]
                    harm[layer][e] = float((base - without).mean())
        out[context] = harm
    return out


class _null:
    def __enter__(self):
        return False

    def __exit__(self, *exc):
        return False


def oracle_exclusions(harm: dict, per_layer: int, top_k: int, num_experts: int) -> dict:
    """{context: {layer: experts}}: per (context, layer) the `per_layer` cells with the
    largest positive measured harm (ties: lower index), at most E - top_k."""
    cap = min(per_layer, num_experts - top_k)
    out = {}
    for context, by_layer in harm.items():
        out[context] = {}
        for layer, h in by_layer.items():
            order = sorted((e for e in range(h.numel()) if h[e] > 0), key=lambda e: (-h[e], e))
            out[context][layer] = sorted(order[:cap])
    return out


def oracle_selector(model, excluded: dict) -> OracleSelector:
    c = model.config
    table = TrustTable.for_model(model, CONTEXTS)
    return OracleSelector(table, c.num_experts_per_tok, c.norm_topk_prob, excluded)


@torch.no_grad()
def upgrade_gain(model, windows, base_bits: int = 2, high_bits: int = 8) -> dict[int, torch.Tensor]:
    """{layer: (E,) float64}: for every expert, the NLL per scored token (every next-token
    prediction of `windows`) won by storing that one expert at `high_bits` while every
    other expert stays at `base_bits` (positive: the upgrade helps)."""
    E = model.config.num_experts
    base = Precision(model, uniform_bits(model, base_bits))

    def mean_nll() -> float:
        rows = trust_runs.score_windows(model, windows)
        return sum(r["nll_sum"] for r in rows) / sum(r["tokens"] for r in rows)

    gain = {}
    # The whole model at base_bits, one expert at a time raised to high_bits.
    base._write(base.broken)
    try:
        reference = mean_nll()
        for layer in sorted(base.bits):
            gain[layer] = torch.zeros(E, dtype=torch.float64)
            experts = trust_runs.resident_experts(model, layer)
            for e in range(E):
                for name in PROJECTIONS:
                    w = base.clean[(layer, e, name)]
                    getattr(experts, name)[e].copy_(fake_quantize(w, high_bits, group_size_of(w)))
                gain[layer][e] = reference - mean_nll()
                for name in PROJECTIONS:
                    getattr(experts, name)[e].copy_(base.broken[(layer, e, name)])
    finally:
        base._write(base.clean)
    return gain


def upgrade_attribution(
    model, windows, base_bits: int = 2, high_bits: int = 8, batch: int = 8
) -> dict[int, torch.Tensor]:
    """{layer: (E,) float64}: for every expert, the first-order estimate of what
    `upgrade_gain` measures (the NLL per scored token won by storing that one expert at
    `high_bits`, every other at `base_bits`), for one forward and one backward pass per
    batch of windows, whatever the number of experts. Attribution patching with the
    upgrade as the patch: on the all-`base_bits` model, raising expert e changes its
    layer's output at each token t it serves by exactly w_te (f_high(x_t) - f_base(x_t))
    (its routing weight, its outputs at both precisions on the token's layer input); the
    estimate is minus the sum over those tokens of that change . the gradient of the
    windows' NLL (their continuations, as `score_windows` scores them) at the layer's
    output, routing held as it was. Windows of one batch share their lengths."""
    blocks = model.sparse_blocks()
    layers = sorted(blocks)
    E = model.config.num_experts
    base = Precision(model, uniform_bits(model, base_bits))
    high = {key: fake_quantize(w, high_bits, group_size_of(w)) for key, w in base.clean.items()}
    gain = {layer: torch.zeros(E, dtype=torch.float64) for layer in layers}
    tokens = 0
    base._write(base.broken)
    try:
        for start in range(0, len(windows), batch):
            group = windows[start : start + batch]
            ids = _ids(group)  # (B, S)
            P = group[0].prompt.numel()  # the continuation is scored, as `score_windows` does
            C = ids.shape[1] - P
            with model.routing_trace() as trace:
                _, grads, inputs = window_nll_gradients(model, ids, P)
            tokens += ids.shape[0] * C
            with torch.no_grad():
                for layer in layers:
                    (indices, weights), *_ = trace[layer]
                    x = inputs[layer].reshape(-1, inputs[layer].shape[-1])  # (T, H)
                    # gradient of each window's NLL sum (window_nll_gradients: its mean)
                    g = grads[layer].reshape(-1, x.shape[-1]) * C  # (T, H)
                    for e in indices.unique().tolist():
                        token, slot = (indices == e).nonzero(as_tuple=True)
                        w = weights[token, slot].to(x.dtype)[:, None]
                        change = w * (
                            _expert_forward(x[token], high, layer, e)
                            - _expert_forward(x[token], base.broken, layer, e)
                        )  # (rows, H)
                        gain[layer][e] -= float((g[token] * change).sum())
    finally:
        base._write(base.clean)
    return {layer: v / tokens for layer, v in gain.items()}


def _expert_forward(x: torch.Tensor, weights: dict, layer: int, e: int) -> torch.Tensor:
    """Expert e of `layer` on rows x (N, H) with the projections in `weights`
    {(layer, expert, projection): tensor}, as the model's experts compute it."""
    gate_up = weights[(layer, e, "gate_up_proj")]
    down = weights[(layer, e, "down_proj")]
    gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)


# --- windows and records ---------------------------------------------------------------------


def seed_windows(
    tokenizer,
    seed: int,
    corpus,
    num_windows: int = NUM_WINDOWS,
    heldout_per_context: int = HELDOUT_PER_CONTEXT,
    prompt_tokens: int = 32,
    continuation_tokens: int = 32,
):
    """(held-out windows, training stream) of one seed, drawn as `trust_runs.run_seed`
    draws them."""
    kw = {"prompt_tokens": prompt_tokens, "continuation_tokens": continuation_tokens}
    kw.update(seed=seed, corpus=corpus)
    heldout = experiments.make_samples(
        tokenizer, "heldout", heldout_per_context, stream="eval", **kw
    )
    per_context = max(1, math.ceil(num_windows / len(CONTEXTS)))
    stream = experiments.make_samples(tokenizer, "train", per_context, stream="trust", **kw)
    random.Random(f"{seed}:stream-order").shuffle(stream)
    return heldout, stream[:num_windows]


def _ppl_rows(seed, rows, clean, **fields) -> list[dict]:
    return [
        {
            "seed": seed,
            **fields,
            "context": context or "all",
            "perplexity": trust_runs.perplexity(rows, context),
            "clean_perplexity": trust_runs.perplexity(clean, context),
        }
        for context in (*CONTEXTS, None)
    ]


def damage_records(model, heldout, seed: int, kinds=KINDS, fraction: float = FRACTION):
    """One row per (scope, kind, context incl. "all") of one seed: held-out perplexity
    with the experts of the scope at `kind`, and at full precision."""
    clean = trust_runs.score_windows(model, heldout)
    out = []
    for scope in SCOPES:
        chosen = all_experts(model) if scope == "all" else some_experts(model, fraction, seed)
        for kind in kinds:
            broken = trust_runs.Breakage(model, chosen, kind, seed)
            rows = trust_runs.score_windows(model, heldout, None, broken)
            out += _ppl_rows(seed, rows, clean, scope=scope, kind=kind)
    return out


def arm_records(
    model,
    heldout,
    stream,
    seed: int,
    oracle_per_layer: int,
    kind: str = "int3",
    settings: trust_runs.ArmSettings | None = None,
    arms=None,
) -> list[dict]:
    """One row per (arm, context incl. "all") of one seed, every expert at `kind`: the
    router, "full_precision", the measured "oracle" and the trust arms at their budget
    (`budget_of(len(stream))`), with each arm's training compute and exclusions."""
    settings = settings or trust_runs.ArmSettings()
    breakage = trust_runs.Breakage(model, all_experts(model), kind, seed)
    clean = trust_runs.score_windows(model, heldout)
    c = model.config
    harm = exhaustive_harm(model, heldout, breakage)
    excluded = oracle_exclusions(harm, oracle_per_layer, c.num_experts_per_tok, c.num_experts)
    torch.manual_seed(seed)
    arms = trust_arms() if arms is None else tuple(arms)
    trained = trust_runs.Arms(model, arms, settings, breakage)
    budget = trust_runs.budget_of(len(stream), settings)
    trained.train_to(stream, budget)
    scored = {
        "router": (trust_runs.score_windows(model, heldout, None, breakage), 0, 0),
        "full_precision": (clean, 0, 0),
        "oracle": (
            trust_runs.score_windows(model, heldout, oracle_selector(model, excluded), breakage),
            0,
            sum(len(v) for by_layer in excluded.values() for v in by_layer.values()),
        ),
    }
    for arm in arms:
        selector = trained.selectors[arm]
        n_excluded = (
            sum(
                len(v)
                for context in CONTEXTS
                for v in trust_runs.excluded_experts(selector, context).values()
            )
            if hasattr(selector, "excluded")
            else 0
        )
        scored[arm] = (
            trust_runs.score_windows(model, heldout, selector, breakage),
            trained.spent(arm),
            n_excluded,
        )
    out = []
    for arm, (rows, spent, n_excluded) in scored.items():
        out += _ppl_rows(
            seed, rows, clean, arm=arm, kind=kind, forward_equivalents=spent, excluded=n_excluded
        )
    return out


def precision_records(
    model,
    heldout,
    stream,
    seed: int,
    settings: trust_runs.ArmSettings | None = None,
    random_draws: int = RANDOM_DRAWS,
    upgrade_windows_per_context: int = UPGRADE_WINDOWS_PER_CONTEXT,
) -> list[dict]:
    """One row per (allocation, context incl. "all") of one seed: held-out perplexity with
    the experts at the allocation's bits, its bytes, and its training compute. Also rows
    for every expert at 2 and at 8 bits ("all_2bit", "all_8bit", other byte counts)."""
    settings = settings or trust_runs.ArmSettings()
    plan = plan_for(model)
    clean = trust_runs.score_windows(model, heldout)
    usage = trust_runs.expert_usage(model, stream)
    rankings = {"usage": rank_by({k: v.double() for k, v in usage.items()})}
    cost = {"usage": len(stream)}
    # trust's harm, learnt on the all-2-bit model at its budget
    two_bit = Precision(model, uniform_bits(model, 2))
    torch.manual_seed(seed)
    trained = trust_runs.Arms(model, ("counterfactual",), settings, two_bit)
    trained.train_to(stream, trust_runs.budget_of(len(stream), settings))
    rankings["harm"] = rank_by(pooled_harm(trained.selectors["counterfactual"].table), usage)
    cost["harm"] = trained.spent("counterfactual")
    rankings["attribution"] = rank_by(upgrade_attribution(model, stream), usage)
    cost["attribution"] = trust_runs.forward_equivalents(len(stream), len(stream))
    upgrade = [w for ws in _by_context(stream).values() for w in ws[:upgrade_windows_per_context]]
    rankings["measured"] = rank_by(upgrade_gain(model, upgrade), usage)
    cost["measured"] = len(upgrade) * (1 + plan.eight + plan.three + plan.two) * len(usage)
    allocations = {"uniform": uniform_bits(model, 3)}
    allocations.update({name: allocate(r, plan) for name, r in rankings.items()})
    for draw in range(random_draws):
        allocations[f"random_{draw}"] = allocate(random_ranking(model, seed, draw), plan)
    allocations["all_2bit"] = uniform_bits(model, 2)
    allocations["all_8bit"] = uniform_bits(model, 8)
    out = []
    for name, bits in allocations.items():
        precision = Precision(model, bits)
        rows = trust_runs.score_windows(model, heldout, None, precision)
        out += _ppl_rows(
            seed,
            rows,
            clean,
            allocation=name,
            bytes=precision.nbytes(),
            forward_equivalents=cost.get(name, 0),
            eight_bit=[[e for e, b in enumerate(v) if b == 8] for _, v in sorted(bits.items())],
        )
    return out


def seed_records(model, tokenizer, seed: int, corpus, oracle_per_layer: int, **kw) -> dict:
    """Every record of one evaluation seed: damage, arms, precision."""
    heldout, stream = seed_windows(tokenizer, seed, corpus, **kw)
    return {
        "low_bit_damage": damage_records(model, heldout, seed),
        "low_bit_arms": arm_records(model, heldout, stream, seed, oracle_per_layer),
        "low_bit_precision": precision_records(model, heldout, stream, seed),
    }


# --- tuning: the oracle's exclusions per layer ---------------------------------------------


def oracle_tuning_records(model, tokenizer, seeds, kind: str = "int3", grid=ORACLE_GRID):
    """Per tuning seed and `oracle_per_layer` in `grid`: perplexity ("all") of the measured
    oracle on validation windows (training-split documents the stream never uses), every
    expert at `kind`, with the router's and the clean model's."""
    corpus = experiments.ValidationCorpus(load_corpus())
    c = model.config
    out = []
    for seed in seeds:
        heldout, _ = seed_windows(tokenizer, seed, corpus, num_windows=1)
        breakage = trust_runs.Breakage(model, all_experts(model), kind, seed)
        clean = trust_runs.perplexity(trust_runs.score_windows(model, heldout))
        router = trust_runs.perplexity(trust_runs.score_windows(model, heldout, None, breakage))
        harm = exhaustive_harm(model, heldout, breakage)
        for n in grid:
            excluded = oracle_exclusions(harm, n, c.num_experts_per_tok, c.num_experts)
            rows = trust_runs.score_windows(
                model, heldout, oracle_selector(model, excluded), breakage
            )
            out.append(
                {
                    "seed": seed,
                    "oracle_per_layer": n,
                    "perplexity": trust_runs.perplexity(rows),
                    "router_perplexity": router,
                    "clean_perplexity": clean,
                }
            )
    return out


def choose_oracle(rows: list[dict]) -> int:
    """The `oracle_per_layer` with the lowest mean perplexity over the tuning seeds (ties:
    the smaller)."""
    values = sorted({r["oracle_per_layer"] for r in rows})
    mean = {
        n: np.mean([r["perplexity"] for r in rows if r["oracle_per_layer"] == n]) for n in values
    }
    return min(values, key=lambda n: (mean[n], n))


# --- summaries -------------------------------------------------------------------------------


def select(rows: list[dict], context: str = "all", **fields) -> dict[int, dict]:
    """{seed: row} of the rows matching `fields` in `context`."""
    out = {}
    for r in rows:
        if r["context"] == context and all(r[k] == v for k, v in fields.items()):
            if r["seed"] in out:
                raise ValueError(f"several rows for seed {r['seed']} and {fields}")
            out[r["seed"]] = r
    return out


def relative_change(rows: list[dict], context: str = "all", reference=None, **fields) -> dict:
    """Per seed: ppl / reference ppl - 1, the reference being the row's clean perplexity
    (None) or the rows matching `reference` (a dict of fields)."""
    mine = select(rows, context, **fields)
    if reference is None:
        return {s: r["perplexity"] / r["clean_perplexity"] - 1 for s, r in mine.items()}
    ref = select(rows, context, **reference)
    return {s: mine[s]["perplexity"] / ref[s]["perplexity"] - 1 for s in sorted(mine)}


def damage_table(rows: list[dict]) -> list[dict]:
    """Per (scope, kind, context): the t interval over seeds of the relative perplexity
    change against full precision."""
    out = []
    keys = dict.fromkeys((r["scope"], r["kind"], r["context"]) for r in rows)
    for scope, kind, context in keys:
        change = relative_change(rows, context, scope=scope, kind=kind)
        out.append(
            {
                "scope": scope,
                "kind": kind,
                "context": context,
                "change": statistics.t_interval(list(change.values())),
                "per_seed": change,
            }
        )
    return out


def recovery_table(rows: list[dict], arm: str, context: str = "all") -> dict:
    """The arm's share of the damage won back: sum(ppl_router - ppl_arm) / sum(ppl_router
    - ppl_clean) over the seeds damaged by more than MIN_DAMAGE (paired bootstrap), and its
    share of the measured oracle's; with the per-seed values and the paired relative change
    against the router over every seed (t interval)."""
    router = select(rows, context, arm="router")
    mine = select(rows, context, arm=arm)
    oracle = select(rows, context, arm="oracle")
    damaged = sorted(
        s for s, r in router.items() if r["perplexity"] > r["clean_perplexity"] * (1 + MIN_DAMAGE)
    )
    won = {s: router[s]["perplexity"] - mine[s]["perplexity"] for s in sorted(mine)}
    lost = {s: router[s]["perplexity"] - router[s]["clean_perplexity"] for s in sorted(router)}
    oracle_won = {s: router[s]["perplexity"] - oracle[s]["perplexity"] for s in sorted(oracle)}
    out = {
        "arm": arm,
        "damaged_seeds": damaged,
        "won": won,
        "damage": lost,
        "change_vs_router": statistics.t_interval(
            [mine[s]["perplexity"] / router[s]["perplexity"] - 1 for s in sorted(mine)]
        ),
        "recovery": None,
        "relative_to_oracle": None,
    }
    if len(damaged) >= 2:
        out["recovery"] = statistics.ratio_of_means(
            [won[s] for s in damaged], [lost[s] for s in damaged]
        )
        if sum(oracle_won[s] for s in damaged) > 0:
            out["relative_to_oracle"] = statistics.ratio_of_means(
                [won[s] for s in damaged], [oracle_won[s] for s in damaged]
            )
    return out


def random_mean(rows: list[dict], context: str = "all") -> dict[int, float]:
    """{seed: mean perplexity of the random allocations}."""
    by = {}
    for r in rows:
        if r["context"] == context and r["allocation"].startswith("random_"):
            by.setdefault(r["seed"], []).append(r["perplexity"])
    return {s: float(np.mean(v)) for s, v in sorted(by.items())}


def allocation_perplexity(rows: list[dict], allocation: str, context: str = "all"):
    """{seed: perplexity} of one allocation ("random": the mean of the random draws)."""
    if allocation == "random":
        return random_mean(rows, context)
    return {s: r["perplexity"] for s, r in select(rows, context, allocation=allocation).items()}


def allocation_change(rows: list[dict], allocation: str, reference: str, context: str = "all"):
    """{seed: ppl_allocation / ppl_reference - 1}."""
    a = allocation_perplexity(rows, allocation, context)
    b = allocation_perplexity(rows, reference, context)
    return {s: a[s] / b[s] - 1 for s in sorted(a)}


def compare_allocations(
    rows, allocation: str, reference: str, margin: float = 0.005, context="all"
):
    """Paired per-seed relative change of `allocation` against `reference`: its t interval
    and a TOST against +-margin."""
    change = list(allocation_change(rows, allocation, reference, context).values())
    return {
        "change": statistics.t_interval(change),
        "equivalence": statistics.equivalence(change, margin),
        "wins": int(sum(x < 0 for x in change)),
        "n": len(change),
    }


def bytes_by_allocation(rows: list[dict]) -> dict[str, set]:
    """{allocation: the distinct byte counts over seeds}."""
    out = {}
    for r in rows:
        name = "random" if r["allocation"].startswith("random_") else r["allocation"]
        out.setdefault(name, set()).add(r["bytes"])
    return out


# --- figures ---------------------------------------------------------------------------------


def _errorbar(ax, x, ci, scale=100.0, **kw):
    ax.errorbar(
        x,
        scale * ci["mean"],
        yerr=[[scale * (ci["mean"] - ci["low"])], [scale * (ci["high"] - ci["mean"])]],
        fmt="o",
        capsize=3,
        **kw,
    )


def plot_damage(table: list[dict]):
    """Relative perplexity change against full precision per kind, scope and context."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCOPES), figsize=(10, 3.6), sharey=True)
    contexts = [*CONTEXTS, "all"]
    for ax, scope in zip(axes, SCOPES, strict=True):
        for ci_, context in enumerate(contexts):
            for ki, kind in enumerate(KINDS):
                (row,) = [
                    r
                    for r in table
                    if (r["scope"], r["kind"], r["context"]) == (scope, kind, context)
                ]
                x = ki + (ci_ - 1.5) * 0.18
                _errorbar(ax, x, row["change"], color=f"C{ci_}", label=context if ki == 0 else None)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xticks(range(len(KINDS)), KINDS)
        what = "every expert" if scope == "all" else f"{FRACTION:.0%} of each layer's experts"
        ax.set_title(what)
    axes[0].set_ylabel("perplexity vs full precision (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Low-precision experts: held-out damage (mean, 95% t interval over seeds)")
    fig.tight_layout()
    return fig


def plot_actuators(arm_rows: list[dict], precision_rows: list[dict], arms, allocations):
    """One figure, two panels on one axis: exclusion on the 3-bit model (the router,
    trust arms, the measured oracle) and precision at the 3-bit byte budget (the
    allocations), each as perplexity against full precision."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1,
        2,
        figsize=(10, 3.8),
        sharey=True,
        gridspec_kw={"width_ratios": [len(arms), len(allocations)]},
    )
    for i, arm in enumerate(arms):
        change = relative_change(arm_rows, "all", arm=arm)
        _errorbar(axes[0], i, statistics.t_interval(list(change.values())), color="C0")
    axes[0].set_xticks(range(len(arms)), [a.replace("_", "\n") for a in arms], fontsize=8)
    axes[0].set_title("exclusion, every expert at 3 bits")
    for i, name in enumerate(allocations):
        ppl = allocation_perplexity(precision_rows, name)
        clean = {
            s: r["clean_perplexity"]
            for s, r in select(precision_rows, allocation="uniform").items()
        }
        change = [ppl[s] / clean[s] - 1 for s in sorted(ppl)]
        _errorbar(axes[1], i, statistics.t_interval(change), color="C1")
    axes[1].set_xticks(range(len(allocations)), allocations, fontsize=8)
    axes[1].set_title("precision (8 / 3 / 2 bits) at the bytes of all at 3 bits")
    for ax in axes:
        ax.axhline(0, color="0.5", lw=0.8)
    axes[0].set_ylabel("perplexity vs full precision (%)")
    fig.suptitle("Two actuators on low-bit experts (mean, 95% t interval over seeds)")
    fig.tight_layout()
    return fig


# --- the command -----------------------------------------------------------------------------

_FORKED: dict = {}


def _forked(seed: int) -> dict:
    model, tokenizer, corpus, n = _FORKED["job"]
    return seed_records(model, tokenizer, seed, corpus, n)


def run_seeds(model, tokenizer, seeds, oracle_per_layer: int, workers: int = 1, corpus=None):
    """`seed_records` for every seed (forked processes when workers > 1; torch must then
    be single-threaded), gathered in seed order."""
    corpus = corpus or load_corpus()
    bar = progress(total=len(seeds), desc="low-bit seeds")
    results = []
    if workers == 1:
        for seed in seeds:
            results.append(seed_records(model, tokenizer, seed, corpus, oracle_per_layer))
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _FORKED["job"] = (model, tokenizer, corpus, oracle_per_layer)
        try:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(min(workers, len(seeds)), mp_context=context) as pool:
                for result in pool.map(_forked, seeds):
                    results.append(result)
                    bar.update(1)
        finally:
            _FORKED.clear()
    bar.close()
    return {name: [r for result in results for r in result[name]] for name in TABLE_NAMES}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=tuning.EVALUATION_SEED)
    parser.add_argument("--num-seeds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(TABLES))
    parser.add_argument(
        "--skip-tuning",
        action="store_true",
        help="read the committed tuning choice instead of tuning again",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from pathlib import Path

    out = Path(args.out)
    model, tokenizer, _ = experiments.load_model()
    if args.skip_tuning:
        import json

        choice = json.loads((TABLES / f"{TUNING_TABLE}.json").read_text())["oracle_per_layer"]
    else:
        rows = oracle_tuning_records(model, tokenizer, tuning.TUNING_SEEDS)
        choice = choose_oracle(rows)
        atomic_write_json(
            out / f"{TUNING_TABLE}.json",
            {"oracle_per_layer": choice, "grid": list(ORACLE_GRID), "rows": rows},
        )
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    if set(seeds) & set(tuning.TUNING_SEEDS):
        raise SystemExit(f"evaluation seeds {seeds} overlap the tuning seeds")
    records = run_seeds(model, tokenizer, seeds, choice, workers=args.workers)
    for name, rows in records.items():
        experiments.save_records(rows, name, directory=out)
    print(f"oracle_per_layer={choice}; wrote {', '.join(TABLE_NAMES)} under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
