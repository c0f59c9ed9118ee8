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

Besides the key's own history, the features carry what the *other* experts say: a
co-occurrence (first-order Markov) table counted on routing traces of training text,
`table[h, l, a, e]` = P(expert e of layer l is used within the next h tokens | expert a of
layer l is used now), averaged over the experts layer l used in its latest call
(`cooccurrence_table`; `MARKOV_HORIZONS`). The table is part of the predictor.

The predictor's model is either linear on the features or an ensemble of gradient-boosted
regression trees (`TreeEnsemble`: sklearn's `GradientBoostingRegressor`, exported as padded
complete trees and evaluated in numpy, all trees and keys at once: every split compared
at once and the leaf read from a table for depth <= 4, level by level deeper). Both
score every resident key once per layer call with a fixed number of numpy operations (no
Python loop over keys); both are persisted as versioned JSON (`ReusePredictor.save`,
atomic write), never pickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sage_core.atomic import atomic_write_text

DEFAULT_PREDICTOR = Path(__file__).with_name("predictors") / "q3omni_tiny.json"
PREDICTOR_FORMAT = "sage-reuse-predictor"
PREDICTOR_VERSION = 3  # 3: optional router-probability features; 2 is still read
HALF_LIVES = (0.5, 2.0, 8.0)  # steps, of the decayed use counts
MARKOV_HORIZONS = (1, 2, 4, 8)  # tokens, of the co-occurrence table
ROUTER_HALF_LIVES = (1.0, 4.0)  # steps (the layer's calls), of the router-probability averages
MODEL_KINDS = ("linear", "trees")

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
    *(f"markov_{h}tok" for h in MARKOV_HORIZONS),  # P(used within h tokens | layer's set)
)
MARKOV_1 = FEATURES.index("markov_1tok")
# With a router-fed predictor, after FEATURES: the router's probability of the key's expert
# at its layer's latest call, and its moving averages over that layer's calls.
ROUTER_FEATURES = ("router_now", *(f"router_ema_{h:g}tok" for h in ROUTER_HALF_LIVES))


def feature_names(num_layers: int, router: bool = False) -> list[str]:
    """The columns of `FeatureState.features`: FEATURES, ROUTER_FEATURES with `router`, then
    one indicator per layer position."""
    return [
        *FEATURES,
        *(ROUTER_FEATURES if router else ()),
        *(f"layer_{i}" for i in range(num_layers)),
    ]


def layer_positions(layers) -> dict[int, int]:
    layers = sorted(int(v) for v in layers)
    if not layers:
        raise ValueError("a layer-aware policy needs the model's sparse layers (layers=...)")
    return {layer: i for i, layer in enumerate(layers)}


def cooccurrence_table(
    expert_arrays, num_experts: int, horizons=MARKOV_HORIZONS, prior: float = 1.0
) -> np.ndarray:
    """(H, L, E, E) table[h, l, a, e] = P(e is used at layer l in one of the next
    `horizons[h]` tokens | a is used at layer l now), counted over the (N, L, k) expert
    arrays of routing traces (`RoutingTrace.experts`, tokens in order), smoothed towards
    the base rate of e with `prior` pseudo-counts."""
    arrays = [np.asarray(a, dtype=np.int64) for a in expert_arrays]
    if not arrays:
        raise ValueError("cooccurrence_table needs at least one trace")
    num_layers = arrays[0].shape[1]
    shape = (len(horizons), num_layers, num_experts)
    joint = np.zeros((*shape, num_experts))
    base, now, rows = np.zeros(shape), np.zeros(shape), np.zeros(len(horizons))
    for experts in arrays:
        n = experts.shape[0]
        used = np.zeros((n, num_layers, num_experts))
        np.put_along_axis(used, experts, 1.0, axis=2)
        for i, h in enumerate(horizons):
            m = n - h
            if m <= 0:
                continue
            future = np.zeros((m, num_layers, num_experts))
            for d in range(1, h + 1):
                np.maximum(future, used[d : d + m], out=future)
            joint[i] += np.einsum("nla,nle->lae", used[:m], future)
            now[i] += used[:m].sum(0)
            base[i] += future.sum(0)
            rows[i] += m
    rate = base / np.maximum(rows, 1)[:, None, None]  # P(e used within h tokens)
    return (joint + prior * rate[:, :, None, :]) / (now[..., None] + prior)


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
    """Every key's access history as the few numbers the features need; cache-independent.

    The policy asks for features once per layer call and records a use per request, so both
    are kept to a few numpy operations on small arrays: a use updates scalars (the decay
    factors of each distance are computed once, with the same expression as before, and
    reused), and the functions of the distance since the last use (log1p, 1/(1+x), the
    decays) are read from tables indexed by that distance in layer calls, filled with the
    very expressions `features` used to evaluate per row, so the values are bit for bit
    those of the direct evaluation (tested against a direct reference)."""

    _TABLE_LIMIT = 1 << 16  # distances (layer calls) tabulated; beyond, evaluated directly

    def __init__(self, layers, num_experts: int, table=None):
        self.clock = StepClock(layers)
        self.num_experts = int(num_experts)
        num_layers = self.clock.num_layers
        size = num_layers * self.num_experts
        shape = (len(MARKOV_HORIZONS), num_layers, self.num_experts, self.num_experts)
        self.table = np.zeros(shape) if table is None else np.asarray(table, dtype=np.float64)
        if self.table.shape != shape:
            raise ValueError(f"co-occurrence table {self.table.shape}, expected {shape}")
        # Each layer's experts in its latest call (`now`) and the call before (`before`).
        self.now = np.zeros((num_layers, self.num_experts))
        self.before = np.zeros((num_layers, self.num_experts))
        self.now_call = np.full(num_layers, -1, dtype=np.int64)
        self.before_call = np.full(num_layers, -1, dtype=np.int64)  # the call of `before`
        self._markov = np.zeros(shape[:3])  # (H, L, E), see `markov`
        self._markov_flat = self._markov.reshape(len(MARKOV_HORIZONS), -1)  # a view
        self._markov_source = np.full(num_layers, -1, dtype=np.int64)  # call it was read from
        self.last = np.full(size, -(10**9), dtype=np.int64)  # time of last use
        self.last_step = np.full(size, -(10**9), dtype=np.int64)
        self.count = np.zeros(size, dtype=np.float64)
        self.decayed = np.zeros((len(HALF_LIVES), size), dtype=np.float64)  # at `last`
        self.call_of_use = np.full(size, -1, dtype=np.int64)  # layer call of the last use
        self._rates = np.array([math.log(2.0) / h for h in HALF_LIVES])
        self._decay_factors: list = []  # [d] -> decay of each half-life over d layer calls
        # Constant per code: its layer's indicator row, and per present layer position p
        # the earliest next use (layer calls / L), as `features` computed them per call.
        q = np.arange(size, dtype=np.int64) // self.num_experts
        self._indicator = (q == np.arange(num_layers)[:, None]).astype(np.float64)
        self._ahead = np.stack(
            [((q - p - 1) % num_layers + 1) * (1.0 / num_layers) for p in range(num_layers)]
        )
        self._since_table = np.zeros((5, 0))  # rows: log1p, 1/(1+x), decays; x = steps since
        # The router's probabilities as a selector saw them (`observe`): per code, the latest
        # of its layer and moving averages over its layer's calls (0 before any).
        self.router = np.zeros((len(ROUTER_FEATURES), size))
        self._router_keep = np.array([0.5 ** (1.0 / h) for h in ROUTER_HALF_LIVES])[:, None]
        self._router_new = 1.0 - self._router_keep

    def code(self, key) -> int:
        e = int(key[1])
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert {e} outside [0, {self.num_experts})")
        return self.clock.pos_of(key) * self.num_experts + e

    def observe(self, layer, probs) -> None:
        """The router's probabilities over `layer`'s experts for the call about to ask the
        cache (a one-token forward's row; the mean over rows of a longer one)."""
        q = self.clock.pos_of((layer, 0))
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim > 1:  # (the mean of one row is the row: skipped, same values)
            probs = probs.reshape(-1, self.num_experts).mean(0)
        block = self.router[:, q * self.num_experts : (q + 1) * self.num_experts]
        block[0] = probs
        # In place, the same products and sum as block * keep + (1 - keep) * probs.
        block[1:] *= self._router_keep
        block[1:] += self._router_new * probs

    def _decay(self, d: int):
        """exp(-rate * d / L) per half-life, for a distance of `d` layer calls (cached)."""
        factors = self._decay_factors
        while len(factors) <= d:
            factors.append(np.exp(-self._rates * (len(factors) / self.clock.num_layers)).tolist())
        return factors[d]

    def use(self, key) -> int:
        """Record a use of `key` now (the clock already at its layer call); -> its code."""
        clock = self.clock
        e = int(key[1])
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert {e} outside [0, {self.num_experts})")
        q = clock.pos_of(key)
        c = q * self.num_experts + e
        now, call = clock.step * clock.num_layers + clock.pos, clock.call
        decayed, count = self.decayed, self.count
        n = count[c]
        if n:
            for h, factor in enumerate(self._decay(now - int(self.last[c]))):
                decayed[h, c] = decayed[h, c] * factor + 1.0
        else:  # nothing to decay: the count starts at one
            decayed[:, c] = 1.0
        count[c] = n + 1
        self.last[c] = now
        self.last_step[c] = clock.step
        self.call_of_use[c] = call
        if self.now_call[q] != call:
            self.before[q] = self.now[q]
            self.before_call[q] = self.now_call[q]
            self.now[q] = 0.0
            self.now_call[q] = call
        self.now[q, e] = 1.0
        return c

    def markov(self) -> np.ndarray:
        """(H, L * E) co-occurrence scores of every key: the table averaged over the experts
        of the key's layer's latest *finished* call (the one in progress is not complete).
        A layer's scores are recomputed only when that finished call changes (one layer a
        layer call: the one whose call just ended)."""
        current = self.now_call == self.clock.call
        source = np.where(current, self.before_call, self.now_call)
        for layer in np.flatnonzero(source != self._markov_source):
            used = self.before[layer] if current[layer] else self.now[layer]
            weights = used / max(used.sum(), 1.0)
            self._markov[:, layer] = weights @ self.table[:, layer]
        self._markov_source = source
        return self._markov_flat

    def _since(self, d: np.ndarray) -> np.ndarray:
        """(5, n): log1p(x), 1 / (1 + x) and exp(-rate * x) per half-life, x = d / L steps,
        from the table (grown as far as needed, up to `_TABLE_LIMIT`)."""
        top = int(d.max()) if d.size else 0
        if top >= self._since_table.shape[1] and top < self._TABLE_LIMIT:
            self._since_table = self._since_columns(np.arange(max(2 * top, 256)))
        if top < self._since_table.shape[1]:
            return self._since_table.take(d, axis=1)
        return self._since_columns(d)  # never-used (read-ahead) keys: far beyond the table

    def _since_columns(self, d: np.ndarray) -> np.ndarray:
        since = d * (1.0 / self.clock.num_layers)
        out = np.empty((5, d.size))
        np.log1p(since, out=out[0])
        np.divide(1.0, 1.0 + since, out=out[1])
        out[2:] = np.exp(np.outer(-self._rates, since))
        return out

    def features(self, codes, router: bool = False) -> np.ndarray:
        """(n, F [+ R] + L) feature rows of `codes` at the present time (`feature_names`);
        written column by column into one array (a view of it, transposed)."""
        codes = np.asarray(codes, dtype=np.int64)
        num_layers = self.clock.num_layers
        step = self.clock.step
        extra = len(ROUTER_FEATURES) if router else 0
        out = np.empty((len(FEATURES) + extra + num_layers, codes.size))
        since = self._since(self.clock.time - self.last.take(codes))
        out[0:2] = since[0:2]
        # Layer calls to the earliest next use, / L: q - p ahead, or the next step's q.
        self._ahead[self.clock.pos % num_layers].take(codes, out=out[2])
        np.multiply(self.decayed.take(codes, axis=1), since[2:], out=out[3:6])
        np.log1p(out[3:6], out=out[3:6])
        count = self.count.take(codes)
        np.log1p(count, out=out[6])
        np.multiply(count, 1.0 / (step + 1.0), out=out[7])
        np.greater_equal(self.last_step.take(codes), step - 1, out=out[8])
        np.multiply(out[0], out[4], out=out[9])
        self.markov().take(codes, axis=1, out=out[10 : MARKOV_1 + len(MARKOV_HORIZONS)])
        if router:
            self.router.take(codes, axis=1, out=out[len(FEATURES) : len(FEATURES) + extra])
        self._indicator.take(codes, axis=1, out=out[len(FEATURES) + extra :])
        return out.T


class TreeEnsemble:
    """Gradient-boosted regression trees as padded complete trees of one depth.

    `feature[t, i]` / `threshold[t, i]` (internal nodes in breadth-first order, node i's
    children 2i+1 and 2i+2) and `leaf[t, j]` (the learning rate folded in); a row goes
    right where its feature, as float32, is above the threshold (sklearn's rule). A leaf
    that sklearn reached above the full depth is padded with never-taken splits
    (threshold +inf) whose leaves repeat its value. Prediction walks every tree and row
    at once, one level per numpy step: `base + sum_t leaf[t, reached]`."""

    def __init__(self, feature, threshold, leaf, base: float):
        self.feature = np.asarray(feature, dtype=np.int64)
        self.threshold = np.asarray(threshold, dtype=np.float64)
        self.leaf = np.asarray(leaf, dtype=np.float64)
        self.base = float(base)
        trees, internal = self.feature.shape
        self.depth = int(round(math.log2(internal + 1)))
        if (
            self.threshold.shape != (trees, internal)
            or self.leaf.shape != (trees, internal + 1)
            or 2**self.depth - 1 != internal
        ):
            raise ValueError(
                f"trees: feature {self.feature.shape}, threshold {self.threshold.shape} and "
                f"leaf {self.leaf.shape} are not complete trees of one depth"
            )
        if not np.all(np.isfinite(self.leaf)):
            raise ValueError("trees: leaf values must be finite")
        # Flat copies: one `take` per array and level is faster than 2-D fancy indexing.
        self._feature, self._threshold = self.feature.ravel(), self.threshold.ravel()
        self._leaf = self.leaf.ravel()
        self._node_offset = (np.arange(trees) * internal)[:, None]
        self._leaf_offset = (np.arange(trees) * (internal + 1) - internal)[:, None]
        # Trees of depth <= 4 (15 splits each) are evaluated without walking them: every
        # split of every tree is compared at once, each tree's 15 outcomes read as one
        # integer, and a table maps that integer to the leaf the walk would reach. The
        # comparisons are made in float32 against each threshold rounded *down* to float32,
        # which gives the same outcome as sklearn's float32 feature against the float64
        # threshold (no float32 lies between the two), at half the cost of mixed precision.
        self._leaf_of_code = None
        if 0 < self.depth <= 4:
            code = np.arange(2**internal, dtype=np.int64)
            node = np.zeros(code.size, dtype=np.int64)
            for _ in range(self.depth):
                node = 2 * node + 1 + ((code >> node) & 1)
            self._leaf_of_code = (node - internal).astype(np.intp)
            down = self._threshold.astype(np.float32)
            above = down.astype(np.float64) > self._threshold
            down[above] = np.nextafter(down[above], np.float32(-np.inf))
            self._threshold32 = down[:, None]
            self._powers = (2.0 ** np.arange(internal)).astype(np.float32)
            self._tree_leaf_offset = (np.arange(trees) * (internal + 1))[:, None]

    @property
    def width(self) -> int:
        return int(self.feature.max()) + 1 if self.feature.size else 0

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        n, width = x.shape
        if self._leaf_of_code is not None and n:
            trees, internal = self.feature.shape
            split = np.empty((trees * internal, n), dtype=np.float32)  # 1.0 where right
            np.greater(x.T.take(self._feature, axis=0), self._threshold32, out=split)
            code = self._powers @ split.reshape(trees, internal, n)
            leaf = self._leaf_of_code.take(code.astype(np.intp)) + self._tree_leaf_offset
            # Summed over trees in tree order (axis 0), as the walk below sums them.
            return self.base + self._leaf.take(leaf).sum(0)
        flat, row_start = x.ravel(), np.arange(n) * width
        node = np.zeros((self.feature.shape[0], n), dtype=np.int64)
        for _ in range(self.depth):
            at = node + self._node_offset
            value = flat.take(row_start + self._feature.take(at))
            node = 2 * node + 1 + (value > self._threshold.take(at))
        return self.base + self._leaf.take(node + self._leaf_offset).sum(0)

    @classmethod
    def from_sklearn(cls, model, base: float) -> TreeEnsemble:
        """From a fitted `GradientBoostingRegressor(init="zero")` (public `tree_` arrays)."""
        trees = [est.tree_ for est in model.estimators_[:, 0]]
        depth = max(int(t.max_depth) for t in trees)
        internal = 2**depth - 1
        feature = np.zeros((len(trees), internal), dtype=np.int64)
        threshold = np.full((len(trees), internal), np.inf)
        leaf = np.zeros((len(trees), internal + 1))
        rate = float(model.learning_rate)
        for t, tree in enumerate(trees):
            stack = [(0, 0, 0)]  # (sklearn node, padded position, level)
            while stack:
                node, pos, level = stack.pop()
                is_leaf = tree.children_left[node] == -1
                if level == depth:
                    leaf[t, pos - internal] = rate * float(tree.value[node].reshape(-1)[0])
                    continue
                if is_leaf:
                    stack += [(node, 2 * pos + 1, level + 1), (node, 2 * pos + 2, level + 1)]
                    continue
                feature[t, pos] = int(tree.feature[node])
                threshold[t, pos] = float(tree.threshold[node])
                stack += [
                    (int(tree.children_left[node]), 2 * pos + 1, level + 1),
                    (int(tree.children_right[node]), 2 * pos + 2, level + 1),
                ]
        return cls(feature, threshold, leaf, base)

    def to_json(self) -> dict:
        return {
            "feature": self.feature.tolist(),
            "threshold": [[v if math.isfinite(v) else "inf" for v in r] for r in self.threshold],
            "leaf": self.leaf.tolist(),
            "base": self.base,
        }

    @classmethod
    def from_json(cls, data) -> TreeEnsemble:
        threshold = [[math.inf if v == "inf" else float(v) for v in r] for r in data["threshold"]]
        return cls(data["feature"], threshold, data["leaf"], data["base"])


class ReusePredictor:
    """Predicted log(1 + steps to the next use) of a key, from its features (`FEATURES`, with
    `router` also ROUTER_FEATURES, then one indicator per layer) by a linear model or a
    `TreeEnsemble`, with the co-occurrence table the features need."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        cap: float,
        table=None,
        linear: dict | None = None,
        trees: TreeEnsemble | None = None,
        info: dict | None = None,
        router: bool = False,
    ):
        self.num_layers, self.num_experts = int(num_layers), int(num_experts)
        self.router = bool(router)
        self.cap = float(cap)
        self.info = dict(info or {})
        shape = (len(MARKOV_HORIZONS), self.num_layers, self.num_experts, self.num_experts)
        # Rounded as it is saved, so a fitted predictor and its JSON decide alike.
        self.table = np.zeros(shape) if table is None else np.round(np.asarray(table, float), 6)
        if self.table.shape != shape or not np.all(np.isfinite(self.table)):
            raise ValueError(f"predictor: co-occurrence table {self.table.shape}, expected {shape}")
        if (linear is None) == (trees is None):
            raise ValueError("predictor: give exactly one model, linear= or trees=")
        width = len(feature_names(self.num_layers, self.router))
        self.kind = "linear" if trees is None else "trees"
        self.trees = trees
        if linear is not None:
            self.coef = np.asarray(linear["coef"], dtype=np.float64)
            self.mean = np.asarray(linear["mean"], dtype=np.float64)
            self.scale = np.asarray(linear["scale"], dtype=np.float64)
            self.intercept = float(linear["intercept"])
            if not (self.coef.shape == self.mean.shape == self.scale.shape == (width,)):
                raise ValueError(
                    f"predictor: coef/mean/scale must have {width} entries "
                    f"({feature_names(self.num_layers, self.router)}), got {self.coef.shape}"
                )
            if not np.all(np.isfinite(self.coef)) or np.any(self.scale <= 0):
                raise ValueError("predictor: coefficients must be finite and scales positive")
            # Folded once: prediction is one matrix-vector product.
            self._w = self.coef / self.scale
            self._b = self.intercept - float(self._w @ self.mean)
        elif trees.width > width:
            raise ValueError(f"predictor: trees split on feature {trees.width - 1} of {width}")

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self.trees is not None:
            return self.trees.predict(features)
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
        table=None,
        kind: str = "linear",
        trees: dict | None = None,
        router: bool = False,
    ) -> ReusePredictor:
        """kind "linear": least squares with a small ridge on standardised features; kind
        "trees": sklearn's `GradientBoostingRegressor` (squared error; `trees` overrides
        its settings, default 60 trees of depth 4, learning rate 0.1, subsample 0.5,
        random_state 0) on the labels less their mean, exported to a `TreeEnsemble` and
        checked against sklearn's own predictions."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != y.size or y.size < x.shape[1] + 1:
            raise ValueError(f"fit: {x.shape} features for {y.size} labels")
        if kind not in MODEL_KINDS:
            raise ValueError(f"fit: kind must be one of {MODEL_KINDS}, got {kind!r}")
        common = {"table": table, "info": info, "router": router}
        if kind == "trees":
            from sklearn.ensemble import GradientBoostingRegressor

            settings = {
                "n_estimators": 60,
                "max_depth": 4,
                "learning_rate": 0.1,
                "subsample": 0.5,
                "random_state": 0,
                **(trees or {}),
            }
            base = float(y.mean())
            model = GradientBoostingRegressor(init="zero", **settings).fit(x, y - base)
            ensemble = TreeEnsemble.from_sklearn(model, base)
            probe = x[:: max(1, x.shape[0] // 2000)]
            if not np.allclose(ensemble.predict(probe), model.predict(probe) + base, atol=1e-9):
                raise RuntimeError("fit: the exported trees disagree with sklearn's")
            info = dict(info or {}, trees=settings)
            return cls(num_layers, num_experts, cap, trees=ensemble, **dict(common, info=info))
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = (x - mean) / scale
        gram = z.T @ z + ridge * y.size * np.eye(z.shape[1])
        coef = np.linalg.solve(gram, z.T @ (y - y.mean()))
        linear = {"coef": coef, "intercept": y.mean(), "mean": mean, "scale": scale}
        return cls(num_layers, num_experts, cap, linear=linear, **common)

    def to_json(self) -> dict:
        out = {
            "format": PREDICTOR_FORMAT,
            "version": PREDICTOR_VERSION,
            "features": feature_names(self.num_layers, self.router),
            "router_half_lives_steps": list(ROUTER_HALF_LIVES),
            "half_lives_steps": list(HALF_LIVES),
            "markov_horizons_tokens": list(MARKOV_HORIZONS),
            "target": "log1p(steps to next use), capped",
            "cap_steps": self.cap,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "kind": self.kind,
            "table": self.table.tolist(),
            "info": self.info,
        }
        if self.trees is not None:
            out["trees"] = self.trees.to_json()
        else:
            out["linear"] = {
                "coef": self.coef.tolist(),
                "intercept": self.intercept,
                "mean": self.mean.tolist(),
                "scale": self.scale.tolist(),
            }
        return out

    def save(self, path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), sort_keys=True) + "\n")

    @classmethod
    def load(cls, path) -> ReusePredictor:
        data = json.loads(Path(path).read_text())
        if data.get("format") != PREDICTOR_FORMAT:
            raise ValueError(f"{path}: not a {PREDICTOR_FORMAT} file")
        if data.get("version") not in (2, PREDICTOR_VERSION):
            raise ValueError(
                f"{path}: predictor version {data.get('version')!r}, this code reads "
                f"{PREDICTOR_VERSION}"
            )
        router = any(name in ROUTER_FEATURES for name in data["features"])
        want = feature_names(data["num_layers"], router)
        if (
            data["features"] != want
            or (router and data.get("router_half_lives_steps") != list(ROUTER_HALF_LIVES))
            or list(data["half_lives_steps"]) != list(HALF_LIVES)
            or list(data["markov_horizons_tokens"]) != list(MARKOV_HORIZONS)
        ):
            raise ValueError(f"{path}: features differ from this code's {want}")
        kind = data.get("kind")
        if kind not in MODEL_KINDS:
            raise ValueError(f"{path}: model kind {kind!r}, expected one of {MODEL_KINDS}")
        return cls(
            data["num_layers"],
            data["num_experts"],
            data["cap_steps"],
            table=data["table"],
            linear=data.get("linear") if kind == "linear" else None,
            trees=TreeEnsemble.from_json(data["trees"]) if kind == "trees" else None,
            info=data["info"],
            router=router,
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
    """Evict the resident key predicted to be needed last (see the module doc).

    protect: per layer, the `protect` experts the co-occurrence table rates most likely for
    the layer's next call (`markov_1tok`) are kept from eviction while another choice
    exists (protection instead of prefetch: no extra reads).

    Read-ahead (`simulate`'s prefetch): `admits_prefetch(key)` says whether `key` may be
    read ahead now: there is room, or a resident key that is neither in use nor protected
    and is predicted to be needed no sooner than `key`. So a prefetch never evicts a
    protected expert. `admit_prefetch(key)` makes it resident without counting a use."""

    name = "learned"

    def __init__(self, capacity: int, layers, predictor: ReusePredictor, protect: int = 0):
        from sage_core.offload.cache_policy import _check_capacity

        self.capacity = _check_capacity(capacity)
        num_layers = len(layer_positions(layers))
        if num_layers != predictor.num_layers:
            raise ValueError(
                f"the predictor was fitted for {predictor.num_layers} sparse layers, the "
                f"model has {num_layers}"
            )
        self.state = FeatureState(layers, predictor.num_experts, predictor.table)
        if isinstance(protect, bool) or not isinstance(protect, int) or protect < 0:
            raise ValueError(f"protect must be an int >= 0 (experts per layer), got {protect!r}")
        self.predictor = predictor
        self.protect = protect
        self._resident: dict = {}  # key -> code
        self._ranked: list | None = None  # codes, evict first first, for the current call
        self._next = 0  # position in `_ranked` of the next candidate
        self._scores = None  # (codes, predicted distances, protected) of the current call
        self._key_of: dict = {}
        self.scored = 0  # feature rows scored, for the cost per token

    def _tick(self, key):
        if self.state.clock.advance(key):
            self._ranked = None

    def observe_router(self, layer, probs) -> None:
        """The router's probabilities for `layer`'s coming call (`FeatureState.observe`),
        from a selector (`cache_selectors.RouterFeed`) or a trace (`simulate(router=...)`);
        read only by a predictor with router features."""
        self.state.observe(layer, probs)

    def _rank(self):
        codes = np.fromiter(self._resident.values(), dtype=np.int64, count=len(self._resident))
        scores = self.predictor.predict(self.state.features(codes, self.predictor.router))
        self.scored += codes.size
        protected = np.zeros(codes.size, dtype=bool)
        if self.protect:
            markov = self.state.markov()[0].reshape(self.state.clock.num_layers, -1)
            top = np.argsort(-markov, axis=1, kind="stable")[:, : self.protect]
            mask = np.zeros(markov.shape, dtype=bool)
            np.put_along_axis(mask, top, True, axis=1)
            protected = mask.reshape(-1)[codes]
        # Unprotected before protected; farthest predicted reuse first; then least recent.
        order = np.lexsort((self.state.last[codes], -scores, protected))
        self._ranked = codes[order].tolist()
        self._next = 0  # the ranked codes before it were handed out this call
        self._scores = (codes, scores, protected)  # read by `admits_prefetch` only

    def victim(self, key):
        self._tick(key)
        if len(self._resident) < self.capacity:
            return None
        if self._ranked is None:
            self._rank()
        call = self.state.clock.call
        ranked, call_of_use, key_of, resident = (
            self._ranked,
            self.state.call_of_use,
            self._key_of,
            self._resident,
        )
        while self._next < len(ranked):
            c = ranked[self._next]
            self._next += 1
            k = key_of[c]
            if k in resident and call_of_use[c] != call:
                return k
        # Every resident key is in use in this call: the least recently used goes.
        return min(self._resident, key=lambda k: self.state.last[self._resident[k]])

    def admits_prefetch(self, key) -> bool:
        self._tick(key)
        if len(self._resident) < self.capacity:
            return True
        if self._ranked is None:
            self._rank()
        c = self.state.code(key)
        row = self.state.features(np.array([c]), self.predictor.router)
        mine = float(self.predictor.predict(row)[0])
        call = self.state.clock.call
        codes, scores, protected = self._scores
        score = dict(zip(codes.tolist(), scores.tolist(), strict=True))
        guarded = set(codes[protected].tolist())
        return any(
            r not in guarded
            and score.get(r, -math.inf) >= mine
            and self.state.call_of_use[r] != call
            and self._key_of[r] in self._resident
            for r in self._ranked[self._next :]
        )

    def admit_prefetch(self, key):
        self._tick(key)
        c = self.state.code(key)
        self._resident[key] = c
        self._key_of[c] = key

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


def training_rows(
    keys,
    layers,
    num_experts: int,
    cap: float,
    stride: int = 1,
    seen_only=True,
    table=None,
    router=None,
):
    """(features, labels, times) for every key seen so far, at the start of every `stride`-th
    layer call of the (A, 2) request sequence `keys` (token-by-token order).

    The label is log1p(steps to the key's next use), the distance counted from the present
    layer call in steps (layer calls / L); a key never used again, or used beyond the
    trace's end by more than `cap` steps, is labelled log1p(cap); a key whose next use is
    unknown (the trace ends within `cap` steps) gives no row. The features come from the
    same `FeatureState` the policy runs (with the co-occurrence `table`, None: zeros), so
    train and serve cannot drift apart. `router` ({request index: [(layer, probabilities)]},
    `expert_trace.router_plan`) is observed as `simulate` gives it to the policy, and adds
    the ROUTER_FEATURES columns."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    state = FeatureState(layers, num_experts, table)
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
        for layer, probs in (router or {}).get(i, ()):
            state.observe(layer, probs)
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
                        xs.append(state.features(rows, router is not None))
                        ys.append(np.log1p(np.minimum(steps[known], cap)))
        state.use(k)
        upcoming[codes[i]] = order_next[i]
    width = len(feature_names(num_layers, router is not None))
    if not xs:
        return np.zeros((0, width)), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys)
