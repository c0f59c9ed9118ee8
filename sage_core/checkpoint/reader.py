"""Reading safetensors files: headers, whole tensors, one expert of a fused tensor."""

import json
import os
from pathlib import Path

import torch

from sage_core.checkpoint.layout import (
    FLOAT_HEADER_DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
)
from sage_core.errors import CheckpointError

# Safetensors dtype names -> torch dtypes (the format's full list we can represent).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Shard:
    """One safetensors file, read with positioned reads into memory we own.

    Not a memory map: every page of a mapped file that a read touches counts towards the
    process's RSS for as long as the file stays mapped, which defeats a bounded expert
    cache, and a view of a mapped file crashes (SIGBUS) if the file is truncated later.
    The header is checked against the file size on open, so a truncated file fails here.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "rb")  # closed by close()
        try:
            size = os.fstat(self.file.fileno()).st_size
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            header_len = int.from_bytes(self._pread(8, 0), "little")
            if 8 + header_len > size:
                raise ValueError(f"header of {header_len} bytes runs past the end ({size} bytes)")
            header = json.loads(self._pread(header_len, 8))
            header.pop("__metadata__", None)
            self.data_start = 8 + header_len
            self.tensors = {k: self._entry(k, v, size) for k, v in header.items()}
        except BaseException:
            self.file.close()
            raise

    def _entry(self, key, info, size) -> tuple[tuple[int, ...], str, int, int]:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r} has unknown dtype {dtype!r}")
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * SAFETENSORS_DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {key!r}: offsets {begin}..{end} disagree with shape {shape}")
        if self.data_start + end > size:
            raise ValueError(
                f"tensor {key!r} ends at byte {self.data_start + end} but the file has {size}"
            )
        return shape, dtype, self.data_start + begin, self.data_start + end

    def _pread(self, n: int, offset: int, into=None):
        buf = bytearray(n) if into is None else into
        self.file.seek(offset)
        if self.file.readinto(buf) != n:  # `into` is a writable buffer of exactly n bytes
            raise OSError(f"file ends before byte {offset + n} (truncated?)")
        return buf

    def keys(self):
        return self.tensors.keys()

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        shape, dtype, _, _ = self.tensors[key]
        return shape, dtype

    def _span(self, key: str, index: int | None):
        shape, dtype, begin, end = self.tensors[key]
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise IndexError(f"row {index} out of range for shape {list(shape)}")
            row = (end - begin) // shape[0]
            begin, end, shape = begin + index * row, begin + (index + 1) * row, shape[1:]
        return shape, SAFETENSORS_DTYPES[dtype], begin, end

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor `key`, or its row `index` alone, in the file's dtype, in fresh memory."""
        shape, dtype, begin, end = self._span(key, index)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._pread(end - begin, begin), dtype=dtype)
        return flat.reshape(shape)  # the header's shape

    def read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> int:
        """Copy `key` (or its row `index`) into `out`, converting; -> bytes read.

        When `out` is a contiguous CPU tensor of the file's dtype the bytes land in it
        directly, with no temporary: a bounded expert cache then holds only its experts.
        """
        shape, dtype, begin, end = self._span(key, index)
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"shape {list(shape)} does not fit a destination of {list(out.shape)}")
        if out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous() and end > begin:
            out_bytes = memoryview(out.view(torch.uint8).numpy())  # out's memory, byte by byte
            self._pread(end - begin, begin, into=out_bytes)
        else:
            out.copy_(self.read(key, index))
        return end - begin

    def close(self) -> None:
        self.file.close()


def open_shard(path: Path) -> Shard:
    return Shard(path)


class SafetensorsReader:
    """Reads single tensors from a checkpoint directory's safetensors file(s).

    Knows which file holds each key (from the index, or from the single file's header),
    opens each file at most once and only when a key in it is needed, and wraps every
    failure in a CheckpointError naming the file and the key. Not thread-safe.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._handles: dict[str, Shard] = {}
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            self.source = index
            self.weight_map = _read_index(index)
        elif single.is_file():
            self.source = single
            self.weight_map = dict.fromkeys(self._handle(SINGLE_FILE, None).keys(), SINGLE_FILE)
        else:
            raise CheckpointError(
                f"{self.directory}: no {INDEX_FILE} or {SINGLE_FILE} in the checkpoint directory"
            )

    def keys(self):
        return self.weight_map.keys()

    def path_of(self, key: str) -> Path:
        return self.directory / self.weight_map[key]

    def _handle(self, filename: str, key: str | None) -> Shard:
        handle = self._handles.get(filename)
        if handle is not None:
            return handle
        path = self.directory / filename
        wanted = f" (needed for key {key!r})" if key else ""
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {self.source.name} is missing{wanted}")
        try:
            handle = open_shard(path)
        except (OSError, ValueError, KeyError, TypeError) as e:  # truncated or corrupt
            raise CheckpointError(
                f"{path}: cannot open safetensors file (truncated or corrupt?){wanted}: {e}"
            ) from e
        self._handles[filename] = handle
        return handle

    def _shard_with(self, key: str) -> Shard:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.source}: missing key {key!r}")
        handle = self._handle(self.weight_map[key], key)
        if key not in handle.tensors:
            raise CheckpointError(
                f"{self.path_of(key)}: key {key!r} (listed in {self.source.name}) "
                "is not in this file"
            )
        return handle

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name) of `key`, from the file header only."""
        return self._shard_with(key).header(key)

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor `key` (or its row `index`, read alone), in the file's dtype, on CPU."""
        shard = self._shard_with(key)
        try:
            return shard.read(key, index)
        except (OSError, IndexError) as e:
            what = f"tensor {key!r}" if index is None else f"tensor {key!r}[{index}]"
            raise CheckpointError(f"{self.path_of(key)}: cannot read {what}: {e}") from e

    def read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> int:
        """Copy `key` (or its row `index`) into `out`, converted; -> bytes read from the file."""
        shard = self._shard_with(key)
        try:
            return shard.read_into(key, out, index)
        except (OSError, IndexError) as e:
            what = f"tensor {key!r}" if index is None else f"tensor {key!r}[{index}]"
            raise CheckpointError(f"{self.path_of(key)}: cannot read {what}: {e}") from e

    def close(self) -> None:
        """Close every open file (files reopen lazily on the next read)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read index: {e}") from e
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: missing field 'weight_map' (an object key -> shard)")
    for key, shard in weight_map.items():
        # A shard name is a plain file name in the checkpoint directory, nothing else.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index}: weight_map[{key!r}] = {shard!r} is not a file name")
    return weight_map


def _owned(tensor: torch.Tensor, device, dtype) -> torch.Tensor:
    """`tensor` (fresh memory from the reader) converted to dtype on device; no extra copy."""
    return tensor.to(device=device, dtype=dtype)


def _check_header(reader: SafetensorsReader, key: str, expected: tuple[int, ...]) -> None:
    shape, dtype = reader.header(key)
    if shape != tuple(expected):
        raise CheckpointError(
            f"{reader.path_of(key)}: tensor {key!r} has shape {list(shape)}, "
            f"expected {list(expected)} from the config"
        )
    if dtype not in FLOAT_HEADER_DTYPES:
        raise CheckpointError(
            f"{reader.path_of(key)}: tensor {key!r} has dtype {dtype}, "
            f"expected a float dtype ({sorted(FLOAT_HEADER_DTYPES)})"
        )
