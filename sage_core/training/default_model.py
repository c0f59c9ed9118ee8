"""The embedded default model: a tiny Qwen3-Omni thinker trained here, on CPU, on the corpus.

    python -m sage_core.training.default_model train [--out DIR] [--steps N] [--threads T]
    python -m sage_core.training.default_model metrics [--model DIR] [--write]

Sizes (`TINY_CONFIG`), and why:

- vocabulary 259: the byte tokenizer (256 bytes + bos, eos, pad); any text, no merges to learn.
- hidden 128, 4 layers, 4 query heads sharing 2 key/value heads (GQA) of head_dim 32: the
  smallest stack that still has every architectural feature of the real model, and a 4-step
  layer sweep (the real one is 48 layers). head_dim 32 gives 16 rotary frequencies, split
  (6, 5, 5) between the temporal, height and width rows, in the real model's 24:20:20 ratio.
- 32 experts, top-4, expert width 64, in every layer: the real model routes 8 of 128
  (1/16); 4 of 32 (1/8) keeps "many experts, a few chosen" while each expert still sees
  enough tokens in a short CPU run to be trained, and 32 experts keep the routing
  statistics (shares, per-context histograms) meaningful.
- rope_theta 1e4: the model only ever sees 256-byte windows; 1e6 would spend most rotary
  frequencies on wavelengths it never sees.
- 3.43M parameters, 13.7 MB in float32, under the 25 MB budget. The committed weights stay
  float32: they are then exactly the weights that were trained and evaluated, and bf16 is
  a `dtype=` argument of `load_thinker` away.

Training: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear warmup then
cosine decay to 10%, gradient clipping at 1, batches of random 256-byte windows of the
train split with the three contexts in equal shares, drawn from a seeded numpy generator,
plus the Switch/Qwen load-balancing loss so that no expert dies. It is applied per layer and
averaged (`balance_loss`), as in the Switch Transformer: transformers' Qwen-MoE pools the
router logits of all layers into one loss, which only balances the sum over layers of
"expert e". A first run with that pooled loss (otherwise identical) left experts below the share
floor on held-out text in every layer, some of them dead. Per layer, every expert keeps
its share (metrics.json: min_expert_share), and held-out bits per byte were slightly
better, not worse, than in the first run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sage_core.atomic import atomic_write_json, atomic_write_text
from sage_core.corpus import CONTEXTS, Corpus, load_corpus
from sage_core.model.config import ThinkerTextConfig
from sage_core.model.tokenizer import ByteTokenizer
from sage_core.paths import MODELS

TINY_DIR = MODELS / "q3omni-tiny"

TINY_CONFIG = ThinkerTextConfig(
    vocab_size=ByteTokenizer().vocab_size,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=0,  # no dense layer
    moe_intermediate_size=64,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    rope_theta=10_000.0,
    mrope_section=(6, 5, 5),
    mrope_interleaved=True,
    max_position_embeddings=1024,
)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.05
    threads: int = 2
    log_every: int = 25


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


class TrainableExperts(nn.Module):
    """Training-only expert provider: one parameter per expert.

    `ResidentExperts` stacks the experts into one [E, 2I, H] parameter; slicing it per
    expert makes autograd materialise a full-size zero gradient for every slice (E of them
    per layer per step), a large share of the step time. Separate parameters avoid it.
    `stack()` turns them back into the checkpoint's stacked tensors.
    """

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        super().__init__()
        self.num_experts = gate_up_proj.shape[0]
        self.gate_up = nn.ParameterList([nn.Parameter(w.clone()) for w in gate_up_proj])
        self.down = nn.ParameterList([nn.Parameter(w.clone()) for w in down_proj])

    def expert(self, e: int):
        return self.gate_up[e], self.down[e]

    def stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(list(self.gate_up)).detach(), torch.stack(list(self.down)).detach()


def build_model(seed: int):
    """The tiny thinker with seeded initial weights and trainable per-expert parameters."""
    from sage_core.model.thinker import Qwen3OmniThinker

    torch.manual_seed(seed)
    model = Qwen3OmniThinker(TINY_CONFIG)
    for block in model.sparse_blocks().values():
        block.experts = TrainableExperts(block.experts.gate_up_proj, block.experts.down_proj)
    return model


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict in the checkpoint key space (stacked experts)."""
    state = {}
    for key, value in model.state_dict().items():
        if ".mlp.experts." not in key:
            state[key] = value.detach().clone()
    for i, block in model.sparse_blocks().items():
        gate_up, down = block.experts.stack()
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up
        state[f"model.layers.{i}.mlp.experts.down_proj"] = down
    return state


def train_streams(corpus: Corpus, tokenizer: ByteTokenizer) -> dict[str, np.ndarray]:
    """Each context's train split as one token stream: [bos] + bytes, document after document."""
    streams = {}
    for context in CONTEXTS:
        ids = []
        for doc in corpus.documents(context, "train"):
            ids.extend(tokenizer.encode(doc, add_bos=True))
        streams[context] = np.asarray(ids, dtype=np.int64)
    return streams


def sample_batch(streams, rng: np.random.Generator, batch_size: int, seq_len: int):
    """Random windows; row r comes from context r mod 3, so every batch mixes them equally."""
    rows = []
    for r in range(batch_size):
        stream = streams[CONTEXTS[r % len(CONTEXTS)]]
        start = int(rng.integers(0, stream.size - seq_len - 1))
        rows.append(stream[start : start + seq_len + 1])
    batch = torch.from_numpy(np.stack(rows))
    return batch[:, :-1], batch[:, 1:]


def balance_loss(router_logits) -> torch.Tensor:
    """`load_balancing_loss` per sparse layer, averaged over layers (balanced: top_k)."""
    from sage_core.model.moe import load_balancing_loss

    E, k = TINY_CONFIG.num_experts, TINY_CONFIG.num_experts_per_tok
    return sum(load_balancing_loss([r], E, k) for r in router_logits) / len(router_logits)


@torch.no_grad()
def min_batch_share(router_logits) -> float:
    """The smallest share of top-k slots any expert of any layer got in this batch."""
    E, k = TINY_CONFIG.num_experts, TINY_CONFIG.num_experts_per_tok
    shares = [  # per layer (E,): router logits r (T, E) -> top-k slots (T*k,)
        torch.bincount(r.topk(k, dim=-1).indices.reshape(-1), minlength=E) / (r.shape[0] * k)
        for r in router_logits
    ]
    return float(torch.stack(shares).min())


def _optimizer(model, cfg: TrainConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
    )


def train_model(cfg: TrainConfig, corpus: Corpus, progress=True):
    """Train from scratch; returns (model, curve rows, wall seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_model(cfg, corpus, progress)
    finally:
        torch.set_num_threads(threads)


def _train_model(cfg: TrainConfig, corpus: Corpus, progress: bool):
    tokenizer = ByteTokenizer()
    streams = train_streams(corpus, tokenizer)
    model = build_model(cfg.seed).train()
    opt = _optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    curve, start = [], time.perf_counter()
    for step in range(cfg.steps):
        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        inputs, targets = sample_batch(streams, rng, cfg.batch_size, cfg.seq_len)
        logits, router_logits = model(inputs, output_router_logits=True)
        logits = logits.reshape(-1, logits.shape[-1])  # (B*T, vocab)
        lm_loss = F.cross_entropy(logits, targets.reshape(-1))  # targets (B*T,)
        aux = balance_loss(router_logits)
        loss = lm_loss + cfg.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            curve.append(
                {
                    "step": step,
                    "lr": lr,
                    "loss": lm_loss.item(),
                    "bits_per_byte": lm_loss.item() / math.log(2),
                    "aux_loss": aux.item(),
                    "min_batch_expert_share": min_batch_share(router_logits),
                    "elapsed_s": round(elapsed, 1),
                }
            )
            if progress:
                print(
                    f"step {step:5d}  lr {lr:.2e}  loss {lm_loss.item():.4f}  "
                    f"aux {aux.item():.3f}  min share {curve[-1]['min_batch_expert_share']:.4f}"
                    f"  {elapsed:7.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
    return model.eval(), curve, time.perf_counter() - start


def _curve_figure(curve, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sage_core.notebook.figures import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in curve], [r["bits_per_byte"] for r in curve], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (bits per byte)")
    ax.set_title("q3omni-tiny training curve (mixed contexts)")
    ax.grid(alpha=0.3)
    save_figure(fig, "training_curve", directory=directory)
    plt.close(fig)


def train_parts_sha256(corpus: Corpus) -> dict[str, str]:
    """{context: sha256 of its train part}: what training reads, recorded in
    training_config.json. A corpus whose held-out parts change (and with them the manifest's
    sha256) keeps these, so a model's training data can be checked without retraining."""
    return {c: corpus.manifest["parts"][f"{c}/train"]["sha256"] for c in CONTEXTS}


def compute_metrics(model_dir: Path | str, corpus: Corpus, threads: int | None = None) -> dict:
    """metrics.json for the checkpoint in `model_dir`, loaded through `load_thinker`."""
    from sage_core.checkpoint import load_thinker
    from sage_core.corpus.heldout import evaluate_heldout
    from sage_core.model.tokenizer import load_tokenizer

    if threads is not None:
        torch.set_num_threads(threads)
    model = load_thinker(model_dir)
    tokenizer = load_tokenizer(model_dir)
    metrics, _ = evaluate_heldout(model, corpus, tokenizer)
    metrics["corpus_manifest_sha256"] = corpus.sha256
    # A cheap fingerprint of the same evaluation that a fast test recomputes exactly.
    metrics["smoke_bits_per_byte"] = smoke_bits_per_byte(model, corpus, tokenizer)
    return metrics


SMOKE_BYTES = 4096


def smoke_bits_per_byte(model, corpus: Corpus, tokenizer) -> dict[str, float]:
    """Bits per byte on the first SMOKE_BYTES held-out bytes of each context."""
    from sage_core.corpus.heldout import heldout_documents, score_documents

    return {
        c: score_documents(
            model, heldout_documents(corpus, c, SMOKE_BYTES), tokenizer, c, route=False
        ).bits_per_byte
        for c in CONTEXTS
    }


def train(out_dir: Path | str = TINY_DIR, cfg: TrainConfig | None = None) -> dict:
    """Train, save in the real checkpoint layout, evaluate; returns metrics. Everything is
    staged in a sibling directory and swapped in at the end, so a crash leaves `out_dir`
    as it was."""
    from sage_core.checkpoint import save_thinker_checkpoint

    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    corpus = load_corpus()
    load_before = os.getloadavg()
    model, curve, wall = train_model(cfg, corpus)

    stage = out_dir.with_name(f".{out_dir.name}.staging-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    save_thinker_checkpoint(
        checkpoint_state_dict(model),
        TINY_CONFIG,
        stage,
        layout="thinker",
        experts="per_expert",
        num_shards=2,
        dtype=torch.float32,
    )
    ByteTokenizer().save(stage)
    atomic_write_json(
        stage / "training_config.json",
        {
            "train": asdict(cfg),
            "model_config": TINY_CONFIG.to_dict(),
            "model_config_sha256": TINY_CONFIG.config_hash(),
            "corpus_manifest_sha256": corpus.sha256,
            "corpus_train_sha256": train_parts_sha256(corpus),
            "corpus_config": corpus.manifest["config"],
            "python_version": platform.python_version(),
            "torch_version": torch.__version__,
        },
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(curve[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(curve)
    atomic_write_text(stage / "training_curve.csv", buf.getvalue())
    _curve_figure(curve, stage)

    eval_start = time.perf_counter()
    metrics = compute_metrics(stage, corpus)
    metrics["training_run"] = {
        "wall_seconds": round(wall, 1),
        "eval_wall_seconds": round(time.perf_counter() - eval_start, 1),
        "threads": cfg.threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load_before],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "final_train_bits_per_byte": curve[-1]["bits_per_byte"],
    }
    atomic_write_json(stage / "metrics.json", metrics)

    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(stage, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(stage, out_dir)
    return metrics


def rewrite_metrics(model_dir: Path | str = TINY_DIR, threads: int | None = 1) -> dict:
    """Recompute metrics.json of a trained checkpoint on the current corpus and write it,
    keeping its `training_run` record: for a corpus whose held-out parts changed while its
    train parts did not (training_config.json's `corpus_train_sha256`). Anything else is
    an error: a model trained on other data has to be retrained."""
    model_dir = Path(model_dir)
    corpus = load_corpus()
    training = json.loads((model_dir / "training_config.json").read_text(encoding="utf-8"))
    recorded = training.get("corpus_train_sha256")
    if recorded != train_parts_sha256(corpus):
        raise ValueError(
            f"{model_dir}: trained on train parts {recorded}, the corpus holds "
            f"{train_parts_sha256(corpus)}; retrain instead of rewriting its metrics"
        )
    metrics = compute_metrics(model_dir, corpus, threads)
    old = json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))
    if "training_run" in old:
        metrics["training_run"] = old["training_run"]
    atomic_write_json(model_dir / "metrics.json", metrics)
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sage_core.training.default_model")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train the tiny model and write its checkpoint")
    p.add_argument("--out", default=str(TINY_DIR), help=f"output directory (default {TINY_DIR})")
    defaults = TrainConfig()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="torch threads (1 is faster on a machine shared with other jobs)",
    )
    p.add_argument("--aux-loss-coef", type=float, default=defaults.aux_loss_coef)
    m = commands.add_parser("metrics", help="recompute metrics.json values for a checkpoint")
    m.add_argument("--model", default=str(TINY_DIR))
    m.add_argument(
        "--write",
        action="store_true",
        help="write them to its metrics.json (only if its train data are the corpus's)",
    )
    m.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(
            defaults,
            steps=args.steps,
            seed=args.seed,
            threads=args.threads,
            aux_loss_coef=args.aux_loss_coef,
        )
        metrics = train(args.out, cfg)
    elif args.write:
        metrics = rewrite_metrics(args.model, args.threads)
    else:
        metrics = compute_metrics(args.model, load_corpus(), args.threads)
    summary = {k: metrics[k] for k in ("bits_per_byte", "ngram_order2_bits_per_byte")}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
