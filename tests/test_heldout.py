"""Held-out scoring and routing statistics (sage_core.corpus.heldout) on small, fast models."""

import lzma
import math

import numpy as np
import pytest
import torch
from checkpoints import toy_config

from sage_core.corpus import Corpus
from sage_core.corpus import build as corpus_build
from sage_core.corpus.heldout import (
    ContextPass,
    document_stream,
    heldout_documents,
    js_divergence,
    routing_statistics,
    score_documents,
)
from sage_core.model.generation import perplexity, window_plan
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.model.tokenizer import ByteTokenizer

CFG = toy_config(
    rope_theta=10000.0,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Qwen3OmniThinker(CFG).eval()


@pytest.mark.parametrize(
    "n,window,stride", [(2, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 3), (97, 16, 8)]
)
def test_window_plan_scores_every_target_once(n, window, stride):
    scored = []
    for start, end, first in window_plan(n, window, stride):
        assert end - start == min(window, n)
        assert first - start >= min(window - stride, first) or start == 0
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_scores_match_teacher_forced_perplexity(model):
    tok = ByteTokenizer()
    doc = "def f(x):\n    return x * 2  # doubled\n" * 3  # 117 bytes: several windows
    p = score_documents(model, [doc], tok, window=32, stride=16, batch_size=3)
    ids, _ = document_stream([doc], tok)
    ref = perplexity(model, torch.from_numpy(ids), window=32, stride=16)
    assert p.bits.size == ref.num_tokens == len(doc.encode())
    assert p.bits.sum() * math.log(2) == pytest.approx(ref.mean_nll * ref.num_tokens, rel=1e-5)
    assert p.bits_per_byte == pytest.approx(p.bits.mean())


def test_document_boundaries_are_not_scored_and_routing_is_recorded(model):
    tok = ByteTokenizer()
    docs = ["abc", "héllo"]  # 3 + 6 bytes
    p = score_documents(model, docs, tok, window=8, stride=4)
    assert p.num_bytes == 9 and p.bits.size == 9  # the second bos is never a target
    assert p.doc_of.tolist() == [0] * 3 + [1] * 6
    assert sorted(p.routing) == [0, 1]
    for chosen in p.routing.values():
        assert chosen.shape == (9, CFG.num_experts_per_tok)
        assert chosen.max() < CFG.num_experts


def test_js_divergence_properties():
    p, q = np.array([0.5, 0.5, 0, 0]), np.array([0, 0, 0.5, 0.5])
    assert js_divergence(p, p) == 0.0
    assert js_divergence(p, q) == pytest.approx(1.0)
    r = np.array([0.4, 0.3, 0.2, 0.1])
    assert js_divergence(p, r) == pytest.approx(js_divergence(r, p))
    assert 0 < js_divergence(p, r) < 1


def _pass(context, chosen, docs):
    return ContextPass(
        context,
        np.ones(len(chosen)),
        np.asarray(docs),
        len(chosen),
        {0: np.asarray(chosen, dtype=np.uint8)},
    )


def test_routing_statistics_tell_context_dependent_from_not():
    rng = np.random.default_rng(0)
    n = 4000
    docs = np.repeat(np.arange(40), n // 40)
    low = rng.integers(0, 4, size=(n, 2))  # context a uses experts 0-3
    high = rng.integers(4, 8, size=(n, 2))  # context b uses experts 4-7
    stats = routing_statistics({"a": _pass("a", low, docs), "b": _pass("b", high, docs)}, 8)
    assert stats["js_divergence"]["0"]["a|b"] == pytest.approx(1.0)
    assert stats["context_dependent_routing"]["0"] is True
    assert sum(stats["expert_share"]["0"]["a"]) == pytest.approx(1.0)
    assert stats["min_expert_share"]["0"] == pytest.approx(
        min(stats["expert_share_all_contexts"]["0"])
    )
    same = rng.integers(0, 8, size=(n, 2))
    also = rng.integers(0, 8, size=(n, 2))
    stats = routing_statistics({"a": _pass("a", same, docs), "b": _pass("b", also, docs)}, 8)
    assert stats["js_divergence"]["0"]["a|b"] < 0.01


def test_heldout_documents_truncate_on_a_character_boundary(tmp_path):
    part = corpus_build.part_path(tmp_path, corpus_build.part_name("text", "heldout"))
    part.write_bytes(lzma.compress('"aé"\n"bbbb"\n'.encode()))
    c = Corpus(tmp_path, {})
    assert heldout_documents(c, "text") == ["aé", "bbbb"]
    assert heldout_documents(c, "text", 2) == ["a"]  # é is two bytes: cut before it
    assert heldout_documents(c, "text", 5) == ["aé", "bb"]
    with pytest.raises(ValueError, match="max_bytes"):
        heldout_documents(c, "text", 0)
