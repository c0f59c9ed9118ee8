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

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from sage_core.atomic import atomic_write_bytes
from sage_core.errors import TrustStateError

SCHEMA_VERSION = 1
KIND = "sage_core.TrustTable"
RULES = ("bias", "report")
REPORT_PRIOR = 0.5  # the report's neutral trust (its reputation default), on a 0..1 scale
_TENSORS = ("trust", "counts", "updates")


class TrustTable:
    """Trust per (layer, context, expert), with a neutral prior and usage counts.

    trust   (L, C, E) float32: the value, `prior` when nothing has been learned.
    counts  (L, C, E) float32: tokens routed to the expert in credited generations.
    updates (C,) float32: generations credited per context.

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
        return bool(torch.all(self.trust == self.prior))

    def clone(self) -> TrustTable:
        out = TrustTable(self.layers, self.contexts, self.num_experts, self.prior, self.config_hash)
        out.trust.copy_(self.trust)
        out.counts.copy_(self.counts)
        out.updates.copy_(self.updates)
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
        """Write the table to one safetensors file, atomically (temp, fsync, rename)."""
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        metadata = {
            "schema_version": str(SCHEMA_VERSION),
            "kind": KIND,
            "config_hash": self.config_hash or "",
            "layers": json.dumps(self.layers),
            "contexts": json.dumps(self.contexts),
            "num_experts": str(self.num_experts),
            "prior": repr(self.prior),
            "sha256": _tensors_sha256(tensors),
        }
        path = Path(path)
        atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))
        return path

    @classmethod
    def load(cls, path, config_hash: str | None = None) -> TrustTable:
        """Read a file written by `save`. With `config_hash` (the current model's), a table
        learned on another model is refused. Any defect is a TrustStateError naming the file;
        nothing is ever silently reset to neutral."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trust file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                keys = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise TrustStateError(f"{path}: not a readable trust file ({exc})") from exc
        if metadata.get("kind") != KIND:
            raise TrustStateError(f"{path}: not a trust table (kind {metadata.get('kind')!r})")
        version = metadata.get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise TrustStateError(
                f"{path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}"
            )
        if keys != set(_TENSORS):
            raise TrustStateError(
                f"{path}: expected tensors {sorted(_TENSORS)}, found {sorted(keys)}"
            )
        if _tensors_sha256(tensors) != metadata.get("sha256"):
            raise TrustStateError(f"{path}: tensor checksum mismatch (corrupt file)")
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

    Set `selector.context` (a name in the table) before each generation. With
    `recording = True` every call appends a `Choice` to `selector.log`.

    rule "bias" (default): per token, top-k of p_router * exp(beta * (trust - prior)),
        i.e. of log p_router + beta * trust-deviation (both in nats); weights are the
        router's float32 probabilities of the chosen experts, renormalised over the chosen
        set only when the model's `norm_topk_prob` is set (exactly what the router does, so
        beta = 0 or neutral trust reproduces RouterTopK bit for bit), then cast to
        hidden_states.dtype. A router probability that underflows to 0 stays unselectable.
    rule "report": the report's rule as it was: combined = alpha * raw router logits +
        (1 - alpha) * trust (its table uses prior REPORT_PRIOR = 0.5 on a 0..1 scale);
        one top-k chosen from the FIRST token of each forward call is used for every
        token of that call; weights = the chosen combined scores divided by their sum
        (they can be negative or huge when logits are negative; that is the report's rule).
        With the KV cache each decode step is its own call.
    """

    def __init__(
        self,
        table: TrustTable,
        top_k: int,
        norm_topk_prob: bool = True,
        rule: str = "bias",
        beta: float = 1.0,
        alpha: float = 0.3,
    ):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= table.num_experts:
            raise ValueError(f"top_k must be an int in [1, {table.num_experts}], got {top_k!r}")
        if not (isinstance(beta, int | float) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.table = table
        self.top_k = top_k
        self.norm_topk_prob = bool(norm_topk_prob)
        self.rule = rule
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.context: str | None = None
        self.recording = False
        self.log: list[Choice] = []

    @classmethod
    def for_model(cls, model, table: TrustTable, **kwargs) -> TrustSelector:
        """A selector with the model's top-k and norm_topk_prob."""
        return cls(table, model.config.num_experts_per_tok, model.config.norm_topk_prob, **kwargs)

    def __call__(self, router_logits, layer_idx, hidden_states):
        if self.context is None:
            raise ValueError(
                "TrustSelector.context is not set; set it to one of "
                f"{self.table.contexts} before running the model"
            )
        if router_logits.shape[-1] != self.table.num_experts:
            raise ValueError(
                f"router logits have {router_logits.shape[-1]} experts, the "
                f"trust table {self.table.num_experts}"
            )
        trust = self.table.deviation(layer_idx, self.context).to(router_logits.device)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        if self.rule == "bias":
            indices = torch.topk(probs * torch.exp(self.beta * trust), self.top_k, dim=-1).indices
            weights = probs.gather(-1, indices)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            raw_trust = trust + self.table.prior
            combined = (
                self.alpha * router_logits[:1].to(torch.float32) + (1 - self.alpha) * raw_trust
            )
            scores, first = torch.topk(combined[0], self.top_k)
            T = router_logits.shape[0]
            indices = first.expand(T, self.top_k).contiguous()
            weights = (scores / scores.sum()).expand(T, self.top_k).contiguous()
        if self.recording:
            self.log.append(
                Choice(
                    layer_idx,
                    self.context,
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


# --- helpers ---------------------------------------------------------------------------


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
