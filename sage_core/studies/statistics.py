"""The statistics every notebook reports with: one module, `scipy.stats` underneath.

Conventions (stated once, used everywhere):

- The unit of replication is the seed. Per-seed values are paired across arms (same
  windows, same stream), so a comparison is an interval over per-seed *differences*.
- `t_interval`: mean and Student-t interval over seeds. A constant sample has no
  interval: it is flagged `constant` and `format_interval` prints it as such ("constant
  +0.000 on 10 of 10 seeds"), never as "[+0.000, +0.000]".
- `bca_interval`: the mean with a BCa bootstrap interval (`scipy.stats.bootstrap`).
- `ratio_of_means`: sum(numerator) / sum(denominator) over seeds (not the mean of
  per-seed ratios, which is undefined where a denominator is near zero), with a paired
  bootstrap interval: seeds are resampled and both sums recomputed (BCa).
- `equivalence`: "no difference" is a claim against a stated margin, tested by two
  one-sided t tests (TOST): equivalent when the (1 - 2 alpha) t interval lies inside
  (-margin, +margin). An interval that merely contains zero is absence of evidence.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999


def _finite(values, name: str, at_least: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size < at_least or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} needs at least {at_least} finite values, got {x.tolist()}")
    return x


def _constant(x: np.ndarray, confidence: float) -> dict:
    mean = float(x.mean())
    return {
        "mean": mean,
        "low": mean,
        "high": mean,
        "n": int(x.size),
        "constant": True,
        "confidence": confidence,
    }


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """{"mean", "low", "high", "n", "constant"}: the mean over seeds and its Student-t
    interval. Needs at least 2 finite values; a constant sample gets low = high = mean
    and constant=True (it has no spread to make an interval from)."""
    x = _finite(values, "t_interval", 2)
    if np.all(x == x[0]):
        return _constant(x, confidence)
    ci = scipy.stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return {
        "mean": float(x.mean()),
        "low": float(ci.low),
        "high": float(ci.high),
        "n": int(x.size),
        "constant": False,
        "confidence": confidence,
    }


def bca_interval(values, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """The mean with a BCa bootstrap interval (`scipy.stats.bootstrap`, seeded); the same
    keys as `t_interval`."""
    x = _finite(values, "bca_interval", 2)
    if np.all(x == x[0]):
        return _constant(x, confidence)
    result = scipy.stats.bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return {
        "mean": float(x.mean()),
        "low": float(ci.low),
        "high": float(ci.high),
        "n": int(x.size),
        "constant": False,
        "confidence": confidence,
    }


def ratio_of_means(numerators, denominators, confidence: float = CONFIDENCE, seed: int = 0):
    """{"ratio", "low", "high", "n", "constant"}: sum(numerators) / sum(denominators)
    (paired per seed) with a paired BCa bootstrap interval: resample seeds, recompute both
    sums. Needs a positive denominator sum."""
    a = _finite(numerators, "ratio_of_means", 2)
    b = _finite(denominators, "ratio_of_means", 2)
    if a.size != b.size:
        raise ValueError(f"ratio_of_means: {a.size} numerators but {b.size} denominators")
    if not b.sum() > 0:
        raise ValueError(f"ratio_of_means needs a positive denominator sum, got {b.sum()}")
    ratio = float(a.sum() / b.sum())
    if np.allclose(a * b.sum(), b * a.sum(), rtol=1e-12, atol=0):  # every resample: one ratio
        return {
            "ratio": ratio,
            "low": ratio,
            "high": ratio,
            "n": int(a.size),
            "constant": True,
            "confidence": confidence,
        }
    result = scipy.stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: x.sum(axis=axis) / y.sum(axis=axis),
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return {
        "ratio": ratio,
        "low": float(ci.low),
        "high": float(ci.high),
        "n": int(a.size),
        "constant": False,
        "confidence": confidence,
    }


def equivalence(values, margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided t tests (TOST) of "the mean of `values` lies within (-margin,
    +margin)". Returns {"mean", "low", "high" (the 1 - 2 alpha t interval), "p" (the
    larger one-sided p-value), "equivalent" (p < alpha), "margin", "n", "constant"}.
    A constant sample is equivalent exactly when its value lies inside the margin."""
    if not margin > 0:
        raise ValueError(f"equivalence: margin must be > 0, got {margin!r}")
    x = _finite(values, "equivalence", 2)
    if np.all(x == x[0]):
        inside = abs(float(x[0])) < margin
        return {
            **_constant(x, 1 - 2 * alpha),
            "p": 0.0 if inside else 1.0,
            "equivalent": inside,
            "margin": margin,
        }
    below = scipy.stats.ttest_1samp(x, -margin, alternative="greater").pvalue
    above = scipy.stats.ttest_1samp(x, margin, alternative="less").pvalue
    ci = t_interval(x, 1 - 2 * alpha)
    p = float(max(below, above))
    return {**ci, "p": p, "equivalent": p < alpha, "margin": float(margin)}


def wins(values, references) -> int:
    """How many seeds have values[i] > references[i] (e.g. an arm beating the oracle)."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(references, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"wins: shapes {a.shape} and {b.shape} differ")
    return int(np.sum(a > b))


def format_interval(ci: dict, scale: float = 1.0, spec: str = "+.3f", unit: str = "") -> str:
    """ "mean [low, high]" of a `t_interval` / `bca_interval` / `equivalence` result (or
    "ratio [low, high]" of `ratio_of_means`), times `scale`; a constant sample prints as
    "constant VALUE on n of n seeds"."""
    centre = ci["ratio"] if "ratio" in ci else ci["mean"]
    value = f"{scale * centre:{spec}}{unit}"
    if ci.get("constant"):
        return f"constant {value} on {ci['n']} of {ci['n']} seeds"
    return (
        f"{value} [{100 * ci['confidence']:.0f}% CI "
        f"{scale * ci['low']:{spec}}{unit}, {scale * ci['high']:{spec}}{unit}]"
    )
