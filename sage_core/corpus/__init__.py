"""The three-context corpus (code, reasoning, text) and its byte n-gram baseline."""

from sage_core.corpus.build import (
    CONTEXTS,
    SPLITS,
    Corpus,
    CorpusConfig,
    build_corpus,
    load_corpus,
    load_snapshot,
)

__all__ = [
    "CONTEXTS",
    "SPLITS",
    "Corpus",
    "CorpusConfig",
    "build_corpus",
    "load_corpus",
    "load_snapshot",
]
