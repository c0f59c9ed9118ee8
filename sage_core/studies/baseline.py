"""Notebook 03, the router-only baseline: layers kept vs quality, and greedy generations.

Held-out scoring and routing statistics themselves live in `sage_core.corpus.heldout`.
"""

from __future__ import annotations

import numpy as np
import torch

from sage_core.corpus import CONTEXTS, Corpus
from sage_core.corpus.heldout import heldout_documents, score_documents


def layer_sweep(
    model_path,
    corpus: Corpus,
    tokenizer,
    layer_counts,
    max_bytes: int | None = 16_384,
    device="cpu",
    dtype=torch.float32,
    window: int = 256,
) -> dict[int, dict[str, float]]:
    """Held-out bits per byte per context for the model cut to its first n layers (final
    norm and lm head kept), for each n in `layer_counts`: the report's "multi-layer testing"."""
    from sage_core.checkpoint import load_thinker

    out = {}
    for n in layer_counts:
        model = load_thinker(model_path, layers=int(n), device=device, dtype=dtype)
        out[int(n)] = {
            c: score_documents(
                model,
                heldout_documents(corpus, c, max_bytes),
                tokenizer,
                c,
                window=window,
                route=False,
            ).bits_per_byte
            for c in CONTEXTS
        }
        del model
    return out


def sweep_layer_counts(num_layers: int) -> list[int]:
    """1, 2, ..., N for a small model; 1, 3, 5, ..., N for a deep one (the report's sweep)."""
    if num_layers <= 8:
        return list(range(1, num_layers + 1))
    return sorted(set(range(1, num_layers + 1, 2)) | {num_layers})


# ------------------------------------------------------------------- generation helpers


def heldout_prompts(corpus: Corpus, n: int, prompt_bytes: int = 96, seed: int = 0):
    """`n` (context, prompt) pairs cycling through the contexts: prompt i is `prompt_bytes`
    bytes of held-out document i // 3 of its context, starting at a seeded line start."""
    import random

    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        context = CONTEXTS[i % len(CONTEXTS)]
        docs = corpus.documents(context, "heldout")
        doc = docs[(i // len(CONTEXTS)) % len(docs)]
        data = doc.encode("utf-8")
        starts = [0] + [j + 1 for j, b in enumerate(data[:-prompt_bytes]) if b == 0x0A]
        start = rng.choice(starts)
        prompt = data[start : start + prompt_bytes].decode("utf-8", errors="ignore")
        prompts.append((context, prompt))
    return prompts


def greedy_generations(
    model, tokenizer, prompts, max_new_tokens: int, compile: bool = False
) -> list[dict]:
    """Greedy continuation of each (context, prompt); records with the decoded text.
    compile: passed to `generate` (the compiled static-cache decode step)."""
    from sage_core.model.generation import generate

    device = model.model.embed_tokens.weight.device
    out = []
    for context, prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)], device=device)
        new = generate(model, ids, max_new_tokens, compile=compile)[0, ids.shape[1] :].tolist()
        out.append(
            {
                "context": context,
                "prompt": prompt,
                "tokens": new,
                "continuation": tokenizer.decode(new),
            }
        )
    return out


# ------------------------------------------------------------------------------ figures


def plot_expert_usage(routing: dict, num_experts: int):
    """Heatmaps of expert shares (layers x experts), one panel per context."""
    import matplotlib.pyplot as plt

    layers = sorted(routing["expert_share"], key=int)
    contexts = sorted(routing["expert_share"][layers[0]])
    grids = {c: np.array([routing["expert_share"][layer][c] for layer in layers]) for c in contexts}
    vmax = max(g.max() for g in grids.values())
    fig, axes = plt.subplots(
        len(contexts),
        1,
        figsize=(8, 1.2 + 0.45 * len(layers) * len(contexts)),
        sharex=True,
        squeeze=False,
    )
    for ax, c in zip(axes[:, 0], contexts):
        im = ax.imshow(
            grids[c], aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest"
        )
        ax.set_ylabel(f"{c}\nlayer")
        ax.set_yticks(range(len(layers)), layers)
    axes[-1, 0].set_xlabel(f"expert (of {num_experts})")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of top-k slots")
    fig.suptitle("Expert usage on held-out text, per context and layer")
    return fig


def plot_layer_sweep(sweep: dict[int, dict[str, float]], baseline: dict[str, float] | None = None):
    """Held-out bits per byte against layers kept, one line per context; dashed: baseline."""
    import matplotlib.pyplot as plt

    counts = sorted(sweep)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, c in enumerate(sorted(sweep[counts[0]])):
        (line,) = ax.plot(counts, [sweep[n][c] for n in counts], marker="o", label=c, color=f"C{i}")
        if baseline is not None:
            ax.axhline(baseline[c], ls="--", lw=1, color=line.get_color())
    ax.set_xlabel("decoder layers kept (the first n)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_xticks(counts)
    title = "Layers kept vs held-out quality"
    ax.set_title(title + (" (dashed: order-2 byte model)" if baseline else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
