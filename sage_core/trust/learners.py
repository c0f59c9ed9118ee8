"""Learners that fill a trust table from real text, and the learned-bias baseline.

- `CounterfactualLearner` (the default): evidence about an expert is what happens when it
  is removed. For one training window of real text in context c, the window is scored
  once (the "base" pass, which also says which experts served its tokens); then a few
  (layer, expert) cells are toggled, one per sequence of one batched forward. Removing an
  expert gives its slot to each token's next router choice (k experts per token, as the
  model was trained; renormalising the remaining k - 1 weights would also change how much
  of the token the other experts write). A cell's harm is the window's mean NLL with the
  expert minus without it, over every next-token prediction of the window;
  `TrustTable.record_harm` keeps its running mean, count and standard error.
  Three choices make the evidence strong enough to act on:
  * the base pass removes the cells *suspected* in c (positive mean harm after two or
    more ablations), and a suspected cell is measured by putting it back. Broken experts
    hide each other: with several broken in a layer, removing one hands its slot to
    another, and with the residual stream already damaged one repair shows little. So
    each expert is measured against the others that are probably broken already removed;
  * cells are chosen after the base pass among the experts that served the window (an
    expert that served nothing has no effect to measure) by an optimistic index, as in
    LUCB (`choose_cells`), so ablations go where harm is still plausible;
  * exploration and the exclusion test borrow strength across contexts
    (`TrustTable.pooled_harm`), while the direction is each context's own.
  Both passes use the router plus the suspected removals, never the selector's trust.
  Cost per window: one base sequence and `ablations_per_window` ablated sequences.
- `TrustLearner` (in `table.py`) is the routing-weighted rule kept as a comparison arm.
- `LearnedBiasSelector` + `LearnedBiasLearner`: a per-(context, layer, expert) bias added
  to the router logits, fitted by gradient descent (Adam, minibatches of windows) on the
  NLL of every next-token prediction of the windows, with an L2 pull to zero: one forward
  and one backward per window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sage_core.trust.table import TrustTable, excluding_top_k

LEARNERS = ("counterfactual", "routing_weighted", "report", "learned_bias")


def continuation_nll(model, ids: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """(B, C) float32 teacher-forced NLL of tokens ids[:, P:] given what precedes them,
    for (B, P + C) token ids, with whatever selector the model has."""
    if ids.dim() != 2 or not 1 <= prompt_tokens < ids.shape[1]:
        raise ValueError(
            f"ids must be (B, P + C) with 1 <= P < its length, got {tuple(ids.shape)}, "
            f"P={prompt_tokens}"
        )
    P = prompt_tokens
    hidden = model.hidden_states(ids)
    logits = model.lm_head(hidden[:, P - 1 : -1]).to(torch.float32)  # (B, C, V)
    return F.cross_entropy(logits.transpose(1, 2), ids[:, P:], reduction="none")


class AblationSelector:
    """Router top-k with, per sequence of the batch, a set of experts removed per layer.

    `masks` is {layer: (B, E) bool}: in that layer, sequence b's experts masks[layer][b]
    are removed from every token's candidates and their slots go to each token's next
    router choice; layers without a mask are routed exactly as RouterTopK routes them."""

    def __init__(self, top_k: int, norm_topk_prob: bool, masks: dict, batch: int):
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.masks = masks
        self.batch = batch

    def __call__(self, router_logits, layer_idx, hidden_states):
        B = self.batch
        if router_logits.shape[0] % B:
            raise ValueError(f"{router_logits.shape[0]} rows do not split into {B} sequences")
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        mask = self.masks.get(layer_idx)
        if mask is not None and mask.any():
            rows = router_logits.shape[0] // B
            mask = mask.to(probs.device).repeat_interleave(rows, 0)
        else:
            mask = None
        indices, weights = excluding_top_k(probs, mask, self.top_k, self.norm_topk_prob)
        return indices, weights.to(hidden_states.dtype)


class CounterfactualLearner:
    """Paired ablation evidence per (context, layer, expert); see the module docstring."""

    def __init__(
        self,
        table: TrustTable,
        ablations_per_window: int = 12,
        alpha: float = 0.05,
        explore: float = 1.0,
        min_ablations: int = 3,
    ):
        if not (isinstance(ablations_per_window, int) and ablations_per_window >= 1):
            raise ValueError(
                f"ablations_per_window must be an int >= 1, got {ablations_per_window!r}"
            )
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if not (isinstance(explore, int | float) and math.isfinite(explore) and explore >= 0):
            raise ValueError(f"explore must be a finite number >= 0, got {explore!r}")
        if not (isinstance(min_ablations, int) and min_ablations >= 2):
            raise ValueError(f"min_ablations must be an int >= 2, got {min_ablations!r}")
        self.table = table
        self.ablations_per_window = ablations_per_window
        self.alpha = float(alpha)
        self.explore = float(explore)
        self.min_ablations = min_ablations
        self.sequence_forwards = 0  # sequences run forward (the stated cost)

    def suspected(self, context: str) -> torch.Tensor:
        """(L, E) bool: the cells of `context` whose mean harm is positive after at least
        two ablations. Ablations are taken with these removed (see the module docstring)."""
        ci = self.table.context_pos(context)
        return (self.table.harm_count[:, ci] >= 2) & (self.table.harm_mean[:, ci] > 0)

    def choose_cells(self, context: str, candidates: torch.Tensor) -> list[tuple[int, int]]:
        """At most `ablations_per_window` of the `candidates` ((L, E) bool) cells of
        `context` to ablate in its next window. Cells already shown harmful (`harmful`,
        what the selector excludes) come last. The others are ranked by an optimistic
        index, as in LUCB: mean + explore * SE of this context's measurements, or of all
        contexts' pooled, whichever is larger (an expert that harms in one context is
        worth a look in the others; whether it is excluded there is still decided by that
        context's own evidence). A cell measured fewer than twice takes the median spread
        of the context's measured cells as its SD (+inf before there is one), and its
        mean as 0 before any measurement. Ties: the more used expert, then the lower
        layer and expert."""
        table, ci = self.table, self.table.context_pos(context)
        n = table.harm_count[:, ci].double()  # (L, E), as are mean and m2
        mean, m2 = table.harm_mean[:, ci].double(), table.harm_m2[:, ci].double()
        measured = (m2 / (n - 1).clamp_min(1)).sqrt()[n >= 2]
        spread = float(measured.median()) if measured.numel() else math.inf
        optimistic = torch.maximum(
            self._optimistic(n, mean, m2, spread),
            self._optimistic(*table.pooled_harm(), spread),
        )
        decided = torch.stack(
            [
                table.harmful(layer, context, self.alpha, self.min_ablations)
                for layer in table.layers
            ]
        )
        usage = table.counts[:, ci]
        order = sorted(
            (bool(decided[li, e]), -float(optimistic[li, e]), -float(usage[li, e]), layer, e)
            for li, layer in enumerate(table.layers)
            for e in range(table.num_experts)
            if candidates[li, e]
        )
        return [(layer, e) for *_, layer, e in order[: self.ablations_per_window]]

    def _optimistic(self, n, mean, m2, spread: float) -> torch.Tensor:
        """mean + explore * SE for (L, E) float64 count, mean and m2; a cell with fewer
        than two measurements takes `spread` as its SD, and mean 0 before any."""
        sd = (m2 / (n - 1).clamp_min(1)).sqrt()
        se = torch.where(n >= 2, sd, torch.full_like(sd, spread)) / n.clamp_min(1).sqrt()
        return torch.where(n > 0, mean, 0.0) + self.explore * se

    @torch.no_grad()
    def update(self, model, prompt: torch.Tensor, continuation: torch.Tensor, context: str):
        """A base pass of the window with the suspected cells removed (its NLL, and which
        experts served it), then one batched forward with one copy per chosen cell, in
        which that cell is toggled: removed if it was in, put back if it was suspected.
        Records each cell's harm (NLL with the expert minus NLL without it, per scored
        token) and the base routing as usage. Every next-token prediction of the window
        is scored, prompt included: the evidence is the text, not the prompt/continuation
        split. Returns {"cells": [(layer, expert, harm)], "mean_nll": the base NLL}."""
        ci = self.table.context_pos(context)
        missing = set(self.table.layers) - set(model.sparse_blocks())
        if missing:
            raise ValueError(f"the model has no sparse layer for trusted layers {sorted(missing)}")
        device = model.model.embed_tokens.weight.device
        ids = torch.cat([prompt, continuation]).to(device)[None]
        S, E, layers = ids.shape[1], self.table.num_experts, self.table.layers
        c = model.config
        removed = self.suspected(context)  # (L, E)
        base_masks = {layer: removed[li][None] for li, layer in enumerate(layers)}  # (1, E)
        model.set_selector(AblationSelector(c.num_experts_per_tok, c.norm_topk_prob, base_masks, 1))
        try:
            with model.routing_trace() as trace:
                base = continuation_nll(model, ids, 1).cpu()  # (1, S - 1)
        finally:
            model.set_selector(None)
        served = torch.zeros(len(layers), E, dtype=torch.bool)
        for layer, calls in trace.items():
            if layer in self.table._layer_pos:
                # positions 0 .. S-2: the ones that feed scored logits
                used = torch.bincount(calls[0][0][: S - 1].reshape(-1).cpu(), minlength=E)
                self.table.counts[self.table.layer_pos(layer), ci] += used.float()
                served[self.table.layer_pos(layer)] = used > 0
        self.table.updates[ci] += 1
        cells = self.choose_cells(context, served | removed)
        self.sequence_forwards += 1 + len(cells)
        reference = base[0].mean().double()
        recorded = []
        if not cells:
            return {"cells": recorded, "mean_nll": float(reference)}
        masks = {layer: removed[li][None].repeat(len(cells), 1) for li, layer in enumerate(layers)}
        for b, (layer, e) in enumerate(cells):  # (B, E) per layer: copy b toggles its cell
            masks[layer][b, e] = ~masks[layer][b, e]
        model.set_selector(
            AblationSelector(c.num_experts_per_tok, c.norm_topk_prob, masks, len(cells))
        )
        try:
            nll = continuation_nll(model, ids.expand(len(cells), -1), 1).cpu()  # (B, S - 1)
        finally:
            model.set_selector(None)
        for b, (layer, e) in enumerate(cells):
            without = bool(masks[layer][b, e])
            change = float(nll[b].mean().double() - reference)  # copy minus base
            harm = -change if without else change  # NLL with the expert minus without it
            self.table.record_harm(layer, context, e, harm)
            recorded.append((layer, e, harm))
        return {"cells": recorded, "mean_nll": float(reference)}


class LearnedBiasSelector:
    """Router logits plus a learned bias per (layer, context, expert), then the router's
    own rule (softmax, top-k, renormalise). `bias` is (L, C, E) float32, zero at start, so
    an untrained selector is RouterTopK. `context` as for TrustSelector: one name, or one
    per sequence of the batch."""

    def __init__(self, layers, contexts, num_experts: int, top_k: int, norm_topk_prob: bool):
        self.layers = [int(i) for i in layers]
        self.contexts = [str(c) for c in contexts]
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.bias = torch.zeros(len(self.layers), len(self.contexts), num_experts)
        self.context: str | list[str] | None = None

    @classmethod
    def for_model(cls, model, contexts) -> LearnedBiasSelector:
        c = model.config
        layers = sorted(model.sparse_blocks())
        return cls(layers, contexts, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)

    def __call__(self, router_logits, layer_idx, hidden_states):
        contexts = [self.context] if isinstance(self.context, str) else list(self.context or [])
        if not contexts or router_logits.shape[0] % len(contexts):
            raise ValueError("LearnedBiasSelector.context must name each sequence's context")
        rows = router_logits.shape[0] // len(contexts)
        li = self.layers.index(layer_idx)
        bias = torch.stack([self.bias[li, self.contexts.index(c)] for c in contexts])
        logits = router_logits.to(torch.float32) + bias.to(router_logits.device).repeat_interleave(
            rows, 0
        )
        probs = torch.softmax(logits, dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return indices, weights.to(hidden_states.dtype)


class LearnedBiasLearner:
    """Adam on the selector's bias, one step per minibatch of windows: loss = mean NLL over
    every next-token prediction of the minibatch (the positions the counterfactual arm
    scores) + l2 * sum(bias^2). A minibatch may be accumulated in parts (`accumulate`, one
    per context, each weighted by its share of the minibatch) before `step`."""

    def __init__(self, selector: LearnedBiasSelector, learning_rate: float = 0.05, l2=1e-3):
        if not learning_rate > 0 or not l2 >= 0:
            raise ValueError(
                f"need learning_rate > 0 and l2 >= 0, got learning_rate={learning_rate}, l2={l2}"
            )
        self.selector = selector
        self.l2 = float(l2)
        selector.bias.requires_grad_(True)
        self.optimizer = torch.optim.Adam([selector.bias], lr=learning_rate)
        self.optimizer.zero_grad()
        self.sequence_forwards = 0
        self.sequence_backwards = 0

    def accumulate(self, model, ids: torch.Tensor, contexts, weight: float = 1.0) -> float:
        """Forward and backward of `weight` x the mean NLL of every next-token prediction
        of (B, S) `ids` (sequence b in context contexts[b]); gradients add up until `step`.
        Returns the mean NLL."""
        device = model.model.embed_tokens.weight.device
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        self.selector.context = list(contexts)
        model.set_selector(self.selector)
        try:
            with torch.enable_grad():
                nll = continuation_nll(model, ids.to(device), 1).mean()
                (weight * nll).backward()
        finally:
            model.set_selector(None)
            for p, flag in frozen:
                p.requires_grad_(flag)
        self.sequence_forwards += ids.shape[0]
        self.sequence_backwards += ids.shape[0]
        return float(nll.detach())

    def step(self) -> None:
        """The L2 pull's gradient (2 * l2 * bias), then one Adam step; gradients reset."""
        bias = self.selector.bias
        with torch.no_grad():
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            bias.grad += 2 * self.l2 * bias
        self.optimizer.step()
        self.optimizer.zero_grad()

    def update(self, model, prompt: torch.Tensor, continuation: torch.Tensor, context: str):
        """One window, one step."""
        nll = self.accumulate(model, torch.cat([prompt, continuation])[None], [context])
        self.step()
        return {"mean_nll": nll}
