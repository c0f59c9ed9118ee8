"""Broken experts, the arms' shared loop, recovery and statistics (sage_core.studies.trust_runs,
sage_core.studies.unreliable_experts)."""

import json
import math

import numpy as np
import pytest
import torch
from checkpoints import toy_config

from sage_core.corpus import CONTEXTS
from sage_core.dtypes.quantize import fake_quantize
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.studies import experiments, trust_runs, unreliable_experts
from sage_core.studies.experiments import Sample
from sage_core.trust import LearnedBiasLearner, LearnedBiasSelector, TrustTable

CONFIG = toy_config(
    vocab_size=64,
)
CHOSEN = {0: [1, 5], 1: [0, 6]}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Qwen3OmniThinker(CONFIG).eval()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def windows(n_per_context=2, seed=0, length=12):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_per_context):
        for context in CONTEXTS:
            ids = torch.randint(0, CONFIG.vocab_size, (length,), generator=gen)
            out.append(Sample(context, "train", i, 0, ids[: length // 2], ids[length // 2 :]))
    return out


@pytest.mark.parametrize("kind", trust_runs.KINDS)
def test_breakage_is_scoped_touches_only_chosen_and_restores(kind):
    model = tiny_model()
    before = state(model)
    breakage = trust_runs.Breakage(model, CHOSEN, kind, seed=7, contexts=("code",))
    assert state(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())
    with breakage.active("text") as on:
        assert not on and all(torch.equal(v, before[k]) for k, v in state(model).items())
    changed = trust_runs.BROKEN_PROJECTIONS[kind]
    with breakage.active("code") as on:
        assert on
        after = state(model)
        for key, value in before.items():
            if key.split(".")[-1] not in changed or ".mlp.experts." not in key:
                assert torch.equal(after[key], value), key
                continue
            layer = int(key.split(".")[2])
            for e in range(CONFIG.num_experts):
                if e not in CHOSEN[layer]:
                    assert torch.equal(after[key][e], value[e]), (key, e)
                    continue
                assert not torch.equal(after[key][e], value[e])
                if kind == "noise":
                    assert float(after[key][e].norm()) == pytest.approx(
                        float(value[e].norm()), rel=1e-5
                    )
                elif kind == "sign_flip":
                    assert torch.equal(after[key][e], -value[e])
                elif kind == "float8":
                    assert torch.equal(after[key][e], value[e].to(torch.float8_e4m3fn).float())
                else:
                    group = math.gcd(64, value.shape[-1])
                    expected = fake_quantize(value[e], int(kind[3:]), group)
                    assert torch.equal(after[key][e], expected)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())
    assert breakage.broken_by_context() == {"code": CHOSEN}


def test_fewer_bits_break_more():
    model = tiny_model()
    errors = []
    for kind in ("int4", "int3", "int2"):
        breakage = trust_runs.Breakage(model, CHOSEN, kind)
        errors.append(
            sum(float((breakage.broken[k] - breakage.clean[k]).norm()) for k in breakage.clean)
        )
    assert errors[0] < errors[1] < errors[2]


def test_breakage_rejects_unknown_kinds_and_contexts():
    model = tiny_model()
    with pytest.raises(ValueError, match="kind"):
        trust_runs.Breakage(model, CHOSEN, "melt")
    with pytest.raises(ValueError, match="unknown contexts"):
        trust_runs.Breakage(model, CHOSEN, contexts=("poetry",))


def test_choose_broken_draws_from_the_most_used_pool():
    usage = {0: torch.tensor([5, 9, 1, 9, 0, 3, 7, 2]), 1: torch.arange(8)}
    chosen = trust_runs.choose_broken(usage, m=2, pool=3, seed=4)
    assert set(chosen[0]) <= {1, 3, 6} and len(chosen[0]) == 2  # the 3 most used
    assert set(chosen[1]) <= {7, 6, 5}
    assert chosen == trust_runs.choose_broken(usage, 2, 3, 4)  # seeded
    with pytest.raises(ValueError, match="m <= pool"):
        trust_runs.choose_broken(usage, m=4, pool=3, seed=0)


def rows(values, arm, context="all", clean=2.0):
    return [
        {"seed": s, "arm": arm, "context": context, "perplexity": v, "clean_perplexity": clean}
        for s, v in enumerate(values)
    ]


def test_recovery_and_relative_to_oracle_by_hand():
    data = rows([4.0, 6.0], "router") + rows([3.0, 4.0], "oracle") + rows([3.5, 5.0], "cf")
    assert trust_runs.recovery(data, "oracle") == pytest.approx([0.5, 0.5])
    assert trust_runs.recovery(data, "cf") == pytest.approx([0.25, 0.25])
    assert trust_runs.relative_to_oracle(data, "cf")["ratio"] == pytest.approx(0.5)
    assert trust_runs.recovered(data, "cf") == pytest.approx([0.5, 1.0])
    assert trust_runs.damage(data) == pytest.approx({0: 2.0, 1: 4.0})
    assert trust_runs.paired(data, "cf", "router") == pytest.approx([3.5 / 4 - 1, 5 / 6 - 1])
    undamaged = rows([2.0, 3.0], "router") + rows([2.0, 2.5], "x")
    with pytest.raises(ValueError, match="did not raise"):
        trust_runs.recovery(undamaged, "x")
    assert trust_runs.damaged_seeds(undamaged) == [1]
    assert trust_runs.recovery(undamaged, "x", seeds=[1]) == pytest.approx([0.5])


def test_relative_to_oracle_is_a_ratio_of_means_not_a_mean_of_ratios():
    # seed 0: the oracle recovers little (0.1) and the arm 0.1; seed 1: 1.0 and 0.5
    data = rows([3.0, 4.0], "router") + rows([2.9, 3.0], "oracle") + rows([2.9, 3.5], "cf")
    ratio = trust_runs.relative_to_oracle(data, "cf")
    assert ratio["ratio"] == pytest.approx((0.1 + 0.5) / (0.1 + 1.0))
    assert ratio["ratio"] != pytest.approx((1.0 + 0.5) / 2)  # the mean of per-seed ratios


def test_damaged_seeds_take_a_minimum_damage_declared_before_results():
    data = rows([2.01, 2.5, 3.0], "router")
    assert trust_runs.damaged_seeds(data) == [0, 1, 2]
    assert trust_runs.damaged_seeds(data, min_damage=0.01) == [1, 2]


def test_rows_of_several_checkpoints_must_be_selected_first():
    data = [dict(r, budget=b) for b in (0, 10) for r in rows([4.0, 6.0], "router")]
    with pytest.raises(ValueError, match="at_budget"):
        trust_runs.paired(data, "router", "router")
    assert trust_runs.budgets(data) == [0, 10]
    assert {r["budget"] for r in trust_runs.at_budget(data)} == {10}
    assert trust_runs.at_budget([]) == []


def test_precision_at_m_ranks_by_the_harm_bound():
    table = TrustTable([0, 1], ["c"], 8)
    for layer, good in ((0, [1, 5]), (1, [2, 3])):
        for e in good:
            for h in (1.0, 1.1, 0.9):
                table.record_harm(layer, "c", e, h)
    assert trust_runs.precision_at_m(table, "c", {0: [1, 5], 1: [0, 6]}, 0.05) == 0.5


def test_every_arm_trains_to_the_same_budget_on_the_same_windows():
    model = tiny_model()
    stream = windows(2)
    breakage = trust_runs.Breakage(model, CHOSEN, "noise", seed=1)
    settings = trust_runs.ArmSettings(
        ablations_per_window=3,
        bias_batch=2,
        scored_batch=4,
        attribution_batch=2,
        verify_per_window=1,
    )
    before = state(model)
    arms = trust_runs.Arms(model, trust_runs.ARMS, settings, breakage)
    budget = trust_runs.budget_of(len(stream), settings)
    assert budget == len(stream) * (3 + 1)
    arms.train_to(stream, budget // 2)
    arms.train_to(stream, budget)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())  # restored
    passes = arms.passes
    for arm in trust_runs.ARMS:
        cost = arms.step_cost(arm)
        spent = arms.spent(arm)
        assert spent <= budget
        if cost:  # a learning arm stops only when one more step would not fit
            assert spent + cost > budget, arm
    assert passes["counterfactual"]["forward"] == len(stream) * (3 + 1)
    assert passes["counterfactual"]["windows"] == len(stream)
    # the learned bias: 2 windows per step cost 2 forwards + 2 backwards = 6 forward equivalents
    assert passes["learned_bias"]["forward"] == passes["learned_bias"]["backward"] == 8
    assert arms.spent("learned_bias") == 24
    # attribution: 2 windows per step, each 1 forward + 1 backward + 1 verifying forward = 8
    assert arms.step_cost("attribution") == 8
    assert passes["attribution"]["forward"] == 12 and passes["attribution"]["backward"] == 6
    verified = arms.learners["attribution"].table.harm_count.sum()
    assert verified == passes["attribution"]["windows"] == 6
    assert passes["routing_weighted"]["forward"] == budget  # epochs over the stream
    assert passes["routing_weighted"]["windows"] == 4 * len(stream)
    assert passes["router"] == {"forward": 0, "backward": 0, "windows": 0}
    pooled = arms.selectors["counterfactual_context_free"].table
    assert pooled.contexts == [trust_runs.POOLED] and pooled.harm_count.sum() == 3 * len(stream)
    router = trust_runs.score_windows(model, stream)
    oracle = trust_runs.score_windows(model, stream, arms.selectors["oracle"], breakage)
    broken = trust_runs.score_windows(model, stream, None, breakage)
    assert [r["context"] for r in router] == [w.context for w in stream]
    assert all(r["tokens"] == 6 for r in router)
    assert trust_runs.perplexity(oracle) != trust_runs.perplexity(broken)
    assert trust_runs.perplexity(router) != trust_runs.perplexity(broken)


def test_a_stronger_l2_pull_keeps_the_learned_bias_smaller():
    norms = {}
    for l2 in (0.0, 1.0):
        model = tiny_model()
        selector = LearnedBiasSelector.for_model(model, CONTEXTS)
        learner = LearnedBiasLearner(selector, learning_rate=0.1, l2=l2)
        for w in windows(3) * 2:
            learner.update(model, w.prompt, w.continuation, w.context)
        norms[l2] = float(selector.bias.detach().norm())
    assert norms[1.0] < 0.5 * norms[0.0]


def test_scenarios_and_their_arms():
    assert unreliable_experts.scenario(2, "noise", None) == unreliable_experts.PRIMARY
    one = unreliable_experts.scenario(1, "sign_flip", "code")
    assert one == {"m": 1, "kind": "sign_flip", "contexts": ("code",)}
    assert unreliable_experts.scenario_name(one) == "m=1 sign_flip (code only)"
    assert "counterfactual_context_free" in unreliable_experts.arms_for(one)
    assert "counterfactual_context_free" not in unreliable_experts.arms_for(
        unreliable_experts.PRIMARY
    )
    assert "learned_bias" in unreliable_experts.arms_for(one)
    with pytest.raises(ValueError, match="kind"):
        unreliable_experts.scenario(2, "melt", None)


def test_choose_features_picks_the_best_mean_validation_accuracy():
    rows = [
        {"seed": 0, "features": "moe_in_0", "mode": "kmeans", "validation": 0.9, "heldout": 0.5},
        {"seed": 1, "features": "moe_in_0", "mode": "kmeans", "validation": 0.5, "heldout": 0.5},
        {
            "seed": 0,
            "features": "moe_in_1",
            "mode": "supervised",
            "validation": 0.8,
            "heldout": 0.7,
        },
        {
            "seed": 1,
            "features": "moe_in_1",
            "mode": "supervised",
            "validation": 0.8,
            "heldout": 0.9,
        },
    ]
    chosen = trust_runs.choose_features(rows)
    assert (chosen["features"], chosen["mode"]) == ("moe_in_1", "supervised")
    assert chosen["heldout"] == pytest.approx(0.8)
    assert chosen["heldout_by_seed"] == [0.7, 0.9] and "heldout_confusion" not in chosen


def test_pooled_features_by_layer_match_the_classifier_features_at_each_block():
    from sage_core.trust.classifier import features

    model = tiny_model()
    stream = windows(1)
    got = trust_runs.pooled_features_by_layer(model, stream)
    assert list(got) == ["moe_in_0", "moe_in_1", "moe_in_all"]
    assert all(v.dtype == np.float32 for v in got.values())
    np.testing.assert_array_equal(
        got["moe_in_all"], np.concatenate([got["moe_in_0"], got["moe_in_1"]], axis=1)
    )
    captured = []
    handle = model.sparse_blocks()[1].register_forward_pre_hook(
        lambda module, args: captured.append(args[0])
    )
    model.hidden_states(stream[2].prompt[None])
    handle.remove()
    assert np.allclose(got["moe_in_1"][2], features(captured[0].detach())[0], atol=1e-5)


def test_classifier_validation_fits_on_fit_prompts_and_scores_every_mode(monkeypatch):
    """On windows whose tokens depend on the context, every (features, mode) row has its
    accuracies and a held-out confusion matrix; fit prompts come from `fit_per_context`."""
    calls = []

    seen = {}

    class FakeCorpus:
        def documents(self, context, split):
            return [f"{context}/{split}/{i}" for i in range(10)]

    def fake_samples(tokenizer, split, per_context, prompt_tokens, seed, stream, corpus, **kw):
        calls.append((split, stream, per_context))
        seen[stream] = set(corpus.documents("code", split))
        gen = torch.Generator().manual_seed(100 * seed + len(calls))
        out = []
        for i in range(per_context):
            for c, context in enumerate(CONTEXTS):
                low = c * CONFIG.vocab_size // len(CONTEXTS)
                ids = torch.randint(low, low + 8, (prompt_tokens + 1,), generator=gen)
                out.append(Sample(context, split, i, 0, ids[:prompt_tokens], ids[prompt_tokens:]))
        return out

    monkeypatch.setattr(trust_runs, "load_corpus", FakeCorpus)
    monkeypatch.setattr(trust_runs, "make_samples", fake_samples)
    rows = trust_runs.classifier_validation(
        tiny_model(), None, [0, 1], per_context=4, prompt_tokens=6, fit_per_context=10
    )
    assert sorted(set(calls)) == [
        ("heldout", "eval", 4),
        ("heldout", "validation", 4),  # the validation corpus's held-out: training documents
        ("train", "classifier", 10),
    ]
    # Validation prompts come from training documents that no fit prompt comes from.
    assert seen["validation"] == {"code/train/0", "code/train/5"}
    assert seen["classifier"] == set(FakeCorpus().documents("code", "train")) - seen["validation"]
    assert seen["eval"] == set(FakeCorpus().documents("code", "heldout"))
    keys = {(r["features"], r["mode"]) for r in rows}
    assert keys == {
        (f, m)
        for f in ("moe_in_0", "moe_in_1", "moe_in_all")
        for m in ("supervised", "kmeans", "logistic")
    }
    assert len(rows) == 2 * len(keys)
    for r in rows:
        confusion = np.array(r["heldout_confusion"])
        assert confusion.shape == (3, 3) and confusion.sum(axis=1).tolist() == [4, 4, 4]
        assert r["heldout"] == pytest.approx(np.trace(confusion) / 12)
    chosen = trust_runs.choose_features(rows)
    assert chosen["validation"] == max(
        np.mean([r["validation"] for r in rows if (r["features"], r["mode"]) == k]) for k in keys
    )
    mine = [r for r in rows if (r["features"], r["mode"]) == (chosen["features"], chosen["mode"])]
    assert chosen["heldout_by_seed"] == [r["heldout"] for r in mine]
    assert np.array(chosen["heldout_confusion"]).sum() == 24
    logistic = [r for r in rows if r["mode"] == "logistic" and r["features"] == "moe_in_all"]
    assert np.mean([r["heldout"] for r in logistic]) >= 0.9  # the contexts are separable


def test_run_arms_records_do_not_depend_on_the_number_of_workers():
    model, tokenizer, _ = experiments.load_model()
    kwargs = dict(
        arms=("router", "oracle", "counterfactual"),
        settings=trust_runs.ArmSettings(ablations_per_window=2),
        num_windows=3,
        heldout_per_context=1,
        prompt_tokens=8,
        continuation_tokens=8,
        breakage_spec={"m": 1, "pool": 4, "kind": "noise", "contexts": None},
        show_progress=False,
    )
    before = state(model)
    threads = torch.get_num_threads()
    if threads != 1:
        with pytest.raises(ValueError, match="set_num_threads"):
            trust_runs.run_arms(model, tokenizer, [3, 4], workers=2, **kwargs)
    torch.set_num_threads(1)
    try:
        serial = trust_runs.run_arms(model, tokenizer, [3, 4, 5], workers=1, **kwargs)
        forked = trust_runs.run_arms(model, tokenizer, [3, 4, 5], workers=2, **kwargs)
    finally:
        torch.set_num_threads(threads)
    for records in (serial, forked):  # wall time is the one field that may differ
        for r in records["curve"]:
            assert r.pop("train_seconds") >= 0
        for r in records["rows"]:  # the last checkpoint's rows (the same dicts, or copies)
            r.pop("train_seconds", None)
    assert json.dumps(serial, sort_keys=True) == json.dumps(forked, sort_keys=True)
    assert [r["seed"] for r in forked["rows"]] == sorted(r["seed"] for r in forked["rows"])
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())
    with pytest.raises(ValueError, match="workers"):
        trust_runs.run_arms(model, tokenizer, [3, 4], workers=0, **kwargs)


def test_context_only_table_tests_equivalence_where_nothing_is_broken():
    rows = []
    for seed, other in enumerate([1.001, 1.0, 0.999, 1.002]):
        for name in ("router", "counterfactual", "counterfactual_context_free"):
            for ctx, ppl in (("code", 3.0), ("text", 2.0), ("all", 2.5)):
                change = {"counterfactual": other, "counterfactual_context_free": 1.0 + 0.02 * seed}
                rows.append(
                    {
                        "seed": seed,
                        "arm": name,
                        "context": ctx,
                        "perplexity": ppl * (change.get(name, 1.0) if ctx == "text" else 1.0),
                        "clean_perplexity": 2.0,
                    }
                )
    table = unreliable_experts.context_only_table(rows, "code")
    assert set(table) == {"counterfactual", "counterfactual_context_free"}
    assert list(table["counterfactual"]) == ["text"]
    assert table["counterfactual"]["text"]["equivalent"]  # within +-0.5%
    assert not table["counterfactual_context_free"]["text"]["equivalent"]  # 0..6% off
