"""Experiment protocol (sage_core.studies.experiments): inputs, scoring, an end-to-end tiny run."""

import warnings

import numpy as np
import pytest
import torch
from checkpoints import toy_config

from sage_core.corpus import CONTEXTS, CorpusConfig, load_corpus
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.model.tokenizer import ByteTokenizer
from sage_core.studies.experiments import (
    ContextAssigner,
    first_last_effect,
    make_samples,
    moe_input_states,
    prompt_features,
    run_generations,
    score_continuation,
    trust_changes,
)
from sage_core.trust import TrustLearner, TrustSelector, TrustTable

CONFIG = toy_config(
    num_experts=6,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a Python other than the reference one warns
        return load_corpus(tmp_path_factory.mktemp("corpus"), CorpusConfig().scaled(0.01))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Qwen3OmniThinker(CONFIG).eval()


# --- inputs and scoring --------------------------------------------------------------------


def test_make_samples_interleaves_contexts_and_is_seeded(corpus):
    tok = ByteTokenizer()
    a = make_samples(tok, "heldout", 2, 8, 5, seed=0, corpus=corpus)
    b = make_samples(tok, "heldout", 2, 8, 5, seed=0, corpus=corpus)
    c = make_samples(tok, "heldout", 2, 8, 5, seed=1, corpus=corpus)
    assert [s.context for s in a] == list(CONTEXTS) * 2
    assert all(s.prompt.numel() == 8 and s.continuation.numel() == 5 for s in a)
    assert [(s.document, s.offset) for s in a] == [(s.document, s.offset) for s in b]
    assert [(s.document, s.offset) for s in a] != [(s.document, s.offset) for s in c]
    doc = corpus.documents(a[0].context, "heldout")[a[0].document]
    ids = tok.encode(doc)[a[0].offset : a[0].offset + 13]
    assert torch.cat([a[0].prompt, a[0].continuation]).tolist() == ids
    many = make_samples(tok, "heldout", 50, 8, 5, seed=0, corpus=corpus)  # documents reused
    assert len(many) == 150
    with pytest.raises(ValueError, match="heldout"):
        make_samples(tok, "heldout", 1, 8, 10**7, seed=0, corpus=corpus)


def test_moe_input_states_is_the_first_moe_blocks_input(model):
    ids = torch.arange(10)[None]
    seen = {}
    block = model.sparse_blocks()[0]

    def hook(module, args, output):
        seen["x"] = args[0]

    handle = block.register_forward_hook(hook)
    try:
        model.hidden_states(ids)
    finally:
        handle.remove()
    assert torch.equal(moe_input_states(model, ids), seen["x"])


def test_score_continuation_is_teacher_forced_nll(model, corpus):
    sample = make_samples(ByteTokenizer(), "heldout", 1, 6, 4, seed=0, corpus=corpus)[0]
    nll, routing = score_continuation(model, sample, with_routing=True)
    ids = torch.cat([sample.prompt, sample.continuation])[None]
    logits = model(ids)[0, 5:9]
    want = torch.nn.functional.cross_entropy(logits, sample.continuation, reduction="none")
    assert torch.allclose(nll, want, atol=1e-5)
    assert sorted(routing) == [0, 1]
    assert all(r.shape == (4, 6) for r in routing.values())
    assert all(torch.allclose(r.sum(-1), torch.ones(4)) for r in routing.values())


def test_classifier_in_the_loop_reports_accuracy_and_purity(model, corpus):
    tok = ByteTokenizer()
    train = make_samples(tok, "train", 3, 16, 4, seed=0, corpus=corpus)
    held = make_samples(tok, "heldout", 2, 16, 4, seed=0, corpus=corpus)
    for mode in ("supervised", "kmeans"):
        assigner = ContextAssigner.fit(model, train, mode, seed=0)
        stats = assigner.evaluate(model, held)
        assert stats["mode"] == mode and stats["samples"] == 6
        # the reported numbers, recomputed by hand from each prompt's own assignment
        assigned = [assigner.assign(model, s.prompt) for s in held]
        accuracy = sum(a == s.context for a, s in zip(assigned, held, strict=True)) / len(held)
        assert stats["accuracy"] == pytest.approx(accuracy)
        feats = np.concatenate([prompt_features(model, s.prompt) for s in held])
        raw = assigner.classifier.predict(feats)
        majority = sum(
            max(sum(1 for r, s in zip(raw, held) if r == k and s.context == c) for c in CONTEXTS)
            for k in set(raw.tolist())
        )
        assert stats["purity"] == pytest.approx(majority / len(held))


# --- end to end ----------------------------------------------------------------------------


def test_generations_baseline_and_trust(model, corpus):
    tok = ByteTokenizer()
    samples = make_samples(tok, "heldout", 1, 8, 6, seed=0, corpus=corpus)
    base = run_generations(model, tok, samples, max_new_tokens=3, show_progress=False)
    table = TrustTable.for_model(model, CONTEXTS)
    selector = TrustSelector.for_model(model, table, beta=5.0)
    trust = run_generations(
        model,
        tok,
        samples,
        selector,
        TrustLearner(table, 1.0),
        max_new_tokens=3,
        show_progress=False,
    )
    assert [r["arm"] for r in base["records"]] == ["baseline"] * 3
    first = trust["records"][0]
    assert first["perplexity"] == base["records"][0]["perplexity"]  # neutral trust
    assert set(first["slots_changed"].values()) == {0.0}
    assert len(trust["trust"]) == 3 and not trust["trust"][-1].is_neutral()
    for record, change in zip(trust["records"], trust_changes(trust["trust"]), strict=True):
        assert change["contexts"] == [record["assigned"]]
        for layer, experts in change["experts"].items():
            assert set(experts) <= set(record["experts_used"][layer])
    assert first_last_effect(base["records"], n=1)["first"] == base["records"][0]["perplexity"]


def test_verdict_reads_the_ci():
    from sage_core.studies.experiments import verdict

    assert verdict({"ci_low": -0.03, "ci_high": -0.01}) == "improvement"
    assert verdict({"ci_low": 0.01, "ci_high": 0.03}) == "harm"
    assert verdict({"ci_low": -0.01, "ci_high": 0.02}) == "inconclusive"
