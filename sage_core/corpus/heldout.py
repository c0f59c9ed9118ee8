"""Held-out quality and routing statistics, per context: what metrics.json and notebook 03 report.

One pass over a context's held-out documents gives both: the bits each byte costs
(teacher-forced) and which experts every token was routed to, layer by layer. From those:

- bits per byte per context, next to the order-2 byte baseline on the same bytes;
- each expert's share of the routing (top-k slots) per layer;
- how differently contexts route: the Jensen-Shannon divergence (base 2, in [0, 1])
  between per-context expert histograms, per layer, next to a null: the same divergence
  between two halves of one context's documents (even vs odd documents). Routing is called
  context-dependent in a layer only if every between-context divergence exceeds every
  within-context one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from sage_core.corpus import CONTEXTS, Corpus
from sage_core.corpus.ngram import ByteTrigramModel
from sage_core.model.generation import window_plan

LOG2E = 1.0 / math.log(2.0)
HEAD_CHUNK = 1024  # rows through the lm head at once: bounds logits memory for a 152k vocabulary


def heldout_documents(corpus: Corpus, context: str, max_bytes: int | None = None) -> list[str]:
    """The context's held-out documents, in order, cut to at most `max_bytes` UTF-8 bytes
    (the last one truncated at a character boundary). None keeps them all."""
    docs = corpus.documents(context, "heldout")
    if max_bytes is None:
        return docs
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    out, used = [], 0
    for doc in docs:
        data = doc.encode("utf-8")
        if used + len(data) > max_bytes:
            cut = data[: max_bytes - used].decode("utf-8", errors="ignore")
            if cut:
                out.append(cut)
            break
        out.append(doc)
        used += len(data)
    return out


def document_stream(documents, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, doc_of): every document as [bos] + its tokens, concatenated; doc_of[t] is the
    document index of token t."""
    ids, doc_of = [], []
    for d, doc in enumerate(documents):
        toks = tokenizer.encode(doc, add_bos=True)
        ids.extend(toks)
        doc_of.extend([d] * len(toks))
    return np.asarray(ids, dtype=np.int64), np.asarray(doc_of, dtype=np.int64)


@dataclass
class ContextPass:
    """Per scored token of one context: its bits, its document, its routing per layer."""

    context: str
    bits: np.ndarray  # (N,) float64, -log2 p(target token)
    doc_of: np.ndarray  # (N,) document index of the target
    num_bytes: int  # UTF-8 bytes of the scored text (= N for the byte tokenizer)
    routing: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (N, k) expert ids

    @property
    def bits_per_byte(self) -> float:
        return float(self.bits.sum() / self.num_bytes)

    @property
    def perplexity(self) -> float:
        """Per token: 2 ** (mean bits per token)."""
        return float(2.0 ** (self.bits.sum() / self.bits.size))


@torch.no_grad()
def score_documents(
    model,
    documents,
    tokenizer,
    context: str = "",
    window: int = 256,
    stride: int | None = None,
    batch_size: int = 16,
    route: bool = True,
) -> ContextPass:
    """Teacher-forced bits of every non-special target token, and (route=True) the experts
    chosen for the token that predicts it. Bits per byte divide by the documents' UTF-8
    bytes, so they compare across tokenizers (for the byte tokenizer, tokens are bytes)."""
    stride = stride or window // 2
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window, got stride={stride}, window={window}")
    ids, doc_of = document_stream(documents, tokenizer)
    if ids.size < 2:
        raise ValueError(f"{context or 'documents'}: need at least one token to score")
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} - {None}
    plan = window_plan(ids.size, window, stride)
    length = min(window, ids.size)
    device = model.model.embed_tokens.weight.device
    bits, targets_of, routing = [], [], {}
    for b in range(0, len(plan), batch_size):
        chunk = plan[b : b + batch_size]
        batch = torch.from_numpy(np.stack([ids[s:end] for s, end, _ in chunk])).to(device)
        # predictor row (window, position) for every target scored in this batch
        rows, targets = [], []
        for w, (s, end, first) in enumerate(chunk):
            t = np.arange(first, end)
            t = t[~np.isin(ids[t], list(special))]
            rows.append(np.stack([np.full(t.size, w), t - 1 - s], axis=1))
            targets.append(t)
        rows, targets = np.concatenate(rows), np.concatenate(targets)
        if route:
            with model.routing_trace() as trace:
                hidden = model.hidden_states(batch)
            for layer, calls in trace.items():
                chosen = calls[-1][0].reshape(len(chunk), length, -1)  # (windows, T, k)
                routing.setdefault(layer, []).append(chosen[rows[:, 0], rows[:, 1]].to(torch.uint8))
        else:
            hidden = model.hidden_states(batch)
        pred = hidden[torch.from_numpy(rows[:, 0]), torch.from_numpy(rows[:, 1])]
        tgt = torch.from_numpy(ids[targets]).to(device)
        for i in range(0, tgt.shape[0], HEAD_CHUNK):
            logp = torch.log_softmax(model.lm_head(pred[i : i + HEAD_CHUNK]).float(), dim=-1)
            nll = -logp.gather(1, tgt[i : i + HEAD_CHUNK, None])[:, 0]
            bits.append(nll.cpu().numpy().astype(np.float64) * LOG2E)
        targets_of.append(targets)
    targets = np.concatenate(targets_of)
    return ContextPass(
        context=context,
        bits=np.concatenate(bits),
        doc_of=doc_of[targets],
        num_bytes=sum(len(d.encode("utf-8")) for d in documents),
        routing={k: torch.cat(v).numpy() for k, v in routing.items()},
    )


def expert_histogram(chosen: np.ndarray, num_experts: int) -> np.ndarray:
    """Share of top-k slots each expert received, (E,) summing to 1."""
    counts = np.bincount(chosen.reshape(-1).astype(np.int64), minlength=num_experts)
    return counts / max(1, counts.sum())


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint support)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def routing_statistics(passes: dict[str, ContextPass], num_experts: int) -> dict:
    """Expert shares per layer and context, and the Jensen-Shannon divergences between
    contexts next to the within-context (even vs odd documents) null."""
    layers = sorted(next(iter(passes.values())).routing)
    shares, pooled, jsd, null, min_share, dependent = {}, {}, {}, {}, {}, {}
    for layer in layers:
        hist = {c: expert_histogram(p.routing[layer], num_experts) for c, p in passes.items()}
        all_chosen = np.concatenate([p.routing[layer] for p in passes.values()])
        pooled[layer] = expert_histogram(all_chosen, num_experts)
        shares[layer] = hist
        min_share[layer] = float(pooled[layer].min())
        jsd[layer] = {
            f"{a}|{b}": js_divergence(hist[a], hist[b])
            for a, b in itertools.combinations(sorted(passes), 2)
        }
        null[layer] = {}
        for c, p in passes.items():
            even = p.routing[layer][p.doc_of % 2 == 0]
            odd = p.routing[layer][p.doc_of % 2 == 1]
            if even.size and odd.size:
                null[layer][c] = js_divergence(
                    expert_histogram(even, num_experts), expert_histogram(odd, num_experts)
                )
        dependent[layer] = bool(null[layer]) and min(jsd[layer].values()) > max(
            null[layer].values()
        )
    return {
        "expert_share": {
            str(layer): {c: shares[layer][c].tolist() for c in sorted(shares[layer])}
            for layer in layers
        },
        "expert_share_all_contexts": {str(k): v.tolist() for k, v in pooled.items()},
        "min_expert_share": {str(k): v for k, v in min_share.items()},
        "js_divergence": {str(k): v for k, v in jsd.items()},
        "js_divergence_within_context": {str(k): v for k, v in null.items()},
        "context_dependent_routing": {str(k): v for k, v in dependent.items()},
    }


def fit_ngram(corpus: Corpus) -> ByteTrigramModel:
    """The order-2 byte baseline on the same train split as the model (all contexts mixed)."""
    return ByteTrigramModel().fit(
        itertools.chain.from_iterable(corpus.documents(c, "train") for c in CONTEXTS)
    )


def evaluate_heldout(
    model,
    corpus: Corpus,
    tokenizer,
    max_bytes: int | None = None,
    window: int = 256,
    batch_size: int = 16,
    ngram: ByteTrigramModel | None = None,
) -> tuple[dict, dict[str, ContextPass]]:
    """Bits per byte per context for `model` and the order-2 baseline on the same held-out
    bytes, plus routing statistics. Returns (metrics dict, the per-context passes)."""
    ngram = ngram or fit_ngram(corpus)
    passes, bpb, ngram_bpb, scored = {}, {}, {}, {}
    for context in CONTEXTS:
        docs = heldout_documents(corpus, context, max_bytes)
        passes[context] = p = score_documents(
            model, docs, tokenizer, context, window=window, batch_size=batch_size
        )
        bits, n = ngram.total_bits(docs)
        if n != p.num_bytes:
            raise RuntimeError(f"{context}: model scored {p.num_bytes} bytes, n-gram {n}")
        bpb[context], ngram_bpb[context], scored[context] = p.bits_per_byte, bits / n, n
    metrics = {
        "bits_per_byte": bpb,
        "ngram_order2_bits_per_byte": ngram_bpb,
        "bytes_scored": scored,
        "beats_ngram_in_every_context": all(bpb[c] < ngram_bpb[c] for c in CONTEXTS),
        "eval": {"window": window, "stride": window // 2, "max_bytes_per_context": max_bytes},
    }
    if passes[CONTEXTS[0]].routing:
        metrics["routing"] = routing_statistics(passes, model.config.num_experts)
    return metrics, passes
