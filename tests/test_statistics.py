"""The statistics module (sage_core.studies.statistics): intervals against their textbook
formulas, constant samples reported as such, the paired ratio of means, TOST equivalence,
and bad input named."""

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_core.studies import statistics

# Samples of 2..30 values on a 0.1 grid, not all equal: exact enough for textbook formulas.
samples = (
    st.lists(st.integers(-1000, 1000), min_size=2, max_size=30)
    .filter(lambda v: len(set(v)) > 1)
    .map(lambda v: [x / 10 for x in v])
)


def textbook_t(x, confidence=0.95):
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    half = scipy.stats.t.ppf(1 - (1 - confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return x.mean() - half, x.mean() + half


# --- t_interval -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(x=samples, confidence=st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_t_interval_is_the_textbook_formula(x, confidence):
    ci = statistics.t_interval(x, confidence)
    low, high = textbook_t(x, confidence)
    assert ci["mean"] == pytest.approx(np.mean(x), abs=1e-9)
    assert ci["low"] == pytest.approx(low, rel=1e-9, abs=1e-9)
    assert ci["high"] == pytest.approx(high, rel=1e-9, abs=1e-9)
    assert ci["low"] < ci["mean"] < ci["high"]
    assert ci["n"] == len(x) and ci["constant"] is False and ci["confidence"] == confidence


def test_t_interval_by_hand_and_can_exclude_zero():
    x = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, s = sqrt(5/3), t_{0.975, 3} = 3.182446...
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    ci = statistics.t_interval(x)
    assert (ci["low"], ci["high"]) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)
    assert ci["low"] > 0  # an effect the data show
    around_zero = statistics.t_interval([-1.0, 1.0, -0.5, 0.5])
    assert around_zero["low"] < 0 < around_zero["high"]


def test_a_constant_sample_is_flagged_and_printed_as_constant():
    for fn in (statistics.t_interval, statistics.bca_interval):
        ci = fn([0.25] * 10)
        assert ci["constant"] is True
        assert ci["mean"] == ci["low"] == ci["high"] == 0.25
        text = statistics.format_interval(ci)
        assert text == "constant +0.250 on 10 of 10 seeds"
        assert "[" not in text and "CI" not in text
    varied = statistics.format_interval(statistics.t_interval([1.0, 2.0, 3.0, 4.0]))
    assert varied.startswith("+2.500 [95% CI ") and not varied.startswith("constant")


def test_format_interval_scales_and_labels():
    ci = {"mean": 0.1234, "low": 0.1, "high": 0.15, "n": 5, "constant": False, "confidence": 0.9}
    assert statistics.format_interval(ci) == "+0.123 [90% CI +0.100, +0.150]"
    assert statistics.format_interval(ci, 100, "+.1f", "%") == "+12.3% [90% CI +10.0%, +15.0%]"
    ratio = {"ratio": 0.5, "low": 0.4, "high": 0.7, "n": 3, "constant": False, "confidence": 0.95}
    assert statistics.format_interval(ratio, spec=".2f") == "0.50 [95% CI 0.40, 0.70]"


# --- bca_interval ---------------------------------------------------------------------------


def test_bca_interval_is_seeded_and_agrees_with_t_on_a_large_normal_sample():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=500)
    a, b = statistics.bca_interval(x, seed=4), statistics.bca_interval(x, seed=4)
    assert a == b
    assert a["mean"] == pytest.approx(x.mean())
    assert a["low"] < a["mean"] < a["high"] and a["constant"] is False
    t = statistics.t_interval(x)
    half = (t["high"] - t["low"]) / 2
    # both are the normal-theory interval in the limit: endpoints within 10% of a half-width
    assert abs(a["low"] - t["low"]) < 0.1 * half
    assert abs(a["high"] - t["high"]) < 0.1 * half


def test_bca_interval_is_scipys_bca_not_the_percentile_interval():
    x = np.random.default_rng(2).exponential(1.0, size=30)
    ci = statistics.bca_interval(x, seed=9)

    def scipy_interval(method):
        return scipy.stats.bootstrap(
            (x,),
            np.mean,
            n_resamples=statistics.BOOTSTRAP_RESAMPLES,
            method=method,
            rng=np.random.default_rng(9),
        ).confidence_interval

    bca, percentile = scipy_interval("BCa"), scipy_interval("percentile")
    assert (ci["low"], ci["high"]) == pytest.approx((bca.low, bca.high), rel=1e-12)
    assert abs(ci["high"] - percentile.high) > 1e-3  # BCa corrects the percentile interval


def test_bca_interval_follows_skew():
    x = np.random.default_rng(2).exponential(1.0, size=200)
    ci = statistics.bca_interval(x)
    # a right-skewed mean: the interval reaches further above the mean than below it
    assert ci["high"] - ci["mean"] > ci["mean"] - ci["low"]


# --- ratio_of_means -------------------------------------------------------------------------

# Two seeds with tiny denominators and large per-seed ratios: the mean of per-seed ratios
# is dominated by them, the ratio of sums is not.
NUMERATORS = [1.0, 1.0, 0.5, 0.52, 0.48, 0.5, 0.51, 0.49, 0.5, 0.5]
DENOMINATORS = [0.01, 0.02, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_ratio_of_means_is_sum_over_sum_not_the_mean_of_ratios():
    r = statistics.ratio_of_means(NUMERATORS, DENOMINATORS)
    assert r["ratio"] == pytest.approx(sum(NUMERATORS) / sum(DENOMINATORS), rel=1e-12)
    assert r["low"] <= r["ratio"] <= r["high"] and r["constant"] is False and r["n"] == 10
    mean_of_ratios = np.mean(np.divide(NUMERATORS, DENOMINATORS))
    assert mean_of_ratios > 10 * r["ratio"]
    assert not r["low"] <= mean_of_ratios <= r["high"]
    assert r == statistics.ratio_of_means(NUMERATORS, DENOMINATORS)  # seeded


def test_ratio_of_means_with_one_ratio_on_every_seed_is_constant():
    r = statistics.ratio_of_means([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert r["constant"] is True and r["ratio"] == r["low"] == r["high"] == 0.5
    assert statistics.format_interval(r, spec=".2f") == "constant 0.50 on 3 of 3 seeds"


def test_ratio_of_means_resamples_seeds_in_pairs():
    # numerator ~ 0.5 * denominator, denominators spread widely: per seed the pair moves
    # together, so resampling seeds (pairs) keeps the ratio near 0.5; resampling numerators
    # and denominators independently does not.
    rng = np.random.default_rng(7)
    den = rng.uniform(0.5, 10.0, size=20)
    num = 0.5 * den + rng.normal(0.0, 0.05, size=20)
    paired = statistics.ratio_of_means(num, den)
    unpaired = scipy.stats.bootstrap(
        (num, den),
        lambda x, y, axis=-1: x.sum(axis=axis) / y.sum(axis=axis),
        paired=False,
        vectorized=True,
        n_resamples=statistics.BOOTSTRAP_RESAMPLES,
        method="BCa",
        rng=np.random.default_rng(0),
    ).confidence_interval
    assert paired["high"] - paired["low"] < 0.25 * (unpaired.high - unpaired.low)
    assert paired["low"] <= paired["ratio"] <= paired["high"]


# --- equivalence ----------------------------------------------------------------------------


def test_equivalence_holds_for_a_tight_sample_well_inside_the_margin():
    x = np.random.default_rng(3).normal(0.002, 0.01, size=20)
    e = statistics.equivalence(x, margin=0.05)
    assert e["equivalent"] is True and e["p"] < 0.05
    assert -0.05 < e["low"] < e["high"] < 0.05
    assert e["margin"] == 0.05 and e["confidence"] == pytest.approx(0.9)


def test_an_interval_containing_zero_is_not_equivalence():
    # absence of evidence: the mean is near zero and the 95% interval contains zero, but
    # the sample is too noisy to rule out differences as large as the margin
    x = np.random.default_rng(5).normal(0.0, 1.0, size=10)
    ci = statistics.t_interval(x)
    assert ci["low"] < 0 < ci["high"]
    assert ci["high"] - ci["low"] > 2 * 0.2
    e = statistics.equivalence(x, margin=0.2)
    assert e["equivalent"] is False and e["p"] >= 0.05


@settings(max_examples=60, deadline=None)
@given(x=samples, margin=st.sampled_from([0.5, 5.0, 50.0]), alpha=st.sampled_from([0.05, 0.1]))
def test_equivalence_p_is_the_larger_one_sided_p_and_matches_the_interval(x, margin, alpha):
    e = statistics.equivalence(x, margin, alpha)
    below = scipy.stats.ttest_1samp(x, -margin, alternative="greater").pvalue
    above = scipy.stats.ttest_1samp(x, margin, alternative="less").pvalue
    assert e["p"] == pytest.approx(max(below, above), rel=1e-9, abs=1e-12)
    assert e["equivalent"] == (e["p"] < alpha)
    low, high = textbook_t(x, 1 - 2 * alpha)
    assert (e["low"], e["high"]) == pytest.approx((low, high), rel=1e-9, abs=1e-9)
    # TOST at alpha is the (1 - 2 alpha) interval lying inside the margin
    if not math.isclose(abs(low), margin) and not math.isclose(abs(high), margin):
        assert e["equivalent"] == (-margin < low and high < margin)


def test_equivalence_of_a_constant_sample():
    inside = statistics.equivalence([0.01] * 5, margin=0.05)
    assert inside["equivalent"] is True and inside["constant"] is True and inside["p"] == 0.0
    outside = statistics.equivalence([0.07] * 5, margin=0.05)
    assert outside["equivalent"] is False and outside["p"] == 1.0


# --- wins -----------------------------------------------------------------------------------


def test_wins_counts_strictly_greater_pairs():
    assert statistics.wins([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 3.5]) == 2
    with pytest.raises(ValueError, match="wins"):
        statistics.wins([1.0, 2.0], [1.0])


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("t_interval", lambda: statistics.t_interval([1.0])),
        ("t_interval", lambda: statistics.t_interval([1.0, math.nan, 2.0])),
        ("t_interval", lambda: statistics.t_interval([1.0, math.inf])),
        ("bca_interval", lambda: statistics.bca_interval([2.0])),
        ("bca_interval", lambda: statistics.bca_interval([1.0, math.nan])),
        ("ratio_of_means", lambda: statistics.ratio_of_means([1.0], [1.0])),
        ("ratio_of_means", lambda: statistics.ratio_of_means([1.0, math.nan], [1.0, 2.0])),
        ("ratio_of_means", lambda: statistics.ratio_of_means([1.0, 2.0, 3.0], [1.0, 2.0])),
        ("ratio_of_means", lambda: statistics.ratio_of_means([1.0, 2.0], [1.0, -1.0])),
        ("ratio_of_means", lambda: statistics.ratio_of_means([1.0, 2.0], [0.0, 0.0])),
        ("equivalence", lambda: statistics.equivalence([1.0], margin=1.0)),
        ("equivalence", lambda: statistics.equivalence([1.0, math.nan], margin=1.0)),
        ("equivalence", lambda: statistics.equivalence([1.0, 2.0], margin=0.0)),
        ("equivalence", lambda: statistics.equivalence([1.0, 2.0], margin=-0.1)),
        ("equivalence", lambda: statistics.equivalence([1.0, 2.0], margin=math.nan)),
        ("wins", lambda: statistics.wins([1.0, 2.0, 3.0], [1.0, 2.0])),
    ],
)
def test_bad_input_is_a_value_error_naming_the_function(name, call):
    with pytest.raises(ValueError, match=name):
        call()
