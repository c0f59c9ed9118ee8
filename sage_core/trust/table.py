"""Trust-augmented expert selection: trust table, selector, update rule, persistence.

Trust is a number per (sparse layer, context, expert), stored as a deviation from a
neutral prior. Three pieces use it:

- `TrustSelector` plugs into the model's `ExpertSelector` hook. Rule "bias" (the default)
  ranks experts per token by router probability times exp(beta * trust), i.e. by
  `log p_router + beta * trust`: trust is measured in nats (see the update rule), the
  same unit as a router log-probability, so beta = 1 weighs one nat of evidence like one
  nat of router preference. Ranking in probability space makes the neutral case exact:
  exp(0) == 1, so the scores are the router's probabilities bit for bit and the choice is
  the router's top-k, ties included. Rule "report" is the report's rule as it was.
- `TrustLearner` updates trust after a generation from a quality signal measured on real
  text: the teacher-forced NLL of the held-out continuation, per token.
- `TrustTable.save` / `TrustTable.load` persist it (safetensors + JSON metadata, schema
  version, the model's config hash, checksum), atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from sage_core.errors import TrustStateError
from sage_core.trust.state import load_state, save_state

SCHEMA_VERSION = 2  # 2: counterfactual harm statistics (harm_mean, harm_m2, harm_count)
KIND = "sage_core.TrustTable"
RULES = ("exclude", "bias", "report")
REPORT_PRIOR = 0.5  # the report's neutral trust (its reputation default), on a 0..1 scale
# An expert is excluded when its one-sided t test of "mean harm > 0" survives the
# Benjamini-Hochberg procedure at false discovery rate alpha over its layer's E experts.
DEFAULT_HARM_ALPHA = 0.05
DEFAULT_MIN_ABLATIONS = 3
_TENSORS = ("trust", "counts", "updates", "harm_mean", "harm_m2", "harm_count")


class TrustTable:
    """Trust per (layer, context, expert), with a neutral prior and usage counts.

    trust   (L, C, E) float32: the value, `prior` when nothing has been learned.
    counts  (L, C, E) float32: tokens routed to the expert in credited generations.
    updates (C,) float32: generations credited per context.
    harm_mean, harm_m2, harm_count (L, C, E) float32: counterfactual evidence, a running
            mean (Welford) of the paired per-token NLL change, with the expert minus
            without it, in windows it served (positive: the expert harms), the sum of
            squared deviations, and the number of ablations recorded.

    `layers` are the model's original sparse-layer indices (a selective model keeps them);
    `contexts` are names. `config_hash` is `ThinkerTextConfig.config_hash()` of the model
    the trust was learned on; `load` refuses a file learned on another model.
    """

    def __init__(
        self, layers, contexts, num_experts: int, prior: float = 0.0, config_hash: str | None = None
    ):
        layers = [int(i) for i in layers]
        contexts = [str(c) for c in contexts]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct layer indices, got {layers}")
        if not contexts or len(set(contexts)) != len(contexts):
            raise ValueError(f"contexts must be distinct names, got {contexts}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not math.isfinite(prior):
            raise ValueError(f"prior must be finite, got {prior!r}")
        self.layers = layers
        self.contexts = contexts
        self.num_experts = num_experts
        self.prior = float(prior)
        self.config_hash = config_hash
        shape = (len(layers), len(contexts), num_experts)
        self.trust = torch.full(shape, self.prior, dtype=torch.float32)
        self.counts = torch.zeros(shape, dtype=torch.float32)
        self.updates = torch.zeros(len(contexts), dtype=torch.float32)
        self.harm_mean = torch.zeros(shape, dtype=torch.float32)
        self.harm_m2 = torch.zeros(shape, dtype=torch.float32)
        self.harm_count = torch.zeros(shape, dtype=torch.float32)
        self.version = 0  # bumped by record_harm: selectors cache their exclusions by it
        self._layer_pos = {layer: i for i, layer in enumerate(layers)}
        self._context_pos = {name: i for i, name in enumerate(contexts)}

    @classmethod
    def for_model(cls, model, contexts, prior: float = 0.0) -> TrustTable:
        """A neutral table for every sparse layer `model` holds."""
        layers = sorted(model.sparse_blocks())
        if not layers:
            raise ValueError("the model holds no sparse (MoE) layer; there is nothing to trust")
        return cls(layers, contexts, model.config.num_experts, prior, model.config.config_hash())

    def layer_pos(self, layer_idx: int) -> int:
        try:
            return self._layer_pos[layer_idx]
        except KeyError:
            raise ValueError(
                f"layer {layer_idx} is not in the trust table (layers {self.layers})"
            ) from None

    def context_pos(self, context: str) -> int:
        try:
            return self._context_pos[context]
        except KeyError:
            raise ValueError(
                f"context {context!r} is not in the trust table (contexts {self.contexts})"
            ) from None

    def deviation(self, layer_idx: int, context: str) -> torch.Tensor:
        """trust - prior for one (layer, context): (E,) float32, zero when neutral."""
        return self.trust[self.layer_pos(layer_idx), self.context_pos(context)] - self.prior

    def is_neutral(self) -> bool:
        return bool(torch.all(self.trust == self.prior)) and not bool(self.harm_count.any())

    def clone(self) -> TrustTable:
        out = TrustTable(self.layers, self.contexts, self.num_experts, self.prior, self.config_hash)
        for name in _TENSORS:
            getattr(out, name).copy_(getattr(self, name))
        return out

    def record_harm(self, layer_idx: int, context: str, expert: int, harm: float) -> None:
        """Add one paired ablation measurement (nats per scored token; positive: the
        window's NLL fell when the expert was removed) to the running mean (Welford)."""
        if not math.isfinite(harm):
            raise ValueError(f"harm must be finite, got {harm!r}")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range [0, {self.num_experts})")
        cell = (self.layer_pos(layer_idx), self.context_pos(context), expert)
        n = float(self.harm_count[cell]) + 1
        mean = float(self.harm_mean[cell])
        delta = harm - mean
        mean += delta / n
        self.harm_count[cell] = n
        self.version += 1
        self.harm_mean[cell] = mean
        self.harm_m2[cell] = float(self.harm_m2[cell]) + delta * (harm - mean)

    def harm_standard_error(self) -> torch.Tensor:
        """(L, C, E) standard error of harm_mean; infinite with fewer than 2 ablations."""
        n = self.harm_count
        variance = self.harm_m2 / (n - 1).clamp_min(1)
        se = (variance / n.clamp_min(1)).sqrt()
        return torch.where(n >= 2, se, torch.full_like(se, math.inf))

    def harm_lower_bound(self, alpha: float = DEFAULT_HARM_ALPHA) -> torch.Tensor:
        """(L, C, E) one-sided lower confidence bound of the mean harm at level
        1 - alpha / E: harm_mean - t(1 - alpha / E, n - 1) * SE; -inf below 2 ablations."""
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        dof = np.maximum(self.harm_count.numpy(), 2) - 1
        quantile = scipy.stats.t.ppf(1 - alpha / self.num_experts, dof).astype(np.float32)
        lower = self.harm_mean - torch.from_numpy(quantile) * self.harm_standard_error()
        return torch.where(self.harm_count >= 2, lower, torch.full_like(lower, -math.inf))

    def pooled_harm(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(count, mean, m2), each (L, E) float64: every context's ablations of a (layer,
        expert) merged into one sample (Chan et al.'s parallel form of Welford's update)."""
        n = self.harm_count.double()
        total = n.sum(1)
        mean = (n * self.harm_mean.double()).sum(1) / total.clamp_min(1)
        m2 = (self.harm_m2.double() + n * (self.harm_mean.double() - mean[:, None]) ** 2).sum(1)
        return total, mean, m2

    @staticmethod
    def _one_sided_p(n, mean, m2) -> torch.Tensor:
        se = (m2 / (n - 1).clamp_min(1) / n.clamp_min(1)).sqrt()
        with np.errstate(divide="ignore", invalid="ignore"):
            t = torch.where(se > 0, mean / se, torch.where(mean > 0, math.inf, -math.inf))
        p = torch.from_numpy(scipy.stats.t.sf(t.numpy(), np.maximum(n.numpy(), 2) - 1))
        return torch.where(n >= 2, p, torch.ones_like(n))

    def harm_p_values(self) -> torch.Tensor:
        """(L, C, E) float64 one-sided p-values of "mean harm > 0" (Student's t on n - 1
        degrees of freedom); 1 below 2 ablations. Identical measurements (SE 0) give 0
        when their mean is positive, else 1."""
        return self._one_sided_p(
            self.harm_count.double(), self.harm_mean.double(), self.harm_m2.double()
        )

    def harmful(
        self,
        layer_idx: int,
        context: str,
        alpha: float = DEFAULT_HARM_ALPHA,
        min_count: int = 2,
        pool_contexts: bool = True,
    ) -> torch.Tensor:
        """(E,) bool: experts shown harmful in this (layer, context), measured at least
        `min_count` (>= 2) times in it. Shown harmful: the Benjamini-Hochberg procedure at
        false discovery rate `alpha` over the layer's E one-sided p-values
        (`harm_p_values`; an expert measured fewer times counts as p = 1) selects it;
        equivalently its one-sided t lower bound at level 1 - alpha * R / E is above zero,
        R the number selected (false-coverage-rate adjusted bounds). With
        `pool_contexts`, an expert is also shown harmful in this context when the same
        procedure on every context's ablations pooled (`pooled_harm`) selects it and this
        context's own mean harm is positive: evidence is shared across contexts, the
        direction is this context's own."""
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        li, ci = self.layer_pos(layer_idx), self.context_pos(context)
        enough = self.harm_count[li, ci] >= max(2, min_count)
        own = (self.harm_count[li, ci], self.harm_mean[li, ci], self.harm_m2[li, ci])
        p = torch.where(enough, self._one_sided_p(*(x.double() for x in own)), 1.0)
        adjusted = torch.from_numpy(scipy.stats.false_discovery_control(p.numpy(), method="bh"))
        out = enough & (adjusted <= alpha)
        if pool_contexts and len(self.contexts) > 1:
            n, mean, m2 = (x[li] for x in self.pooled_harm())  # (E,) each
            p = torch.where(n >= max(2, min_count), self._one_sided_p(n, mean, m2), 1.0)
            adjusted = scipy.stats.false_discovery_control(p.numpy(), method="bh")
            pooled = torch.from_numpy(adjusted) <= alpha
            out |= pooled & enough & (self.harm_mean[li, ci] > 0)
        return out

    def credit(
        self,
        layer_idx: int,
        context: str,
        routing: torch.Tensor,
        advantage: torch.Tensor,
        learning_rate: float,
    ) -> None:
        """Move the trust of the experts that served these tokens toward their advantage.

        routing (T, E): each token's routing weight per expert (0 where not chosen).
        advantage (T,): per-token quality, in nats, relative to the neutral level.

        For expert e: target_e = sum_t w_te a_t / sum_t w_te (routing-weighted mean
        advantage of the tokens it served) and step_e = min(1, lr * k_eff * mean_t w_te),
        k_eff = number of chosen experts per token; trust_e moves step_e of the way from
        its deviation to target_e. An expert carrying its full share (1/k) of every token
        moves by lr; an expert that served no token does not move.
        """
        routing = routing.detach().to("cpu", torch.float32)
        advantage = advantage.detach().to("cpu", torch.float32).reshape(-1)
        if routing.dim() != 2 or routing.shape != (advantage.shape[0], self.num_experts):
            raise ValueError(
                f"routing must be (T, num_experts={self.num_experts}) with T = "
                f"{advantage.shape[0]} advantages, got {tuple(routing.shape)}"
            )
        if not (torch.isfinite(routing).all() and torch.isfinite(advantage).all()):
            raise ValueError("routing and advantage must be finite")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
        li, ci = self.layer_pos(layer_idx), self.context_pos(context)
        T = routing.shape[0]
        if T == 0:
            return
        used = routing > 0
        mass = routing.sum(0)  # (E,)
        k_eff = used.sum(1).float().mean()
        target = (routing * advantage[:, None]).sum(0) / mass.clamp_min(1e-12)
        step = (learning_rate * k_eff * mass / T).clamp(max=1.0)
        row = self.trust[li, ci]
        deviation = row - self.prior
        served = mass > 0
        row[served] = (self.prior + deviation + step * (target - deviation))[served]
        self.counts[li, ci] += used.sum(0).float()

    # --- persistence -----------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the table to one safetensors file, atomically (`sage_core.trust.state`)."""
        metadata = {
            "config_hash": self.config_hash or "",
            "layers": json.dumps(self.layers),
            "contexts": json.dumps(self.contexts),
            "num_experts": str(self.num_experts),
            "prior": repr(self.prior),
        }
        tensors = {name: getattr(self, name) for name in _TENSORS}
        return save_state(path, KIND, SCHEMA_VERSION, tensors, metadata)

    @classmethod
    def load(cls, path, config_hash: str | None = None) -> TrustTable:
        """Read a file written by `save`. With `config_hash` (the current model's), a table
        learned on another model is refused. Any defect is a TrustStateError naming the file;
        nothing is ever silently reset to neutral."""
        path = Path(path)
        tensors, metadata = load_state(
            path, KIND, SCHEMA_VERSION, _TENSORS, TrustStateError, "trust"
        )
        saved_hash = metadata.get("config_hash") or None
        if config_hash is not None and saved_hash != config_hash:
            raise TrustStateError(
                f"{path}: trust was learned on a model with config hash {saved_hash}, "
                f"the current model's is {config_hash}"
            )
        try:
            table = cls(
                json.loads(metadata["layers"]),
                json.loads(metadata["contexts"]),
                int(metadata["num_experts"]),
                float(metadata["prior"]),
                saved_hash,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise TrustStateError(f"{path}: bad metadata ({exc})") from exc
        for name in _TENSORS:
            expected = getattr(table, name)
            got = tensors[name]
            if got.shape != expected.shape or got.dtype != torch.float32:
                raise TrustStateError(
                    f"{path}: tensor {name!r} is {got.dtype} {tuple(got.shape)}, metadata "
                    f"says float32 {tuple(expected.shape)}"
                )
            if not torch.isfinite(got).all():
                raise TrustStateError(f"{path}: tensor {name!r} holds NaN or infinity")
            expected.copy_(got)
        return table


@dataclass(frozen=True)
class Choice:
    """One selector call: what it chose, and what the router alone would have chosen."""

    layer_idx: int
    context: str
    indices: torch.Tensor  # (T, k) int64, on CPU
    weights: torch.Tensor  # (T, k) float32
    router_indices: torch.Tensor  # (T, k) int64: the router's own top-k

    def slots_changed(self) -> int:
        """(token, slot) pairs whose expert is not in the router's top-k for that token."""
        same = (self.indices[:, :, None] == self.router_indices[:, None, :]).any(-1)
        return int((~same).sum())


class TrustSelector:
    """An `ExpertSelector` that adds trust to the router's choice.

    Set `selector.context` before each forward: one context name for every sequence of
    the batch, or a list with one name per sequence (the rows of the (B*S, E) router
    logits are B sequences of S positions). With `recording = True` every call appends a
    `Choice` to `selector.log`.

    rule "exclude" (default): per (layer, context), the experts `TrustTable.harmful` names
        (lower confidence bound of counterfactual harm above zero, `harm_alpha`) are removed from every
        token's candidates, even a token's top choice: its slot goes to the router's next
        choice, so each token still uses k experts, as the model was trained to. Weights
        are the router's float32 probabilities of the chosen experts, renormalised when
        `norm_topk_prob` is set. With nothing excluded the selection is RouterTopK's bit
        for bit; trust never adds a bonus. At most E - k experts are excluded per (layer,
        context): those with the highest lower bounds.
    rule "bias": per token, top-k of log p_router + beta * (trust - prior) (both in nats),
        ranked as p_router * exp(beta * deviation) so neutral trust is exactly the router's
        ranking; weights as for "exclude". A router probability that underflows to 0 stays
        unselectable.
    rule "report": the report's rule as it was: combined = alpha * raw router logits +
        (1 - alpha) * trust (its table uses prior REPORT_PRIOR = 0.5 on a 0..1 scale);
        one top-k chosen from the FIRST token of each sequence is used for every token of
        that sequence; weights = the chosen combined scores divided by their sum (they can
        be negative or huge when logits are negative; that is the report's rule).
    """

    def __init__(
        self,
        table: TrustTable,
        top_k: int,
        norm_topk_prob: bool = True,
        rule: str = "exclude",
        beta: float = 1.0,
        alpha: float = 0.3,
        harm_alpha: float = DEFAULT_HARM_ALPHA,
        min_ablations: int = DEFAULT_MIN_ABLATIONS,
    ):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= table.num_experts:
            raise ValueError(f"top_k must be an int in [1, {table.num_experts}], got {top_k!r}")
        if not (isinstance(beta, int | float) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not (isinstance(harm_alpha, int | float) and 0 < harm_alpha < 1):
            raise ValueError(f"harm_alpha must be in (0, 1), got {harm_alpha!r}")
        if not (isinstance(min_ablations, int) and min_ablations >= 2):
            raise ValueError(f"min_ablations must be an int >= 2, got {min_ablations!r}")
        self.table = table
        self.top_k = top_k
        self.norm_topk_prob = bool(norm_topk_prob)
        self.rule = rule
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.harm_alpha = float(harm_alpha)
        self.min_ablations = min_ablations
        self.context: str | list[str] | None = None
        self.recording = False
        self.log: list[Choice] = []
        self._cache: dict = {}
        self._cache_key = None

    @classmethod
    def for_model(cls, model, table: TrustTable, **kwargs) -> TrustSelector:
        """A selector with the model's top-k and norm_topk_prob."""
        return cls(table, model.config.num_experts_per_tok, model.config.norm_topk_prob, **kwargs)

    def excluded(self, layer_idx: int, context: str) -> torch.Tensor:
        """(E,) bool: the experts rule "exclude" removes in this (layer, context), cached
        until the table records new evidence."""
        key = (self.table.version, layer_idx, context)
        if self._cache_key != key[0]:
            self._cache, self._cache_key = {}, key[0]
        if key not in self._cache:
            self._cache[key] = self._excluded(layer_idx, context)
        return self._cache[key]

    def _excluded(self, layer_idx: int, context: str) -> torch.Tensor:
        if not (
            self.table.harm_count[self.table.layer_pos(layer_idx), self.table.context_pos(context)]
            >= 2
        ).any():
            return torch.zeros(self.table.num_experts, dtype=torch.bool)
        harmful = self.table.harmful(layer_idx, context, self.harm_alpha, self.min_ablations)
        spare = self.table.num_experts - self.top_k
        if int(harmful.sum()) > spare:  # keep k candidates: drop the least certain
            lower = self.table.harm_lower_bound(self.harm_alpha)[
                self.table.layer_pos(layer_idx), self.table.context_pos(context)
            ]
            keep = torch.topk(torch.where(harmful, lower, -math.inf), spare).indices
            harmful = torch.zeros_like(harmful).index_fill_(0, keep, True)
        return harmful

    def _contexts(self, rows: int) -> list[str]:
        """One context per sequence of the call; rows must split evenly among them."""
        if self.context is None:
            raise ValueError(
                "TrustSelector.context is not set; set it to one of "
                f"{self.table.contexts} (or a list, one per sequence) before running the model"
            )
        contexts = [self.context] if isinstance(self.context, str) else list(self.context)
        if not contexts or rows % len(contexts):
            raise ValueError(
                f"{rows} router rows do not split into {len(contexts)} sequences "
                f"(TrustSelector.context has one name per sequence)"
            )
        return contexts

    def __call__(self, router_logits, layer_idx, hidden_states):
        if router_logits.shape[-1] != self.table.num_experts:
            raise ValueError(
                f"router logits have {router_logits.shape[-1]} experts, the "
                f"trust table {self.table.num_experts}"
            )
        T = router_logits.shape[0]
        contexts = self._contexts(T)
        per_sequence = T // len(contexts)
        device = router_logits.device
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        if self.rule == "exclude":
            masks = torch.stack([self.excluded(layer_idx, c) for c in contexts])
            mask = None if not masks.any() else masks.to(device).repeat_interleave(per_sequence, 0)
            indices, weights = excluding_top_k(probs, mask, self.top_k, self.norm_topk_prob)
        elif self.rule == "bias":
            trust = torch.stack([self.table.deviation(layer_idx, c) for c in contexts])
            trust = trust.to(device).repeat_interleave(per_sequence, 0)
            indices = torch.topk(probs * torch.exp(self.beta * trust), self.top_k, dim=-1).indices
            weights = probs.gather(-1, indices)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            firsts = router_logits[::per_sequence].to(torch.float32)  # (B, E)
            raw_trust = torch.stack([self.table.deviation(layer_idx, c) for c in contexts])
            combined = self.alpha * firsts + (1 - self.alpha) * (raw_trust + self.table.prior)
            scores, first = torch.topk(combined.to(device), self.top_k, dim=-1)
            indices = first.repeat_interleave(per_sequence, 0)
            weights = (scores / scores.sum(-1, keepdim=True)).repeat_interleave(per_sequence, 0)
        if self.recording:
            self.log.append(
                Choice(
                    layer_idx,
                    contexts[0] if len(contexts) == 1 else ",".join(contexts),
                    indices.detach().cpu(),
                    weights.detach().to("cpu", torch.float32),
                    torch.topk(probs, self.top_k, dim=-1).indices.cpu(),
                )
            )
        return indices, weights.to(hidden_states.dtype)

    def slots_changed_by_layer(self) -> dict[int, float]:
        """{layer: fraction of (token, slot) pairs not in the router's own top-k} over the log."""
        changed: dict[int, int] = {}
        total: dict[int, int] = {}
        for choice in self.log:
            changed[choice.layer_idx] = changed.get(choice.layer_idx, 0) + choice.slots_changed()
            total[choice.layer_idx] = total.get(choice.layer_idx, 0) + choice.indices.numel()
        return {layer: changed[layer] / total[layer] for layer in sorted(total)}


class OracleSelector(TrustSelector):
    """Rule "exclude" with the evidence replaced by the truth: `broken[context][layer]`
    lists the experts to exclude (the notebook-07 oracle: exactly the corrupted ones)."""

    def __init__(self, table: TrustTable, top_k: int, norm_topk_prob: bool, broken: dict):
        super().__init__(table, top_k, norm_topk_prob, rule="exclude")
        self.broken = {
            context: {int(layer): [int(e) for e in experts] for layer, experts in by_layer.items()}
            for context, by_layer in broken.items()
        }

    def excluded(self, layer_idx: int, context: str) -> torch.Tensor:
        mask = torch.zeros(self.table.num_experts, dtype=torch.bool)
        experts = self.broken.get(context, {}).get(layer_idx, [])
        if len(experts) > self.table.num_experts - self.top_k:
            raise ValueError(f"cannot exclude {len(experts)} of {self.table.num_experts} experts")
        return mask.index_fill_(0, torch.tensor(experts, dtype=torch.int64), True)


def excluding_top_k(probs: torch.Tensor, excluded, top_k: int, norm_topk_prob: bool):
    """Top-k of router probabilities (T, E) float32 with `excluded` (T, E) bool experts
    removed (None: nothing removed; then exactly RouterTopK's indices and weights).
    Excluded entries rank below every probability (-1 < 0 <= p)."""
    ranked = probs if excluded is None else probs.masked_fill(excluded, -1.0)
    indices = torch.topk(ranked, top_k, dim=-1).indices
    weights = probs.gather(-1, indices)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return indices, weights


def dense_routing(indices: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, k) indices and weights -> (T, E) float32 routing weights, 0 where not chosen."""
    out = torch.zeros(indices.shape[0], num_experts, dtype=torch.float32)
    return out.scatter_add_(1, indices.cpu(), weights.detach().to("cpu", torch.float32))


class TrustLearner:
    """The update rule: per-token advantage against a running per-context baseline.

    After a generation in context c, `update(c, token_nll, routing)` takes the
    teacher-forced NLL (nats) of each token of the real continuation and, per sparse
    layer, the routing of the positions that predicted those tokens. The advantage of
    token t is a_t = b_c - nll_t, where b_c is the running mean per-token NLL of context c
    before this generation (the first generation of a context is its own baseline). Each
    layer's trust is credited with `TrustTable.credit(..., learning_rate)`; then b_c moves
    toward this generation's mean NLL: b_c <- m * b_c + (1 - m) * mean(nll), m =
    baseline_momentum. A token easier than usual for its context raises the trust of the
    experts that served it, in proportion to their routing weight; trust is therefore in
    nats per token, the scale the "bias" rule adds to router log-probabilities.
    """

    def __init__(
        self, table: TrustTable, learning_rate: float = 0.5, baseline_momentum: float = 0.9
    ):
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
        if not 0 <= baseline_momentum < 1:
            raise ValueError(f"baseline_momentum must be in [0, 1), got {baseline_momentum!r}")
        self.table = table
        self.learning_rate = float(learning_rate)
        self.baseline_momentum = float(baseline_momentum)
        self.baseline: dict[str, float] = {}

    def update(
        self, context: str, token_nll: torch.Tensor, routing: dict[int, torch.Tensor]
    ) -> dict:
        """Credit one generation. routing: {layer_idx: (T, E) dense weights} for the T
        predicting positions of the T scored tokens. Returns what was done, for records."""
        token_nll = token_nll.detach().to("cpu", torch.float32).reshape(-1)
        if token_nll.numel() == 0 or not torch.isfinite(token_nll).all():
            raise ValueError("token_nll must be a non-empty finite tensor")
        self.table.context_pos(context)
        missing = set(self.table.layers) - set(routing)
        if missing:
            raise ValueError(f"routing has no entry for trusted layers {sorted(missing)}")
        mean_nll = float(token_nll.mean())
        baseline = self.baseline.get(context, mean_nll)
        advantage = baseline - token_nll
        for layer in self.table.layers:
            self.table.credit(layer, context, routing[layer], advantage, self.learning_rate)
        self.table.updates[self.table.context_pos(context)] += 1
        m = self.baseline_momentum
        self.baseline[context] = m * baseline + (1 - m) * mean_nll
        return {
            "context": context,
            "mean_nll": mean_nll,
            "baseline_nll": baseline,
            "mean_advantage": baseline - mean_nll,
        }
