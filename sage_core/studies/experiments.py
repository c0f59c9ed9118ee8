"""Inputs, scoring and the report's ten generations done on real text (notebook 04), and
the pieces notebooks 04-07 share: the model loader, corpus windows, the classifier in the
loop, records.

- Inputs are windows of the three-context corpus: a prompt of `prompt_tokens` tokens and
  its real continuation of `continuation_tokens` tokens (`Sample`).
- Quality is teacher-forced: the NLL of the real continuation given the prompt, with the
  selector under test active.
- The context comes from the corpus label or from a `ContextAssigner` (a classifier on the
  mean-pooled, L2-normalised hidden states at the first MoE block's input, computed from
  the prompt only). The trust arms of notebooks 05 and 07 live in `trust_runs`.

Every function returns plain records (lists of dicts); `save_records` writes them as CSV
and JSON under `sage_core.paths.RESULTS` (gitignored).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sage_core.atomic import atomic_write_table
from sage_core.corpus import CONTEXTS, load_corpus
from sage_core.model.generation import generate
from sage_core.notebook.progress import progress
from sage_core.paths import MODELS, RESULTS
from sage_core.trust import (
    TrustTable,
    dense_routing,
)
from sage_core.trust.classifier import ContextClassifier

# --- model and inputs --------------------------------------------------------------------


def resolve_model_path(model_path=None) -> Path:
    """`model_path`, or the embedded default: the one directory under models/ with a
    config.json."""
    if model_path is not None:
        return Path(model_path)
    found = sorted(p.parent for p in MODELS.glob("*/config.json"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected exactly one default model under {MODELS} (a directory with "
            f"config.json), found {[p.name for p in found]}; pass model_path"
        )
    return found[0]


def load_model(
    model_path=None, device="cpu", dtype="float32", layers=None, max_resident_experts=None
):
    """(model in eval mode, its tokenizer, the resolved path) for notebook parameters."""
    from sage_core.checkpoint import load_thinker
    from sage_core.dtypes import parse_dtype
    from sage_core.model.tokenizer import load_tokenizer

    path = resolve_model_path(model_path)
    model = load_thinker(
        path,
        layers=layers,
        max_resident_experts=max_resident_experts,
        device=device,
        dtype=parse_dtype(dtype),
    )
    return model.eval(), load_tokenizer(path), path


class ValidationCorpus:
    """The training split cut in two, for choices made before any held-out text is seen:
    "train" is the training documents i % `every` != 0, "heldout" the others (validation
    documents). Tuning and model selection run on it; evaluation runs on the real corpus."""

    def __init__(self, corpus, every: int = 5):
        if not (isinstance(every, int) and every >= 2):
            raise ValueError(f"every must be an int >= 2, got {every!r}")
        self.corpus, self.every = corpus, every

    def documents(self, context: str, split: str) -> list[str]:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        docs = self.corpus.documents(context, "train")
        return [d for i, d in enumerate(docs) if (i % self.every == 0) == (split == "heldout")]


@dataclass(frozen=True)
class Sample:
    """A prompt and its real continuation, cut from one corpus document."""

    context: str
    split: str
    document: int  # index of the document in its corpus part
    offset: int  # token offset of the prompt in the document
    prompt: torch.Tensor  # (P,) int64
    continuation: torch.Tensor  # (C,) int64


def make_samples(
    tokenizer,
    split: str,
    per_context: int,
    prompt_tokens: int,
    continuation_tokens: int,
    seed: int,
    corpus=None,
    stream: str = "",
) -> list[Sample]:
    """`per_context` windows per context from `split`, interleaved code, reasoning, text,
    code, ... Each window comes from a different document while there are enough documents
    long enough, then windows at new offsets of the same documents. Documents and offsets
    come from a Random seeded by (seed, split, stream, context): `stream` names independent
    draws from one split (the classifier's prompts, trust's stream); they may overlap."""
    if per_context < 1 or prompt_tokens < 1 or continuation_tokens < 1:
        raise ValueError(
            f"per_context, prompt_tokens and continuation_tokens must be >= 1, got "
            f"{per_context}, {prompt_tokens}, {continuation_tokens}"
        )
    corpus = corpus or load_corpus()
    window = prompt_tokens + continuation_tokens
    by_context = []
    for context in CONTEXTS:
        docs = corpus.documents(context, split)
        rng = random.Random(f"{seed}:{split}:{stream}:{context}")
        order = list(range(len(docs)))
        rng.shuffle(order)
        eligible = [(d, ids) for d in order if len(ids := tokenizer.encode(docs[d])) >= window]
        if not eligible:
            raise ValueError(
                f"corpus part {context}/{split} has no document of at least {window} tokens"
            )
        picked = []
        for i in range(per_context):  # distinct documents first, then cycle through them
            d, ids = eligible[i % len(eligible)]
            offset = rng.randrange(len(ids) - window + 1)
            chunk = torch.tensor(ids[offset : offset + window], dtype=torch.int64)
            picked.append(
                Sample(context, split, d, offset, chunk[:prompt_tokens], chunk[prompt_tokens:])
            )
        by_context.append(picked)
    return [s for group in zip(*by_context, strict=True) for s in group]


# --- classifier in the loop --------------------------------------------------------------


class _Stop(Exception):
    pass


@torch.no_grad()
def moe_input_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states entering the first sparse layer's MoE block (after its
    post_attention_layernorm), (B, S, H) in the model's dtype. The forward stops there."""
    blocks = model.sparse_blocks()
    if not blocks:
        raise ValueError("the model holds no sparse (MoE) layer")
    block = blocks[min(blocks)]
    captured = {}

    def hook(module, args):
        captured["x"] = args[0].detach()
        raise _Stop

    handle = block.register_forward_pre_hook(hook)
    try:
        model.hidden_states(input_ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"]


class ContextAssigner:
    """A ContextClassifier on MoE-input features, plus the context name of each class.

    Supervised mode: class i is CONTEXTS[i]. K-means mode: cluster i is named after the
    majority corpus label of its training prompts (two clusters may share a name; a context
    no cluster wins is never assigned).
    """

    def __init__(self, classifier: ContextClassifier, names: list[str]):
        self.classifier = classifier
        self.names = list(names)

    @classmethod
    def fit(
        cls, model, samples: list[Sample], mode: str = "supervised", seed: int = 0
    ) -> ContextAssigner:
        feats = np.concatenate([prompt_features(model, s.prompt) for s in samples])
        labels = np.array([CONTEXTS.index(s.context) for s in samples], dtype=np.int64)
        if mode == "supervised":
            classifier = ContextClassifier(len(CONTEXTS), list(CONTEXTS), "supervised", seed)
            classifier.fit(feats, labels)
            return cls(classifier, list(CONTEXTS))
        classifier = ContextClassifier(
            len(CONTEXTS), [f"cluster_{i}" for i in range(len(CONTEXTS))], mode, seed
        )
        classifier.fit(feats)
        clusters = classifier.predict(feats)
        names = []
        for k in range(len(CONTEXTS)):
            members = labels[clusters == k]
            majority = np.bincount(members, minlength=len(CONTEXTS)).argmax() if members.size else k
            names.append(CONTEXTS[int(majority)])
        return cls(classifier, names)

    def assign(self, model, prompt: torch.Tensor) -> str:
        return self.names[int(self.classifier.predict(prompt_features(model, prompt))[0])]

    def evaluate(self, model, samples: list[Sample]) -> dict:
        """Accuracy against corpus labels and purity (of the raw classes) on `samples`."""
        feats = np.concatenate([prompt_features(model, s.prompt) for s in samples])
        labels = np.array([CONTEXTS.index(s.context) for s in samples], dtype=np.int64)
        assigned = [self.names[i] for i in self.classifier.predict(feats)]
        accuracy = float(np.mean([a == s.context for a, s in zip(assigned, samples, strict=True)]))
        return {
            "mode": self.classifier.mode,
            "samples": len(samples),
            "accuracy": accuracy,
            "purity": self.classifier.purity(feats, labels),
        }


def moe_features(model, ids: torch.Tensor) -> np.ndarray:
    """(B, H) float32 classifier features of (B, S) token ids: the hidden states entering
    the first sparse layer's MoE block, mean-pooled and L2-normalised. The one feature
    extractor of the classifier in the loop (notebooks 04-06)."""
    from sage_core.trust.classifier import features

    device = model.model.embed_tokens.weight.device
    return features(moe_input_states(model, ids.to(device)))


def prompt_features(model, prompt: torch.Tensor) -> np.ndarray:
    """(1, H) features of one prompt (`moe_features`)."""
    return moe_features(model, prompt[None])


# --- scoring ------------------------------------------------------------------------------


@torch.no_grad()
def score_continuation(model, sample: Sample, with_routing: bool = False):
    """Teacher-forced NLL of each continuation token given the prompt (and the
    continuation before it), with whatever selector the model has. Returns (token_nll (C,)
    float32 on CPU, {layer: (C, E) dense routing of the C predicting positions} or None)."""
    device = model.model.embed_tokens.weight.device
    ids = torch.cat([sample.prompt, sample.continuation]).to(device)[None]
    P, C = sample.prompt.numel(), sample.continuation.numel()
    if with_routing:
        with model.routing_trace() as trace:
            hidden = model.hidden_states(ids)
    else:
        hidden, trace = model.hidden_states(ids), None
    logits = model.lm_head(hidden[0, P - 1 : P + C - 1]).to(torch.float32)
    nll = F.cross_entropy(logits, sample.continuation.to(device), reduction="none").cpu()
    routing = None
    if trace is not None:
        E = model.config.num_experts
        routing = {
            layer: dense_routing(calls[0][0][P - 1 : P + C - 1], calls[0][1][P - 1 : P + C - 1], E)
            for layer, calls in trace.items()
        }
    return nll, routing


def _context_for(sample, context_source, assigner, model) -> str:
    if context_source == "label":
        return sample.context
    if assigner is None:
        raise ValueError("context_source='classifier' needs a fitted ContextAssigner")
    return assigner.assign(model, sample.prompt)


# --- the report's ten generations, done right ---------------------------------------------


def run_generations(
    model,
    tokenizer,
    samples,
    selector=None,
    learner=None,
    context_source="label",
    assigner=None,
    max_new_tokens=32,
    show_progress=True,
    desc="generations",
) -> dict[str, list]:
    """Generate from each prompt (greedy), then score its real continuation teacher-forced.

    With a `learner`, trust is updated after each generation from that score. Returns
    {"records": one row per generation, "trust": a TrustTable snapshot after each one
    (trust runs only)}. Rows hold the true and the used context, the held-out perplexity,
    the generated text and, for trust runs, the fraction of (token, slot) pairs per layer
    whose expert differs from the router's own top-k during scoring; with a learner, the
    experts each layer used while scoring ({layer: [experts]}) and the update's summary.
    """
    records, snapshots = [], []
    try:
        for i, sample in enumerate(progress(samples, desc=desc, disable=not show_progress)):
            context = _context_for(sample, context_source, assigner, model)
            model.set_selector(selector)
            if selector is not None:
                selector.context = context
            device = model.model.embed_tokens.weight.device
            out = generate(model, sample.prompt.to(device)[None], max_new_tokens)
            if selector is not None:
                selector.log.clear()
                selector.recording = True
            nll, routing = score_continuation(model, sample, with_routing=learner is not None)
            row = {
                "generation": i + 1,
                "arm": "baseline" if selector is None else "trust",
                "context": sample.context,
                "assigned": context,
                "perplexity": math.exp(float(nll.mean())),
                "mean_nll": float(nll.mean()),
                "tokens": int(nll.numel()),
                "generated": tokenizer.decode(out[0, sample.prompt.numel() :].tolist()),
            }
            if selector is not None:
                selector.recording = False
                row["slots_changed"] = selector.slots_changed_by_layer()
                selector.log.clear()
            if learner is not None:
                row["experts_used"] = {
                    layer: r.sum(0).nonzero().flatten().tolist() for layer, r in routing.items()
                }
                row.update(
                    {
                        f"update_{k}": v
                        for k, v in learner.update(context, nll, routing).items()
                        if k != "context"
                    }
                )
                snapshots.append(learner.table.clone())
            records.append(row)
    finally:
        model.set_selector(None)
    return {"records": records, "trust": snapshots}


def first_last_effect(records: list[dict], n: int = 3) -> dict:
    """The report's "learning effect": mean perplexity of the first n vs the last n
    generations of one run, as a % improvement. It compares different prompts."""
    if len(records) < 2 * n:
        raise ValueError(
            f"need at least {2 * n} generations for first/last {n}, got {len(records)}"
        )
    first = sum(r["perplexity"] for r in records[:n]) / n
    last = sum(r["perplexity"] for r in records[-n:]) / n
    return {"first": first, "last": last, "effect_percent": 100 * (first - last) / first}


def trust_changes(snapshots: list[TrustTable]) -> list[dict]:
    """Per snapshot (after each generation): which contexts, layers and experts ({layer:
    [experts]}) changed since the previous one (the first is compared with a neutral
    table), and how many (layer, context, expert) cells."""
    out = []
    previous = None
    for snapshot in snapshots:
        before = (
            previous.trust
            if previous is not None
            else torch.full_like(snapshot.trust, snapshot.prior)
        )
        moved = snapshot.trust != before  # (L, C, E)
        out.append(
            {
                "contexts": [
                    snapshot.contexts[c] for c in moved.any(-1).any(0).nonzero().flatten().tolist()
                ],
                "layers": [
                    snapshot.layers[i] for i in moved.any(-1).any(1).nonzero().flatten().tolist()
                ],
                "cells": int(moved.sum()),
                "experts": {
                    layer: moved[i].any(0).nonzero().flatten().tolist()
                    for i, layer in enumerate(snapshot.layers)
                    if moved[i].any()
                },
            }
        )
        previous = snapshot
    return out


# --- results ------------------------------------------------------------------------------


def save_records(records: list[dict], name: str, directory=None) -> dict[str, Path]:
    """Write records as `<name>.csv` and `<name>.json` under `directory` (default results/),
    atomically. Nested values (dicts, lists) are JSON-encoded in the CSV."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"results name must be a plain file stem, got {name!r}")
    out = Path(directory) if directory is not None else RESULTS
    return atomic_write_table(out / name, records, indent=1, default=_jsonable)


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


# --- summaries and figures ----------------------------------------------------------------


def verdict(row: dict) -> str:
    """What a CI of the relative perplexity change (trust vs router) supports:
    "improvement" (CI below zero), "harm" (CI above zero) or "inconclusive" (CI contains
    zero: absence of evidence, not "no difference"; that needs `statistics.equivalence`)."""
    if row["ci_high"] < 0:
        return "improvement"
    return "harm" if row["ci_low"] > 0 else "inconclusive"


def plot_generations(baseline: list[dict], trust: list[dict]):
    """Per-generation held-out perplexity of the two arms on the same prompts."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = [r["generation"] for r in baseline]
    ax.plot(x, [r["perplexity"] for r in baseline], color="0.35", marker="o", label="router alone")
    ax.plot(
        x,
        [r["perplexity"] for r in trust],
        color="C0",
        marker="s",
        ls="--",
        label="trust-augmented",
    )
    for r in baseline:
        ax.annotate(
            r["context"][:4],
            (r["generation"], r["perplexity"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
        )
    ax.set_xticks(x)
    ax.set_xlabel("generation")
    ax.set_ylabel("held-out perplexity\n(teacher-forced)")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_trust_heatmaps(snapshots: list[TrustTable], records: list[dict]):
    """One heatmap per context: trust (deviation from neutral, nats) of every (layer,
    expert) after each generation. Rows: generations; columns: experts, grouped by layer."""
    import matplotlib.pyplot as plt

    table = snapshots[-1]
    deviations = torch.stack([s.trust - s.prior for s in snapshots])  # (G, L, C, E)
    limit = max(float(deviations.abs().max()), 1e-6)
    fig, axes = plt.subplots(
        len(table.contexts), 1, figsize=(8, 1.3 + 1.2 * len(table.contexts)), squeeze=False
    )
    for c, context in enumerate(table.contexts):
        ax = axes[c, 0]
        grid = deviations[:, :, c, :].reshape(len(snapshots), -1).numpy()
        image = ax.imshow(
            grid, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
        )
        for boundary in range(1, len(table.layers)):
            ax.axvline(boundary * table.num_experts - 0.5, color="k", lw=0.6)
        used = [r["generation"] for r in records if r["assigned"] == context]
        ax.set_ylabel(
            f"{context}\n(updated at {used})" if used else f"{context}\n(never)", fontsize=8
        )
        ax.set_yticks(
            range(len(snapshots)), [str(i + 1) for i in range(len(snapshots))], fontsize=6
        )
        ax.set_xticks(
            [(i + 0.5) * table.num_experts for i in range(len(table.layers))],
            [f"layer {layer}" for layer in table.layers],
        )
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    axes[0, 0].set_title("trust - prior (nats) after each generation; columns: experts by layer")
    fig.tight_layout()
    return fig


def plot_slots_changed(records: list[dict]):
    """Fraction of (token, slot) pairs per layer whose expert differs from the router's."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    layers = sorted({int(layer) for r in records for layer in r["slots_changed"]})
    x = [r["generation"] for r in records]
    for layer in layers:
        ax.plot(
            x,
            [100 * r["slots_changed"][layer] for r in records],
            marker="o",
            ms=3,
            label=f"layer {layer}",
        )
    ax.set_xticks(x)
    ax.set_xlabel("generation (trust before its update)")
    ax.set_ylabel("expert slots changed\nvs router top-k (%)")
    ax.legend(frameon=False, fontsize=8, ncol=len(layers))
    fig.tight_layout()
    return fig
