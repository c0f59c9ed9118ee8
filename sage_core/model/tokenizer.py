"""Tokenizers: the byte-level default for the embedded model, the checkpoint's own for real ones.

`load_tokenizer(path)` picks by what the checkpoint directory holds:

- ``byte_tokenizer.json`` (written next to the embedded model): `ByteTokenizer`;
- ``tokenizer.json``: the `tokenizers` library's fast tokenizer (what Qwen ships);
- ``vocab.json`` + ``merges.txt``: a byte-level BPE built from them with `tokenizers`.

Every tokenizer here has ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``vocab_size`` and ``bos_id`` / ``eos_id`` / ``pad_id`` (None where the vocabulary has none).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sage_core.atomic import atomic_write_json
from sage_core.errors import CheckpointError

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


@dataclass(frozen=True)
class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes themselves, then bos, eos and pad.

    Any text round-trips exactly, because encoding is just ``text.encode("utf-8")``. No
    context tokens: the trust experiments must infer the context from hidden states, as
    they would with a real model, so the model is never told it.
    """

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    vocab_size: int = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, errors: str = "replace") -> str:
        """Bytes to text; specials are dropped. A model may emit byte sequences that are not
        valid UTF-8, so by default those become U+FFFD instead of raising."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors=errors)

    @property
    def specials(self) -> dict[str, int]:
        return {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}

    def save(self, directory: Path | str) -> Path:
        path = Path(directory) / BYTE_TOKENIZER_FILE
        return atomic_write_json(path, {"type": "byte", **asdict(self)})

    @classmethod
    def from_file(cls, path: Path | str) -> ByteTokenizer:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read byte tokenizer description ({e})") from e
        if not isinstance(raw, dict) or raw.get("type") != "byte":
            raise CheckpointError(f"{path}: expected {{'type': 'byte', ...}}, got {raw!r:.200}")
        fields = {k: raw[k] for k in ("bos_id", "eos_id", "pad_id", "vocab_size") if k in raw}
        tok = cls(**fields)
        if sorted(tok.specials.values()) != list(range(256, 256 + len(tok.specials))) or (
            tok.vocab_size != 256 + len(tok.specials)
        ):
            raise CheckpointError(f"{path}: byte tokenizer specials must be ids 256.. , got {raw}")
        return tok


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind the same small interface as `ByteTokenizer`."""

    def __init__(self, tokenizer, source: Path):
        self._tok = tokenizer
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Qwen has no BOS; its pretraining separates documents with <|endoftext|>.
        self.bos_id = _first_id(vocab, ("<|endoftext|>", "<s>", "<|begin_of_text|>", "<bos>"))
        self.eos_id = _first_id(vocab, ("<|endoftext|>", "<|im_end|>", "</s>", "<eos>"))
        self.pad_id = _first_id(vocab, ("<|endoftext|>", "<pad>"))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, errors: str = "replace") -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _first_id(vocab: dict, names) -> int | None:
    for name in names:
        if name in vocab:
            return vocab[name]
    return None


def _tokenizers_module(path: Path):
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - tokenizers ships with the test extras
        raise CheckpointError(
            f"{path} needs the 'tokenizers' package (pip install tokenizers)"
        ) from e
    return tokenizers


def load_tokenizer(model_path: Path | str | None = None):
    """The tokenizer for the checkpoint at `model_path`; None means the byte-level default."""
    if model_path is None:
        return ByteTokenizer()
    root = Path(model_path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory (looking for a tokenizer)")
    byte_file = root / BYTE_TOKENIZER_FILE
    if byte_file.is_file():
        return ByteTokenizer.from_file(byte_file)
    fast = root / "tokenizer.json"
    if fast.is_file():
        tokenizers = _tokenizers_module(fast)
        try:
            return HFTokenizer(tokenizers.Tokenizer.from_file(str(fast)), fast)
        except Exception as e:
            raise CheckpointError(f"{fast}: cannot load tokenizer ({e})") from e
    vocab, merges = root / "vocab.json", root / "merges.txt"
    if vocab.is_file() and merges.is_file():
        tokenizers = _tokenizers_module(vocab)
        try:
            bpe = tokenizers.models.BPE.from_file(str(vocab), str(merges))
            tok = tokenizers.Tokenizer(bpe)
            tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tokenizers.decoders.ByteLevel()
        except Exception as e:
            raise CheckpointError(f"{vocab} + {merges}: cannot build a BPE tokenizer ({e})") from e
        return HFTokenizer(tok, vocab)
    raise CheckpointError(
        f"{root}: no tokenizer found; looked for {BYTE_TOKENIZER_FILE}, tokenizer.json, "
        f"and vocab.json + merges.txt"
    )
