"""Notebook 09's study: the arithmetic and bookkeeping, on small hand-made inputs."""

import numpy as np
import pytest
import torch

from sage_core.offload.expert_trace import RoutingTrace
from sage_core.studies import expert_offloading as offloading


def test_q3_omni_expert_is_9_44_mb_and_links_are_nominal_rates():
    q = offloading.Q3_OMNI
    assert offloading.expert_bytes(q["hidden"], q["moe_intermediate"], 2) == 9_437_184
    assert offloading.LINKS["PCIe 4.0 x16"] == pytest.approx(31.5e9, rel=1e-3)
    assert offloading.LINKS["PCIe 5.0 x16"] == pytest.approx(63.0e9, rel=1e-3)
    assert offloading.LINKS["NVMe (PCIe 4.0 x4 link)"] == pytest.approx(7.88e9, rel=1e-3)


def test_modelled_tokens_per_s_by_hand():
    # Every expert missed: 48 x 8 x 9,437,184 B per token.
    out = offloading.modelled_tokens_per_s(1.0, 1e9)
    assert out["bytes_per_token"] == 48 * 8 * 9_437_184
    assert out["tokens_per_s"] == pytest.approx(1e9 / (48 * 8 * 9_437_184))
    half = offloading.modelled_tokens_per_s(0.5, 1e9)
    assert half["tokens_per_s"] == pytest.approx(2 * out["tokens_per_s"])
    assert offloading.modelled_tokens_per_s(0.0, 1e9)["tokens_per_s"] == float("inf")


def test_evaluation_seeds_start_at_seed():
    assert offloading.evaluation_seeds(3000) == list(range(3000, 3010))
    assert offloading.evaluation_seeds(0, [4, 2]) == [4, 2]
    with pytest.raises(ValueError, match="distinct"):
        offloading.evaluation_seeds(0, [1, 1])
    assert offloading.nearest_fraction([0.1, 0.25, 0.5], 0.3) == 0.25


def rows(seed=0, context="c", phase="decode", fraction=0.25, part=None, **rates):
    out = [
        {
            "seed": seed,
            "context": context,
            "phase": phase,
            "fraction": fraction,
            "policy": p,
            "hit_rate": h,
        }
        for p, h in rates.items()
    ]
    if part is not None:
        for r in out:
            r["part"] = part
    return out


def test_gap_closed_per_seed_and_its_intervals():
    table = rows(seed=0, lru=0.2, lfu=0.3, belady=0.6)  # lfu closes 0.25
    table += rows(seed=1, lru=0.4, lfu=0.45, belady=0.8)  # 0.125
    table += rows(seed=2, lru=0.2, lfu=0.3, belady=0.4)  # 0.5
    closed = offloading.gap_closed(table, 0.25, "lfu")
    assert closed == pytest.approx(
        {(0, "c", "decode"): 0.25, (1, "c", "decode"): 0.125, (2, "c", "decode"): 0.5}
    )
    cell = offloading.gap_closed_by_cell(table, 0.25, "lfu")[("c", "decode")]
    assert cell["mean"] == pytest.approx(0.875 / 3)
    assert cell["n"] == 3 and cell["low"] < cell["mean"] < cell["high"]
    # a second cell: the overall interval averages each seed's cells first
    table += rows(seed=0, context="d", lru=0.1, lfu=0.1, belady=0.5)
    table += rows(seed=1, context="d", lru=0.1, lfu=0.1, belady=0.5)
    table += rows(seed=2, context="d", lru=0.1, lfu=0.1, belady=0.5)
    assert offloading.gap_closed_by_cell(table, 0.25, "lfu")[("d", "decode")]["constant"]
    overall = offloading.gap_closed_overall(table, 0.25, "lfu")
    assert overall["mean"] == pytest.approx(0.875 / 6)
    diff = offloading.gap_closed_difference(table, 0.25, "lfu", "lru")
    assert diff[("c", "decode")]["mean"] == pytest.approx(0.875 / 3)


def test_belady_violations_compare_within_one_seed_and_trace():
    table = rows(seed=0, lru=0.2, belady=0.6) + rows(seed=1, lru=0.7, belady=0.9)
    assert offloading.belady_violations(table) == []  # 0.7 > seed 0's Belady, but other seed
    table[0]["hit_rate"] = 0.65
    assert offloading.belady_violations(table) == [table[0]]
    static = rows(seed=0, static=0.99)
    assert offloading.belady_violations(table[1:] + static) == []  # static is not bounded


def test_choose_and_score_chooses_on_selection_and_scores_on_held_out_traces():
    selection, scoring = [], []
    for seed in range(4):
        # on the selection traces lfu is best; on the scoring traces activation would be
        selection += rows(
            seed=seed,
            part="selection",
            lru=0.30,
            lfu=0.40,
            activation=0.35,
            layer_lru=0.29,
            belady=0.7,
        )
        scoring += rows(
            seed=seed,
            part="scoring",
            lru=0.30,
            lfu=0.33 + 0.01 * seed,
            activation=0.45,
            layer_lru=0.29,
            belady=0.6,
        )
    out = offloading.choose_and_score(selection, scoring, 0.25)
    assert out["policy"] == "lfu"  # the selection traces' best, not the scoring traces'
    assert out["selection"]["lfu"]["constant"] and out["selection"]["lfu"]["mean"] == 0.40
    # lfu's gap closed on the scoring traces: (0.03..0.06) / 0.3
    assert out["gap_closed_overall"]["mean"] == pytest.approx(0.045 / 0.3)
    assert out["gap_closed"][("c", "decode")]["n"] == 4
    assert out["vs_lru"]["mean"] == pytest.approx(0.045)
    assert out["scoring"]["belady"]["mean"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="selection rows"):
        offloading.choose_and_score(scoring, scoring, 0.25)
    with pytest.raises(ValueError, match="scoring rows"):
        offloading.choose_and_score(selection, selection, 0.25)


def test_paired_difference_and_per_seed_table():
    table = rows(seed=0, lru=0.2, lfu=0.3) + rows(seed=1, lru=0.4, lfu=0.45)
    table += rows(seed=0, context="d", lru=0.2, lfu=0.5)
    d = offloading.paired_difference(table, "hit_rate", {"policy": "lfu"}, {"policy": "lru"})
    assert d["mean"] == pytest.approx((0.2 + 0.05) / 2)  # seed 0: mean over c and d
    text = offloading.per_seed_table(table, "policy", "hit_rate", context="c")
    assert text.splitlines()[1].split() == ["0", "0.200", "0.300"]
    assert text.splitlines()[2].split() == ["1", "0.400", "0.450"]
    with pytest.raises(ValueError, match="no rows"):
        offloading.interval(table, "hit_rate", policy="belady")


def test_interval_table_prints_constants_as_constant():
    from sage_core.studies.statistics import t_interval

    text = offloading.interval_table(
        {"a": {("c", "decode"): t_interval([1.0, 3.0])}, "b": {("c", "decode"): t_interval([2, 2])}}
    )
    line = text.splitlines()[1]
    assert "2.0 ±12.7" in line and "2.0 const" in line and "[" not in line


def test_frontier_summary_is_paired_with_threshold_zero_and_uses_t_intervals():
    frontier = []
    for seed, (base_reads, base_ppl, cost) in enumerate([(8.0, 10.0, 0.004), (6.0, 12.0, 0.006)]):
        for threshold, factor, c in ((0.0, 1.0, 0.0), (1.0, 2.0, cost), (2.0, 3.0, 0.05 + cost)):
            frontier.append(
                {
                    "seed": seed,
                    "threshold": threshold,
                    "experts_read_per_token": base_reads / factor,
                    "perplexity": base_ppl * (1 + c),
                    "hit_rate": 0.3,
                }
            )
    summary = offloading.frontier_summary(frontier)
    assert summary[0]["fewer_reads"]["constant"] and summary[0]["perplexity_cost"]["mean"] == 0
    one = summary[1]
    assert one["fewer_reads"]["constant"] and one["fewer_reads"]["mean"] == pytest.approx(2.0)
    assert one["perplexity_cost"]["mean"] == pytest.approx(0.005)
    # two seeds: the t interval uses t(0.975, 1) = 12.71 times the standard error 0.001
    assert one["perplexity_cost"]["high"] == pytest.approx(0.005 + 12.706 * 0.001, rel=1e-3)
    assert offloading.target_verdicts(summary) == {
        0.0: "too few reads saved",
        1.0: "open",  # cost interval reaches above 1%
        2.0: "too costly",
    }
    assert offloading.meets_target(summary) == []
    assert offloading.meets_target(summary, max_cost=0.05) == [1.0]
    assert offloading.first_reaching(summary, 1.5)["threshold"] == 1.0
    assert offloading.first_reaching(summary, 5.0) is None
    steps = offloading.frontier_steps(frontier)
    assert [(s["from"], s["to"]) for s in steps] == [(0.0, 1.0), (1.0, 2.0)]
    assert steps[0]["difference"]["mean"] == pytest.approx(-3.5)  # (-4 - 3) / 2
    with pytest.raises(ValueError, match="threshold 0"):
        offloading.frontier_summary([r for r in frontier if r["threshold"] == 1.0])


def test_cost_table_spans_the_miss_rate_interval():
    from sage_core.studies.statistics import t_interval

    miss = {"lru": t_interval([0.6, 0.7, 0.65]), "none": t_interval([1.0, 1.0])}
    table = offloading.cost_table(miss, {"link": 1e9})
    lru, none = table
    assert lru["tokens_per_s_low"] < lru["tokens_per_s"] < lru["tokens_per_s_high"]
    assert lru["tokens_per_s"] == pytest.approx(
        offloading.modelled_tokens_per_s(0.65, 1e9)["tokens_per_s"]
    )
    assert none["tokens_per_s_low"] == none["tokens_per_s"] == none["tokens_per_s_high"]


def test_prefetch_pairs_and_effect_match_seed_context_phase_and_policy():
    prefetch = [
        {
            "seed": s,
            "context": "c",
            "phase": "decode",
            "policy": "lru",
            "prefetch": flag,
            "stalls_per_token": 5.0 - 2 * flag - s,
        }
        for s in (0, 1)
        for flag in (False, True)
    ]
    pairs = offloading.prefetch_pairs(prefetch)
    assert [(a["seed"], b["seed"]) for a, b in pairs] == [(0, 0), (1, 1)]
    effect = offloading.prefetch_effect(prefetch, "stalls_per_token")[("c", "decode")]
    assert effect["constant"] and effect["mean"] == -2.0
    with pytest.raises(ValueError, match="one policy"):
        offloading.prefetch_effect(
            prefetch + [{**prefetch[0], "policy": "lfu"}], "stalls_per_token"
        )


def small_trace(seed):
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(60 * 2)]).reshape(60, 2, 2)
    predicted = experts.copy()
    predicted[:, 0] = -1
    return RoutingTrace(experts, predicted, np.arange(60), [0, 1], 8)


def test_policies_and_prefetch_on_small_trace_sets_are_consistent():
    sets = {s: {"c": {"decode": small_trace(s)}} for s in (0, 1)}
    table = offloading.simulate_policies(sets, fractions=(0.25, 0.5))
    assert offloading.belady_violations(table) == []
    assert {r["capacity"] for r in table} == {4, 8}
    assert {r["seed"] for r in table} == {0, 1} and {r["part"] for r in table} == {"scoring"}
    bounds = offloading.simulate_bounds(sets, 0.5, offloading.lookahead_horizons(2, (1,)))
    assert offloading.belady_violations(table + bounds) == []
    pf = offloading.simulate_prefetch(sets, 0.5)
    # A perfect guess: every layer-1 request was read ahead, so layer 1 never stalls.
    for plain, ahead in offloading.prefetch_pairs(pf):
        assert ahead["stalls_per_token"] < plain["stalls_per_token"]
    quality = offloading.prefetch_quality(sets)[1]
    assert quality["constant"] and quality["mean"] == 1.0
    miss = offloading.decode_miss_rates(table, 0.5, ["lru", "belady"])
    assert miss["belady"]["mean"] <= miss["lru"]["mean"]


def test_figures_draw_and_the_extrapolation_says_so():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sage_core.studies.statistics import t_interval

    sets = {
        s: {"c": {p: small_trace(s + 10 * i) for i, p in enumerate(offloading.PHASES)}}
        for s in (0, 1, 2)
    }
    table = offloading.simulate_policies(sets, fractions=(0.25, 0.5))
    horizons = offloading.lookahead_horizons(2, (1,))
    every = table + offloading.simulate_bounds(sets, 0.5, horizons)
    pf = offloading.simulate_prefetch(sets, 0.5)
    cost = offloading.cost_table({"lru": t_interval([0.6, 0.7]), "none": t_interval([1.0, 1.0])})
    figures = [
        offloading.plot_policies(table),
        offloading.plot_bounds(every, 0.5, horizons, "lfu"),
        offloading.plot_prefetch(offloading.prefetch_quality(sets), pf, 0.25),
        offloading.plot_cost(cost),
    ]
    assert "extrapolated" in figures[-1].axes[0].get_title()
    for fig in figures:
        plt.close(fig)


def test_saved_traces_load_back(tmp_path):
    experts = np.zeros((3, 2, 2), dtype=np.int16)
    trace = RoutingTrace(experts, experts, [0, 0, 1], [0, 1], 4)
    traces = {c: {p: trace for p in offloading.PHASES} for c in ("code", "reasoning", "text")}
    written = offloading.save_traces(traces, offloading.trace_directory(tmp_path / "t"))
    assert len(written) == 6
    back = offloading.load_traces(tmp_path / "t")
    assert np.array_equal(back["text"]["decode"].call_of, [0, 0, 1])
    sets = offloading.save_trace_sets({5: traces, 6: traces}, tmp_path / "sets")
    assert len(sets) == 12
    assert set(offloading.load_trace_sets(tmp_path / "sets", [5, 6])) == {5, 6}
    written[0].unlink()
    with pytest.raises(FileNotFoundError, match="no trace"):
        offloading.load_traces(tmp_path / "t")


def test_selection_and_scoring_documents_are_disjoint_halves():
    docs = [f"doc{i}" for i in range(7)]
    selection = offloading.heldout_part(docs, "selection")
    scoring = offloading.heldout_part(docs, "scoring")
    assert selection == ["doc1", "doc3", "doc5"] and scoring == ["doc0", "doc2", "doc4", "doc6"]
    assert offloading.heldout_part(docs, None) == docs
    with pytest.raises(ValueError, match="part"):
        offloading.heldout_part(docs, "train")


def test_heldout_windows_are_seeded_distinct_and_drawn_from_their_part():
    from sage_core.corpus import load_corpus
    from sage_core.corpus.heldout import document_stream
    from sage_core.model.tokenizer import load_tokenizer
    from sage_core.paths import ROOT

    tokenizer = load_tokenizer(ROOT / "models" / "q3omni-tiny")
    a = offloading.heldout_windows(tokenizer, "code", 3, 16, seed=0)
    b = offloading.heldout_windows(tokenizer, "code", 3, 16, seed=0)
    c = offloading.heldout_windows(tokenizer, "code", 3, 16, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    docs = load_corpus().documents("code", "heldout")
    for part in offloading.HELDOUT_PARTS:
        ids, _ = document_stream(offloading.heldout_part(docs, part), tokenizer)
        stream = ids.tobytes()
        for w in offloading.heldout_windows(tokenizer, "code", 3, 16, 0, part=part):
            assert w.numpy().tobytes() in stream  # each window is a slice of its part's stream
    with pytest.raises(ValueError, match="too few"):
        offloading.heldout_windows(tokenizer, "code", 10**6, 16, seed=0)


def test_breaking_on_load_equals_the_resident_breakage_and_keeps_the_reads():
    """The trust-and-cache section breaks experts as the cache reads them: the logits must
    be those of notebook 07's Breakage on the resident model, bit for bit."""
    from sage_core.checkpoint import load_thinker
    from sage_core.studies import trust_runs
    from sage_core.studies.experiments import resolve_model_path

    path = resolve_model_path(None)
    resident = load_thinker(path).eval()
    chosen = {layer: [0, 5] for layer in resident.sparse_blocks()}
    breakage = trust_runs.Breakage(resident, chosen, "noise", seed=0)
    ids = torch.randint(3, 250, (1, 10), generator=torch.Generator().manual_seed(0))

    def stepwise(model):
        cache, out = model.new_cache(1, ids.shape[1]), []
        with torch.no_grad():
            for t in range(ids.shape[1]):
                out.append(model(ids[:, t : t + 1], cache=cache))
        return torch.cat(out, 1)

    with breakage.active("code"):
        want = stepwise(resident)
    plain = load_thinker(path, max_resident_experts=32).eval()
    clean = stepwise(plain)
    cached = load_thinker(path, max_resident_experts=32).eval()
    offloading.break_on_load(cached, breakage)
    assert torch.equal(stepwise(cached), want)
    assert not torch.equal(want, clean)
    # Routing downstream of a broken expert differs, so compare bytes per read, not totals.
    per_read = [m.expert_cache.bytes_read / m.expert_cache.misses for m in (cached, plain)]
    assert per_read[0] == per_read[1]
    one_context = trust_runs.Breakage(resident, chosen, "noise", seed=0, contexts=("code",))
    with pytest.raises(ValueError, match="every context"):
        offloading.break_on_load(load_thinker(path, max_resident_experts=32), one_context)
    with pytest.raises(ValueError, match="expert cache"):
        offloading.break_on_load(resident, breakage)


def test_lookahead_horizons_and_the_shortest_closing_half_by_its_lower_bound():
    assert offloading.lookahead_horizons(4, (1, 4)) == {
        "1 layer": 1,
        "1 token": 4,
        "4 tokens": 16,
        "unlimited": float("inf"),
    }
    horizons = {"1 token": 4, "4 tokens": 16}
    table = []
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        table += rows(
            seed=seed,
            lru=0.2,
            belady=0.6,
            **{"lookahead 1 token": 0.42 + noise, "lookahead 4 tokens": 0.45 + noise},
        )
    # 1 token closes 55% on average, but its interval reaches below half: not enough
    assert (
        offloading.gap_closed_by_cell(table, 0.25, "lookahead 1 token")[("c", "decode")]["low"]
        < 0.5
    )
    assert offloading.smallest_closing(table, 0.25, horizons) == "4 tokens"
    assert offloading.smallest_closing(table, 0.25, horizons, share=0.9) is None


def test_predictor_training_windows_come_from_training_documents_only():
    from sage_core.corpus import CONTEXTS, load_corpus
    from sage_core.corpus.heldout import document_stream
    from sage_core.model.tokenizer import load_tokenizer
    from sage_core.paths import ROOT
    from sage_core.studies.experiments import ValidationCorpus

    tokenizer = load_tokenizer(ROOT / "models" / "q3omni-tiny")
    corpus = load_corpus()
    for context in CONTEXTS:
        train = ValidationCorpus(corpus).documents(context, "train")
        held = corpus.documents(context, "heldout")
        assert not set(train) & set(held)  # no held-out document is trained on
        stream = document_stream(train, tokenizer)[0].tobytes()
        windows = offloading.training_windows(tokenizer, context, 4, 64, offloading.PREDICTOR_SEED)
        assert len(windows) == 4
        assert all(w.numpy().tobytes() in stream for w in windows)


def test_reuse_rows_compare_every_policy_on_the_same_traces():
    from sage_core.offload import reuse

    rng = np.random.default_rng(0)
    trace = RoutingTrace(
        rng.integers(0, 8, size=(20, 2, 2)),
        np.full((20, 2, 2), -1),
        np.zeros(20, dtype=np.int64),
        np.array([0, 1]),
        8,
    )
    sets = {s: {"code": {"decode": trace}} for s in (0, 1)}
    keys, _ = offloading.access_sequence(trace)
    x, y = reuse.training_rows(keys, [0, 1], 8, cap=8.0)
    predictor = reuse.ReusePredictor.fit(x, y, 2, 8, 8.0)
    rows = offloading.simulate_reuse_policies(sets, predictor, fractions=(0.25,))
    names = {r["policy"] for r in rows}
    assert {"lru", "layer_aware", "learned", "lookahead_1tok", "belady"} <= names
    belady = {r["seed"]: r["hit_rate"] for r in rows if r["policy"] == "belady"}
    assert all(r["hit_rate"] <= belady[r["seed"]] + 1e-12 for r in rows)
    gain = offloading.gain_over(rows, 0.25, "learned", "lru")
    assert set(gain) == {("code", "decode")}


def test_markov_prefetch_plan_reads_the_tables_pick_one_token_ahead():
    from sage_core.offload import reuse

    # 2 layers, 4 experts, k = 1; the table says expert (a + 1) % 4 follows a in layer 0 and
    # (a + 2) % 4 in layer 1.
    table = np.zeros((len(reuse.MARKOV_HORIZONS), 2, 4, 4))
    for a in range(4):
        table[:, 0, a, (a + 1) % 4] = 0.9
        table[:, 1, a, (a + 2) % 4] = 0.6
    experts = np.array([[[0], [1]], [[2], [3]], [[1], [1]]])
    trace = RoutingTrace(experts, np.full(experts.shape, -1), np.arange(3), np.array([5, 7]), 4)
    plan = offloading.markov_prefetch_plan(trace, table, 1)
    # Before token t's first request in layer l (index (t * L + l) * k), from token t - 1.
    assert plan == {2: [(5, 1)], 3: [(7, 3)], 4: [(5, 3)], 5: [(7, 1)]}
    assert offloading.markov_prefetch_plan(trace, table, 1, min_probability=0.7) == {
        2: [(5, 1)],
        3: [],
        4: [(5, 3)],
        5: [],
    }


def test_protection_rows_count_reads_and_read_aheads():
    from sage_core.offload import reuse

    rng = np.random.default_rng(0)
    experts = np.stack([rng.choice(8, size=(2, 2), replace=False) for _ in range(30)])
    trace = RoutingTrace(
        experts, rng.integers(0, 8, size=(30, 2, 2)), np.arange(30), np.array([0, 1]), 8
    )
    table = reuse.cooccurrence_table([experts], 8)
    keys, _ = offloading.access_sequence(trace)
    x, y = reuse.training_rows(keys, [0, 1], 8, cap=8.0, table=table)
    predictor = reuse.ReusePredictor.fit(x, y, 2, 8, 8.0, table=table)
    sets = {s: {"code": {"decode": trace}} for s in (0, 1)}
    rows = offloading.simulate_protection(sets, predictor, 0.25)
    assert {r["policy"] for r in rows} == set(offloading.PROTECTION_ARMS)
    by = {r["policy"]: r for r in rows if r["seed"] == 0}
    assert (
        by["learned"]["prefetched_per_token"] == by["learned_protect"]["prefetched_per_token"] == 0
    )
    assert by["learned_prefetch"]["prefetched_per_token"] > 0
    misses = (1 - by["learned_prefetch"]["hit_rate"]) * keys.shape[0] / 30
    reads = misses + by["learned_prefetch"]["prefetched_per_token"]
    assert by["learned_prefetch"]["experts_read_per_token"] == pytest.approx(reads)
    cells = offloading.cell_intervals(rows, "hit_rate", ["learned", "lru"], 0.25)
    assert set(cells) == {"learned", "lru"} and set(cells["lru"]) == {("code", "decode")}


def test_swap_summary_pairs_each_arm_with_the_reference_per_seed():
    rows = [
        {"seed": s, "arm": a, "experts_read_per_token": r, "perplexity": p, "swapped_per_token": w}
        for s, a, r, p, w in [
            (0, "ref", 10.0, 2.0, 0.0),
            (1, "ref", 12.0, 3.0, 0.0),
            (0, "tail", 5.0, 2.02, 1.0),
            (1, "tail", 8.0, 3.03, 2.0),
        ]
    ]
    out = offloading.swap_summary(rows, "ref")
    assert out["ref"]["fewer_reads"]["mean"] == 1.0
    assert out["tail"]["fewer_reads"]["mean"] == pytest.approx((2.0 + 1.5) / 2)
    assert out["tail"]["perplexity_cost"]["mean"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="seeds"):
        offloading.swap_summary(rows[:3], "ref")
