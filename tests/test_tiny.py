"""The committed tiny model: real layout, loads through load_thinker, metrics consistent.

The slow test retrains it from scratch and checks the metrics reproduce (not in make test).
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from sage_core.checkpoint import load_thinker
from sage_core.corpus import CONTEXTS, load_corpus, load_snapshot
from sage_core.corpus.heldout import fit_ngram, heldout_documents
from sage_core.model.config import read_config
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.model.tokenizer import ByteTokenizer, load_tokenizer
from sage_core.training.default_model import (
    TINY_CONFIG,
    TINY_DIR,
    TrainConfig,
    build_model,
    checkpoint_state_dict,
    learning_rate,
    rewrite_metrics,
    sample_batch,
    smoke_bits_per_byte,
    train_model,
    train_parts_sha256,
)

MAX_BYTES = 25 * 1024 * 1024
REPRO_TOLERANCE_BPB = 0.03  # retraining reproduces each held-out bits-per-byte within this


@pytest.fixture(scope="module")
def metrics():
    return json.loads((TINY_DIR / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    return load_thinker(TINY_DIR)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture
def one_thread():
    # Two torch threads on a CPU shared with other jobs can stall for seconds per matmul;
    # one thread degrades gracefully. The result differs only in the last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _same_corpus(corpus, metrics):
    if corpus.sha256 != metrics["corpus_manifest_sha256"]:
        pytest.skip("this Python builds a different corpus than the one the model was measured on")


def test_config_is_the_tiny_config_in_the_nested_layout():
    raw = json.loads((TINY_DIR / "config.json").read_text())
    assert raw["model_type"] == "qwen3_omni_moe"
    assert "text_config" in raw["thinker_config"]
    assert read_config(TINY_DIR) == TINY_CONFIG
    assert 2 * sum(TINY_CONFIG.mrope_section) == TINY_CONFIG.head_dim
    assert TINY_CONFIG.num_attention_heads > TINY_CONFIG.num_key_value_heads  # GQA


def test_checkpoint_is_sharded_in_the_real_layout():
    index = json.loads((TINY_DIR / "model.safetensors.index.json").read_text())
    keys, shards = set(index["weight_map"]), set(index["weight_map"].values())
    assert len(shards) >= 2 and all((TINY_DIR / s).is_file() for s in shards)
    assert all(k.startswith("thinker.") for k in keys)
    assert {
        "thinker.lm_head.weight",
        "thinker.model.embed_tokens.weight",
        "thinker.model.norm.weight",
    } <= keys
    last, e = TINY_CONFIG.num_hidden_layers - 1, TINY_CONFIG.num_experts - 1
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"thinker.model.layers.{last}.mlp.experts.{e}.{name}.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)  # per-expert, not fused
    size = sum(p.stat().st_size for p in TINY_DIR.iterdir() if p.is_file())
    assert size <= MAX_BYTES


def test_loads_and_runs_through_load_thinker(tiny):
    assert isinstance(tiny, Qwen3OmniThinker)
    ids = torch.tensor([ByteTokenizer().encode("def add(a, b):\n    return", add_bos=True)])
    logits = tiny(ids)
    assert logits.shape == (1, ids.shape[1], TINY_CONFIG.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    pos = torch.arange(ids.shape[1])[None]
    torch.testing.assert_close(tiny(ids, position_ids=pos.expand(3, 1, -1)), logits)
    assert load_tokenizer(TINY_DIR) == ByteTokenizer()


def test_metrics_fields_are_present_and_consistent(metrics):
    for c in CONTEXTS:
        assert metrics["bits_per_byte"][c] < metrics["ngram_order2_bits_per_byte"][c], c
        assert metrics["bytes_scored"][c] > 100_000
    assert metrics["beats_ngram_in_every_context"] is True
    routing = metrics["routing"]
    layers = [str(i) for i in range(TINY_CONFIG.num_hidden_layers)]
    assert sorted(routing["min_expert_share"]) == layers
    for layer in layers:
        pooled = np.array(routing["expert_share_all_contexts"][layer])
        assert pooled.shape == (TINY_CONFIG.num_experts,)
        assert pooled.sum() == pytest.approx(1.0)
        assert routing["min_expert_share"][layer] == pytest.approx(pooled.min())
        assert routing["min_expert_share"][layer] >= 0.005  # no dead expert
        for c in CONTEXTS:
            assert sum(routing["expert_share"][layer][c]) == pytest.approx(1.0)
        assert set(routing["js_divergence"][layer]) == {
            "code|reasoning",
            "code|text",
            "reasoning|text",
        }
        assert all(0 <= v <= 1 for v in routing["js_divergence"][layer].values())
    training = json.loads((TINY_DIR / "training_config.json").read_text())
    assert training["corpus_train_sha256"] == train_parts_sha256(load_snapshot())
    assert training["model_config_sha256"] == TINY_CONFIG.config_hash()


def test_metrics_are_rewritten_only_for_the_data_the_model_was_trained_on(tmp_path):
    model_dir = tmp_path / "tiny"
    shutil.copytree(TINY_DIR, model_dir)
    training = json.loads((model_dir / "training_config.json").read_text())
    training["corpus_train_sha256"]["code"] = "0" * 64
    (model_dir / "training_config.json").write_text(json.dumps(training))
    before = (model_dir / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match="retrain"):
        rewrite_metrics(model_dir)
    assert (model_dir / "metrics.json").read_bytes() == before


def test_smoke_metrics_reproduce_from_the_committed_weights(tiny, corpus, metrics, one_thread):
    _same_corpus(corpus, metrics)
    smoke = smoke_bits_per_byte(tiny, corpus, ByteTokenizer())
    for c in CONTEXTS:
        assert smoke[c] == pytest.approx(metrics["smoke_bits_per_byte"][c], abs=1e-4), c


def test_ngram_baseline_reproduces(corpus, metrics):
    _same_corpus(corpus, metrics)
    ngram = fit_ngram(corpus)
    for c in CONTEXTS:
        bpb = ngram.bits_per_byte(heldout_documents(corpus, c))
        assert bpb == pytest.approx(metrics["ngram_order2_bits_per_byte"][c], abs=1e-9)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_ratio=0.1)
    lrs = [learning_rate(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-5)
    assert max(lrs) == pytest.approx(1e-3) == lrs[99]
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-3)


def test_batches_are_seeded_and_mix_the_contexts():
    streams = {c: np.full(1000, i, dtype=np.int64) for i, c in enumerate(CONTEXTS)}
    a = sample_batch(streams, np.random.default_rng(3), 6, 16)
    b = sample_batch(streams, np.random.default_rng(3), 6, 16)
    torch.testing.assert_close(a, b)
    inputs, targets = a
    assert inputs.shape == targets.shape == (6, 16)
    assert inputs[:, 0].tolist() == [0, 1, 2, 0, 1, 2]


def test_training_state_dict_has_the_model_key_space():
    trained = checkpoint_state_dict(build_model(0))
    reference = Qwen3OmniThinker(TINY_CONFIG).state_dict()
    assert trained.keys() == reference.keys()
    for key, value in reference.items():
        assert trained[key].shape == value.shape, key


def test_a_few_training_steps_are_deterministic_and_learn(corpus):
    cfg = TrainConfig(steps=6, batch_size=3, seq_len=32, warmup_steps=2, log_every=1, threads=1)
    model_a, curve_a, _ = train_model(cfg, corpus, progress=False)
    model_b, curve_b, _ = train_model(cfg, corpus, progress=False)
    assert [r["loss"] for r in curve_a] == [r["loss"] for r in curve_b]
    assert curve_a[-1]["loss"] < curve_a[0]["loss"]
    sd_a, sd_b = checkpoint_state_dict(model_a), checkpoint_state_dict(model_b)
    for key in sd_a:
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=0, atol=0)


@pytest.mark.slow
def test_retraining_reproduces_the_committed_metrics(tmp_path, metrics):
    from sage_core.training.default_model import train

    training = json.loads((TINY_DIR / "training_config.json").read_text())
    cfg = dataclasses.replace(
        TrainConfig(),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in training["train"].items()},
    )
    again = train(tmp_path / "tiny", cfg)
    assert again["corpus_manifest_sha256"] == metrics["corpus_manifest_sha256"]
    for c in CONTEXTS:
        assert again["bits_per_byte"][c] == pytest.approx(
            metrics["bits_per_byte"][c], abs=REPRO_TOLERANCE_BPB
        ), c
    assert again["beats_ngram_in_every_context"]
    assert min(again["routing"]["min_expert_share"].values()) >= 0.005
