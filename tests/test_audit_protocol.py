"""The report's measurement and protocol, rebuilt (sage_core.studies.report_protocol)."""

import math

import numpy as np
import pytest
import torch
from checkpoints import toy_config
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_core.corpus import CONTEXTS
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.studies import report_protocol as ap
from sage_core.studies.experiments import Sample
from sage_core.trust import REPORT_PRIOR, TrustTable

CONFIG = toy_config(
    vocab_size=64,  # every exp(CE) <= 64 < 100: the report's quality is always "good"
)
PROTOCOL = ap.ReportProtocol(classifier_samples=6)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Qwen3OmniThinker(CONFIG).eval()


def test_argmax_perplexity_hand_case():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    ce_first = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce_second = -math.log(math.e / (math.e + 2))
    expected = math.exp((ce_first + ce_second) / 2)
    assert ap.argmax_perplexity(logits) == pytest.approx(expected, rel=1e-12)
    assert ap.argmax_perplexity(logits[None]) == pytest.approx(expected, rel=1e-12)
    # the real next tokens (2, 0) are not the argmax: the honest perplexity is larger
    honest = math.exp((-math.log(1 / (math.exp(2) + 2)) - math.log(1 / (math.e + 2))) / 2)
    assert ap.teacher_forced_perplexity(logits, torch.tensor([2, 0])) == pytest.approx(honest)
    assert ap.argmax_perplexity(torch.zeros(4, 7)) == pytest.approx(7.0)  # uniform: V


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    positions=st.integers(1, 12),
    vocab=st.integers(2, 50),
    scale=st.floats(0.01, 30.0),
)
def test_report_metric_never_exceeds_teacher_forced_perplexity(seed, positions, vocab, scale):
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(positions, vocab, generator=gen)
    targets = torch.randint(0, vocab, (positions,), generator=gen)
    metric = ap.argmax_perplexity(logits)
    assert 1.0 <= metric <= ap.teacher_forced_perplexity(logits, targets)
    assert metric == pytest.approx(ap.teacher_forced_perplexity(logits, logits.argmax(-1)))


def test_metric_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        ap.argmax_perplexity(torch.zeros(5))
    with pytest.raises(ValueError, match="targets has 3 tokens"):
        ap.teacher_forced_perplexity(torch.zeros(2, 4), torch.tensor([0, 1, 2]))


def test_report_quality_rule():
    assert ap.report_quality(13.24) == 0.7
    assert ap.report_quality(99.999) == 0.7
    assert ap.report_quality(100.0) == 0.5
    assert ap.report_quality(1e6) == 0.5
    assert ap.report_quality(math.inf) == 0.5
    with pytest.raises(ValueError):
        ap.report_quality(math.nan)


def test_report_update_moves_only_experts_0_to_3_of_the_context():
    table = TrustTable([0, 2], CONTEXTS, 8, prior=REPORT_PRIOR)
    ap.report_update(table, "code", 0.7, learning_rate=0.25)
    code = CONTEXTS.index("code")
    expected = torch.full((2, 8), REPORT_PRIOR)
    expected[:, :4] = REPORT_PRIOR + 0.25 * (0.7 - REPORT_PRIOR)
    assert torch.equal(table.trust[:, code], expected)
    others = [i for i in range(len(CONTEXTS)) if i != code]
    assert torch.all(table.trust[:, others] == REPORT_PRIOR)
    assert table.updates.tolist() == [1.0, 0.0, 0.0]
    ap.report_update(table, "code", 0.5, learning_rate=0.25)  # the "bad" quality pulls back
    assert table.trust[0, code, 0] == pytest.approx(0.55 + 0.25 * (0.5 - 0.55))
    with pytest.raises(ValueError, match="experts"):
        ap.report_update(table, "code", 0.7, experts=(6, 8))


def test_learning_effect_as_the_report_computed_it():
    ppls = [15.27, 15.27, 15.27, 12, 11, 10, 9, 9.96, 9.96, 9.96]
    assert ap.learning_effect(ppls) == pytest.approx((15.27 - 9.96) / 15.27)
    assert ap.REPORT_EFFECT == pytest.approx(0.3477, abs=1e-4)
    assert ap.learning_effect([2, 1, 4], window=1) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        ap.learning_effect([1, 2], window=3)
    with pytest.raises(ValueError, match="num_runs"):
        ap.ReportProtocol(num_runs=5, window=3)


def test_protocol_arms_share_inputs_and_updates_off_leave_trust_neutral():
    model = tiny_model()
    result = ap.run_report_protocol(model, PROTOCOL, seed=3)
    runs = {(r["arm"], r["run"]): r for r in result["runs"]}
    assert len(runs) == len(ap.ARMS) * PROTOCOL.num_runs
    assert all(r["quality"] == 0.7 for r in result["runs"])  # vocab 64: every ppl < 100
    off = result["tables"]["trust_no_update"]
    assert off.is_neutral() and float(off.updates.sum()) == 0
    on = result["tables"]["trust"]
    assert not on.is_neutral() and float(on.updates.sum()) == PROTOCOL.num_runs
    assert torch.all(on.trust[:, :, 4:] == REPORT_PRIOR)  # only experts 0-3 ever move
    assert torch.all(on.trust[:, :, :4] >= REPORT_PRIOR)
    # same inputs, same (neutral) trust at the first run: both trust arms agree exactly
    assert runs[("trust", 1)]["ppl"] == runs[("trust_no_update", 1)]["ppl"]
    for r in result["runs"]:
        assert r["context"] == runs[("baseline", r["run"])]["context"]
    effects = {e["arm"]: e for e in result["effects"]}
    for arm in ap.ARMS:
        ppls = [runs[(arm, i)]["ppl"] for i in range(1, PROTOCOL.num_runs + 1)]
        assert effects[arm]["effect"] == pytest.approx(ap.learning_effect(ppls))


def test_protocol_is_seeded():
    model = tiny_model()
    a = ap.run_report_protocol(model, PROTOCOL, seed=5)["runs"]
    b = ap.run_report_protocol(model, PROTOCOL, seed=5)["runs"]
    c = ap.run_report_protocol(model, PROTOCOL, seed=6)["runs"]
    assert a == b
    assert [r["ppl"] for r in a] != [r["ppl"] for r in c]


def test_effect_distribution_and_summary():
    model = tiny_model()
    rows = ap.effect_distribution(model, PROTOCOL, [0, 1, 2], show_progress=False)
    assert sorted((r["seed"], r["arm"]) for r in rows) == sorted(
        (s, a) for s in (0, 1, 2) for a in ap.ARMS
    )
    summary = {s["arm"]: s for s in ap.summarise_effects(rows, observed=-1e9)}
    assert summary["trust"]["seeds"] == 3 and summary["trust"]["share_at_least_observed"] == 1
    diffs = ap.paired_differences(rows)
    by = {(r["seed"], r["arm"]): r["effect"] for r in rows}
    assert diffs == [by[(s, "trust")] - by[(s, "trust_no_update")] for s in (0, 1, 2)]
    with pytest.raises(ValueError, match="distinct"):
        ap.effect_distribution(model, PROTOCOL, [1, 1], show_progress=False)


def test_bound_holds_on_text_like_samples():
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    samples = [
        Sample(
            c,
            "heldout",
            0,
            0,
            torch.randint(0, 64, (7,), generator=gen),
            torch.randint(0, 64, (5,), generator=gen),
        )
        for c in CONTEXTS
    ]
    rows = ap.bound_rows(model, samples)
    assert len(rows) == 3
    assert all(1 <= r["report_metric"] <= r["teacher_forced_ppl"] for r in rows)


def test_different_draws_gap_pairs_seeds_and_counts_gaps_by_hand():
    from sage_core.studies.report_protocol import different_draws_gap

    rows = [
        {"seed": 0, "arm": "baseline", "last_mean": 7.0, "mean": 10.0},  # 30% lower: counts
        {"seed": 1, "arm": "baseline", "last_mean": 9.0, "mean": 10.0},
        {"seed": 2, "arm": "baseline", "last_mean": 13.0, "mean": 10.0},  # 13 vs 9: no
        {"seed": 3, "arm": "baseline", "last_mean": 5.0, "mean": 9.0},  # other way: 9 vs 13
        {"seed": 4, "arm": "trust", "last_mean": 1.0, "mean": 10.0},
    ]
    got = different_draws_gap(rows)
    assert got["pairs"] == 2
    assert got["gap"] == pytest.approx(1 - 9.96 / 13.24)
    assert got["share_final_lower"] == 0.5  # pair (0, 1): 7 <= 0.752 * 10
    assert got["share_either_lower"] == 1.0  # pair (2, 3): 9 <= 0.752 * 13
    with pytest.raises(ValueError, match="two seeds"):
        different_draws_gap(rows, "trust")


def test_effect_rows_keep_each_runs_value_and_the_draws_figure_shows_them():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = tiny_model()
    result = ap.run_report_protocol(model, PROTOCOL, seed=2)
    for e in result["effects"]:
        runs = [r["ppl"] for r in result["runs"] if r["arm"] == e["arm"]]
        assert e["ppls"] == runs and len(runs) == PROTOCOL.num_runs
        assert e["effect"] == pytest.approx(ap.learning_effect(e["ppls"], PROTOCOL.window))
    rows = ap.effect_distribution(model, PROTOCOL, [4, 2, 3], show_progress=False)
    assert [r["seed"] for r in ap.protocol_draws(rows, "baseline", 2)] == [2, 3]
    with pytest.raises(ValueError, match="4 draws"):
        ap.protocol_draws(rows, "baseline", 4)
    fig = ap.plot_protocol_draws(rows, "baseline", draws=3, window=PROTOCOL.window)
    try:
        raw, scaled = fig.axes
        assert len(raw.lines) == 3  # one line per draw
        for line, row in zip(raw.lines, ap.protocol_draws(rows, "baseline", 3), strict=True):
            assert list(line.get_ydata()) == row["ppls"]
        first = scaled.lines[0].get_ydata()
        assert np.mean(first[: PROTOCOL.window]) == pytest.approx(1.0)  # scaled to runs 1-3
    finally:
        plt.close(fig)
