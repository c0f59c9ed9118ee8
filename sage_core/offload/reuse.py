"""Eviction by predicted reuse: the layer-aware policy and the learned reuse-distance policy.

Both know the model's fixed layer order. An MoE decode step asks its cache layer by layer, in
that order, each layer's experts in slot order, so the policy tells tokens apart without
being told: a request of a layer that comes earlier in the order than the previous request's
starts a new step (a token, in decode). A *layer call* is the requests of one step in one
layer. Time is counted in layer calls, `T = step * L + position of the layer`.

An expert of layer position q, looked at while position p runs, is next needed no sooner
than q - p layer calls ahead when q > p, and L - p + q (the next step's layer q) otherwise.

- `LayerAwarePolicy` (`layer_aware`): evict the key whose last use lies in the oldest step;
  among keys last used in the same step, the one whose layer comes farthest ahead (its next
  use is the latest possible). Plain LRU does the opposite inside a step: it evicts the
  earliest layer's experts, the ones the next token asks for first.
- `LearnedPolicy` (`learned`): evict the resident key with the largest *predicted* distance
  to its next use, in steps, from a `ReusePredictor` fitted on routing traces of training
  text (Mockingjay / LRB style reuse-distance regression). Keys used in the current layer
  call are never evicted by it while another choice exists (they are in use).

Why reuse distance and not imitation of Belady's decisions (Hawkeye, Parrot): every feature
is a function of the key's own access history and the clock, never of what the cache holds,
so a trace fixes each feature vector and its label (the distance to the next use) whatever
the policy did. The training data are exact for any policy, with no DAgger rounds, and
ranking keys by the true distance *is* Belady's decision: a regression that ranks well
imitates Belady directly.

The predictor is a linear model on a fixed basis of features (`FEATURES`), small enough to
score every resident key once per layer call in a few numpy operations; it is persisted as
versioned JSON (`ReusePredictor.save`, atomic write), never pickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sage_core.atomic import atomic_write_text

DEFAULT_PREDICTOR = Path(__file__).with_name("predictors") / "q3omni_tiny.json"
PREDICTOR_FORMAT = "sage-reuse-predictor"
PREDICTOR_VERSION = 1
HALF_LIVES = (0.5, 2.0, 8.0)  # steps, of the decayed use counts

# The basis of the linear model; per-layer indicators are added for each layer position.
FEATURES = (
    "log1p_steps_since_use",
    "inv1p_steps_since_use",
    "earliest_next_use",  # layer calls to the earliest possible next use, / L
    *(f"log1p_decayed_{h:g}" for h in HALF_LIVES),
    "log1p_count",
    "use_rate",  # uses per step since the clock started
    "used_last_step",
    "recency_x_decayed",
)


def layer_positions(layers) -> dict[int, int]:
    layers = sorted(int(v) for v in layers)
    if not layers:
        raise ValueError("a layer-aware policy needs the model's sparse layers (layers=...)")
    return {layer: i for i, layer in enumerate(layers)}


class StepClock:
    """Steps and layer calls, read off the layer order of the requests."""

    def __init__(self, layers):
        self.position = layer_positions(layers)
        self.num_layers = len(self.position)
        self.step = -1
        self.pos = self.num_layers  # before the first request: any layer starts a step
        self.call = -1

    def pos_of(self, key) -> int:
        try:
            return self.position[int(key[0])]
        except KeyError:
            raise ValueError(
                f"key {key!r} is not in a known layer {sorted(self.position)}"
            ) from None

    def advance(self, key) -> bool:
        """Move the clock to `key`'s layer call; -> whether a new layer call started."""
        q = self.pos_of(key)
        if self.num_layers == 1:  # no layer order to read: every request is its own step
            self.step, self.pos, self.call = self.step + 1, 0, self.call + 1
            return True
        if q == self.pos:
            return False
        if q < self.pos:
            self.step += 1
        self.pos = q
        self.call += 1
        return True

    @property
    def time(self) -> int:
        """Layer calls since the first step's layer position 0."""
        return self.step * self.num_layers + self.pos


class FeatureState:
    """Every key's access history as the few numbers the features need; cache-independent."""

    def __init__(self, layers, num_experts: int):
        self.clock = StepClock(layers)
        self.num_experts = int(num_experts)
        size = self.clock.num_layers * self.num_experts
        self.last = np.full(size, -(10**9), dtype=np.int64)  # time of last use
        self.last_step = np.full(size, -(10**9), dtype=np.int64)
        self.count = np.zeros(size, dtype=np.float64)
        self.decayed = np.zeros((len(HALF_LIVES), size), dtype=np.float64)  # at `last`
        self.call_of_use = np.full(size, -1, dtype=np.int64)  # layer call of the last use
        self._rates = np.array([math.log(2.0) / h for h in HALF_LIVES])

    def code(self, key) -> int:
        e = int(key[1])
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert {e} outside [0, {self.num_experts})")
        return self.clock.pos_of(key) * self.num_experts + e

    def use(self, key) -> int:
        """Record a use of `key` now (the clock already at its layer call); -> its code."""
        c = self.code(key)
        now = self.clock.time
        dt = (now - self.last[c]) / self.clock.num_layers if self.count[c] else 0.0
        self.decayed[:, c] = self.decayed[:, c] * np.exp(-self._rates * dt) + 1.0
        self.count[c] += 1
        self.last[c] = now
        self.last_step[c] = self.clock.step
        self.call_of_use[c] = self.clock.call
        return c

    def features(self, codes) -> np.ndarray:
        """(n, F + L) feature rows of `codes` at the present time (see FEATURES)."""
        codes = np.asarray(codes, dtype=np.int64)
        num_layers = self.clock.num_layers
        now, p = self.clock.time, self.clock.pos
        since = (now - self.last[codes]) / num_layers  # steps since last use
        q = codes // self.num_experts
        earliest = np.where(q > p, q - p, num_layers - p + q) / num_layers
        decayed = self.decayed[:, codes] * np.exp(-self._rates[:, None] * since[None, :])
        log_since = np.log1p(since)
        rate = self.count[codes] / (self.clock.step + 1.0)
        cols = [
            log_since,
            1.0 / (1.0 + since),
            earliest,
            *np.log1p(decayed),
            np.log1p(self.count[codes]),
            rate,
            (self.last_step[codes] >= self.clock.step - 1).astype(np.float64),
            log_since * np.log1p(decayed[1]),
        ]
        onehot = (q[:, None] == np.arange(num_layers)[None, :]).astype(np.float64)
        return np.column_stack([*cols, onehot])


class ReusePredictor:
    """Predicted log(1 + steps to the next use) of a key: a linear model on its features."""

    def __init__(
        self,
        coef,
        intercept: float,
        mean,
        scale,
        num_layers: int,
        num_experts: int,
        cap: float,
        info: dict | None = None,
    ):
        self.coef = np.asarray(coef, dtype=np.float64)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.intercept = float(intercept)
        self.num_layers, self.num_experts = int(num_layers), int(num_experts)
        self.cap = float(cap)
        self.info = dict(info or {})
        width = len(FEATURES) + self.num_layers
        if not (self.coef.shape == self.mean.shape == self.scale.shape == (width,)):
            raise ValueError(
                f"predictor: coef/mean/scale must have {width} entries ({len(FEATURES)} "
                f"features + {self.num_layers} layers), got {self.coef.shape}"
            )
        if not np.all(np.isfinite(self.coef)) or np.any(self.scale <= 0):
            raise ValueError("predictor: coefficients must be finite and scales positive")
        # Folded once: prediction is one matrix-vector product.
        self._w = self.coef / self.scale
        self._b = self.intercept - float(self._w @ self.mean)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return features @ self._w + self._b

    @classmethod
    def fit(
        cls,
        features,
        labels,
        num_layers: int,
        num_experts: int,
        cap: float,
        ridge: float = 1e-3,
        info: dict | None = None,
    ) -> ReusePredictor:
        """Least squares with a small ridge on standardised features."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != y.size or y.size < x.shape[1] + 1:
            raise ValueError(f"fit: {x.shape} features for {y.size} labels")
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = (x - mean) / scale
        gram = z.T @ z + ridge * y.size * np.eye(z.shape[1])
        coef = np.linalg.solve(gram, z.T @ (y - y.mean()))
        return cls(coef, y.mean(), mean, scale, num_layers, num_experts, cap, info)

    def to_json(self) -> dict:
        return {
            "format": PREDICTOR_FORMAT,
            "version": PREDICTOR_VERSION,
            "features": [*FEATURES, *(f"layer_{i}" for i in range(self.num_layers))],
            "half_lives_steps": list(HALF_LIVES),
            "target": "log1p(steps to next use), capped",
            "cap_steps": self.cap,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "info": self.info,
        }

    def save(self, path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path) -> ReusePredictor:
        data = json.loads(Path(path).read_text())
        if data.get("format") != PREDICTOR_FORMAT:
            raise ValueError(f"{path}: not a {PREDICTOR_FORMAT} file")
        if data.get("version") != PREDICTOR_VERSION:
            raise ValueError(
                f"{path}: predictor version {data.get('version')!r}, this code reads "
                f"{PREDICTOR_VERSION}"
            )
        want = [*FEATURES, *(f"layer_{i}" for i in range(data["num_layers"]))]
        if data["features"] != want or list(data["half_lives_steps"]) != list(HALF_LIVES):
            raise ValueError(f"{path}: features differ from this code's {want}")
        return cls(
            data["coef"],
            data["intercept"],
            data["mean"],
            data["scale"],
            data["num_layers"],
            data["num_experts"],
            data["cap_steps"],
            data["info"],
        )


def default_predictor() -> ReusePredictor:
    """The predictor fitted on the default model's training-text traces (committed; written
    by `python -m sage_core.studies.expert_offloading fit-predictor`)."""
    if not DEFAULT_PREDICTOR.is_file():
        raise FileNotFoundError(
            f"{DEFAULT_PREDICTOR}: no fitted reuse predictor; run "
            "`python -m sage_core.studies.expert_offloading fit-predictor`"
        )
    return ReusePredictor.load(DEFAULT_PREDICTOR)


class LayerAwarePolicy:
    """LRU by step; inside a step, the key whose layer comes farthest ahead goes first."""

    name = "layer_aware"

    def __init__(self, capacity: int, layers):
        from sage_core.offload.cache_policy import _check_capacity

        self.capacity = _check_capacity(capacity)
        self.clock = StepClock(layers)
        self._last: dict = {}  # resident key -> (step of last use, layer call of last use)

    def victim(self, key):
        self.clock.advance(key)
        if len(self._last) < self.capacity:
            return None
        p, num_layers = self.clock.pos, self.clock.num_layers

        def rank(k):
            q = self.clock.position[int(k[0])]
            ahead = q - p if q > p else num_layers - p + q
            step, call = self._last[k]
            return (call == self.clock.call, step, -ahead)

        return min(self._last, key=rank)

    def _use(self, key):
        self.clock.advance(key)
        self._last[key] = (self.clock.step, self.clock.call)

    admit = touch = _use

    def forget(self, key):
        del self._last[key]

    def keys(self) -> list:
        return list(self._last)


class LearnedPolicy:
    """Evict the resident key predicted to be needed last (see the module doc)."""

    name = "learned"

    def __init__(self, capacity: int, layers, predictor: ReusePredictor):
        from sage_core.offload.cache_policy import _check_capacity

        self.capacity = _check_capacity(capacity)
        self.state = FeatureState(layers, predictor.num_experts)
        if self.state.clock.num_layers != predictor.num_layers:
            raise ValueError(
                f"the predictor was fitted for {predictor.num_layers} sparse layers, the "
                f"model has {self.state.clock.num_layers}"
            )
        self.predictor = predictor
        self._resident: dict = {}  # key -> code
        self._ranked: list | None = None  # codes, evict first first, for the current call
        self._key_of: dict = {}
        self.scored = 0  # feature rows scored, for the cost per token

    def _tick(self, key):
        if self.state.clock.advance(key):
            self._ranked = None

    def victim(self, key):
        self._tick(key)
        if len(self._resident) < self.capacity:
            return None
        if self._ranked is None:
            codes = np.fromiter(self._resident.values(), dtype=np.int64)
            scores = self.predictor.predict(self.state.features(codes))
            self.scored += codes.size
            # Farthest predicted reuse first; ties: least recently used first.
            order = np.lexsort((self.state.last[codes], -scores))
            self._ranked = codes[order].tolist()
        call = self.state.clock.call
        while self._ranked:
            c = self._ranked.pop(0)
            k = self._key_of[c]
            if k in self._resident and self.state.call_of_use[c] != call:
                return k
        # Every resident key is in use in this call: the least recently used goes.
        return min(self._resident, key=lambda k: self.state.last[self._resident[k]])

    def _use(self, key):
        self._tick(key)
        c = self.state.use(key)
        self._resident[key] = c
        self._key_of[c] = key

    admit = touch = _use

    def forget(self, key):
        del self._resident[key]

    def keys(self) -> list:
        return list(self._resident)


# --- training data: features and labels from a trace ---------------------------------------


def training_rows(keys, layers, num_experts: int, cap: float, stride: int = 1, seen_only=True):
    """(features, labels, times) for every key seen so far, at the start of every `stride`-th
    layer call of the (A, 2) request sequence `keys` (token-by-token order).

    The label is log1p(steps to the key's next use), the distance counted from the present
    layer call in steps (layer calls / L); a key never used again, or used beyond the
    trace's end by more than `cap` steps, is labelled log1p(cap); a key whose next use is
    unknown (the trace ends within `cap` steps) gives no row. The features come from the
    same `FeatureState` the policy runs, so train and serve cannot drift apart."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    state = FeatureState(layers, num_experts)
    num_layers = state.clock.num_layers
    size = num_layers * state.num_experts
    # Time (layer calls) of every request, and of each request's key's next use.
    times = np.empty(len(keys), dtype=np.int64)
    probe = StepClock(layers)
    for i, k in enumerate(keys):
        probe.advance(k)
        times[i] = probe.time
    codes = np.array([state.code(k) for k in keys], dtype=np.int64)
    end = times[-1] if len(times) else 0
    xs, ys = [], []
    next_time = np.full(size, -1, dtype=np.int64)
    # Walk backwards to know each request's next use of its key, then forwards for features.
    order_next = np.full(len(keys), -1, dtype=np.int64)
    for i in range(len(keys) - 1, -1, -1):
        order_next[i] = next_time[codes[i]]
        next_time[codes[i]] = times[i]
    first_use = next_time.copy()  # first use time of each code (-1: never)
    upcoming = first_use.copy()  # next use at or after the present, updated as we go
    calls = 0
    for i, k in enumerate(keys):
        if state.clock.advance(k):
            calls += 1
            if calls % stride == 0:
                now = state.clock.time
                seen = np.flatnonzero(state.count > 0) if seen_only else np.arange(size)
                if seen.size:
                    nxt = upcoming[seen]
                    steps = np.where(nxt >= 0, (nxt - now) / num_layers, np.inf)
                    known = (nxt >= 0) | ((end - now) / num_layers >= cap)
                    if known.any():
                        rows = seen[known]
                        xs.append(state.features(rows))
                        ys.append(np.log1p(np.minimum(steps[known], cap)))
        state.use(k)
        upcoming[codes[i]] = order_next[i]
    width = len(FEATURES) + num_layers
    if not xs:
        return np.zeros((0, width)), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys)
