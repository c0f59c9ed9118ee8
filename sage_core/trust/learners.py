"""Learners that fill a trust table from real text, and the learned-bias baseline.

- `CounterfactualLearner` (the default): evidence about an expert is what happens when it
  is removed. For one training window (a prompt and its real continuation) in context c,
  the window is scored once with the router (the "base" pass, which also says which
  experts served its tokens); then a few (layer, expert) cells are ablated, one per
  sequence of one batched forward that also holds an unablated copy: in the ablated copy
  the expert is removed from every token that chose it in that layer and its slot goes to
  the router's next choice (k experts per token, as the model was trained; renormalising
  the remaining k - 1 weights would also change how much of the token the other experts
  write). The paired change of the window's mean continuation NLL, unablated minus
  ablated, is one measurement of the cell's harm; `TrustTable.record_harm` keeps its
  running mean, count and standard error. Both passes use the router, not the current
  trust: the estimate has a fixed target. Cells are chosen before the window by
  usage-weighted uncertainty (`choose_cells`); a cell whose expert served no token of the
  window is a measurement of exactly zero, which is its true effect there. Cost per
  window: one batched forward of `ablations_per_window + 1` sequences.
- `TrustLearner` (in `table.py`) is the routing-weighted rule kept as a comparison arm.
- `LearnedBiasSelector` + `LearnedBiasLearner`: a per-(context, layer, expert) bias added
  to the router logits, fitted by gradient descent (Adam) on the same windows' NLL with an
  L2 pull to zero: one forward and one backward per window.
"""

from __future__ import annotations

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
    """Router top-k with one (layer, expert) removed per sequence of the batch.

    `cells[b]` is (layer, expert) for sequence b, or None for an unablated copy. In that
    layer the expert's slots go to each token's next router choice; other layers and
    other sequences are routed exactly as RouterTopK routes them."""

    def __init__(self, top_k: int, norm_topk_prob: bool, num_experts: int, cells):
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.num_experts = num_experts
        self.cells = list(cells)

    def __call__(self, router_logits, layer_idx, hidden_states):
        B = len(self.cells)
        if router_logits.shape[0] % B:
            raise ValueError(f"{router_logits.shape[0]} rows do not split into {B} sequences")
        mask = torch.zeros(B, self.num_experts, dtype=torch.bool)
        for b, cell in enumerate(self.cells):
            if cell is not None and cell[0] == layer_idx:
                mask[b, cell[1]] = True
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        rows = router_logits.shape[0] // B
        mask = mask.to(probs.device).repeat_interleave(rows, 0) if mask.any() else None
        indices, weights = excluding_top_k(probs, mask, self.top_k, self.norm_topk_prob)
        return indices, weights.to(hidden_states.dtype)


class CounterfactualLearner:
    """Paired ablation evidence per (context, layer, expert); see the module docstring."""

    def __init__(self, table: TrustTable, ablations_per_window: int = 16, alpha: float = 0.05):
        if not (isinstance(ablations_per_window, int) and ablations_per_window >= 1):
            raise ValueError(
                f"ablations_per_window must be an int >= 1, got {ablations_per_window!r}"
            )
        self.table = table
        self.ablations_per_window = ablations_per_window
        self.alpha = float(alpha)
        self.sequence_forwards = 0  # sequences run forward (the stated cost)

    def choose_cells(self, context: str) -> list[tuple[int, int]]:
        """The cells to ablate in the next window of `context`: highest priority first, ties
        to the lower layer, then the lower expert. Priority = the expert's share of its
        layer's routing in this context so far (uniform before any) / sqrt(1 + ablations),
        divided by 10 once its two-sided interval (the selector's bound, `alpha`) excludes
        zero (decided cells are revisited rarely; undecided, much-used ones first)."""
        ci = self.table.context_pos(context)
        usage = self.table.counts[:, ci]  # (L, E)
        total = usage.sum(-1, keepdim=True)
        share = torch.where(total > 0, usage / total.clamp_min(1), 1.0 / self.table.num_experts)
        n = self.table.harm_count[:, ci]
        mean = self.table.harm_mean[:, ci]
        lower = self.table.harm_lower_bound(self.alpha)[:, ci]
        upper = 2 * mean - lower  # the symmetric upper bound
        decided = (n >= 2) & ((lower > 0) | (upper < 0))
        priority = share / (1 + n).sqrt() * torch.where(decided, 0.1, 1.0)
        order = sorted(
            (-float(priority[li, e]), li, e)
            for li in range(len(self.table.layers))
            for e in range(self.table.num_experts)
        )
        return [(self.table.layers[li], e) for _, li, e in order[: self.ablations_per_window]]

    @torch.no_grad()
    def update(self, model, prompt: torch.Tensor, continuation: torch.Tensor, context: str):
        """One batched forward of the window: an unablated copy and one copy per chosen
        cell. Records each cell's harm (unablated minus ablated mean NLL) and the
        unablated copy's routing as usage. Returns {"cells": [(layer, expert, harm)],
        "mean_nll": the window's NLL with the router}."""
        ci = self.table.context_pos(context)
        missing = set(self.table.layers) - set(model.sparse_blocks())
        if missing:
            raise ValueError(f"the model has no sparse layer for trusted layers {sorted(missing)}")
        device = model.model.embed_tokens.weight.device
        ids = torch.cat([prompt, continuation]).to(device)[None]
        S, P, E = ids.shape[1], prompt.numel(), self.table.num_experts
        cells = self.choose_cells(context)
        c = model.config
        model.set_selector(
            AblationSelector(c.num_experts_per_tok, c.norm_topk_prob, E, [None, *cells])
        )
        try:
            with model.routing_trace() as trace:
                nll = continuation_nll(model, ids.expand(len(cells) + 1, -1), P).cpu()
        finally:
            model.set_selector(None)
        self.sequence_forwards += len(cells) + 1
        for layer, calls in trace.items():
            if layer in self.table._layer_pos:
                # the unablated copy's positions 0 .. S-2: the ones that feed scored logits
                served = torch.bincount(calls[0][0][: S - 1].reshape(-1), minlength=E)
                self.table.counts[self.table.layer_pos(layer), ci] += served.float()
        self.table.updates[ci] += 1
        reference = nll[0].mean().double()
        recorded = []
        for b, (layer, e) in enumerate(cells, start=1):
            harm = float(reference - nll[b].mean().double())
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
    """Adam on the selector's bias: loss = mean continuation NLL + l2 * sum(bias^2)."""

    def __init__(self, selector: LearnedBiasSelector, learning_rate: float = 0.05, l2=1e-3):
        if not learning_rate > 0 or not l2 >= 0:
            raise ValueError(f"need learning_rate > 0 and l2 >= 0, got {learning_rate}, {l2}")
        self.selector = selector
        self.l2 = float(l2)
        selector.bias.requires_grad_(True)
        self.optimizer = torch.optim.Adam([selector.bias], lr=learning_rate)
        self.sequence_forwards = 0
        self.sequence_backwards = 0

    def update(self, model, prompt: torch.Tensor, continuation: torch.Tensor, context: str):
        device = model.model.embed_tokens.weight.device
        ids = torch.cat([prompt, continuation]).to(device)[None]
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        self.selector.context = context
        model.set_selector(self.selector)
        try:
            with torch.enable_grad():
                nll = continuation_nll(model, ids, prompt.numel()).mean()
                loss = nll + self.l2 * self.selector.bias.pow(2).sum()
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
        finally:
            model.set_selector(None)
            for p, flag in frozen:
                p.requires_grad_(flag)
        self.sequence_forwards += 1
        self.sequence_backwards += 1
        return {"mean_nll": float(nll.detach())}
