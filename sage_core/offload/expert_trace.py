"""Routing traces: which experts every sparse layer chose for every token, as plain arrays.

`TraceRecorder` is an `ExpertSelector` that wraps any other selector (the model's own router
by default) and records, per forward call and sparse layer, the experts chosen for each token
in slot order, and the experts layer l+1's router would choose from layer l's hidden state
(`predicted`: the pre-gated / next-layer prefetch guess, made before layer l+1 runs), and
the router's probabilities over all experts (`router`: the softmax of the router logits,
float16), which a cache may read as the selector sees them (`router_plan`).

A `RoutingTrace` holds those as (N, L, k) integer arrays plus the forward call of every
token; it is saved as `.npz` (never pickle). `access_sequence` turns a trace into the
(layer, expert) requests an `ExpertCache` receives, in the order the MoE block makes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sage_core.atomic import atomic_write
from sage_core.model.moe import RouterTopK


@dataclass
class RoutingTrace:
    """experts[t, l, j]: slot j's expert for token t in the l-th sparse layer (`layers[l]`);
    predicted[t, l]: layer l's experts as guessed from layer l-1's hidden state (-1 for the
    first layer); call_of[t]: the forward call token t was part of; router[t, l, e]: the
    router's probability of expert e for token t in layer l (None: not recorded)."""

    experts: np.ndarray  # (N, L, k) int16
    predicted: np.ndarray  # (N, L, k) int16
    call_of: np.ndarray  # (N,) int64, non-decreasing
    layers: np.ndarray  # (L,) int64, original layer indices
    num_experts: int
    router: np.ndarray | None = None  # (N, L, E) float16

    def __post_init__(self):
        self.experts = np.asarray(self.experts, dtype=np.int16)
        self.predicted = np.asarray(self.predicted, dtype=np.int16)
        self.call_of = np.asarray(self.call_of, dtype=np.int64)
        self.layers = np.asarray(self.layers, dtype=np.int64)
        n, num_layers, _ = self.experts.shape if self.experts.ndim == 3 else (None, None, None)
        if n is None or self.predicted.shape != self.experts.shape:
            raise ValueError(
                f"trace: experts {self.experts.shape} and predicted {self.predicted.shape} "
                "must be equal (N, L, k) arrays"
            )
        if self.call_of.shape != (n,) or self.layers.shape != (num_layers,):
            raise ValueError(
                f"trace: call_of {self.call_of.shape} must be ({n},) and layers "
                f"{self.layers.shape} ({num_layers},)"
            )
        if n and (self.experts.min() < 0 or self.experts.max() >= self.num_experts):
            raise ValueError(f"trace: expert ids outside [0, {self.num_experts})")
        if self.router is not None:
            self.router = np.asarray(self.router, dtype=np.float16)
            if self.router.shape != (n, num_layers, self.num_experts):
                raise ValueError(
                    f"trace: router {self.router.shape} must be ({n}, {num_layers}, "
                    f"{self.num_experts})"
                )

    def rows(self, mask) -> RoutingTrace:
        """The tokens selected by `mask` (bool or indices), every field kept."""
        return RoutingTrace(
            self.experts[mask],
            self.predicted[mask],
            self.call_of[mask],
            self.layers,
            self.num_experts,
            None if self.router is None else self.router[mask],
        )

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def save(self, path) -> Path:
        """Write the trace as an uncompressed .npz of plain arrays."""
        arrays = {
            "experts": self.experts,
            "predicted": self.predicted,
            "call_of": self.call_of,
            "layers": self.layers,
            "num_experts": np.int64(self.num_experts),
        }
        if self.router is not None:
            arrays["router"] = self.router
        return atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path) -> RoutingTrace:
        path = Path(path)
        with np.load(path, allow_pickle=False) as data:
            missing = {"experts", "predicted", "call_of", "layers", "num_experts"} - set(data)
            if missing:
                raise ValueError(f"{path}: not a routing trace, missing {sorted(missing)}")
            return cls(
                data["experts"],
                data["predicted"],
                data["call_of"],
                data["layers"],
                int(data["num_experts"]),
                data["router"] if "router" in data else None,
            )


def concatenate(traces: list[RoutingTrace]) -> RoutingTrace:
    """One trace after another (calls renumbered so they stay distinct)."""
    if not traces:
        raise ValueError("concatenate needs at least one trace")
    offset, calls = 0, []
    for t in traces:
        calls.append(t.call_of + offset)
        offset += int(t.call_of.max()) + 1 if t.num_tokens else 0
    routers = [t.router for t in traces]
    return RoutingTrace(
        np.concatenate([t.experts for t in traces]),
        np.concatenate([t.predicted for t in traces]),
        np.concatenate(calls),
        traces[0].layers,
        traces[0].num_experts,
        None if any(r is None for r in routers) else np.concatenate(routers),
    )


def router_probabilities(router_logits) -> np.ndarray:
    """(rows, E) float16 softmax of router logits: what a trace stores and what a cache that
    reads the router is given (`cache_selectors.RouterFeed`), so both see the same values."""
    probs = torch.softmax(router_logits.detach().float(), dim=-1)
    return probs.cpu().numpy().astype(np.float16)


class TraceRecorder:
    """A selector that records what `inner` chose (and the next-layer guess) for a model."""

    def __init__(self, model, inner=None):
        cfg = model.config
        self.inner = inner or RouterTopK(cfg.num_experts_per_tok, cfg.norm_topk_prob)
        blocks = model.sparse_blocks()
        self.layers = sorted(blocks)
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        # The router of the next sparse layer, to guess its choice from this layer's states.
        self._next_gate = {
            a: blocks[b].gate.weight for a, b in zip(self.layers, self.layers[1:], strict=False)
        }
        self.clear()

    def clear(self) -> None:
        self._chosen = {layer: [] for layer in self.layers}
        self._guess = {layer: [] for layer in self.layers}
        self._router = {layer: [] for layer in self.layers}

    def __call__(self, router_logits, layer_idx, hidden_states):
        indices, weights = self.inner(router_logits, layer_idx, hidden_states)
        self._chosen[layer_idx].append(indices.detach().cpu().numpy().astype(np.int16))
        self._router[layer_idx].append(router_probabilities(router_logits))
        if layer_idx == self.layers[0]:
            blank = np.full(indices.shape, -1, dtype=np.int16)
            self._guess[layer_idx].append(blank)
        gate = self._next_gate.get(layer_idx)
        if gate is not None:
            with torch.no_grad():
                logits = torch.nn.functional.linear(hidden_states, gate.to(hidden_states.dtype))
                guess = torch.topk(logits.float(), indices.shape[1], dim=-1).indices
            layer_after = self.layers[self.layers.index(layer_idx) + 1]
            self._guess[layer_after].append(guess.cpu().numpy().astype(np.int16))
        return indices, weights

    def trace(self) -> RoutingTrace:
        """Everything recorded since the last `clear()`."""
        first = self._chosen[self.layers[0]]
        if not first:
            return RoutingTrace(
                np.zeros((0, len(self.layers), self.top_k)),
                np.zeros((0, len(self.layers), self.top_k)),
                np.zeros(0),
                self.layers,
                self.num_experts,
                np.zeros((0, len(self.layers), self.num_experts)),
            )
        sizes = [a.shape[0] for a in first]
        for layer in self.layers:
            if [a.shape[0] for a in self._chosen[layer]] != sizes:
                raise RuntimeError(f"layer {layer} saw different forward calls than layer 0")
        experts = np.stack([np.concatenate(self._chosen[layer]) for layer in self.layers], 1)
        predicted = np.stack([np.concatenate(self._guess[layer]) for layer in self.layers], 1)
        router = np.stack([np.concatenate(self._router[layer]) for layer in self.layers], 1)
        call_of = np.repeat(np.arange(len(sizes)), sizes)
        return RoutingTrace(experts, predicted, call_of, self.layers, self.num_experts, router)


def access_sequence(trace: RoutingTrace, grouped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """((A, 2) (layer, expert) requests, (A,) token of each request) in the cache's order.

    Token by token (grouped=False): layer by layer, each token's experts in slot order, which
    is what a one-token forward (decode) asks its cache. grouped=True follows the block's
    batched path for calls of more than one token: per call and layer, each used expert
    once, in ascending order (the token is the call's first)."""
    keys, token_of = [], []
    layers = trace.layers
    if not grouped:
        n, num_layers, k = trace.experts.shape
        layer_ids = np.broadcast_to(layers[None, :, None], (n, num_layers, k))
        keys = np.stack([layer_ids.reshape(-1), trace.experts.reshape(-1)], 1).astype(np.int64)
        token_of = np.repeat(np.arange(n), num_layers * k)
        return keys, token_of
    starts = np.flatnonzero(np.r_[True, np.diff(trace.call_of) != 0])
    ends = np.r_[starts[1:], trace.num_tokens]
    for s, e in zip(starts, ends, strict=True):
        for li, layer in enumerate(layers):
            chosen = trace.experts[s:e, li]
            used = chosen[0] if e - s == 1 else np.unique(chosen)
            keys.append(np.stack([np.full(used.size, layer), used], 1))
            token_of.append(np.full(used.size, s))
    if not keys:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(keys).astype(np.int64), np.concatenate(token_of)


def prefetch_plan(trace: RoutingTrace) -> dict[int, list[tuple[int, int]]]:
    """{request index: experts to read ahead} for the token-by-token order: before token t's
    first request in layer l (l > 0), layer l's experts as guessed from layer l-1."""
    n, num_layers, k = trace.experts.shape
    plan = {}
    for t in range(n):
        for li in range(1, num_layers):
            guess = trace.predicted[t, li]
            plan[(t * num_layers + li) * k] = [(int(trace.layers[li]), int(e)) for e in guess]
    return plan


def prediction_quality(trace: RoutingTrace) -> dict[int, dict[str, float]]:
    """{layer: precision, recall} of the next-layer guess against the experts then chosen,
    pooled over tokens (set overlap per token). With as many guesses as choices they are
    equal; they differ when the guess and the choice differ in size."""
    out = {}
    for li in range(1, len(trace.layers)):
        guess, chosen = trace.predicted[:, li], trace.experts[:, li]
        overlap = (guess[:, :, None] == chosen[:, None, :]).any(2).sum()
        out[int(trace.layers[li])] = {
            "precision": float(overlap / max(1, guess.size)),
            "recall": float(overlap / max(1, chosen.size)),
        }
    return out


def router_plan(trace: RoutingTrace) -> dict[int, list]:
    """{request index: [(layer, probabilities)]} for the token-by-token order: before token
    t's first request in layer l, the router's probabilities of that token at layer l (what a
    selector sees just before the layer asks its cache). Empty without recorded router."""
    if trace.router is None:
        return {}
    n, num_layers, k = trace.experts.shape
    probs = trace.router.astype(np.float64)
    return {
        (t * num_layers + li) * k: [(int(trace.layers[li]), probs[t, li])]
        for t in range(n)
        for li in range(num_layers)
    }
