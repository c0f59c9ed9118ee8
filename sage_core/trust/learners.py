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


class AttributionSelector(AblationSelector):
    """`AblationSelector` that also keeps, per layer, what the attribution estimate needs:
    the layer's input rows, router probabilities and each token's k + 1 best candidates
    (its top-k and the next choice, which takes a removed expert's slot)."""

    def __init__(self, top_k: int, norm_topk_prob: bool, masks: dict, batch: int):
        super().__init__(top_k, norm_topk_prob, masks, batch)
        self.records: dict[int, tuple] = {}

    def __call__(self, router_logits, layer_idx, hidden_states):
        B, k = self.batch, self.top_k
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # (T, E)
        mask = self.masks.get(layer_idx)
        if mask is not None:
            mask = mask.to(probs.device).repeat_interleave(router_logits.shape[0] // B, 0)
        candidates, _ = excluding_top_k(probs.detach(), mask, k + 1, False)  # (T, k + 1)
        self.records[layer_idx] = (hidden_states.detach(), probs.detach(), candidates)
        indices, weights = excluding_top_k(probs, mask, k, self.norm_topk_prob)
        return indices, weights.to(hidden_states.dtype)


def _expert_outputs(x: torch.Tensor, candidates: torch.Tensor, experts) -> torch.Tensor:
    """(T, k + 1, H): each candidate expert's output on its token, one expert at a time."""
    out = x.new_zeros(*candidates.shape, x.shape[1])
    for e in candidates.unique().tolist():
        token, slot = (candidates == e).nonzero(as_tuple=True)
        gate_up, down = experts.expert(e)
        gate, up = F.linear(x[token], gate_up).chunk(2, dim=-1)  # each (rows, I)
        out[token, slot] = F.linear(F.silu(gate) * up, down)
    return out


def removal_changes(probs, candidates, outputs, norm_topk_prob: bool) -> torch.Tensor:
    """(T, k, H): the exact change of a layer's output at each token when the expert in
    slot j is removed and its slot handed to the token's next choice (the k-th candidate),
    the weights renormalised as the router does. probs (T, E), candidates (T, k + 1),
    outputs (T, k + 1, H) as from `_expert_outputs`."""
    p = probs.gather(1, candidates).to(outputs.dtype)  # (T, k + 1)
    k = candidates.shape[1] - 1
    kept, nxt = p[:, :k], p[:, k:]  # (T, k), (T, 1)
    total = kept.sum(1, keepdim=True) if norm_topk_prob else torch.ones_like(nxt)
    mix = torch.einsum("tk,tkh->th", kept, outputs[:, :k])  # (T, H), unnormalised
    # Without slot j: (mix - p_j f_j + p_n f_n) / (total - p_j + p_n), for every j at once.
    without = mix[:, None] - kept[..., None] * outputs[:, :k] + nxt[..., None] * outputs[:, k:]
    new_total = total - kept + nxt  # (T, k)
    if not norm_topk_prob:
        new_total = torch.ones_like(new_total)
    return without / new_total[..., None] - (mix / total)[:, None]  # (T, k, H)


def window_nll_gradients(model, ids: torch.Tensor, prompt_tokens: int = 1, shift=None):
    """The mean NLL of each window's tokens after `prompt_tokens` ((B, S) `ids`, routed by
    whatever selector the model has) and its gradient at every sparse layer's output, with
    the model's parameters left out of the graph. `shift` {layer: (B, S, H)}: added to
    that layer's output on the way (None: nothing). Returns (window_nll (B,) detached,
    {layer: (B, S, H) gradient of window_nll.sum()}, {layer: (B, S, H) the layer's input})."""
    blocks = model.sparse_blocks()
    layers = sorted(blocks)
    inputs, outputs = {}, {}

    def keep_output(out, layer):
        hidden = out[0]
        if shift is not None and layer in shift:
            hidden = hidden + shift[layer].reshape(hidden.shape).to(hidden.dtype)
        outputs[layer] = hidden
        return (hidden, *out[1:])

    hooks = [
        blocks[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
        for i in layers
    ] + [
        blocks[i].register_forward_hook(lambda m, a, out, i=i: keep_output(out, i)) for i in layers
    ]
    hooks.append(
        model.model.embed_tokens.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    )
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            window_nll = continuation_nll(model, ids, prompt_tokens).mean(1)  # (B,)
            grads = torch.autograd.grad(window_nll.sum(), [outputs[i] for i in layers])
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return window_nll.detach(), dict(zip(layers, grads, strict=True)), inputs


def attribution_estimates(model, ids: torch.Tensor, masks: dict) -> dict:
    """Every served (layer, expert) cell's effect on each window's mean NLL, estimated from
    one forward and one backward pass of (B, S) `ids` routed as `AblationSelector(masks)`
    routes them (the removals in `masks` taken as the base).

    Per MoE layer the forward keeps each token's input, router probabilities and next
    choice; removing expert e from a token changes the layer's output by an exactly
    computed `removal_changes` vector; the backward gives the gradient g of the window's
    mean NLL (every next-token prediction) with respect to the layer's output, and the
    first-order estimate of the NLL change when e is removed from the window is the sum
    over the tokens it served of g . change. Attribution patching (Nanda; Syed et al.
    2023) with the patch computed exactly inside the layer, linearised only downstream.

    Returns {"harm": (B, L, E) estimated harm (NLL with the expert minus without; 0 where
    it served nothing), "served": (B, L, E) bool, "nll": (B,) base mean NLL, "candidates":
    {layer: (B * S, k + 1) each token's top-k and next choice}}, layers in sorted order."""
    device = model.model.embed_tokens.weight.device
    ids = ids.to(device)
    B, S = ids.shape
    c = model.config
    blocks = model.sparse_blocks()
    layers = sorted(blocks)
    selector = AttributionSelector(c.num_experts_per_tok, c.norm_topk_prob, masks, B)
    model.set_selector(selector)
    try:
        window_nll, grads, _ = window_nll_gradients(model, ids, 1)
    finally:
        model.set_selector(None)
    grads = [grads[layer] for layer in layers]
    E = c.num_experts
    harm = torch.zeros(B, len(layers), E, dtype=torch.float64)
    served = torch.zeros(B, len(layers), E, dtype=torch.bool)
    with torch.no_grad():
        for li, (layer, grad) in enumerate(zip(layers, grads, strict=True)):
            x, probs, candidates = selector.records[layer]
            fx = _expert_outputs(x, candidates, blocks[layer].experts)  # (T, k + 1, H)
            change = removal_changes(probs, candidates, fx, c.norm_topk_prob)  # (T, k, H)
            g = grad.reshape(-1, grad.shape[-1])[:, None]  # (T, 1, H)
            effect = (g * change).sum(-1).double().reshape(B, S, -1)  # (B, S, k)
            chosen = candidates[:, :-1].reshape(B, S, -1)[:, : S - 1]  # feeds scored logits
            effect = effect[:, : S - 1]
            for b in range(B):
                harm[b, li].index_add_(0, chosen[b].reshape(-1).cpu(), -effect[b].reshape(-1).cpu())
                served[b, li, chosen[b].reshape(-1).cpu()] = True
    return {
        "harm": harm,
        "served": served,
        "nll": window_nll.detach().double().cpu(),
        "candidates": {layer: selector.records[layer][2] for layer in layers},
    }


class AttributionLearner(CounterfactualLearner):
    """Attribution proposes, ablation verifies. Per minibatch of windows: one forward and
    one backward pass (`attribution_estimates`, with each context's suspected cells
    removed, as the counterfactual learner's base pass) estimates every served cell's
    harm, kept per (context, layer, expert) in `estimates` (mean, count and SE, as the
    table keeps harms). Then `verify_per_window` cells per window, ranked by their harm so
    far (a cell's measured mean once it has two real ablations, its estimated mean
    before), are measured by real paired ablations in one batched forward, exactly as the
    counterfactual learner measures them (relative to the suspected set; a suspected cell
    is put back). Only those measurements enter `table`, so only verified evidence
    excludes. Cost per window: 1 forward, 1 backward, `verify_per_window` forwards."""

    def __init__(
        self,
        table: TrustTable,
        verify_per_window: int = 2,
        alpha: float = 0.05,
        min_ablations: int = 3,
    ):
        super().__init__(table, verify_per_window, alpha, 0.0, min_ablations)
        self.estimates = TrustTable(table.layers, table.contexts, table.num_experts)
        self.sequence_backwards = 0

    def choose_cells(
        self, context: str, candidates: torch.Tensor, decided: torch.Tensor | None = None
    ) -> list[tuple[int, int]]:
        """At most `ablations_per_window` candidate cells: undecided cells first, by harm
        so far (measured mean after two ablations, else estimated mean), then by usage.
        `decided` ((L, E) bool, the cells already shown harmful) is computed if not given."""
        table, ci = self.table, self.table.context_pos(context)
        measured = table.harm_count[:, ci] >= 2
        score = torch.where(
            measured, table.harm_mean[:, ci], self.estimates.harm_mean[:, ci]
        ).double()
        if decided is None:
            decided = self.decided(context)
        usage = table.counts[:, ci]
        order = sorted(
            (bool(decided[li, e]), -float(score[li, e]), -float(usage[li, e]), layer, e)
            for li, layer in enumerate(table.layers)
            for e in range(table.num_experts)
            if candidates[li, e]
        )
        return [(layer, e) for *_, layer, e in order[: self.ablations_per_window]]

    def decided(self, context: str) -> torch.Tensor:
        """(L, E) bool: the cells of `context` shown harmful (what the selector excludes)."""
        return torch.stack(
            [
                self.table.harmful(layer, context, self.alpha, self.min_ablations)
                for layer in self.table.layers
            ]
        )

    def update_batch(self, model, ids: torch.Tensor, contexts: list[str]) -> dict:
        """Estimate on (B, S) `ids` (sequence b in context contexts[b]), then verify.
        Returns {"cells": [(context, layer, expert, harm)] verified, "mean_nll": (B,)}."""
        missing = set(self.table.layers) - set(model.sparse_blocks())
        if missing:
            raise ValueError(f"the model has no sparse layer for trusted layers {sorted(missing)}")
        if len(contexts) != ids.shape[0]:
            raise ValueError(f"{len(contexts)} contexts for {ids.shape[0]} windows")
        layers, c = self.table.layers, model.config
        removed = {ctx: self.suspected(ctx) for ctx in set(contexts)}  # (L, E) each
        decided = {ctx: self.decided(ctx) for ctx in set(contexts)}  # fixed until verified
        masks = {
            layer: torch.stack([removed[ctx][li] for ctx in contexts])
            for li, layer in enumerate(layers)
        }  # (B, E) per layer
        est = attribution_estimates(model, ids, masks)
        self.sequence_forwards += ids.shape[0]
        self.sequence_backwards += ids.shape[0]
        plan = []  # (window, layer, expert)
        for b, ctx in enumerate(contexts):
            ci = self.table.context_pos(ctx)
            for li, layer in enumerate(layers):
                self.table.counts[li, ci] += est["served"][b, li].float()
                for e in est["served"][b, li].nonzero().flatten().tolist():
                    self.estimates.record_harm(layer, ctx, e, float(est["harm"][b, li, e]))
            self.table.updates[ci] += 1
            served = est["served"][b] | removed[ctx]
            chosen = self.choose_cells(ctx, served, decided[ctx])
            plan += [(b, layer, e) for layer, e in chosen]
        recorded = []
        if plan:
            masks = {layer: masks[layer][[b for b, *_ in plan]].clone() for layer in layers}
            for row, (_, layer, e) in enumerate(plan):  # copy `row` toggles its cell
                masks[layer][row, e] = ~masks[layer][row, e]
            model.set_selector(
                AblationSelector(c.num_experts_per_tok, c.norm_topk_prob, masks, len(plan))
            )
            device = model.model.embed_tokens.weight.device
            try:
                with torch.no_grad():
                    copies = ids[[b for b, *_ in plan]].to(device)
                    nll = continuation_nll(model, copies, 1).mean(1).double().cpu()
            finally:
                model.set_selector(None)
            self.sequence_forwards += len(plan)
            for row, (b, layer, e) in enumerate(plan):
                change = float(nll[row] - est["nll"][b])  # copy minus base
                harm = -change if bool(masks[layer][row, e]) else change
                self.table.record_harm(layer, contexts[b], e, harm)
                recorded.append((contexts[b], layer, e, harm))
        return {"cells": recorded, "mean_nll": est["nll"]}

    def update(self, model, prompt: torch.Tensor, continuation: torch.Tensor, context: str):
        """One window."""
        return self.update_batch(model, torch.cat([prompt, continuation])[None], [context])
