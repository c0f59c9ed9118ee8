"""Cache policies and their simulation: exact against brute force, and the real cache agrees."""

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_core.checkpoint import ExpertCache
from sage_core.offload import cache_policy as cp

# Tiny traces: (layer, expert) keys over 2 layers x 3 experts.
key_strategy = st.tuples(st.integers(0, 1), st.integers(0, 2))
trace_strategy = st.lists(key_strategy, min_size=0, max_size=12)


def brute_lru_misses(keys, capacity):
    cache, misses = [], 0
    for k in keys:
        if k in cache:
            cache.remove(k)
        else:
            misses += 1
            if len(cache) == capacity:
                cache.pop(0)
        cache.append(k)
    return misses


def optimal_misses(keys, capacity):
    """Fewest misses of any demand policy: exhaustive search over every eviction choice."""
    best = {frozenset(): 0}  # resident set -> fewest misses so far
    for k in keys:
        nxt = {}
        for held, misses in best.items():
            if k in held:
                options = [(held, misses)]
            elif len(held) < capacity:
                options = [(held | {k}, misses + 1)]
            else:
                options = [((held - {v}) | {k}, misses + 1) for v in held]
            for state, m in options:
                nxt[state] = min(m, nxt.get(state, m))
        best = nxt
    return min(best.values())


def as_array(keys):
    return np.asarray(keys, dtype=np.int64).reshape(-1, 2)


@settings(max_examples=200, deadline=None)
@given(trace_strategy, st.integers(1, 6))
def test_lru_stack_distances_and_policy_equal_brute_force(keys, capacity):
    want = brute_lru_misses(keys, capacity)
    hits = cp.lru_hits(as_array(keys), [capacity])[capacity]
    assert len(keys) - int(hits.sum()) == want
    sim = cp.simulate(as_array(keys), cp.make_policy("lru", capacity))
    assert sim.misses == want
    assert np.array_equal(sim.hits, hits)


@settings(max_examples=200, deadline=None)
@given(trace_strategy, st.integers(1, 4))
def test_belady_is_the_optimum_of_exhaustive_search(keys, capacity):
    assert cp.simulate_belady(as_array(keys), capacity).misses == optimal_misses(keys, capacity)


@settings(max_examples=100, deadline=None)
@given(trace_strategy, st.integers(2, 5))
def test_no_online_policy_beats_belady(keys, capacity):
    belady = cp.simulate_belady(as_array(keys), capacity).misses
    for name in cp.POLICIES:
        policy = cp.make_policy(name, capacity, layers=[0, 1])
        assert cp.simulate(as_array(keys), policy).misses >= belady


@settings(max_examples=100, deadline=None)
@given(trace_strategy)
def test_lru_and_belady_misses_never_grow_with_capacity(keys):
    lru = cp.lru_hits(as_array(keys), range(1, 7))
    lru_misses = [len(keys) - lru[c].sum() for c in range(1, 7)]
    belady = [cp.simulate_belady(as_array(keys), c).misses for c in range(1, 7)]
    assert lru_misses == sorted(lru_misses, reverse=True)
    assert belady == sorted(belady, reverse=True)


@settings(max_examples=100, deadline=None)
@given(trace_strategy)
def test_a_cache_holding_every_key_misses_each_key_once(keys):
    distinct = len(set(keys))
    for name in cp.POLICIES:
        policy = cp.make_policy(name, 6, layers=[0, 1])
        assert cp.simulate(as_array(keys), policy).misses == distinct
    assert cp.simulate_belady(as_array(keys), 6).misses == distinct


@settings(max_examples=100, deadline=None)
@given(trace_strategy, st.integers(2, 6))
def test_layer_lru_is_one_lru_per_layer_with_its_quota(keys, capacity):
    quota = cp.layer_quotas(capacity, [0, 1])
    want = sum(
        brute_lru_misses([k for k in keys if k[0] == layer], quota[layer]) for layer in (0, 1)
    )
    policy = cp.make_policy("layer_lru", capacity, layers=[0, 1])
    assert cp.simulate(as_array(keys), policy).misses == want


def brute_lfu_misses(keys, capacity):
    counts, last, held, misses = {}, {}, [], 0
    for t, k in enumerate(keys):
        counts[k] = counts.get(k, 0) + 1
        if k not in held:
            misses += 1
            if len(held) == capacity:
                held.remove(min(held, key=lambda h: (counts[h], last[h])))
            held.append(k)
        last[k] = t
    return misses


@settings(max_examples=200, deadline=None)
@given(trace_strategy, st.integers(1, 5))
def test_lfu_equals_brute_force(keys, capacity):
    sim = cp.simulate(as_array(keys), cp.make_policy("lfu", capacity))
    assert sim.misses == brute_lfu_misses(keys, capacity)


@settings(max_examples=100, deadline=None)
@given(trace_strategy, st.integers(1, 5))
def test_activation_policy_with_endless_memory_is_lfu(keys, capacity):
    endless = cp.make_policy("activation", capacity, half_life=math.inf)
    assert cp.simulate(as_array(keys), endless).misses == brute_lfu_misses(keys, capacity)


def test_endless_memory_ties_exactly_on_the_case_that_was_flaky():
    # Two keys used twice tie; a float score with a huge half-life broke the tie by the
    # last digit and evicted the more recent one (issue 21).
    keys = [(0, 0), (1, 0), (1, 0), (0, 0), (0, 1), (0, 0)]
    endless = cp.make_policy("activation", 2, half_life=math.inf)
    assert cp.simulate(as_array(keys), endless).misses == brute_lfu_misses(keys, 2) == 3


def test_activation_policy_forgets_old_activity():
    # "a" was used 3 times long ago, "b" twice just now: with a short half-life "a" goes.
    keys = [(0, 0)] * 3 + [(0, 1), (0, 2)] * 1 + [(0, 1)] + [(0, 3)]
    policy = cp.ActivationPolicy(3, half_life=1.0)
    cp.simulate(as_array(keys), policy)
    assert (0, 0) not in policy.keys() and (0, 1) in policy.keys()
    lfu = cp.LFUPolicy(3)
    cp.simulate(as_array(keys), lfu)
    assert (0, 0) in lfu.keys()


@pytest.mark.parametrize("name", cp.POLICIES)
def test_expert_cache_does_what_the_simulation_says(name):
    rng = np.random.default_rng(0)
    keys = [tuple(int(v) for v in k) for k in rng.integers(0, [3, 5], size=(300, 2))]
    sim = cp.simulate(as_array(keys), cp.make_policy(name, 6, layers=[0, 1, 2]))
    cache = ExpertCache(6, policy=name, layers=[0, 1, 2])
    for k in keys:
        cache.get(k, lambda: ("w", 7))
    assert (cache.hits, cache.misses, cache.bytes_read) == (
        int(sim.hits.sum()),
        sim.misses,
        7 * sim.misses,
    )
    assert len(cache) <= 6 and cache.peak_resident <= 6


def test_expert_cache_prefetch_counts_agree_with_the_simulation():
    rng = np.random.default_rng(1)
    keys = [tuple(int(v) for v in k) for k in rng.integers(0, [2, 6], size=(200, 2))]
    plan = {i: [tuple(int(v) for v in rng.integers(0, [2, 6]))] for i in range(0, 200, 3)}
    sim = cp.simulate(as_array(keys), cp.make_policy("lru", 4), prefetch=plan)
    cache = ExpertCache(4)
    for i, k in enumerate(keys):
        for ahead in plan.get(i, ()):
            cache.prefetch(ahead, lambda: ("w", 5))
        cache.get(k, lambda: ("w", 5))
    s = cache.stats()
    assert (s["hits"], s["prefetched"], s["wasted"]) == (
        int(sim.hits.sum()),
        sim.prefetched,
        sim.wasted,
    )
    assert s["prefetch_bytes"] == 5 * sim.prefetched
    assert s["bytes_read"] == 5 * sim.experts_read
    assert sim.prefetch_used + sim.wasted + sim.left_unused == sim.prefetched


def test_prefetch_of_a_resident_key_reads_nothing():
    cache = ExpertCache(2)
    cache.get("a", lambda: ("A", 3))
    assert cache.prefetch("a", lambda: pytest.fail("must not read")) is False
    assert cache.stats()["prefetched"] == 0


def test_next_use():
    codes = np.array([5, 1, 5, 2, 1])
    assert cp.next_use(codes).tolist() == [2, 4, 5, 5, 5]


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: cp.make_policy("fifo", 3), "unknown cache policy"),
        (lambda: cp.make_policy("lru", 0), "capacity"),
        (lambda: cp.make_policy("layer_lru", 3), "layers"),
        (lambda: cp.make_policy("layer_lru", 1, layers=[0, 1]), "each layer needs"),
        (lambda: cp.make_policy("activation", 3, half_life=0), "half_life"),
        (lambda: ExpertCache(3, policy="mru"), "unknown cache policy"),
    ],
)
def test_bad_arguments_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_layer_quotas_split_evenly():
    assert cp.layer_quotas(7, [2, 0, 1]) == {0: 3, 1: 2, 2: 2}
    assert sum(cp.layer_quotas(13, range(4)).values()) == 13


def test_brute_force_helpers_agree_on_a_known_case():
    # Classic: capacity 3, a b c d a b e a b c d e -> Belady 7 misses, LRU 10.
    names = "abcdabeabcde"
    keys = [(0, "abcde".index(c)) for c in names]
    assert optimal_misses(keys, 3) == 7
    assert brute_lru_misses(keys, 3) == 10
    assert cp.simulate_belady(as_array(keys), 3).misses == 7
    assert list(itertools.islice(cp.lru_stack_distances(as_array(keys)), 5))[:4] == [np.inf] * 4


# --- bounds: static hindsight cache and Belady with a lookahead horizon --------------------

# One flag per request: does it start a new layer call (the first request always does).
calls_strategy = st.lists(st.booleans(), min_size=12, max_size=12)


def as_calls(starts, n):
    return np.cumsum([0, *[int(s) for s in starts[1:n]]])[:n].astype(np.int64)


def brute_lookahead_hits(keys, capacity, horizon, calls):
    """Straight from the docstring: at a miss with a full cache, evict the least recently
    used key whose next use lies beyond the horizon, else the seen key used farthest ahead."""
    held, last, hits = [], {}, []
    for i, k in enumerate(keys):
        hits.append(k in held)
        if k not in held:
            if len(held) == capacity:

                def rank(h, i=i):
                    j = next((j for j in range(i + 1, len(keys)) if keys[j] == h), None)
                    call = calls[j] if j is not None else math.inf
                    if call <= calls[i] + horizon:
                        return (1, -(j if j is not None else len(keys)))
                    return (0, last[h])

                held.remove(min(held, key=rank))
            held.append(k)
        last[k] = i
    return np.array(hits, dtype=bool)


@settings(max_examples=200, deadline=None)
@given(trace_strategy, calls_strategy, st.integers(1, 4), st.sampled_from([0, 1, 2, 5, math.inf]))
def test_lookahead_equals_its_brute_force_definition(keys, starts, capacity, horizon):
    calls = as_calls(starts, len(keys))
    sim = cp.simulate_lookahead(as_array(keys), capacity, horizon, calls)
    assert np.array_equal(sim.hits, brute_lookahead_hits(keys, capacity, horizon, calls))


@settings(max_examples=200, deadline=None)
@given(trace_strategy, calls_strategy, st.integers(1, 5))
def test_unlimited_lookahead_is_belady_hit_for_hit(keys, starts, capacity):
    calls = as_calls(starts, len(keys))
    unlimited = cp.simulate_lookahead(as_array(keys), capacity, math.inf, calls)
    assert np.array_equal(unlimited.hits, cp.simulate_belady(as_array(keys), capacity).hits)


@settings(max_examples=200, deadline=None)
@given(trace_strategy, st.integers(1, 5))
def test_lookahead_zero_with_one_request_per_call_is_lru(keys, capacity):
    zero = cp.simulate_lookahead(as_array(keys), capacity, 0)
    assert zero.misses == brute_lru_misses(keys, capacity)
    assert np.array_equal(zero.hits, cp.lru_hits(as_array(keys), [capacity])[capacity])


def test_lookahead_zero_keeps_the_current_calls_experts():
    # Capacity 2: a, b resident; the next call asks c then a. LRU evicts a (least recent)
    # and misses it again; horizon 0 sees a in the current call and evicts b.
    keys = as_array([(0, 0), (0, 1), (0, 2), (0, 0)])
    calls = np.array([0, 1, 2, 2])
    assert cp.simulate_lookahead(keys, 2, 0, calls).hits.tolist() == [False, False, False, True]
    assert cp.simulate(keys, cp.make_policy("lru", 2)).hits.tolist() == [False] * 4


def test_belady_bounds_every_horizon_and_unlimited_equals_it_on_random_traces():
    rng = np.random.default_rng(3)
    for trial in range(30):
        # Zipf-like popularity over 2 layers x 8 experts, calls of 1-3 requests.
        n = int(rng.integers(20, 120))
        experts = np.minimum(rng.zipf(1.5, size=n) - 1, 7)
        keys = np.stack([rng.integers(0, 2, size=n), experts], 1)
        calls = np.cumsum(rng.random(n) < 0.5)
        capacity = int(rng.integers(1, 8))
        belady = cp.simulate_belady(keys, capacity)
        for horizon in (0, 1, 3, 10, math.inf):
            sim = cp.simulate_lookahead(keys, capacity, horizon, calls)
            assert sim.misses >= belady.misses, (trial, horizon)
        assert np.array_equal(sim.hits, belady.hits)


def brute_static_hits(keys, capacity):
    counts = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    held = sorted(counts, key=lambda k: (-counts[k], k))[:capacity]
    return np.array([k in held for k in keys], dtype=bool)


@settings(max_examples=200, deadline=None)
@given(trace_strategy, st.integers(1, 6))
def test_static_cache_holds_the_most_requested_keys(keys, capacity):
    sim = cp.simulate_static(as_array(keys), capacity)
    assert np.array_equal(sim.hits, brute_static_hits(keys, capacity))
    assert sim.policy == "static"


def test_static_cache_is_not_a_demand_policy():
    # a, b, a, b with one slot: the static cache keeps a and hits twice; Belady, which must
    # admit every miss, never hits.
    keys = as_array([(0, 0), (0, 1)] * 2)
    assert int(cp.simulate_static(keys, 1).hits.sum()) == 2
    assert int(cp.simulate_belady(keys, 1).hits.sum()) == 0


def test_layer_calls_split_tokens_and_layers():
    keys = as_array([(0, 3), (0, 1), (1, 2), (1, 0), (0, 3), (1, 1)])
    token_of = np.array([0, 0, 0, 0, 1, 1])
    assert cp.layer_calls(keys, token_of).tolist() == [0, 0, 1, 1, 2, 3]


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: cp.simulate_lookahead(as_array([(0, 0)]), 1, -1), "horizon"),
        (lambda: cp.simulate_lookahead(as_array([(0, 0), (0, 1)]), 1, 1, [1, 0]), "calls"),
        (lambda: cp.simulate_static(as_array([(0, 0)]), 0), "capacity"),
    ],
)
def test_bound_arguments_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# --- issue 21: layer-aware and learned policies ----------------------------------------------

from sage_core.offload import reuse  # noqa: E402

LAYERS = [0, 1, 2]


def decode_like(rng, tokens, num_layers=3, experts=5, k=2):
    """(layer, expert) requests token by token, layer by layer, k distinct experts a layer."""
    keys = []
    for _ in range(tokens):
        for layer in range(num_layers):
            keys += [(layer, int(e)) for e in rng.choice(experts, size=k, replace=False)]
    return keys


def small_predictor(seed=0, kind="linear"):
    rng = np.random.default_rng(seed)
    keys = decode_like(rng, 60)
    experts = as_array(keys)[:, 1].reshape(60, 3, 2)
    table = reuse.cooccurrence_table([experts], 5)
    x, y = reuse.training_rows(as_array(keys), LAYERS, 5, cap=8.0, table=table)
    trees = {"n_estimators": 8, "max_depth": 3}
    return reuse.ReusePredictor.fit(x, y, 3, 5, 8.0, table=table, kind=kind, trees=trees)


def test_layer_aware_evicts_the_layer_needed_last_within_a_step():
    # Token 0 uses one expert in each of 3 layers; token 1 uses new ones in layers 0 and 1,
    # capacity 4. At (1, 1) every token-0 key is as old: LRU evicts (0, 0), which the next
    # token's layer 0 may ask for two layer calls ahead; layer-aware evicts (1, 0), whose
    # next possible use (the next token's layer 1) is three calls ahead.
    keys = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]
    policy = cp.make_policy("layer_aware", 4, layers=LAYERS)
    cp.simulate(as_array(keys), policy)
    assert sorted(policy.keys()) == [(0, 0), (0, 1), (1, 1), (2, 0)]
    lru = cp.make_policy("lru", 4)
    cp.simulate(as_array(keys), lru)
    assert sorted(lru.keys()) == [(0, 1), (1, 0), (1, 1), (2, 0)]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**6), st.integers(2, 9))
def test_new_policies_never_beat_belady_and_hold_their_capacity(seed, capacity):
    keys = decode_like(np.random.default_rng(seed), 12)
    belady = cp.simulate_belady(as_array(keys), capacity).misses
    predictor = small_predictor()
    for name in ("layer_aware", "learned"):
        options = {"predictor": predictor} if name == "learned" else {}
        policy = cp.make_policy(name, capacity, layers=LAYERS, **options)
        sim = cp.simulate(as_array(keys), policy)
        assert sim.misses >= belady
        assert len(policy.keys()) <= capacity


@pytest.mark.parametrize("name", ["layer_aware", "learned", "learned_trees", "learned_protect"])
def test_expert_cache_runs_the_new_policies_hit_for_hit(name):
    keys = decode_like(np.random.default_rng(3), 80)
    options = {}
    if name.startswith("learned"):
        kind = "trees" if name == "learned_trees" else "linear"
        options["predictor"] = small_predictor(kind=kind)
        options["protect"] = 1 if name == "learned_protect" else 0
        name = "learned"
    sim = cp.simulate(as_array(keys), cp.make_policy(name, 6, layers=LAYERS, **options))
    cache = ExpertCache(6, policy=name, layers=LAYERS, **options)
    hits = []
    for k in keys:
        before = cache.hits
        cache.get(k, lambda: ("w", 7))
        hits.append(cache.hits > before)
    assert np.array_equal(np.array(hits), sim.hits)
    assert cache.bytes_read == 7 * sim.misses and cache.peak_resident <= 6


def test_training_labels_are_the_steps_to_the_next_use():
    # 2 layers; token 0: (0,0) (1,0); token 1: (0,1) (1,0); token 2: (0,0) (1,1).
    keys = [(0, 0), (1, 0), (0, 1), (1, 0), (0, 0), (1, 1)]
    x, y = reuse.training_rows(as_array(keys), [0, 1], 2, cap=1.0)
    steps = np.expm1(y)
    # Rows per layer call, keys seen so far in code order, in steps (2 layer calls each),
    # capped at 1; a key not used again gives a row only while the trace runs `cap` on.
    # time 1: (0,0) -> 1.5, capped; time 2: (0,0) -> 1, (1,0) -> 0.5; time 3: (0,0) -> 0.5,
    # (0,1) never again -> cap, (1,0) -> 0; time 4: (0,0) -> 0, the rest unknown.
    assert x.shape == (7, len(reuse.FEATURES) + 2)
    assert np.all(x[:, reuse.MARKOV_1 :].sum(1) >= 0)
    assert np.allclose(steps, [1, 1, 0.5, 0.5, 1, 0, 0])


def test_predictor_round_trips_through_json_and_refuses_other_versions(tmp_path):
    predictor = small_predictor()
    path = predictor.save(tmp_path / "p.json")
    again = reuse.ReusePredictor.load(path)
    x = np.random.default_rng(0).normal(size=(4, len(reuse.FEATURES) + 3))
    assert np.array_equal(predictor.predict(x), again.predict(x))
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version"):
        reuse.ReusePredictor.load(path)
    with pytest.raises(ValueError, match="sparse layers"):
        reuse.LearnedPolicy(4, [0, 1], predictor)


def test_the_committed_predictor_loads_and_says_what_it_was_fitted_on():
    predictor = reuse.default_predictor()
    assert predictor.info["text"].startswith("training split")
    assert predictor.num_layers == 4 and predictor.num_experts == 32
    # The candidate was chosen on tuning windows of training text, the best one there.
    tuning = predictor.info["tuning"]["mean_hit_rate"]
    chosen = predictor.info.get("chosen", predictor.info["chosen_kind"])
    assert chosen == max(tuning, key=tuning.get)
    assert predictor.kind == predictor.info["chosen_kind"] and predictor.kind in chosen
    assert predictor.router == chosen.endswith("+router")
    assert predictor.info["tuning"]["seed"] != predictor.info["seed"]


def test_cooccurrence_table_counts_what_follows_within_each_horizon():
    # One layer, 3 experts, k = 1: tokens use 0, 1, 2, 0, 1 (expert by token).
    experts = np.array([0, 1, 2, 0, 1]).reshape(5, 1, 1)
    table = reuse.cooccurrence_table([experts], 3, horizons=(1, 2), prior=0.0)
    # Next token after 0 (tokens 0 and 3): 1 both times. Within 2 tokens only tokens with
    # 2 tokens after them count: token 0, followed by {1, 2}.
    assert np.allclose(table[0, 0, 0], [0, 1, 0])
    assert np.allclose(table[1, 0, 0], [0, 1, 1])
    # After 2 (token 2): next is 0; within 2: 0 and 1.
    assert np.allclose(table[0, 0, 2], [1, 0, 0]) and np.allclose(table[1, 0, 2], [1, 1, 0])
    # With a prior, rows shrink towards the base rate and stay probabilities.
    smoothed = reuse.cooccurrence_table([experts], 3, horizons=(1, 2), prior=1.0)
    assert np.all((smoothed >= 0) & (smoothed <= 1))
    assert 0 < smoothed[0, 0, 0, 0] < smoothed[0, 0, 0, 1] < 1


def test_markov_feature_reads_the_latest_finished_call_of_each_layer():
    # 2 layers, 3 experts; the table says: after expert a, expert (a + 1) % 3 comes next.
    table = np.zeros((len(reuse.MARKOV_HORIZONS), 2, 3, 3))
    for a in range(3):
        table[:, :, a, (a + 1) % 3] = 1.0
    state = reuse.FeatureState([0, 1], 3, table)
    for key in [(0, 0), (1, 2)]:  # token 0
        state.clock.advance(key)
        state.use(key)
    state.clock.advance((0, 1))  # token 1, layer 0's call begins
    state.use((0, 1))
    markov = state.markov()[0].reshape(2, 3)
    # Layer 0's call is in progress: its finished call is token 0's (expert 0 -> 1 next).
    assert np.allclose(markov[0], [0, 1, 0])
    # Layer 1's latest call is token 0's (expert 2 -> 0 next).
    assert np.allclose(markov[1], [1, 0, 0])
    column = reuse.FEATURES.index("markov_1tok")
    rows = state.features(np.array([1, 3]))  # codes of (0, 1) and (1, 0)
    assert np.allclose(rows[:, column], [1, 1])


def test_tree_predictor_is_sklearns_model_and_round_trips(tmp_path):
    from sklearn.ensemble import GradientBoostingRegressor

    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, len(reuse.FEATURES) + 2))
    y = np.where(x[:, 0] > 0.3, 2.0, 0.5) + 0.5 * (x[:, 1] > -0.2) + 0.1 * rng.normal(size=400)
    trees = {"n_estimators": 5, "max_depth": 3}
    predictor = reuse.ReusePredictor.fit(x, y, 2, 3, 8.0, kind="trees", trees=trees)
    settings_ = {"learning_rate": 0.1, "subsample": 0.5, "random_state": 0, **trees}
    model = GradientBoostingRegressor(init="zero", **settings_).fit(x, y - y.mean())
    probe = rng.normal(size=(50, x.shape[1]))
    assert np.allclose(predictor.predict(probe), model.predict(probe) + y.mean(), atol=1e-9)
    again = reuse.ReusePredictor.load(predictor.save(tmp_path / "t.json"))
    assert again.kind == "trees"
    assert np.array_equal(again.predict(probe), predictor.predict(probe))
    assert np.array_equal(again.table, predictor.table)


def test_protected_experts_are_not_evicted_while_another_choice_exists():
    # One layer, 4 experts; the table rates expert 3 as next after anything, the model
    # predicts the same distance for every key, so without protection the least recent goes.
    table = np.full((len(reuse.MARKOV_HORIZONS), 1, 4, 4), 0.1)
    table[:, :, :, 3] = 0.9
    linear = {
        "coef": np.zeros(len(reuse.FEATURES) + 1),
        "intercept": 1.0,
        "mean": np.zeros(len(reuse.FEATURES) + 1),
        "scale": np.ones(len(reuse.FEATURES) + 1),
    }
    predictor = reuse.ReusePredictor(1, 4, 8.0, table=table, linear=linear)
    keys = [(0, 3), (0, 0), (0, 1)]  # capacity 2: at (0, 1) evict (0, 3) or (0, 0)
    plain = cp.make_policy("learned", 2, layers=[0], predictor=predictor)
    cp.simulate(as_array(keys), plain)
    assert sorted(plain.keys()) == [(0, 0), (0, 1)]  # least recent (0, 3) went
    protected = cp.make_policy("learned", 2, layers=[0], predictor=predictor, protect=1)
    cp.simulate(as_array(keys), protected)
    assert sorted(protected.keys()) == [(0, 1), (0, 3)]  # (0, 3) kept: predicted next


def test_a_prefetch_never_evicts_a_protected_expert():
    # 2 layers, 4 experts, capacity 2; the table rates expert 3 next in both layers and the
    # model predicts the same distance for every key. Token 0 uses (0, 3) and (1, 3); before
    # token 1, (0, 1) is to be read ahead: the cache is full of the protected experts.
    table = np.full((len(reuse.MARKOV_HORIZONS), 2, 4, 4), 0.1)
    table[:, :, :, 3] = 0.9
    width = len(reuse.FEATURES) + 2
    linear = {
        "coef": np.zeros(width),
        "intercept": 1.0,
        "mean": np.zeros(width),
        "scale": np.ones(width),
    }
    predictor = reuse.ReusePredictor(2, 4, 8.0, table=table, linear=linear)
    keys = as_array([(0, 3), (1, 3), (0, 0)])
    policy = cp.make_policy("learned", 2, layers=[0, 1], predictor=predictor, protect=1)
    sim = cp.simulate(keys, policy, prefetch={2: [(0, 1)]})
    assert sim.prefetched == 0 and (0, 1) not in policy.keys()
    # Unprotected, the same read-ahead goes ahead: it evicts a key predicted no sooner.
    policy = cp.make_policy("learned", 2, layers=[0, 1], predictor=predictor, protect=0)
    sim = cp.simulate(keys, policy, prefetch={2: [(0, 1)]})
    assert sim.prefetched == 1 and (0, 1) in policy.keys()


# --- the learned policy's fast paths decide as the direct evaluation does ---------------------


def direct_features(state, codes, router=False):
    """The features as first written (one numpy expression per feature, per call): the
    reference the tabulated, incremental `FeatureState.features` must equal bit for bit."""
    num_layers, step, p = state.clock.num_layers, state.clock.step, state.clock.pos
    extra = len(reuse.ROUTER_FEATURES) if router else 0
    out = np.empty((len(reuse.FEATURES) + extra + num_layers, codes.size))
    since = (state.clock.time - state.last[codes]) * (1.0 / num_layers)
    out[0] = np.log1p(since)
    out[1] = np.divide(1.0, 1.0 + since)
    q = codes // state.num_experts
    out[2] = ((q - p - 1) % num_layers + 1) * (1.0 / num_layers)
    decay = np.exp(np.outer(-state._rates, since))
    out[3:6] = np.log1p(state.decayed[:, codes] * decay)
    out[6] = np.log1p(state.count[codes])
    out[7] = state.count[codes] * (1.0 / (step + 1.0))
    out[8] = state.last_step[codes] >= step - 1
    out[9] = out[0] * out[4]
    out[10 : reuse.MARKOV_1 + len(reuse.MARKOV_HORIZONS)] = direct_markov(state)[:, codes]
    if router:
        out[len(reuse.FEATURES) : len(reuse.FEATURES) + extra] = state.router[:, codes]
    out[len(reuse.FEATURES) + extra :] = q == np.arange(num_layers)[:, None]
    return out.T


def direct_markov(state):
    """Every layer's co-occurrence scores recomputed from its latest finished call (the
    definition, no caching)."""
    table = state.table
    out = np.zeros(table.shape[:3])
    for layer in range(state.clock.num_layers):
        current = state.now_call[layer] == state.clock.call
        used = state.before[layer] if current else state.now[layer]
        out[:, layer] = (used / max(used.sum(), 1.0)) @ table[:, layer]
    return out.reshape(len(table), -1)


def walked(trees, x):
    """The tree ensemble evaluated by walking every tree level by level (no leaf table)."""
    walker = reuse.TreeEnsemble(trees.feature, trees.threshold, trees.leaf, trees.base)
    walker._leaf_of_code = None
    return walker.predict(x)


class DirectLearned(reuse.LearnedPolicy):
    """The learned policy as first written: every resident key's features evaluated
    directly, the trees walked, the ranking re-read from its front at every victim."""

    def _rank(self):
        codes = np.fromiter(self._resident.values(), dtype=np.int64)
        p = self.predictor
        x = direct_features(self.state, codes, p.router)
        scores = walked(p.trees, x) if p.trees is not None else x @ p._w + p._b
        protected = np.zeros(codes.size, dtype=bool)
        if self.protect:
            markov = direct_markov(self.state)[0].reshape(self.state.clock.num_layers, -1)
            top = np.argsort(-markov, axis=1, kind="stable")[:, : self.protect]
            mask = np.zeros(markov.shape, dtype=bool)
            np.put_along_axis(mask, top, True, axis=1)
            protected = mask.reshape(-1)[codes]
        order = np.lexsort((self.state.last[codes], -scores, protected))
        self._ranked = codes[order].tolist()
        self._next = 0
        self._scores = (codes, scores, protected)

    def victim(self, key):
        self._tick(key)
        if len(self._resident) < self.capacity:
            return None
        if self._ranked is None:
            self._rank()
        call = self.state.clock.call
        while self._ranked:
            c = self._ranked.pop(0)
            k = self._key_of[c]
            if k in self._resident and self.state.call_of_use[c] != call:
                return k
        return min(self._resident, key=lambda k: self.state.last[self._resident[k]])


def test_tabulated_features_equal_the_direct_expressions_bit_for_bit():
    predictor = reuse.default_predictor()
    rng = np.random.default_rng(5)
    keys = decode_like(rng, 40, num_layers=4, experts=32, k=4)
    state = reuse.FeatureState([0, 1, 2, 3], 32, predictor.table)
    checked = 0
    for k in keys:
        state.observe(k[0], rng.dirichlet(np.ones(32)))
        if state.clock.advance(k):
            codes = rng.choice(128, 40)
            for router in (False, True):
                assert np.array_equal(
                    state.features(codes, router), direct_features(state, codes, router)
                )
            checked += 1
        state.use(k)
    assert checked == 160
    # A code never used (a read-ahead) lies far beyond the distance table.
    assert np.array_equal(state.features(np.array([127])), direct_features(state, np.array([127])))


def test_tree_leaf_table_reaches_the_leaves_the_walk_reaches():
    predictor = reuse.default_predictor()
    assert predictor.trees._leaf_of_code is not None  # the committed trees take the table path
    rng = np.random.default_rng(2)
    width = len(reuse.feature_names(4, predictor.router))
    x = rng.normal(size=(300, width)) * rng.choice([0.01, 1, 10], size=(1, width))
    # Values exactly at, just above and just below float32-rounded thresholds.
    t = predictor.trees
    for i, (f, thr) in enumerate(zip(t._feature[:300], t._threshold[:300], strict=True)):
        if np.isfinite(thr):
            x[i, f] = np.float32(thr) * (1, 1 + 1e-7, 1 - 1e-7)[i % 3]
    assert np.array_equal(t.predict(x), walked(t, x))


@pytest.mark.parametrize("capacity", [12, 32, 64])
@pytest.mark.parametrize("protect", [0, 4])
def test_fast_learned_policy_makes_the_direct_policys_decisions(capacity, protect):
    predictor = reuse.default_predictor()
    keys = as_array(decode_like(np.random.default_rng(capacity), 48, 4, 32, 4))
    plan = None
    if protect:  # read-aheads of two experts per layer call, some already resident
        rng = np.random.default_rng(1)
        plan = {i: [(int(keys[i, 0]), int(e)) for e in rng.choice(32, 2)] for i in range(8, 760, 4)}
    fast = reuse.LearnedPolicy(capacity, [0, 1, 2, 3], predictor, protect=protect)
    direct = DirectLearned(capacity, [0, 1, 2, 3], predictor, protect=protect)
    rng = np.random.default_rng(7)  # router probabilities before each layer call
    router = {i: [(int(keys[i, 0]), rng.dirichlet(np.full(32, 0.3)))] for i in range(0, 768, 4)}
    a, b = cp.simulate(keys, fast, plan, router), cp.simulate(keys, direct, plan, router)
    assert np.array_equal(a.hits, b.hits) and a.prefetched == b.prefetched
    assert fast.keys() == direct.keys()
    assert a.misses > capacity and a.hits.any()  # evictions happened, and hits


def test_router_features_are_the_latest_probability_and_its_moving_averages():
    state = reuse.FeatureState([0, 1], 3)
    first, second = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.1, 0.8])
    state.observe(1, first)
    state.observe(1, second[None])  # one row of a one-token forward
    state.observe(0, np.array([[0.2, 0.2, 0.6], [0.4, 0.4, 0.2]]))  # two rows: their mean
    state.clock.advance((0, 0))
    state.use((0, 0))
    names = reuse.feature_names(2, router=True)
    x = state.features(np.array([0, 5]), router=True)  # (0, 0) and (1, 2)
    assert x.shape == (2, len(names)) and names[-2:] == ["layer_0", "layer_1"]
    now, ema1, ema4 = (names.index(n) for n in reuse.ROUTER_FEATURES)
    keep1, keep4 = 0.5, 0.5**0.25  # half-lives of 1 and 4 calls of the layer
    assert x[1, now] == 0.8 and x[0, now] == pytest.approx(0.3)
    assert x[1, ema1] == pytest.approx((0.2 * (1 - keep1)) * keep1 + 0.8 * (1 - keep1))
    assert x[1, ema4] == pytest.approx((0.2 * (1 - keep4)) * keep4 + 0.8 * (1 - keep4))
    assert x[0, ema1] == pytest.approx(0.3 * (1 - keep1))
    # Without router columns the rows are the first features exactly.
    assert np.array_equal(state.features(np.array([0, 5])), np.delete(x, [now, ema1, ema4], axis=1))


def test_router_fed_predictor_round_trips_and_a_version_2_file_still_loads(tmp_path):
    rng = np.random.default_rng(4)
    keys = decode_like(rng, 50)
    plan = {i: [(k[0], rng.dirichlet(np.ones(5)))] for i, k in enumerate(keys) if i % 2 == 0}
    x, y = reuse.training_rows(as_array(keys), LAYERS, 5, cap=8.0, router=plan)
    assert x.shape[1] == len(reuse.feature_names(3, router=True))
    assert x[:, len(reuse.FEATURES)].max() > 0  # the router columns were filled
    fitted = reuse.ReusePredictor.fit(
        x, y, 3, 5, 8.0, kind="trees", trees={"n_estimators": 6, "max_depth": 3}, router=True
    )
    again = reuse.ReusePredictor.load(fitted.save(tmp_path / "r.json"))
    assert again.router and np.array_equal(again.predict(x), fitted.predict(x))
    plain = small_predictor()
    data = json.loads(plain.save(tmp_path / "p.json").read_text())
    data["version"] = 2  # the format before router features: the same fields
    del data["router_half_lives_steps"]
    (tmp_path / "p.json").write_text(json.dumps(data))
    assert not reuse.ReusePredictor.load(tmp_path / "p.json").router
