"""Selectors that know about the expert cache: next-layer prefetch and cache-aware routing.

Both wrap any inner `ExpertSelector` (the model's router, or trust's selector) and change
nothing about how it scores experts, so they compose with whatever chooses experts.

- `NextLayerPrefetch`: at layer l, guess layer l+1's experts by running layer l+1's router
  on layer l's hidden states (pre-gated MoE's idea); the guess is read into the cache just
  before layer l+1 asks for its experts. Outputs are unchanged: only what is resident is.
- `CacheAwareSelector`: when an expert the inner selector chose is not resident and a
  resident expert not already chosen scores within `threshold` router logits of it, take
  the resident one (Skliar et al., "Mixture of Cache-Conditional Experts", 2024, bias the
  router toward resident experts). The swapped slot's weight is scaled by the ratio of the
  two experts' router probabilities, then each token's weights are rescaled to the inner
  selector's sum, so with norm_topk_prob they still sum to one. When the inner selector
  excludes experts (trust's rule "exclude": it has `excluded(layer_idx, context)` and a
  `context`, one name or one per sequence), a swap never takes an excluded expert: the
  cache must not bring back what trust removed.

  Two limits keep a swap inside the router's uncertain tail: `keep_top` (the slots with the
  `keep_top` highest router logits, top-1 for 1, are never swapped) and `budget` (at most
  that many swaps per token over all sparse layers of one forward). With either set, each
  token's slots are considered from its lowest router logit up, so a budget is spent on
  the tail first; with neither, slot by slot as before.
- `RouterFeed`: gives the cache's policy the router's probabilities of each layer call
  before the layer asks for its experts (a policy that reads them: the learned one with a
  router-fed predictor); choices unchanged. `CacheAwareSelector` feeds them too.
"""

from __future__ import annotations

import torch

from sage_core.model.moe import RouterTopK


def _default_inner(model):
    cfg = model.config
    return RouterTopK(cfg.num_experts_per_tok, cfg.norm_topk_prob)


def _on_demand_blocks(model) -> dict:
    blocks = model.sparse_blocks()
    if getattr(model, "expert_cache", None) is None:
        raise ValueError(
            "the model has no expert cache; load it with max_resident_experts=N to use "
            "cache-aware selection or prefetch"
        )
    return blocks


def _feed(model):
    """The cache policy's `observe_router`, or None (no cache, or a policy that ignores it)."""
    cache = getattr(model, "expert_cache", None)
    return getattr(getattr(cache, "policy", None), "observe_router", None)


def _observe(feed, router_logits, layer_idx) -> None:
    if feed is not None:
        from sage_core.offload.expert_trace import router_probabilities

        feed(layer_idx, router_probabilities(router_logits).astype("float64"))


class RouterFeed:
    """Selector wrapper that shows the cache's policy each layer call's router probabilities
    (float16-rounded, as traces store them) before the layer's experts are requested."""

    def __init__(self, model, inner=None):
        self.inner = inner or _default_inner(model)
        self._feed = _feed(model)

    def __call__(self, router_logits, layer_idx, hidden_states):
        _observe(self._feed, router_logits, layer_idx)
        return self.inner(router_logits, layer_idx, hidden_states)


class NextLayerPrefetch:
    """Selector wrapper reading each layer's guessed experts ahead of their use."""

    def __init__(self, model, inner=None):
        blocks = _on_demand_blocks(model)
        self.inner = inner or _default_inner(model)
        self.layers = sorted(blocks)
        self._experts = {layer: blocks[layer].experts for layer in self.layers}
        self._next = dict(zip(self.layers, self.layers[1:], strict=False))
        self._next_gate = {a: blocks[b].gate.weight for a, b in self._next.items()}
        self._pending: dict[int, list[int]] = {}

    def __call__(self, router_logits, layer_idx, hidden_states):
        for e in self._pending.pop(layer_idx, ()):
            self._experts[layer_idx].prefetch(e)
        indices, weights = self.inner(router_logits, layer_idx, hidden_states)
        after = self._next.get(layer_idx)
        if after is not None:
            with torch.no_grad():
                logits = torch.nn.functional.linear(hidden_states, self._next_gate[layer_idx])
                guess = torch.topk(logits.float(), indices.shape[1], dim=-1).indices
            # A token's guess in slot order, tokens in order, each expert once.
            self._pending[after] = list(dict.fromkeys(guess.reshape(-1).tolist()))
        return indices, weights


class CacheAwareSelector:
    """Selector wrapper swapping uncached choices for resident near-ties (see module doc)."""

    def __init__(self, model, threshold: float, inner=None, keep_top: int = 0, budget=None):
        if not isinstance(threshold, int | float) or threshold < 0:
            raise ValueError(f"threshold must be a number >= 0 (router logits), got {threshold!r}")
        for name, value in (("keep_top", keep_top), ("budget", 0 if budget is None else budget)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        blocks = _on_demand_blocks(model)
        self.keep_top, self.budget = keep_top, budget
        self._first_layer = min(blocks)
        self._spent = None  # swaps per token row in the current forward (with a budget)
        self.cache = model.expert_cache
        self.threshold = float(threshold)
        self.inner = inner or _default_inner(model)
        self.num_experts = model.config.num_experts
        self.swapped = 0  # slots changed, over all calls
        self._feed = _feed(model)  # the policy sees the router's own probabilities

    def resident_mask(self, layer_idx: int, device) -> torch.Tensor:
        return torch.tensor(
            [(layer_idx, e) in self.cache for e in range(self.num_experts)],
            dtype=torch.bool,
            device=device,
        )

    def excluded_rows(self, layer_idx: int, rows: int, device) -> torch.Tensor | None:
        """(rows, E) bool: the experts the inner selector excludes for each router row, or
        None when it excludes nothing (or has no notion of exclusion). Checked by duck
        typing, so the checkpoint package needs nothing from trust."""
        excluded = getattr(self.inner, "excluded", None)
        if not callable(excluded) or not hasattr(self.inner, "context"):
            return None
        context = self.inner.context
        if context is None:
            raise ValueError(
                "the inner selector excludes experts per context, but its context is not set"
            )
        contexts = [context] if isinstance(context, str) else list(context)
        if not contexts or rows % len(contexts):
            raise ValueError(
                f"{rows} router rows do not split into {len(contexts)} sequences "
                "(the inner selector's context has one name per sequence)"
            )
        masks = torch.stack(
            [torch.as_tensor(excluded(layer_idx, c), dtype=torch.bool) for c in contexts]
        )
        if not masks.any():
            return None
        return masks.to(device).repeat_interleave(rows // len(contexts), 0)

    def __call__(self, router_logits, layer_idx, hidden_states):
        _observe(self._feed, router_logits, layer_idx)
        indices, weights = self.inner(router_logits, layer_idx, hidden_states)
        if self.threshold == 0:
            return indices, weights
        resident = self.resident_mask(layer_idx, router_logits.device)
        if not resident.any():
            return indices, weights
        logits = router_logits.float()
        indices, scale = indices.clone(), torch.ones_like(logits[:, : indices.shape[1]])
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, indices, True)
        excluded = self.excluded_rows(layer_idx, logits.shape[0], logits.device)
        allowed = resident if excluded is None else resident & ~excluded
        rows = torch.arange(indices.shape[0], device=indices.device)
        k = indices.shape[1]
        limited = self.keep_top > 0 or self.budget is not None
        if limited:
            # Slots from the lowest router logit up; the top `keep_top` are never visited.
            order = torch.argsort(logits[rows[:, None], indices], dim=1, stable=True)
            if self.budget is not None and (
                layer_idx == self._first_layer
                or self._spent is None
                or self._spent.shape[0] != rows.shape[0]
            ):
                self._spent = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
        for step in range(k - self.keep_top if limited else k):
            j = order[:, step] if limited else torch.full_like(rows, step)
            mine = logits[rows, indices[rows, j]]
            alternatives = torch.where(allowed & ~chosen, logits, -torch.inf)
            best, alt = alternatives.max(dim=1)
            swap = ~resident[indices[rows, j]] & (mine - best <= self.threshold)
            if self.budget is not None:
                swap &= self._spent < self.budget
            if swap.any():
                r, js = rows[swap], j[swap]
                chosen[r, indices[r, js]] = False
                chosen[r, alt[swap]] = True
                indices[r, js] = alt[swap]
                scale[r, js] = torch.exp(best[swap] - mine[swap])
                self.swapped += int(swap.sum())
                if self.budget is not None:
                    self._spent += swap.long()
        new = weights.float() * scale
        new = new * (weights.float().sum(1, keepdim=True) / new.sum(1, keepdim=True))
        return indices, new.to(weights.dtype)
