"""Order-2 byte baseline: proper distributions, learns, beats uniform."""

import numpy as np
import pytest

from sage_core.corpus.ngram import UNIFORM_BITS_PER_BYTE, ByteTrigramModel

TRAIN = ["the cat sat on the mat. " * 20, "def f(x):\n    return x + 1\n" * 10, "ünïcödé ok"]


def test_distributions_sum_to_one_for_seen_and_unseen_histories():
    m = ByteTrigramModel().fit(TRAIN)
    for history in (b"", b"t", b"th", b"\xff\xfe", b"zq", "ü".encode()):
        p = m.distribution(history)
        assert p.shape == (256,)
        assert np.all(p > 0)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_learns_the_training_text():
    m = ByteTrigramModel().fit(TRAIN)
    assert m.distribution(b"th").argmax() == ord("e")
    bpb = m.bits_per_byte(["the cat sat on the mat. "])
    assert bpb < 1.5 < UNIFORM_BITS_PER_BYTE


def test_beats_uniform_on_unseen_text_of_the_same_kind():
    m = ByteTrigramModel().fit(["the cat and the hat and the bat sat on the mat. " * 5])
    assert m.bits_per_byte(["the bat and the cat sat."]) < UNIFORM_BITS_PER_BYTE


def test_bits_are_the_sum_of_log_probabilities():
    m = ByteTrigramModel().fit(TRAIN)
    doc = "the f(x)"
    data = doc.encode()
    expected = 0.0
    for i, byte in enumerate(data):
        expected -= np.log2(m.distribution(data[max(0, i - 2) : i])[byte])
    bits, n = m.total_bits([doc])
    assert n == len(data)
    assert bits == pytest.approx(expected)


def test_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        ByteTrigramModel().distribution(b"ab")
    with pytest.raises(ValueError, match="non-empty"):
        ByteTrigramModel().fit(["", ""])
