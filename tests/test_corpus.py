"""Corpus: deterministic, split by document, manifest complete; the committed snapshot is
intact, is what everything reads, and is replaced only when asked to."""

import hashlib
import json
import lzma
import platform
import random
import shutil

import nbformat
import pytest

from sage_core.corpus import (
    CONTEXTS,
    SPLITS,
    CorpusConfig,
    build_corpus,
    load_corpus,
    load_snapshot,
)
from sage_core.corpus import build as corpus
from sage_core.errors import CorpusError
from sage_core.paths import MODELS, NOTEBOOKS

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
        assert corpus.read_part(small_build, name) != corpus.read_part(other, name)


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
            data = corpus.read_part(small_build, part["file"])
            assert part["bytes"] == len(data)
            assert part["sha256"] == hashlib.sha256(data).hexdigest()
            docs = [json.loads(line) for line in data.decode().splitlines()]
            assert part["documents"] == len(docs) > 0
            assert part["text_bytes"] == sum(len(d.encode()) for d in docs)


def _normalised(docs):
    """The documents as compared for identity (whitespace runs as one space): written out
    here, not imported, so that a broken `corpus.normalise` cannot pass these tests."""
    return [" ".join(d.split()) for d in docs]


def _assert_heldout_is_clean(c):
    for context in CONTEXTS:
        train = set(_normalised(c.documents(context, "train")))
        held = _normalised(c.documents(context, "heldout"))
        assert train and held, context
        in_train = [d for d in held if d in train]
        assert not in_train, f"{context}: {len(in_train)} held-out documents are in train"
        repeats = len(held) - len(set(held))
        assert repeats == 0, f"{context}: {repeats} held-out documents repeat an earlier one"


def test_split_is_by_document_and_disjoint(small_build):
    c = load_corpus(small_build, SMALL)
    _assert_heldout_is_clean(c)
    for context in CONTEXTS:
        # held-out is filled first, document by document, so it stops just past its budget,
        # then loses the documents that are in train or repeat (the manifest counts them)
        sizes = [len(d.encode()) for d in c.documents(context, "heldout")]
        dropped = c.manifest["parts"][f"{context}/heldout"]["dropped"]
        assert sum(sizes[:-1]) < SMALL.heldout_bytes
        if dropped == {"in_train": 0, "repeated": 0}:
            assert SMALL.heldout_bytes <= sum(sizes), context


def test_split_drops_heldout_documents_in_train_or_repeated(monkeypatch):
    # held-out fills to 10 bytes: "p q\n" (4), "r", "p  q" (4), "s"; train to 3: "t", "r "
    stream = ["p q\n", "r", "p  q", "s", "t", "r ", "u"]
    monkeypatch.setattr(corpus, "_documents", lambda context, config: iter(stream))
    parts, dropped = corpus.split_documents("text", CorpusConfig(train_bytes=3, heldout_bytes=10))
    assert parts["train"] == ["t", "r "]  # train is what the fill gave, untouched
    assert parts["heldout"] == ["p q\n", "s"]  # "r" is in train, "p  q" repeats "p q\n"
    assert dropped == {"in_train": 1, "repeated": 1}
    assert corpus.normalise(" a\n\tb  c ") == "a b c"


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
    part = corpus.part_path(tmp_path, corpus.part_name("text", "train"))
    mtime = part.stat().st_mtime_ns
    assert load_corpus(tmp_path, SMALL).sha256 == c.sha256
    assert part.stat().st_mtime_ns == mtime  # not rebuilt
    part.write_text("tampered\n")
    with pytest.warns(UserWarning, match="text.train.jsonl.xz.*rebuilding"):
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


# --- the committed snapshot ------------------------------------------------------------------


def test_snapshot_loads_and_matches_its_manifest():
    snapshot = load_snapshot()
    assert snapshot.directory == corpus.SNAPSHOT_DIR
    assert snapshot.manifest["config"] == {
        "seed": 0,
        "train_bytes": 1_200_000,
        "heldout_bytes": 200_000,
    }
    assert snapshot.manifest["python_version"] == corpus.REFERENCE_PYTHON
    files = sorted(p.name for p in corpus.SNAPSHOT_DIR.iterdir())
    assert files == sorted(
        ["manifest.json"] + [f"{corpus.part_name(c, s)}.xz" for c in CONTEXTS for s in SPLITS]
    )
    for key, part in snapshot.manifest["parts"].items():
        context, split = key.split("/")
        data = corpus.read_part(corpus.SNAPSHOT_DIR, part["file"])
        assert hashlib.sha256(data).hexdigest() == part["sha256"], key
        docs = snapshot.documents(context, split)
        assert len(docs) == part["documents"] and docs, key
        assert sum(len(d.encode()) for d in docs) == part["text_bytes"], key


def test_snapshot_heldout_is_deduplicated_and_disjoint_from_train():
    """What the notebooks read (`load_corpus()`): in every context, no held-out document is
    a training document and none repeats (after whitespace normalisation)."""
    _assert_heldout_is_clean(load_corpus())


def test_snapshot_is_the_corpus_the_model_and_notebooks_were_made_from():
    snapshot = load_snapshot()
    sha = snapshot.sha256
    metrics = json.loads((MODELS / "q3omni-tiny" / "metrics.json").read_text())
    assert metrics["corpus_manifest_sha256"] == sha
    # The model was trained on exactly these train parts (held-out parts may have changed
    # since: training_config.json keeps the manifest sha256 of its own time).
    training = json.loads((MODELS / "q3omni-tiny" / "training_config.json").read_text())
    assert training["corpus_train_sha256"] == {
        c: snapshot.manifest["parts"][f"{c}/train"]["sha256"] for c in CONTEXTS
    }
    nb = nbformat.read(NOTEBOOKS / "03_baseline_generation.ipynb", as_version=4)
    printed = json.dumps([cell.get("outputs", []) for cell in nb.cells])
    assert f"corpus manifest sha256: {sha[:16]}" in printed


def test_load_corpus_reads_the_snapshot_without_the_stdlib(monkeypatch, tmp_path):
    def no_build(*args, **kwargs):
        raise AssertionError("load_corpus() must not build")

    monkeypatch.setattr(corpus, "build_corpus", no_build)
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: tmp_path / "no-stdlib")
    monkeypatch.setattr(platform, "python_version", lambda: "3.11.99")
    c = load_corpus()
    assert c.directory == corpus.SNAPSHOT_DIR
    assert c.documents("text", "heldout") == load_snapshot().documents("text", "heldout")
    with pytest.raises(CorpusError, match="recipe"):
        load_corpus(config=SMALL)


def test_altered_or_missing_snapshot_part_is_an_error_naming_it(tmp_path):
    shutil.copytree(corpus.SNAPSHOT_DIR, tmp_path, dirs_exist_ok=True)
    part = corpus.part_path(tmp_path, corpus.part_name("code", "heldout"))
    docs = load_snapshot(tmp_path).documents("code", "heldout")
    edited = "".join(json.dumps(d) + "\n" for d in [docs[0] + " "] + docs[1:]).encode()
    part.write_bytes(lzma.compress(edited))
    with pytest.raises(CorpusError, match="code.heldout.jsonl.xz.*sha256"):
        load_snapshot(tmp_path)
    part.unlink()
    with pytest.raises(CorpusError, match="code.heldout.jsonl.xz is missing.*--write-snapshot"):
        load_snapshot(tmp_path)


def test_a_build_on_another_python_writes_a_snapshot_only_when_asked(monkeypatch, tmp_path, capsys):
    snapshot = {p.name: p.read_bytes() for p in corpus.SNAPSHOT_DIR.iterdir()}
    monkeypatch.setattr(platform, "python_version", lambda: "3.11.99")
    monkeypatch.setattr(corpus, "CorpusConfig", lambda: SMALL)
    with pytest.warns(UserWarning, match="Python 3.11.99"):
        assert corpus.main(["--out", str(tmp_path)]) == 0
    assert "differs from the committed snapshot" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text())["python_version"] == "3.11.99"
    assert {p.name: p.read_bytes() for p in corpus.SNAPSHOT_DIR.iterdir()} == snapshot
    written = []
    monkeypatch.setattr(corpus, "build_corpus", lambda out, *a: written.append(out))
    monkeypatch.setattr(corpus, "manifest_sha256", lambda out: "x")
    corpus.main(["--write-snapshot"])
    assert written == [corpus.SNAPSHOT_DIR]
