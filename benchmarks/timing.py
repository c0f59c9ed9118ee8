"""Interleaved wall-clock timing: warm-up, several rounds, medians and paired ratios."""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Samples:
    """Seconds per call of one contender, one sample per round."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass(frozen=True)
class Ratio:
    """How many times faster `ours` is than `reference` (reference time / our time).

    `value` is the median of the per-round ratios; `low`/`high` their range. Rounds
    are interleaved (ours, reference, ours, reference, ...), so a burst of load from
    other processes hits both sides of a pair and mostly cancels in the ratio.
    """

    value: float
    low: float
    high: float
    ours: Samples
    reference: Samples


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    contenders: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, Samples]:
    """Run every contender `warmup` times, then `repeats` rounds of one call each, the
    order of the contenders reversed every other round."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for round_ in range(repeats):
        # Alternate who goes first: a contender that always ran second would always
        # find the caches warmed (or the CPU clocked) by the first.
        for name in order if round_ % 2 == 0 else order[::-1]:
            times[name].append(time_call(contenders[name]))
    return {name: Samples(tuple(t)) for name, t in times.items()}


def paired_rounds(
    ours: Callable[[], object],
    reference: Callable[[], object],
    first_reference_s: float,
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
) -> Ratio:
    """Interleaved rounds of (ours, reference); as many as fit `budget_s` given the
    reference's first-call time, within [min_rounds, max_rounds]."""
    rounds = int(budget_s // max(first_reference_s, 1e-9))
    rounds = max(min_rounds, min(max_rounds, rounds))
    samples = interleaved({"ours": ours, "reference": reference}, 0, rounds)
    return speedup(samples["ours"], samples["reference"])


def speedup(ours: Samples, reference: Samples) -> Ratio:
    """Paired per-round ratios reference / ours (both measured in the same rounds)."""
    if len(ours.seconds) != len(reference.seconds):
        raise ValueError("ours and reference must come from the same interleaved rounds")
    pairs = [r / o for o, r in zip(ours.seconds, reference.seconds)]
    return Ratio(statistics.median(pairs), min(pairs), max(pairs), ours, reference)
