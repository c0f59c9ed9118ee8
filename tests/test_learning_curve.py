"""The learning-curve protocol (sage_core.studies.learning_curve, tuning): tables over
checkpoints, exclusion counts and the realised false discovery rate, p-value calibration,
forced exclusions, the validation corpus and the frozen tuning choice."""

import json

import numpy as np
import pytest
import torch
from checkpoints import toy_config

from sage_core.corpus import CONTEXTS, load_corpus
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.paths import TABLES
from sage_core.studies import experiments, learning_curve, trust_runs, tuning
from sage_core.trust import TrustSelector, TrustTable


def curve_rows():
    """Two seeds, two checkpoints: router 4 / 6, clean 2; the arm halves the damage at the
    second checkpoint; the oracle recovers it all."""
    out = []
    for budget, arm_ppl in ((0, (4.0, 6.0)), (10, (3.0, 4.0))):
        for seed in (0, 1):
            for arm, ppl in (("router", (4.0, 6.0)), ("oracle", (2.0, 2.0)), ("cf", arm_ppl)):
                out.append(
                    {
                        "seed": seed,
                        "arm": arm,
                        "context": "all",
                        "budget": budget,
                        "forward_equivalents": budget if arm == "cf" else 0,
                        "perplexity": ppl[seed],
                        "clean_perplexity": 2.0,
                    }
                )
    return out


def test_curve_table_scores_every_checkpoint_as_a_ratio_of_means():
    table = learning_curve.curve_table(curve_rows(), min_damage=0.01)
    by = {(r["arm"], r["budget"]): r for r in table}
    assert by[("cf", 0)]["recovery"]["ratio"] == 0.0
    assert by[("cf", 10)]["recovery"]["ratio"] == pytest.approx((1 + 2) / (2 + 4))
    assert by[("oracle", 10)]["recovery"]["ratio"] == 1.0
    assert by[("cf", 10)]["forward_equivalents"] == 10
    assert by[("cf", 10)]["change"]["mean"] == pytest.approx(np.mean([3 / 4 - 1, 4 / 6 - 1]))
    assert "recovery" not in learning_curve.curve_table(curve_rows())[0]  # healthy: none


def test_paired_recovery_difference_is_per_seed_and_tests_equivalence():
    rows = trust_runs.at_budget(curve_rows())
    rows += [dict(r, arm="lb", perplexity=r["perplexity"] + 0.01) for r in rows if r["arm"] == "cf"]
    d = learning_curve.paired_recovery_difference(rows + [], "cf", "lb", [0, 1])
    assert d["per_seed"] == pytest.approx([0.01 / 2, 0.01 / 4])
    assert d["equivalence"]["equivalent"]  # within +-0.1


def test_exclusion_counts_and_the_realised_false_discovery_rate():
    rows = [
        {"seed": 0, "arm": "counterfactual", "excluded": [1, 2], "false_exclusions": 1},
        {"seed": 0, "arm": "counterfactual", "excluded": [3], "false_exclusions": 0},
        {"seed": 1, "arm": "counterfactual", "excluded": [], "false_exclusions": 0},
        {"seed": 1, "arm": "other", "excluded": [5, 6, 7], "false_exclusions": 3},
    ]
    c = learning_curve.exclusion_counts(rows)
    assert c["excluded"] == [3, 0] and c["false"] == [1, 0]
    assert c["seeds_with_exclusions"] == 1
    assert c["realised_fdr"] == pytest.approx(1 / 3)
    assert learning_curve.exclusion_counts(rows[2:3])["realised_fdr"] is None


def test_p_value_calibration_flags_anti_conservative_p_values():
    rng = np.random.default_rng(0)
    cells = lambda p: [{"arm": "counterfactual", "p": x, "broken": False} for x in p]  # noqa: E731
    uniform = learning_curve.p_value_calibration(cells(rng.uniform(size=400)))
    assert uniform["p"] > 0.01
    conservative = learning_curve.p_value_calibration(cells(rng.uniform(size=400) ** 0.3))
    assert conservative["p"] > 0.5  # p-values near 1 (experts that help) pass
    small = learning_curve.p_value_calibration(cells(rng.uniform(size=400) ** 3))
    assert small["p"] < 1e-6 and small["share_below_0.05"] > 0.2
    broken_only = [{"arm": "counterfactual", "p": 0.0, "broken": True}] * 5
    with pytest.raises(ValueError, match="healthy"):
        learning_curve.p_value_calibration(broken_only)


def test_forced_exclusion_takes_the_most_suspected_healthy_experts():
    torch.manual_seed(0)
    model = Qwen3OmniThinker(toy_config(vocab_size=64)).eval()
    table = TrustTable.for_model(model, CONTEXTS)
    layer = sorted(model.sparse_blocks())[0]
    for e, harms in ((1, [0.3, 0.31, 0.29]), (2, [0.1, 0.3, 0.2]), (3, [-0.2, -0.1, -0.3])):
        for h in harms:
            table.record_harm(layer, "code", e, h)
    selector = TrustSelector.for_model(model, table)
    forced = trust_runs.forced_exclusion_selector(model, selector, 1, {"code": {layer: [1]}})
    assert forced.excluded(layer, "code").nonzero().flatten().tolist() == [2]  # 1 is broken
    forced = trust_runs.forced_exclusion_selector(model, selector, 2)
    assert forced.excluded(layer, "code").nonzero().flatten().tolist() == [1, 2]


def test_validation_corpus_is_the_training_split_cut_in_two():
    corpus = load_corpus()
    view = experiments.ValidationCorpus(corpus)
    for context in CONTEXTS:
        train, validation = view.documents(context, "train"), view.documents(context, "heldout")
        assert len(train) + len(validation) == len(corpus.documents(context, "train"))
        assert validation == corpus.documents(context, "train")[::5]
        heldout = set(corpus.documents(context, "heldout"))
        assert not heldout & set(validation)  # tuning never sees held-out documents
    with pytest.raises(ValueError, match="split"):
        view.documents("code", "test")


def test_tuning_grids_name_real_settings_and_seeds_stay_apart():
    base = trust_runs.ArmSettings()
    assert len(tuning.settings_grid("learned_bias", base)) == 12
    assert not set(tuning.TUNING_SEEDS) & set(
        range(tuning.EVALUATION_SEED, tuning.EVALUATION_SEED + 10)
    )
    with pytest.raises(ValueError, match="overlap"):
        tuning.tune(None, None, seeds=[tuning.EVALUATION_SEED])


def test_the_frozen_settings_are_the_committed_tuning_choice():
    payload = json.loads((TABLES / "tuning_choice.json").read_text())
    assert payload["tuning_seeds"] == list(tuning.TUNING_SEEDS)
    defaults = trust_runs.ArmSettings()
    for field, value in payload["frozen"].items():
        assert getattr(defaults, field) == value, field
    rows = json.loads((TABLES / "tuning_arms.json").read_text())
    for arm, chosen in payload["choice"].items():
        mine = [r for r in rows if r["arm"] == arm]
        best = {}
        for r in mine:
            key = json.dumps(r["setting"], sort_keys=True)
            won, damage = best.get(key, (0.0, 0.0))
            best[key] = (won + r["recovered"], damage + r["damage"])
        winner = max(best, key=lambda k: best[k][0] / best[k][1])
        assert json.loads(winner) == chosen["setting"], arm
        assert {r["seed"] for r in mine} == set(tuning.TUNING_SEEDS)


def test_committed_records_are_read_only_for_the_parameters_they_were_computed_with(
    tmp_path, monkeypatch
):
    calls = []

    def fake_evaluate(model, tokenizer, seeds, settings=None, **kwargs):
        calls.append(list(seeds))
        return {"broken": {"curve": [{"seed": seeds[0], "excluded": (1, 2)}]}}

    monkeypatch.setattr(learning_curve, "evaluate", fake_evaluate)
    settings = trust_runs.ArmSettings()
    kwargs = {"num_windows": 4, "no_harm_multiple": 2, "workers": 2}
    path = tmp_path / "records.json"
    records, source = learning_curve.load_or_evaluate(None, None, [7, 8], settings, path, **kwargs)
    assert source == "computed now" and calls == [[7, 8]]
    assert records["broken"]["curve"][0]["excluded"] == [1, 2]  # as JSON would give it back
    stored = {
        "parameters": learning_curve.parameters_of(
            [7, 8], settings, num_windows=4, no_harm_multiple=2
        ),
        "records": records,
    }
    path.write_text(json.dumps(stored))
    again, source = learning_curve.load_or_evaluate(None, None, [7, 8], settings, path, **kwargs)
    assert again == records and source.startswith("read") and len(calls) == 1
    # another first seed, another setting or another budget: computed, never read
    learning_curve.load_or_evaluate(None, None, [9, 10], settings, path, **kwargs)
    other = trust_runs.ArmSettings(verify_per_window=settings.verify_per_window + 1)
    learning_curve.load_or_evaluate(None, None, [7, 8], other, path, **kwargs)
    learning_curve.load_or_evaluate(
        None, None, [7, 8], settings, path, **{**kwargs, "num_windows": 5}
    )
    assert len(calls) == 4


def test_the_committed_curve_records_match_the_notebook_defaults():
    stored = json.loads(learning_curve.TABLE.read_text())["parameters"]
    seeds = list(range(tuning.EVALUATION_SEED, tuning.EVALUATION_SEED + 10))
    want = learning_curve.parameters_of(
        seeds,
        trust_runs.ArmSettings(),
        **{k: v for k, v in learning_curve.DEFAULTS.items() if k != "num_seeds"},
    )
    assert stored == json.loads(json.dumps(want))


def test_true_ranking_verifies_broken_cells_first_in_the_attribution_order():
    # Layer 0 of one context, 6 experts: 1 and 4 broken. Scores (the attribution arm's:
    # measured mean after two ablations, else estimated): 5: 0.9, 4: 0.5, 2: 0.4, 1: 0.3.
    table = TrustTable([0], ["c"], 6)
    learner = trust_runs.TrueRankingLearner(table, {"c": {0: [1, 4]}}, 3)
    for e, harm in ((5, 0.9), (4, 0.5), (2, 0.4), (1, 0.9)):
        learner.estimates.record_harm(0, "c", e, harm)
    for harm in (0.2, 0.4):
        table.record_harm(0, "c", 1, harm)
    plain = trust_runs.AttributionLearner(table, 3)
    plain.estimates = learner.estimates
    candidates = torch.ones(1, 6, dtype=torch.bool)
    assert plain.choose_cells("c", candidates) == [(0, 5), (0, 4), (0, 2)]
    # broken cells first, in that order (4 before 1), then healthy ones (5)
    assert learner.choose_cells("c", candidates) == [(0, 4), (0, 1), (0, 5)]
    # a broken cell already shown harmful is not verified again
    decided = torch.tensor([[False, False, False, False, True, False]])
    assert learner.choose_cells("c", candidates, decided) == [(0, 1), (0, 5), (0, 2)]
    # no broken cells known: the attribution order alone
    blind = trust_runs.TrueRankingLearner(table, {}, 3)
    blind.estimates = learner.estimates
    assert blind.choose_cells("c", candidates) == plain.choose_cells("c", candidates)
