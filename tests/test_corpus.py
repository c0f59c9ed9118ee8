"""Corpus: deterministic, split by document, manifest complete."""

import hashlib
import json
import platform
import random

import pytest

from sage_core.corpus import CONTEXTS, SPLITS, CorpusConfig, build_corpus, load_corpus
from sage_core.corpus import build as corpus

SMALL = CorpusConfig().scaled(0.02)  # ~24 KB train, ~4 KB held-out per context


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus_a"), SMALL)


def test_two_builds_are_byte_identical(small_build, tmp_path):
    other = build_corpus(tmp_path, SMALL)
    names = sorted(p.name for p in small_build.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    assert len(names) == 1 + len(CONTEXTS) * len(SPLITS)
    for name in names:
        assert (small_build / name).read_bytes() == (other / name).read_bytes(), name


def test_another_seed_gives_another_corpus(small_build, tmp_path):
    other = build_corpus(
        tmp_path,
        CorpusConfig(seed=1, train_bytes=SMALL.train_bytes, heldout_bytes=SMALL.heldout_bytes),
    )
    for context in ("code", "reasoning"):
        name = corpus.part_name(context, "heldout")
        assert (small_build / name).read_bytes() != (other / name).read_bytes()


def test_manifest_fields_match_the_files(small_build):
    manifest = json.loads((small_build / "manifest.json").read_text())
    assert manifest["python_version"] == platform.python_version()
    assert manifest["matches_reference_python"] == (
        platform.python_version() == corpus.REFERENCE_PYTHON
    )
    assert manifest["config"] == {
        "seed": 0,
        "train_bytes": SMALL.train_bytes,
        "heldout_bytes": SMALL.heldout_bytes,
    }
    for context in CONTEXTS:
        for split in SPLITS:
            part = manifest["parts"][f"{context}/{split}"]
            data = (small_build / part["file"]).read_bytes()
            assert part["bytes"] == len(data)
            assert part["sha256"] == hashlib.sha256(data).hexdigest()
            docs = [json.loads(line) for line in data.decode().splitlines()]
            assert part["documents"] == len(docs) > 0
            assert part["text_bytes"] == sum(len(d.encode()) for d in docs)


def test_split_is_by_document_and_disjoint(small_build):
    c = load_corpus(small_build, SMALL)
    for context in CONTEXTS:
        train, held = c.documents(context, "train"), c.documents(context, "heldout")
        assert train and held
        assert not set(train) & set(held), context
        # held-out is filled first, document by document, so it stops just past its budget
        sizes = [len(d.encode()) for d in held]
        assert sum(sizes[:-1]) < SMALL.heldout_bytes <= sum(sizes)


def test_contexts_hold_what_they_say(small_build):
    c = load_corpus(small_build, SMALL)
    for doc in c.documents("code", "train"):
        compile(doc, "<corpus>", "exec")  # real Python source
        assert '"""' not in doc  # docstrings removed (ast.unparse would write them this way)
    for doc in c.documents("reasoning", "heldout"):
        assert doc.startswith("Problem: ") and "\nAnswer: " in doc
    for doc in c.documents("text", "train"):
        assert ">>> " not in doc
        letters = sum(ch.isalpha() or ch.isspace() for ch in doc)
        assert letters / len(doc) > 0.6


def test_docstrings_are_stripped_but_code_kept(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        '"""Module doc."""\n# comment\ndef f(x):\n    """Doc."""\n    return x + 1\n'
        "class C:\n    'only a docstring'\n"
    )
    out = corpus.code_document(src)
    assert "Module doc" not in out and "Doc." not in out and "comment" not in out
    assert "return x + 1" in out and "class C:\n    pass" in out


def test_reasoning_solutions_are_correct():
    rng = random.Random(0)
    for _ in range(200):
        doc = corpus._arithmetic(rng)
        expr = doc.split("Compute ")[1].split(".\n")[0]
        assert doc.rstrip().endswith(f"Answer: {eval(expr)}")  # noqa: S307 - our own text


def test_cache_is_reused_and_rebuilt_when_corrupt(small_build, tmp_path):
    c = load_corpus(tmp_path, SMALL)
    part = tmp_path / corpus.part_name("text", "train")
    mtime = part.stat().st_mtime_ns
    assert load_corpus(tmp_path, SMALL).sha256 == c.sha256
    assert part.stat().st_mtime_ns == mtime  # not rebuilt
    part.write_text("tampered\n")
    with pytest.warns(UserWarning, match="does not match its manifest"):
        again = load_corpus(tmp_path, SMALL)
    assert again.documents("text", "train") == c.documents("text", "train")


def test_other_python_version_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "REFERENCE_PYTHON", "3.0.0")
    with pytest.warns(UserWarning, match="Python"):
        out = build_corpus(tmp_path, CorpusConfig().scaled(0.002))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["matches_reference_python"] is False
    assert manifest["reference_python_version"] == "3.0.0"


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        CorpusConfig().scaled(0)
    c = corpus.Corpus(corpus.DEFAULT_DIR, {})
    with pytest.raises(ValueError, match="context"):
        c.documents("poetry", "train")
    with pytest.raises(ValueError, match="split"):
        c.documents("code", "test")
