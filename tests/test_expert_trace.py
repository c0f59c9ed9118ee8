"""Routing traces through the real load path, and the cache-aware selectors, on the default
model: the simulator predicts the real cache exactly, and no policy changes the logits."""

import numpy as np
import pytest
import torch

from sage_core.checkpoint import cache_policy as cp
from sage_core.checkpoint import load_thinker
from sage_core.checkpoint.cache_selectors import CacheAwareSelector, NextLayerPrefetch
from sage_core.checkpoint.expert_trace import (
    RoutingTrace,
    TraceRecorder,
    access_sequence,
    concatenate,
    prediction_quality,
    prefetch_plan,
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
    for name in ("experts", "predicted", "call_of", "layers"):
        assert np.array_equal(getattr(back, name), getattr(trace, name))
    assert back.num_experts == trace.num_experts
    both = concatenate([trace, back])
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


def test_selectors_need_a_cache():
    model = load_thinker(MODEL)
    with pytest.raises(ValueError, match="max_resident_experts"):
        CacheAwareSelector(model, 1.0)
    with pytest.raises(ValueError, match="max_resident_experts"):
        NextLayerPrefetch(model)
    with pytest.raises(ValueError, match="threshold"):
        CacheAwareSelector(load_thinker(MODEL, max_resident_experts=4), -1)
