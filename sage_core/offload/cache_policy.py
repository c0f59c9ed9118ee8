"""Which expert to evict: cache policies, shared by `ExpertCache` and the trace simulator.

A policy only keeps the bookkeeping an eviction decision needs; it never holds weights. The
cache asks it `victim(key)` (a resident key to evict before `key` can be admitted, or None
while there is room for `key`), then tells it `admit(key)`, `touch(key)` on every hit and
`forget(key)` on every eviction. The same objects drive the real cache and `simulate`, so
what a simulation measures is what the library does.

Keys are (layer, expert) pairs. Policies (online: they see only the past):

- `lru`:        one least-recently-used order across the model (the library's first policy);
- `layer_lru`:  the capacity split evenly across layers, an LRU per layer;
- `lfu`:        evict the resident key used least often since the start (ties: LRU);
- `activation`: in the spirit of MoE-Infinity's activation-aware cache: evict the resident
                key with the least *recent* activation, an exponentially decayed count of its
                uses (half-life in accesses), so experts a sequence keeps activating stay.

Belady's MIN (offline: evict the key whose next use is farthest away) needs the future and
lives in `simulate_belady`; it is the fewest misses any demand policy can have on a trace.
Two more bounds say where Belady's advantage comes from: `simulate_static` (the most
requested keys of the whole trace, fixed: the ceiling of frequency) and `simulate_lookahead`
(Belady seeing only a horizon of layer calls ahead, LRU beyond it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

EXISTING_POLICIES = ("lru", "layer_lru", "lfu", "activation")  # before issue 21
POLICIES = (*EXISTING_POLICIES, "layer_aware")  # online, nothing to fit
LEARNED = "learned"  # needs a fitted `reuse.ReusePredictor`
POLICY_NAMES = (*POLICIES, LEARNED)  # every name `make_policy` and the cache accept


def _check_capacity(capacity) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    return capacity


class LRUPolicy:
    """One least-recently-used order over every resident key."""

    name = "lru"

    def __init__(self, capacity: int):
        self.capacity = _check_capacity(capacity)
        self._order: OrderedDict = OrderedDict()

    def victim(self, key):
        return next(iter(self._order)) if len(self._order) >= self.capacity else None

    def admit(self, key):
        self._order[key] = None

    def touch(self, key):
        self._order.move_to_end(key)

    def forget(self, key):
        del self._order[key]

    def keys(self) -> list:
        """Resident keys, least recently used first."""
        return list(self._order)


def layer_quotas(capacity: int, layers) -> dict:
    """{layer: slots}: `capacity` split evenly, the first `capacity % n` layers one more."""
    layers = sorted(layers)
    if not layers:
        raise ValueError("layer_lru needs at least one layer")
    if capacity < len(layers):
        raise ValueError(
            f"layer_lru: capacity {capacity} is below the {len(layers)} layers; "
            "each layer needs at least one slot"
        )
    base, extra = divmod(capacity, len(layers))
    return {layer: base + (i < extra) for i, layer in enumerate(layers)}


class LayerLRUPolicy:
    """The capacity partitioned across layers, one LRU order per layer."""

    name = "layer_lru"

    def __init__(self, capacity: int, layers):
        self.capacity = _check_capacity(capacity)
        self.quota = layer_quotas(capacity, layers)
        self._order = {layer: OrderedDict() for layer in self.quota}

    def _layer(self, key) -> OrderedDict:
        try:
            return self._order[key[0]]
        except KeyError:
            raise ValueError(
                f"layer_lru: key {key!r} is not in a known layer {sorted(self.quota)}"
            ) from None

    def victim(self, key):
        order = self._layer(key)
        return next(iter(order)) if len(order) >= self.quota[key[0]] else None

    def admit(self, key):
        self._layer(key)[key] = None

    def touch(self, key):
        self._layer(key).move_to_end(key)

    def forget(self, key):
        del self._layer(key)[key]

    def keys(self) -> list:
        return [k for order in self._order.values() for k in order]


class LFUPolicy:
    """Evict the resident key with the fewest uses since the start (ties: least recent)."""

    name = "lfu"

    def __init__(self, capacity: int):
        self.capacity = _check_capacity(capacity)
        self._count: dict = {}  # every key ever seen, resident or not
        self._last: dict = {}  # resident key -> time of last use
        self._time = 0

    def _use(self, key):
        self._time += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = self._time

    def victim(self, key):
        if len(self._last) < self.capacity:
            return None
        return min(self._last, key=lambda k: (self._count[k], self._last[k]))

    admit = touch = _use

    def forget(self, key):
        del self._last[key]

    def keys(self) -> list:
        return list(self._last)


class ActivationPolicy:
    """Evict the resident key with the least decayed activation count.

    Each use adds 1 to a key's score; scores halve every `half_life` accesses (of any key).
    Stored as log(score) + rate * time of last use, which orders keys exactly as their
    scores decayed to the present do, without touching every key on every access. Ties
    (equal ordering values) go to the least recently used key, as in LFU.

    `half_life=math.inf` is endless memory: the score is the integer count of uses, so
    equal counts tie exactly and the policy is LFU decision for decision. (With a huge
    finite half-life the float scores of equal counts differ in their last digits by the
    times of use, which is not LFU's tie-break; that made a property test flaky.)
    """

    name = "activation"

    def __init__(self, capacity: int, half_life: float = 64.0):
        self.capacity = _check_capacity(capacity)
        if not (
            isinstance(half_life, int | float) and not isinstance(half_life, bool) and half_life > 0
        ):
            raise ValueError(f"half_life must be a positive number, got {half_life!r}")
        self.half_life = float(half_life)
        self._endless = math.isinf(self.half_life)
        self._rate = 0.0 if self._endless else math.log(2.0) / self.half_life
        self._score: dict = {}  # key -> (log score at last use, time of last use), or count
        self._resident: dict = {}  # resident key -> (ordering value, time of last use)
        self._time = 0

    def _use(self, key):
        self._time += 1
        if self._endless:  # exact integer counts
            self._score[key] = self._score.get(key, 0) + 1
            self._resident[key] = (self._score[key], self._time)
            return
        log_score, last = self._score.get(key, (-math.inf, self._time))
        decayed = math.exp(log_score - self._rate * (self._time - last))
        self._score[key] = (math.log1p(decayed), self._time)
        self._resident[key] = (self._score[key][0] + self._rate * self._time, self._time)

    def victim(self, key):
        if len(self._resident) < self.capacity:
            return None
        return min(self._resident, key=self._resident.__getitem__)

    admit = touch = _use

    def forget(self, key):
        del self._resident[key]

    def keys(self) -> list:
        return list(self._resident)


def make_policy(name: str, capacity: int, layers=None, **options):
    """A fresh policy object by name (see POLICY_NAMES); `layers` is needed by layer_lru,
    layer_aware and learned; learned takes `predictor=` (a `ReusePredictor`, or None for
    the default model's committed one, `reuse.default_predictor()`)."""
    if name in ("layer_aware", LEARNED):
        from sage_core.offload import reuse

        if layers is None:
            raise ValueError(f"{name} needs the model's sparse layers (layers=...)")
        if name == "layer_aware":
            return reuse.LayerAwarePolicy(capacity, layers, **options)
        predictor = options.pop("predictor", None) or reuse.default_predictor()
        return reuse.LearnedPolicy(capacity, layers, predictor, **options)
    if name == "lru":
        return LRUPolicy(capacity)
    if name == "layer_lru":
        if layers is None:
            raise ValueError("layer_lru needs the model's sparse layers (layers=...)")
        return LayerLRUPolicy(capacity, layers)
    if name == "lfu":
        return LFUPolicy(capacity)
    if name == "activation":
        return ActivationPolicy(capacity, **options)
    raise ValueError(f"unknown cache policy {name!r}; choose one of {POLICY_NAMES}")


# --- simulation -------------------------------------------------------------------------


@dataclass
class Simulation:
    """What a policy did on an access sequence (and, with prefetch, on its read-aheads)."""

    policy: str
    capacity: int
    hits: np.ndarray  # (A,) bool: was access i a hit
    prefetched: int = 0  # experts read ahead
    prefetch_used: int = 0  # of those, hit by a demand access before being evicted
    wasted: int = 0  # read ahead and evicted without being used
    left_unused: int = 0  # read ahead, still resident and unused at the end
    ahead_reads: np.ndarray | None = None  # (A,) int: experts read ahead just before access i

    @property
    def accesses(self) -> int:
        return int(self.hits.size)

    @property
    def misses(self) -> int:
        return int(self.hits.size - self.hits.sum())

    @property
    def hit_rate(self) -> float:
        return float(self.hits.mean()) if self.hits.size else 0.0

    @property
    def experts_read(self) -> int:
        """Demand misses plus read-aheads: every expert moved over the link."""
        return self.misses + self.prefetched


def _as_keys(keys) -> list:
    return [tuple(int(v) for v in k) for k in np.asarray(keys).reshape(-1, 2)]


def simulate(keys, policy, prefetch=None, router=None) -> Simulation:
    """Run `policy` (a fresh object from `make_policy`) over the (A, 2) array of (layer,
    expert) accesses, admitting every miss (demand paging).

    prefetch: optional {access index: [(layer, expert), ...]} read ahead just before that
    access; a read-ahead of a resident key does nothing. A policy with `admits_prefetch`
    (the learned one) may refuse a read-ahead (not read, not counted), and one with
    `admit_prefetch` is told of a read-ahead apart from a use.

    router: optional {access index: [(layer, probabilities)]} (`expert_trace.router_plan`):
    the router's probabilities a selector sees before that access, given to a policy that
    reads them (`observe_router`, the learned one); others ignore them.
    """
    keys = _as_keys(keys)
    resident: set = set()
    unused_prefetch: set = set()
    hits = np.zeros(len(keys), dtype=bool)
    ahead_reads = np.zeros(len(keys), dtype=np.int64)
    counts = {"prefetched": 0, "prefetch_used": 0, "wasted": 0, "left_unused": 0}

    admits = getattr(policy, "admits_prefetch", lambda key: True)
    observe = getattr(policy, "observe_router", None) if router else None

    def admit(key, ahead=False):
        while (victim := policy.victim(key)) is not None:
            policy.forget(victim)
            resident.discard(victim)
            if victim in unused_prefetch:
                unused_prefetch.discard(victim)
                counts["wasted"] += 1
        getattr(policy, "admit_prefetch", policy.admit)(key) if ahead else policy.admit(key)
        resident.add(key)

    for i, key in enumerate(keys):
        if observe is not None:
            for layer, probs in router.get(i, ()):
                observe(layer, probs)
        for ahead in (prefetch or {}).get(i, ()):
            ahead = tuple(int(v) for v in ahead)
            if ahead not in resident and admits(ahead):
                admit(ahead, ahead=True)
                unused_prefetch.add(ahead)
                counts["prefetched"] += 1
                ahead_reads[i] += 1
        if key in resident:
            hits[i] = True
            policy.touch(key)
            if key in unused_prefetch:
                unused_prefetch.discard(key)
                counts["prefetch_used"] += 1
        else:
            admit(key)
    counts["left_unused"] = len(unused_prefetch)
    return Simulation(policy.name, policy.capacity, hits, **counts, ahead_reads=ahead_reads)


def lru_stack_distances(keys) -> np.ndarray:
    """(A,) LRU stack distance of every access: the number of distinct keys used since the
    previous access to the same key (inf for a first access). An LRU cache of capacity c
    hits access i exactly when distance[i] < c (Mattson et al.'s inclusion property), so one
    pass gives the hit rate at every capacity."""
    codes = _codes(keys)
    last = np.full(codes.max() + 1 if codes.size else 0, -1, dtype=np.int64)
    out = np.full(codes.size, np.inf)
    for i, c in enumerate(codes):
        prev = last[c]
        if prev >= 0:
            out[i] = np.count_nonzero(last > prev)
        last[c] = i
    return out


def _codes(keys) -> np.ndarray:
    """(A,) int64 dense ids of (layer, expert) keys."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    if keys.min() < 0:
        raise ValueError("keys must be non-negative (layer, expert) pairs")
    return keys[:, 0] * (int(keys[:, 1].max()) + 1) + keys[:, 1]


def lru_hits(keys, capacities) -> dict[int, np.ndarray]:
    """{capacity: (A,) bool hits} of a global LRU, from one pass of stack distances."""
    distances = lru_stack_distances(keys)
    return {int(c): distances < _check_capacity(int(c)) for c in capacities}


def next_use(codes: np.ndarray) -> np.ndarray:
    """(A,) index of the next access to the same key (A when there is none)."""
    out = np.full(codes.size, codes.size, dtype=np.int64)
    seen: dict = {}
    for i in range(codes.size - 1, -1, -1):
        c = int(codes[i])
        out[i] = seen.get(c, codes.size)
        seen[c] = i
    return out


def simulate_belady(keys, capacity: int) -> Simulation:
    """Belady's MIN: on a miss with a full cache, evict the resident key whose next use is
    farthest in the future (never used again counts as farthest). Optimal among demand
    policies: no policy that admits every miss has fewer misses on this sequence."""
    capacity = _check_capacity(capacity)
    codes = _codes(keys)
    nxt = next_use(codes)
    size = int(codes.max()) + 1 if codes.size else 0
    resident = np.zeros(size, dtype=bool)
    next_of = np.full(size, -1, dtype=np.int64)  # next use of each resident key
    hits = np.zeros(codes.size, dtype=bool)
    held = 0
    for i, c in enumerate(codes):
        if resident[c]:
            hits[i] = True
        else:
            if held >= capacity:
                victim = int(np.argmax(np.where(resident, next_of, -1)))
                resident[victim] = False
                held -= 1
            resident[c] = True
            held += 1
        next_of[c] = nxt[i]
    return Simulation("belady", capacity, hits)


# --- bounds: what knowing the trace would buy ----------------------------------------------


def simulate_static(keys, capacity: int) -> Simulation:
    """The hindsight-optimal static cache: the `capacity` keys the whole trace requests
    most often (ties: lower (layer, expert)) are resident from the start and never change.

    Every other request is a miss, streamed through a transient buffer without displacing
    the set (bypass), so this is not a demand policy and Belady does not bound it in
    general (capacity 1 on a, b, a, b, ...). It is the ceiling of any policy that settles
    on one set of frequent experts (LFU, and the activation-aware policy with a long
    half-life, converge to such a set), given the frequencies it could only estimate."""
    capacity = _check_capacity(capacity)
    codes = _codes(keys)
    counts = np.bincount(codes) if codes.size else np.zeros(0, dtype=np.int64)
    # A stable sort of -counts keeps the lower code first among equal counts.
    held = np.argsort(-counts, kind="stable")[:capacity]
    return Simulation("static", capacity, np.isin(codes, held))


def layer_calls(keys, token_of) -> np.ndarray:
    """(A,) id of the layer call each request belongs to: consecutive requests of one token
    in one layer (what the router of that layer chose at once)."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    token_of = np.asarray(token_of, dtype=np.int64).reshape(-1)
    if token_of.size != keys.shape[0]:
        raise ValueError(f"{keys.shape[0]} requests but {token_of.size} tokens")
    if not keys.size:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[False, (np.diff(token_of) != 0) | (np.diff(keys[:, 0]) != 0)]
    return np.cumsum(starts)


def simulate_lookahead(keys, capacity: int, horizon, calls=None) -> Simulation:
    """Belady's MIN that sees only `horizon` layer calls ahead (demand paging).

    At a miss with a full cache, each resident key's next use is *seen* when it falls in
    the current layer call or one of the next `horizon` (`calls`: the (A,) layer call of
    each request, from `layer_calls`; None: every request is its own call). Keys with a
    seen next use are ranked as Belady ranks them (farthest first). Keys whose next use is
    not seen are evicted first, least recently used first: without sight of their future,
    recency is what the library's default policy uses, so the gap between horizons is
    what the lookahead adds to today's cache. Treating unseen keys as "never reused" and
    nothing more would leave their order arbitrary, and the bound at a short horizon
    would then measure that arbitrary order as much as the lookahead.

    horizon 0 sees the current layer call only: the experts its router already chose are
    kept, the rest is LRU (exactly LRU when each call requests one key). horizon
    `math.inf` sees the whole trace and is Belady's MIN, hit for hit."""
    capacity = _check_capacity(capacity)
    if not (isinstance(horizon, int | float) and not isinstance(horizon, bool) and horizon >= 0):
        raise ValueError(f"horizon must be a number >= 0 (layer calls), got {horizon!r}")
    codes = _codes(keys)
    calls = (
        np.arange(codes.size, dtype=np.int64)
        if calls is None
        else np.asarray(calls, dtype=np.int64).reshape(-1)
    )
    if calls.size != codes.size or np.any(np.diff(calls) < 0):
        raise ValueError("calls must be one non-decreasing layer call id per request")
    nxt = next_use(codes)
    # The call of each request's next use; inf when the key is never requested again.
    next_call = np.append(calls.astype(np.float64), np.inf)[nxt]
    size = int(codes.max()) + 1 if codes.size else 0
    resident = np.zeros(size, dtype=bool)
    last_use = np.zeros(size, dtype=np.int64)
    next_of = np.zeros(size, dtype=np.int64)
    next_call_of = np.zeros(size, dtype=np.float64)
    hits = np.zeros(codes.size, dtype=bool)
    held = 0
    for i, c in enumerate(codes):
        if resident[c]:
            hits[i] = True
        else:
            if held >= capacity:
                candidates = np.flatnonzero(resident)
                seen = next_call_of[candidates] <= calls[i] + horizon
                if seen.all():
                    victim = candidates[np.argmax(next_of[candidates])]
                else:
                    unseen = candidates[~seen]
                    victim = unseen[np.argmin(last_use[unseen])]
                resident[victim] = False
                held -= 1
            resident[c] = True
            held += 1
        last_use[c] = i
        next_of[c] = nxt[i]
        next_call_of[c] = next_call[i]
    return Simulation(f"lookahead_{horizon:g}", capacity, hits)
