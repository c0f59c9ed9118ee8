"""A decode step laid out in time: each sparse layer's compute beside the expert transfers
it waits for, so that prefetch is judged with overlap, not by bytes alone.

The model is the one an offloading runtime on a GPU has: one compute stream and one link
(a copy engine) that moves one expert at a time, first come first served. For token t and
sparse layer l, in order:

- attention (and the router) runs for `attention_s`; then the router's choices are known;
- the experts it missed are requested at once (demand reads), and so are the experts
  guessed for layer l + 1 (read-aheads, `ahead[t, l + 1]`), demand first;
- the experts' compute (`experts_s`) starts when the layer's demand reads and every
  read-ahead issued for it have arrived (a runtime waits on the copy stream's event for
  the batch: conservative for prefetch when only some of the guesses are used).

Read-aheads therefore overlap the rest of layer l and wait only if the link is still busy
when layer l + 1 needs them; demand reads never overlap their own layer's expert compute.
With every time known, the step's time is exact for this model: no averaging of compute
and transfer. The inputs come from the cache simulator (which experts missed, which
read-aheads were made) and from a cost per layer and per expert moved.
"""

from __future__ import annotations

import numpy as np

from sage_core.offload.cache_policy import Simulation
from sage_core.offload.expert_trace import RoutingTrace

EVENT_KINDS = ("attention", "demand", "ahead", "experts", "stall")


def decode_timeline(demand, ahead, attention_s: float, experts_s: float, transfer_s: float) -> dict:
    """Lay out T tokens x L sparse layers.

    demand (T, L): experts read on demand at layer l of token t (expected counts may be
    fractional); ahead (T, L): experts read ahead for layer l, requested when layer l - 1's router has run (column 0 must be 0:
    nothing is guessed before the first layer); attention_s, experts_s: seconds of compute
    per layer before and after the router; transfer_s: seconds to move one expert.

    Returns {"token_s": (T,) seconds per token, "compute_s": total compute, "link_busy_s":
    total transfer time, "stall_s": time the compute stream waited on the link, "events":
    [(token, layer, kind, start, end)] with kind in `EVENT_KINDS`}."""
    demand = np.asarray(demand, dtype=np.float64)
    ahead = np.asarray(ahead, dtype=np.float64)
    if demand.ndim != 2 or ahead.shape != demand.shape:
        raise ValueError(
            f"demand {demand.shape} and ahead {ahead.shape} must be equal (tokens, layers) arrays"
        )
    if not (np.isfinite(demand).all() and np.isfinite(ahead).all()):
        raise ValueError("demand and ahead must be finite")
    if (demand < 0).any() or (ahead < 0).any():
        raise ValueError("demand and ahead count experts: they must be >= 0")
    if ahead.size and ahead[:, 0].any():
        raise ValueError("ahead[:, 0] must be 0: no guess precedes the first sparse layer")
    for name, value in (
        ("attention_s", attention_s),
        ("experts_s", experts_s),
        ("transfer_s", transfer_s),
    ):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    T, L = demand.shape
    now = link_free = 0.0
    ready = 0.0  # when the read-aheads issued for the next layer have all arrived
    token_s = np.zeros(T)
    events = []
    stall = busy = 0.0
    for t in range(T):
        start = now
        for li in range(L):
            routed = now + attention_s
            events.append((t, li, "attention", now, routed))
            arrived = max(routed, ready if li > 0 else routed)
            guessed = ahead[t, li + 1] if li + 1 < L else 0
            for kind, count in (("demand", demand[t, li]), ("ahead", guessed)):
                if count:
                    begin = max(routed, link_free)
                    link_free = begin + count * transfer_s
                    busy += count * transfer_s
                    events.append((t, li, kind, begin, link_free))
                    if kind == "demand":
                        arrived = max(arrived, link_free)
                    else:
                        ready = link_free
                elif kind == "ahead":
                    ready = routed
            if arrived > routed:
                events.append((t, li, "stall", routed, arrived))
                stall += arrived - routed
            now = arrived + experts_s
            events.append((t, li, "experts", arrived, now))
        token_s[t] = now - start
    return {
        "token_s": token_s,
        "compute_s": T * L * (attention_s + experts_s),
        "link_busy_s": busy,
        "stall_s": stall,
        "events": events,
    }


def layer_reads(trace: RoutingTrace, simulation: Simulation) -> tuple[np.ndarray, np.ndarray]:
    """((T, L) demand reads, (T, L) read-aheads) of a simulation run on
    `access_sequence(trace)` (token by token), in `decode_timeline`'s layout. A read-ahead
    made just before one of layer l's requests counts for layer l."""
    T, L, k = trace.experts.shape
    if simulation.hits.shape != (T * L * k,):
        raise ValueError(
            f"simulation of {simulation.hits.size} requests, trace of {T} tokens x {L} layers "
            f"x {k} slots: simulate access_sequence(trace) (token by token)"
        )
    if simulation.ahead_reads is None:
        raise ValueError(f"{simulation.policy}: the simulation does not record its read-aheads")
    demand = (~simulation.hits).reshape(T, L, k).sum(2)
    ahead = simulation.ahead_reads.reshape(T, L, k).sum(2)
    return demand, ahead
