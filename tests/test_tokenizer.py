"""Tokenizers: byte-level round trip, specials, checkpoint tokenizer discovery."""

import json

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_core.errors import CheckpointError
from sage_core.model.tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer, load_tokenizer


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < 256 for i in ids[1:-1])
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_specials_are_distinct_and_outside_the_bytes():
    tok = ByteTokenizer()
    assert sorted(tok.specials.values()) == [256, 257, 258]
    assert tok.vocab_size == 259
    assert tok.encode("é") == [0xC3, 0xA9]


def test_invalid_utf8_from_a_model_decodes_with_replacement():
    tok = ByteTokenizer()
    assert tok.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    with pytest.raises(UnicodeDecodeError):
        tok.decode([0xFF], errors="strict")


def test_load_tokenizer_default_and_saved_byte_tokenizer(tmp_path):
    assert load_tokenizer(None) == ByteTokenizer()
    ByteTokenizer().save(tmp_path)
    assert load_tokenizer(tmp_path) == ByteTokenizer()


def test_corrupt_byte_tokenizer_file_is_named(tmp_path):
    (tmp_path / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bpe"}))
    with pytest.raises(CheckpointError, match=BYTE_TOKENIZER_FILE):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_names_the_files_looked_for(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert name in str(info.value)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_tokenizer(tmp_path / "absent")


def test_tokenizer_json_through_tokenizers(tmp_path):
    bpe = tokenizers.models.BPE(
        vocab={"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}, merges=[("a", "b")]
    )
    tok = tokenizers.Tokenizer(bpe)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("abab") == [2, 2]
    assert loaded.encode("ab", add_eos=True) == [2, 3]
    assert loaded.decode([2, 3]) == "ab"  # specials skipped


def test_vocab_and_merges_through_tokenizers(tmp_path):
    # byte-level alphabet for "hi": 'h', 'i', merged "hi"
    (tmp_path / "vocab.json").write_text(json.dumps({"h": 0, "i": 1, "hi": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh i\n")
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("hi") == [2]
    assert loaded.decode([2]) == "hi"
