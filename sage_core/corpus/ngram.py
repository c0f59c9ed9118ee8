"""The order-2 byte baseline: next byte given the two bytes before it.

Interpolated Witten-Bell smoothing, which needs no tuned constant: the estimate for a history
h mixes the maximum-likelihood counts with the next-shorter history's estimate, weighting
the shorter one by how many distinct bytes followed h (T(h)) against how often h was seen
(C(h)):

    P(x | h) = (C(h, x) + T(h) * P(x | h')) / (C(h) + T(h)),   h' = h without its oldest byte

down to the unigram, which backs off to uniform over the 256 bytes. Every distribution it
returns is over the 256 byte values and sums to 1. Each document starts from a history of
two BOS symbols, so no prediction looks across a document boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

BOS = 256  # history-only symbol; never predicted
_NSYM = 257  # history alphabet: 256 bytes + BOS


def _trigram_arrays(documents: Iterable[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h2, h1, x) int64 arrays over every byte of every document."""
    h2s, h1s, xs = [], [], []
    for doc in documents:
        seq = np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if seq.size == 0:
            continue
        padded = np.concatenate([[BOS, BOS], seq])
        h2s.append(padded[:-2])
        h1s.append(padded[1:-1])
        xs.append(seq)
    if not xs:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(h2s), np.concatenate(h1s), np.concatenate(xs)


class ByteTrigramModel:
    """Order-2 (two bytes of history) byte model with interpolated Witten-Bell smoothing."""

    def __init__(self) -> None:
        self.fitted = False

    def fit(self, documents: Iterable[str]) -> ByteTrigramModel:
        h2, h1, x = _trigram_arrays(documents)
        if x.size == 0:
            raise ValueError("ByteTrigramModel.fit needs at least one non-empty document")
        self.n = int(x.size)
        self.c1 = np.bincount(x, minlength=256).astype(np.float64)
        self.t0 = float(np.count_nonzero(self.c1))
        c2 = np.zeros((_NSYM, 256), dtype=np.float64)
        np.add.at(c2, (h1, x), 1.0)
        self.c2 = c2
        self.c2_ctx = c2.sum(axis=1)
        self.t2_ctx = np.count_nonzero(c2, axis=1).astype(np.float64)
        # Trigram counts stay sparse: 257 * 257 histories * 256 bytes would be 17M cells.
        ctx = h2 * _NSYM + h1
        keys, counts = np.unique(ctx * 256 + x, return_counts=True)
        self.c3_keys, self.c3_counts = keys, counts.astype(np.float64)
        key_ctx = keys // 256
        self.c3_ctx = np.bincount(ctx, minlength=_NSYM * _NSYM).astype(np.float64)
        self.t3_ctx = np.bincount(key_ctx, minlength=_NSYM * _NSYM).astype(np.float64)
        self.fitted = True
        return self

    def _check(self) -> None:
        if not self.fitted:
            raise RuntimeError("ByteTrigramModel is not fitted; call fit(documents) first")

    def _p0(self, x: np.ndarray) -> np.ndarray:
        return (self.c1[x] + self.t0 / 256.0) / (self.n + self.t0)

    def _p1(self, h1: np.ndarray, x: np.ndarray) -> np.ndarray:
        c, t = self.c2_ctx[h1], self.t2_ctx[h1]
        p0 = self._p0(x)
        seen = c > 0
        safe = np.where(seen, c + t, 1.0)
        return np.where(seen, (self.c2[h1, x] + t * p0) / safe, p0)

    def _c3(self, ctx: np.ndarray, x: np.ndarray) -> np.ndarray:
        keys = ctx * 256 + x
        pos = np.searchsorted(self.c3_keys, keys)
        pos = np.minimum(pos, self.c3_keys.size - 1)
        return np.where(self.c3_keys[pos] == keys, self.c3_counts[pos], 0.0)

    def prob(self, h2: np.ndarray, h1: np.ndarray, x: np.ndarray) -> np.ndarray:
        """P(x | h2, h1) elementwise, for int arrays (histories may be BOS = 256)."""
        self._check()
        h2, h1, x = (np.asarray(a, dtype=np.int64) for a in (h2, h1, x))
        ctx = h2 * _NSYM + h1
        c, t = self.c3_ctx[ctx], self.t3_ctx[ctx]
        p1 = self._p1(h1, x)
        seen = c > 0
        safe = np.where(seen, c + t, 1.0)
        return np.where(seen, (self._c3(ctx, x) + t * p1) / safe, p1)

    def distribution(self, history: bytes) -> np.ndarray:
        """The full next-byte distribution (256,) after `history` (padded on the left with BOS)."""
        hist = [BOS, BOS] + list(history)
        x = np.arange(256)
        return self.prob(np.full(256, hist[-2]), np.full(256, hist[-1]), x)

    def total_bits(self, documents: Iterable[str]) -> tuple[float, int]:
        """(sum of -log2 P over every byte, number of bytes), each document from BOS BOS."""
        h2, h1, x = _trigram_arrays(documents)
        if x.size == 0:
            return 0.0, 0
        return float(-np.log2(self.prob(h2, h1, x)).sum()), int(x.size)

    def bits_per_byte(self, documents: Iterable[str]) -> float:
        bits, n = self.total_bits(documents)
        if n == 0:
            raise ValueError("bits_per_byte needs at least one non-empty document")
        return bits / n


UNIFORM_BITS_PER_BYTE = math.log2(256)  # 8.0: what knowing nothing costs
