"""Routing traces through the real load path, and the cache-aware selectors, on the default
model: the simulator predicts the real cache exactly, and no policy changes the logits."""

import numpy as np
import pytest
import torch

from sage_core.checkpoint import load_thinker
from sage_core.offload import cache_policy as cp
from sage_core.offload.cache_selectors import CacheAwareSelector, NextLayerPrefetch, RouterFeed
from sage_core.offload.expert_trace import (
    RoutingTrace,
    TraceRecorder,
    access_sequence,
    concatenate,
    prediction_quality,
    prefetch_plan,
    router_plan,
)
from sage_core.paths import ROOT

MODEL = ROOT / "models" / "q3omni-tiny"
TOKENS = 24
CAPACITY = 32  # a quarter of the default model's 4 x 32 experts


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 250, (1, TOKENS), generator=torch.Generator().manual_seed(0))


def stepwise(model, ids):
    """Logits of every position, one token per forward over a KV cache (decode order)."""
    cache, out = model.new_cache(1, ids.shape[1]), []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out.append(model(ids[:, t : t + 1], cache=cache))
    return torch.cat(out, 1)


@pytest.fixture(scope="module")
def resident(ids):
    model = load_thinker(MODEL)
    recorder = TraceRecorder(model)
    model.set_selector(recorder)
    logits = stepwise(model, ids)
    return logits, recorder.trace()


@pytest.mark.parametrize("policy", cp.POLICIES)
def test_simulation_predicts_the_real_cache_and_logits_never_change(ids, resident, policy):
    logits, trace = resident
    keys, _ = access_sequence(trace)
    layers = list(trace.layers)

    model = load_thinker(MODEL, max_resident_experts=CAPACITY, cache_policy=policy)
    assert torch.equal(stepwise(model, ids), logits)
    sim = cp.simulate(keys, cp.make_policy(policy, CAPACITY, layers=layers))
    assert (model.expert_cache.hits, model.expert_cache.misses) == (sim.hits.sum(), sim.misses)

    model = load_thinker(MODEL, max_resident_experts=CAPACITY, cache_policy=policy)
    model.set_selector(NextLayerPrefetch(model))
    assert torch.equal(stepwise(model, ids), logits)
    sim = cp.simulate(
        keys, cp.make_policy(policy, CAPACITY, layers=layers), prefetch=prefetch_plan(trace)
    )
    stats = model.expert_cache.stats()
    assert (stats["hits"], stats["misses"]) == (sim.hits.sum(), sim.misses)
    assert (stats["prefetched"], stats["wasted"]) == (sim.prefetched, sim.wasted)
    assert stats["prefetched"] > 0


def test_grouped_order_is_what_a_multi_token_forward_asks(resident, ids):
    model = load_thinker(MODEL)
    recorder = TraceRecorder(model)
    model.set_selector(recorder)
    with torch.no_grad():
        model(ids[:, :10])
        model(ids[:, 10:11])
        model(ids[:, 11:20])
    trace = recorder.trace()
    assert trace.call_of.tolist() == [0] * 10 + [1] + [2] * 9
    keys, _ = access_sequence(trace, grouped=True)
    cached = load_thinker(MODEL, max_resident_experts=20)
    with torch.no_grad():
        cached(ids[:, :10])
        cached(ids[:, 10:11])
        cached(ids[:, 11:20])
    sim = cp.simulate(keys, cp.make_policy("lru", 20))
    assert (cached.expert_cache.hits, cached.expert_cache.misses) == (sim.hits.sum(), sim.misses)


def test_trace_matches_the_models_own_routing_record(ids):
    model = load_thinker(MODEL)
    recorder = TraceRecorder(model)
    model.set_selector(recorder)
    with model.routing_trace() as record, torch.no_grad():
        model(ids)
    trace = recorder.trace()
    for li, layer in enumerate(trace.layers):
        assert np.array_equal(trace.experts[:, li], record[int(layer)][0][0].numpy())
    assert (trace.predicted[:, 0] == -1).all()
    quality = prediction_quality(trace)
    assert set(quality) == set(int(x) for x in trace.layers[1:])
    assert all(0 <= q["precision"] <= 1 for q in quality.values())


def test_save_load_roundtrip(tmp_path, resident):
    _, trace = resident
    path = trace.save(tmp_path / "t.npz")
    back = RoutingTrace.load(path)
    for name in ("experts", "predicted", "call_of", "layers", "router"):
        assert np.array_equal(getattr(back, name), getattr(trace, name))
    assert back.num_experts == trace.num_experts
    both = concatenate([trace, back])
    assert both.router.shape == (2 * trace.num_tokens, *trace.router.shape[1:])
    assert trace.rows(trace.call_of > 0).router.shape[0] == trace.num_tokens - 1
    assert both.num_tokens == 2 * trace.num_tokens
    assert both.call_of[trace.num_tokens] == trace.call_of[-1] + 1
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a routing trace"):
        RoutingTrace.load(tmp_path / "other.npz")


def test_bad_traces_are_named():
    with pytest.raises(ValueError, match="expert ids"):
        RoutingTrace(np.full((2, 1, 1), 9), np.zeros((2, 1, 1)), [0, 1], [0], 4)
    with pytest.raises(ValueError, match="call_of"):
        RoutingTrace(np.zeros((2, 1, 1)), np.zeros((2, 1, 1)), [0], [0], 4)


def test_prediction_quality_counts_overlap():
    experts = np.array([[[0, 1], [2, 3]], [[0, 1], [4, 5]]])
    predicted = np.array([[[-1, -1], [3, 7]], [[-1, -1], [4, 5]]])
    trace = RoutingTrace(experts, predicted, [0, 1], [0, 1], 8)
    assert prediction_quality(trace) == {1: {"precision": 0.75, "recall": 0.75}}


def test_cache_aware_selection_at_zero_threshold_is_the_router(ids, resident):
    logits, _ = resident
    model = load_thinker(MODEL, max_resident_experts=CAPACITY)
    selector = CacheAwareSelector(model, 0.0)
    model.set_selector(selector)
    assert torch.equal(stepwise(model, ids), logits)
    assert selector.swapped == 0


def test_cache_aware_selection_trades_reads_for_resident_experts(ids, resident):
    plain = load_thinker(MODEL, max_resident_experts=CAPACITY)
    stepwise(plain, ids)
    model = load_thinker(MODEL, max_resident_experts=CAPACITY)
    selector = CacheAwareSelector(model, 100.0)  # any resident alternative wins
    model.set_selector(selector)
    stepwise(model, ids)
    assert selector.swapped > 0
    assert model.expert_cache.misses < plain.expert_cache.misses


def test_cache_aware_weights_keep_the_inner_sum_and_only_swap_uncached():
    model = load_thinker(MODEL, max_resident_experts=CAPACITY)
    cache = model.expert_cache
    for e in (5, 6):
        cache.get((0, e), lambda: ("w", 1))
    logits = torch.full((1, 32), -5.0)
    logits[0, :4] = torch.tensor([3.0, 2.9, 2.0, 1.0])
    logits[0, 5] = 0.95  # resident and unchosen, 0.05 below expert 3
    selector = CacheAwareSelector(model, 0.1)
    indices, weights = selector(logits, 0, torch.zeros(1, 128))
    assert indices[0].tolist() == [0, 1, 2, 5]  # expert 3 (uncached) -> resident 5
    assert torch.allclose(weights.sum(), torch.tensor(1.0))
    assert selector.swapped == 1
    # The swapped slot weighs what expert 5's router probability says next to the slots
    # kept: exp(0.95) against exp(3.0) for slot 0, i.e. the replaced slot's weight scaled
    # by exp(logit 5 - logit 3) = exp(-0.05) < 1, not by its inverse.
    router = torch.softmax(logits[0, [0, 1, 2, 3]], -1)
    ratio = weights[0, 3] / weights[0, 0]
    assert torch.allclose(ratio, torch.exp(torch.tensor(0.95 - 3.0)), rtol=1e-5)
    assert torch.allclose(ratio, router[3] / router[0] * torch.exp(torch.tensor(-0.05)), rtol=1e-5)
    assert weights[0, 3] < router[3]  # the resident stand-in weighs less than what it replaced


def test_selectors_need_a_cache():
    model = load_thinker(MODEL)
    with pytest.raises(ValueError, match="max_resident_experts"):
        CacheAwareSelector(model, 1.0)
    with pytest.raises(ValueError, match="max_resident_experts"):
        NextLayerPrefetch(model)
    with pytest.raises(ValueError, match="threshold"):
        CacheAwareSelector(load_thinker(MODEL, max_resident_experts=4), -1)


class ExcludingInner:
    """A fake trust selector: top-k of the logits without the experts its table excludes
    per (layer, context); `context` is one name or one per sequence, like TrustSelector's."""

    def __init__(self, excluded_by_context: dict, top_k: int = 4):
        self.excluded_by_context = excluded_by_context
        self.top_k = top_k
        self.context = None

    def excluded(self, layer_idx, context):
        mask = torch.zeros(32, dtype=torch.bool)
        mask[self.excluded_by_context.get(context, {}).get(layer_idx, [])] = True
        return mask

    def __call__(self, router_logits, layer_idx, hidden_states):
        contexts = [self.context] if isinstance(self.context, str) else self.context
        per = router_logits.shape[0] // len(contexts)
        mask = torch.stack([self.excluded(layer_idx, c) for c in contexts])
        logits = router_logits.masked_fill(mask.repeat_interleave(per, 0), -torch.inf)
        top = torch.topk(logits, self.top_k, dim=-1)
        return top.indices, torch.softmax(top.values, -1)


def near_tie_logits(rows):
    # Experts 0-3 chosen, 3 uncached; resident 5 and 6 just below it, 5 the closer.
    logits = torch.full((rows, 32), -5.0)
    logits[:, :4] = torch.tensor([3.0, 2.9, 2.0, 1.0])
    logits[:, 5], logits[:, 6] = 0.95, 0.9
    return logits


def cache_with(resident):
    model = load_thinker(MODEL, max_resident_experts=CAPACITY)
    for key in resident:
        model.expert_cache.get(key, lambda: ("w", 1))
    return model


def test_cache_aware_swap_never_takes_an_expert_trust_excluded_per_sequence():
    model = cache_with([(0, 5), (0, 6)])
    inner = ExcludingInner({"code": {0: [5]}})
    selector = CacheAwareSelector(model, 0.2, inner=inner)
    inner.context = ["code", "text"]  # B = 2 sequences of S = 2 positions: rows = 4
    indices, weights = selector(near_tie_logits(4), 0, torch.zeros(4, 128))
    assert indices[:, 3].tolist() == [6, 6, 5, 5]  # code: 5 is excluded, 6 is next
    assert not (indices[:2] == 5).any()
    assert torch.allclose(weights.sum(1), torch.ones(4))
    inner.context = "code"  # one name for the whole batch
    indices, _ = selector(near_tie_logits(2), 0, torch.zeros(2, 128))
    assert indices[:, 3].tolist() == [6, 6]
    # Excluded in another layer only: layer 0 swaps to 5 as without trust.
    inner.excluded_by_context = {"code": {1: [5]}}
    indices, _ = selector(near_tie_logits(2), 0, torch.zeros(2, 128))
    assert indices[:, 3].tolist() == [5, 5]


def test_cache_aware_swap_with_every_resident_alternative_excluded_keeps_the_choice():
    model = cache_with([(0, 5), (0, 6)])
    inner = ExcludingInner({"code": {0: [5, 6]}})
    inner.context = "code"
    selector = CacheAwareSelector(model, 100.0, inner=inner)
    indices, _ = selector(near_tie_logits(1), 0, torch.zeros(1, 128))
    assert indices[0].tolist() == [0, 1, 2, 3] and selector.swapped == 0


def test_cache_aware_with_trusts_oracle_never_brings_back_a_broken_expert():
    from sage_core.corpus import CONTEXTS
    from sage_core.trust import OracleSelector, TrustTable

    model = cache_with([(0, 5), (0, 6)])
    oracle = OracleSelector(TrustTable.for_model(model, CONTEXTS), 4, True, {"code": {0: [5]}})
    selector = CacheAwareSelector(model, 0.2, inner=oracle)
    oracle.context = "code"
    indices, _ = selector(near_tie_logits(3), 0, torch.zeros(3, 128))
    assert not (indices == 5).any() and (indices[:, 3] == 6).all()
    oracle.context = "text"
    indices, _ = selector(near_tie_logits(3), 0, torch.zeros(3, 128))
    assert (indices[:, 3] == 5).all()
    oracle.context = None
    with pytest.raises(ValueError, match="context"):
        selector(near_tie_logits(1), 0, torch.zeros(1, 128))
    oracle.context = ["code", "text"]
    with pytest.raises(ValueError, match="sequences"):
        selector(near_tie_logits(3), 0, torch.zeros(3, 128))


def test_the_learned_policy_runs_in_the_real_cache_hit_for_hit_and_logits_never_change(
    ids, resident
):
    logits, trace = resident
    keys, _ = access_sequence(trace)
    layers = list(trace.layers)
    for policy in ("layer_aware", "learned"):
        model = load_thinker(MODEL, max_resident_experts=CAPACITY, cache_policy=policy)
        assert torch.equal(stepwise(model, ids), logits)
        sim = cp.simulate(keys, cp.make_policy(policy, CAPACITY, layers=layers))
        assert (model.expert_cache.hits, model.expert_cache.misses) == (sim.hits.sum(), sim.misses)
        assert model.expert_cache.stats()["policy"] == policy


def test_cache_aware_keep_top_never_swaps_the_top_choice_and_budget_spends_on_the_tail():
    model = load_thinker(MODEL, max_resident_experts=CAPACITY)
    cache = model.expert_cache
    for layer in (0, 1):
        for e in (1, 2, 5, 6):
            cache.get((layer, e), lambda: ("w", 1))
    logits = torch.full((1, 32), -5.0)
    logits[0, :4] = torch.tensor([3.0, 2.9, 2.8, 1.0])  # experts 0 and 3 are not resident
    logits[0, 5], logits[0, 6] = 0.95, 0.9  # resident, unchosen
    hidden = torch.zeros(1, 128)
    # Unlimited, threshold 2.5: both uncached slots go to residents, the top-1 included.
    indices, _ = CacheAwareSelector(model, 2.5)(logits, 0, hidden)
    assert indices[0].tolist() == [5, 1, 2, 6]
    # keep_top=1: the top-1 stays; the tail slot takes the best resident.
    selector = CacheAwareSelector(model, 2.5, keep_top=1)
    indices, weights = selector(logits, 0, hidden)
    assert indices[0].tolist() == [0, 1, 2, 5] and selector.swapped == 1
    assert torch.allclose(weights.sum(), torch.tensor(1.0))
    # budget=1 per token and forward, top-1 allowed: the tail slot (expert 3) spends it.
    selector = CacheAwareSelector(model, 2.5, budget=1)
    indices, _ = selector(logits, 0, hidden)
    assert indices[0].tolist() == [0, 1, 2, 5]
    indices, _ = selector(logits, 1, hidden)  # same forward, next layer: budget spent
    assert indices[0].tolist() == [0, 1, 2, 3] and selector.swapped == 1
    indices, _ = selector(logits, 0, hidden)  # next forward: a fresh budget
    assert indices[0].tolist() == [0, 1, 2, 5] and selector.swapped == 2
    with pytest.raises(ValueError, match="budget"):
        CacheAwareSelector(model, 0.1, budget=-1)


def test_the_trace_records_the_routers_probabilities(ids):
    model = load_thinker(MODEL)
    recorder = TraceRecorder(model)
    model.set_selector(recorder)
    with model.routing_trace() as record, torch.no_grad():
        model(ids)
    trace = recorder.trace()
    assert trace.router.shape == (TOKENS, 4, 32) and trace.router.dtype == np.float16
    assert np.allclose(trace.router.astype(np.float64).sum(2), 1.0, atol=1e-2)
    # The chosen experts are the router's top-k of the recorded probabilities.
    top = np.sort(np.argsort(-trace.router.astype(np.float32), axis=2, kind="stable")[:, :, :4], 2)
    assert (top == np.sort(trace.experts, 2)).mean() > 0.99  # float16 ties aside
    plan = router_plan(trace)
    assert len(plan) == TOKENS * 4 and plan[4][0][0] == int(trace.layers[1])  # token 0, layer 1
    assert np.array_equal(plan[4][0][1], trace.router[0, 1].astype(np.float64))
    assert record  # the model's own record ran beside it


def test_a_router_fed_learned_policy_runs_in_the_real_cache_hit_for_hit(ids, resident):
    from sage_core.studies import expert_offloading as offloading

    logits, trace = resident
    keys, _ = access_sequence(trace)
    layers = list(trace.layers)
    predictor = offloading.fit_predictor(
        {"code": {"decode": trace}},
        cap=8.0,
        kind="trees",
        trees={"n_estimators": 10, "max_depth": 3},
        router=True,
    )
    assert predictor.router
    model = load_thinker(MODEL, max_resident_experts=CAPACITY)
    # The loader takes the committed predictor; this one is given to its (empty) cache.
    model.expert_cache.policy = cp.make_policy(
        "learned", CAPACITY, layers=layers, predictor=predictor
    )
    model.set_selector(RouterFeed(model))
    assert torch.equal(stepwise(model, ids), logits)  # the feed changes no choice
    policy = cp.make_policy("learned", CAPACITY, layers=layers, predictor=predictor)
    sim = cp.simulate(keys, policy, router=router_plan(trace))
    assert (model.expert_cache.hits, model.expert_cache.misses) == (sim.hits.sum(), sim.misses)
    # The real cache's policy was shown what the trace recorded, in the same order.
    seen = model.expert_cache.policy.state.router
    assert seen.any() and np.array_equal(seen, policy.state.router)
