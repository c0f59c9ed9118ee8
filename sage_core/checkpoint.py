"""Qwen3-Omni thinker checkpoints: sharded safetensors in, a ready model out (and a writer).

`load_thinker` reads the real checkpoint layout (`thinker.`-prefixed keys in shards listed by
`model.safetensors.index.json`, next to talker, code2wav, audio and vision weights it never
touches) and the layouts exporters produce: one `model.safetensors`, fused or per-expert MoE
weights, a thinker-only export (`model.*`, `lm_head.weight`) and a bare text export
(`embed_tokens.weight`, `layers.*`, `norm.weight`, no lm_head).

Loading is two passes. The first checks every tensor the chosen layers need, by name, shape
and dtype, from the safetensors headers alone (cheap), so a broken checkpoint fails before
any weight is read and nothing half-built is ever returned. The second reads exactly those
tensors, converts each once to the requested dtype and device, and assigns them into a model
built on the meta device. With `max_resident_experts`, expert weights are instead read on
first use into one LRU cache shared by all layers.

The model's own keys drive the load, so a stray checkpoint buffer such as a float64
`rotary_emb.inv_freq` (bug #1 of the dtype report) is never read: the rotary table is
recomputed in float32 by `MultimodalRotaryEmbedding.reset_buffers`.
"""

import json
import operator
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from sage_core.atomic import atomic_write_bytes, atomic_write_text
from sage_core.config import ThinkerTextConfig, nested_config_dict, read_config
from sage_core.dtypes import parse_dtype
from sage_core.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LAYOUTS = ("thinker", "thinker_only", "text")
EXPERT_LAYOUTS = ("per_expert", "fused")
# Safetensors header dtypes we accept as weights (converted to the requested dtype on load).
FLOAT_HEADER_DTYPES = {"F16", "BF16", "F32", "F64"}
# Model keys of the stacked expert weights: model.layers.{i}.mlp.experts.{gate_up,down}_proj
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


# ---------------------------------------------------------------------------------------------
# Key names: the model's own key space <-> each file layout
# ---------------------------------------------------------------------------------------------


def file_key(model_key: str, layout: str) -> str:
    """Checkpoint key of a model key (`model.norm.weight`, `lm_head.weight`, ...) in `layout`."""
    if layout == "thinker":
        return "thinker." + model_key
    if layout == "thinker_only":
        return model_key
    if layout == "text":
        if not model_key.startswith("model."):
            raise ValueError(f"the bare text layout has no key for {model_key!r}")
        return model_key.removeprefix("model.")
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def detect_layout(keys, source: str) -> str:
    """Which layout a set of checkpoint keys is in, recognised by its embedding key."""
    keys = set(keys)
    for layout in LAYOUTS:
        if file_key("model.embed_tokens.weight", layout) in keys:
            return layout
    raise CheckpointError(
        f"{source}: no thinker text model found: none of the keys "
        f"{[file_key('model.embed_tokens.weight', lay) for lay in LAYOUTS]} is present"
    )


# ---------------------------------------------------------------------------------------------
# Reading safetensors files: headers, whole tensors, one expert of a fused tensor
# ---------------------------------------------------------------------------------------------


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
        return torch.frombuffer(self._pread(end - begin, begin), dtype=dtype).reshape(shape)

    def read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> int:
        """Copy `key` (or its row `index`) into `out`, converting; -> bytes read.

        When `out` is a contiguous CPU tensor of the file's dtype the bytes land in it
        directly, with no temporary: a bounded expert cache then holds only its experts.
        """
        shape, dtype, begin, end = self._span(key, index)
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"shape {list(shape)} does not fit a destination of {list(out.shape)}")
        if out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous() and end > begin:
            self._pread(end - begin, begin, into=memoryview(out.view(torch.uint8).numpy()))
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


# ---------------------------------------------------------------------------------------------
# Experts: where one sparse layer's experts live, the LRU cache, the on-demand provider
# ---------------------------------------------------------------------------------------------


class ExpertSource:
    """The file keys of one sparse layer's experts, per-expert or fused, and how to read them.

    Per-expert layout: `...mlp.experts.{e}.{gate,up,down}_proj.weight`, gate/up [I, H] and
    down [H, I]. Fused layout: `...mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first)
    and `...mlp.experts.down_proj` [E, H, I]. Either way an expert reads as
    (gate_up [2I, H], down [H, I]) converted to `dtype` on `device`.
    """

    def __init__(self, reader, prefix: str, cfg: ThinkerTextConfig, dtype, device):
        self.reader = reader
        self.prefix = prefix  # e.g. "thinker.model.layers.3.mlp.experts."
        self.num_experts = cfg.num_experts
        self.dtype, self.device = dtype, device
        inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_shape = (2 * inter, hidden)
        self.down_shape = (hidden, inter)
        self.fused = (
            prefix + "gate_up_proj" in reader.keys() or prefix + "down_proj" in reader.keys()
        )

    def validate(self) -> None:
        """Check every key and shape of every expert from the headers (no data read)."""
        e, (two_i, h), (_, i) = self.num_experts, self.gate_up_shape, self.down_shape
        if self.fused:
            _check_header(self.reader, self.prefix + "gate_up_proj", (e, two_i, h))
            _check_header(self.reader, self.prefix + "down_proj", (e, h, i))
            return
        for expert in range(e):
            for name, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
                _check_header(self.reader, f"{self.prefix}{expert}.{name}_proj.weight", shape)

    def _read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> int:
        shape, _ = self.reader.header(key)
        if index is not None:
            shape = shape[1:]
        if tuple(shape) != tuple(out.shape):  # the file changed since the header check
            where = key if index is None else f"{key}[{index}]"
            raise CheckpointError(
                f"{self.reader.path_of(key)}: tensor {where!r} has shape {list(shape)}, "
                f"expected {list(out.shape)}"
            )
        return self.reader.read_into(key, out, index)

    def read_into(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> int:
        """Copy one expert, converted, into `gate_up` [2I, H] and `down` [H, I]; -> bytes read."""
        if self.fused:
            return self._read_into(self.prefix + "gate_up_proj", gate_up, expert) + (
                self._read_into(self.prefix + "down_proj", down, expert)
            )
        key, inter = f"{self.prefix}{expert}.", self.gate_up_shape[0] // 2
        return (
            self._read_into(key + "gate_proj.weight", gate_up[:inter])  # gate rows first
            + self._read_into(key + "up_proj.weight", gate_up[inter:])
            + self._read_into(key + "down_proj.weight", down)
        )

    def read(self, expert: int, into=None) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """((gate_up, down), bytes read from the file) for one expert, for the cache.

        `into`: an evicted expert's (gate_up, down) to overwrite instead of allocating.
        """
        if into is not None and self._fits(*into):
            gate_up, down = into
        else:
            # Normal tensors even under inference_mode, so a later call under no_grad
            # may still read the next expert into them.
            with torch.inference_mode(False):
                gate_up = torch.empty(self.gate_up_shape, dtype=self.dtype, device=self.device)
                down = torch.empty(self.down_shape, dtype=self.dtype, device=self.device)
        return (gate_up, down), self.read_into(expert, gate_up, down)

    def _fits(self, gate_up, down) -> bool:
        return all(
            tuple(t.shape) == shape and t.dtype == self.dtype and t.device == torch.device(self.device)
            for t, shape in ((gate_up, self.gate_up_shape), (down, self.down_shape))
        )

    def read_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (gate_up [E, 2I, H], down [E, H, I]) for the resident model, filled expert
        by expert (no second full-size copy, whatever the file layout); on CPU each expert
        is stored transposed (see `expert_stack`)."""
        e = self.num_experts
        gate_up = expert_stack(e, *self.gate_up_shape, dtype=self.dtype, device=self.device)
        down = expert_stack(e, *self.down_shape, dtype=self.dtype, device=self.device)
        for expert in range(e):
            self.read_into(expert, gate_up[expert], down[expert])
        return gate_up, down


def expert_stack(num: int, rows: int, cols: int, dtype, device) -> torch.Tensor:
    """An empty [num, rows, cols] stack of expert matrices.

    On CPU every [rows, cols] matrix is stored transposed (column-major), so F.linear(x, w)
    multiplies by a row-major w.T: on this project's 2-core CPU (mid config, float32) a
    one-token decode ran 15-17% faster, and a 256-token prefill 2% faster, than with
    row-major experts, for sage_core and transformers alike. Elsewhere (unmeasured, e.g. the
    CUDA gather path) the usual row-major layout. Shapes, names and values are the same."""
    if torch.device(device).type == "cpu":
        return torch.empty(num, cols, rows, dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(num, rows, cols, dtype=dtype, device=device)


def _held_only_by_caller(tensors) -> bool:
    """True when nothing but the caller's tuple refers to these tensors or their memory:
    no other Python reference, no view, no tensor saved for autograd."""
    for t in tensors:
        # References here: the tuple, the loop variable and getrefcount's own argument.
        if not isinstance(t, torch.Tensor) or sys.getrefcount(t) > 3:
            return False
        if t.is_inference() and not torch.is_inference_mode_enabled():
            return False  # not writable here
        try:  # private counters (torch 2.x); without them, never recycle
            if t._use_count() != 1:
                return False
            # One storage reference from the tensor, one from untyped_storage()'s handle.
            if torch._C._storage_Use_Count(t.untyped_storage()._cdata) != 2:
                return False
        except AttributeError:
            return False
    return True


class ExpertCache:
    """LRU cache of expert weights keyed by (layer, expert), holding at most `capacity`.

    `get(key, load)` returns the cached weights, or evicts the least recently used entries
    down to `capacity - 1` and calls `load() -> (weights, bytes_read)`. Evicting first keeps
    the number of experts held by the cache within the bound at every moment.

    An evicted entry that nothing else still refers to is kept as the spare: the loader
    may take it (`take_spare`) and read the next expert into its memory, so a full cache
    recycles its buffers instead of freeing and allocating one expert per miss, which
    fragments the heap and raised peak RSS by ~40 MiB in the mid benchmark.
    """

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"max_resident_experts must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()
        self._spare = None
        self.hits = self.misses = self.evictions = self.bytes_read = self.peak_resident = 0
        self.recycled = 0

    def take_spare(self):
        """The last evicted entry's weights if no one else holds them, else None (once)."""
        spare, self._spare = self._spare, None
        if spare is not None and isinstance(spare, tuple) and _held_only_by_caller(spare):
            self.recycled += 1
            return spare
        return None

    def get(self, key, load: Callable[[], tuple[object, int]]):
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        while len(self._entries) >= self.capacity:
            _, self._spare = self._entries.popitem(last=False)
            self.evictions += 1
        try:
            weights, nbytes = load()
        finally:
            self._spare = None  # never held past the miss that evicted it
        self._entries[key] = weights
        self.bytes_read += nbytes
        self.peak_resident = max(self.peak_resident, len(self._entries))
        return weights

    def keys(self) -> list:
        """Cached keys, least recently used first."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def stats(self) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes_read": self.bytes_read,
            "peak_resident": self.peak_resident,
            "resident": len(self._entries),
            "capacity": self.capacity,
            "recycled": self.recycled,
        }


class OnDemandExperts(nn.Module):
    """Expert provider of one sparse layer that reads experts from disk through a shared cache.

    Same interface as ResidentExperts (`num_experts`, `expert(e) -> (gate_up, down)`), no
    parameters: the weights live in the ExpertCache, not in the module.
    """

    def __init__(self, layer_idx: int, source: ExpertSource, cache: ExpertCache):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = source.num_experts
        self.source = source
        self.cache = cache

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        e = int(e)
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} out of range [0, {self.num_experts})")
        return self.cache.get(
            (self.layer_idx, e), lambda: self.source.read(e, into=self.cache.take_spare())
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, num_experts={self.num_experts}, on_demand=True"


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


def _layer_indices(layers, num_layers: int) -> list[int]:
    """`layers` argument (None, N for the first N, or a list of indices) -> sorted indices."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, bool):
        raise ValueError(f"layers must be None, an int or a list of ints, got {layers!r}")
    if isinstance(layers, int):
        if not 1 <= layers <= num_layers:
            raise ValueError(
                f"layers={layers}: the model has {num_layers} layers; need 1..{num_layers}"
            )
        return list(range(layers))
    if not isinstance(layers, list | tuple | range):
        raise ValueError(
            f"layers must be None, an int or a list of ints, got {type(layers).__name__}"
        )
    if len(layers) == 0:
        raise ValueError("layers is an empty list; give at least one layer index")
    indices = []
    for item in layers:
        if isinstance(item, bool):
            raise ValueError(f"layers contains {item!r}, not a layer index")
        try:
            idx = operator.index(item)
        except TypeError:
            raise ValueError(f"layers contains {item!r}, not an int layer index") from None
        if not 0 <= idx < num_layers:
            raise ValueError(f"layers contains {idx}, out of range [0, {num_layers})")
        indices.append(idx)
    if len(set(indices)) != len(indices):
        raise ValueError(f"layers contains duplicates: {list(layers)}")
    return sorted(indices)


def _check_resident_bound(max_resident_experts) -> None:
    if max_resident_experts is None:
        return
    if (
        isinstance(max_resident_experts, bool)
        or not isinstance(max_resident_experts, int)
        or max_resident_experts < 1
    ):
        raise ValueError(
            f"max_resident_experts must be None or an int >= 1, got {max_resident_experts!r}"
        )


def load_thinker(
    path,
    layers=None,
    max_resident_experts=None,
    device="cpu",
    dtype=torch.float32,
):
    """Load the Qwen3-Omni thinker text model from a checkpoint directory.

    path: directory with `config.json` and `model.safetensors` or shards plus
        `model.safetensors.index.json`, in any layout of the module docstring.
    layers: None (all), N (the first N) or a list of layer indices.
    max_resident_experts: None (every expert of the chosen layers in memory) or a bound on
        the experts held across the model; the rest are read on demand (`model.expert_cache`).
    device, dtype: where and in what dtype the weights live; converted once, on load.

    Raises CheckpointError (naming the file, key and shapes) for a broken checkpoint and
    ValueError for bad arguments; never returns a partially loaded model.
    """
    from sage_core.model import Qwen3OmniThinker  # deferred: importing the model is heavier

    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise CheckpointError(f"{path}: not a directory; give the checkpoint directory")
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    cfg = read_config(path)
    layer_indices = _layer_indices(layers, cfg.num_hidden_layers)
    _check_resident_bound(max_resident_experts)
    dtype = parse_dtype(dtype)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device: {e}") from e

    reader = SafetensorsReader(path)
    try:
        layout = detect_layout(reader.keys(), str(reader.source))
        embed_key = file_key("model.embed_tokens.weight", layout)
        lm_head_key = None if layout == "text" else file_key("lm_head.weight", layout)
        if lm_head_key is not None and lm_head_key not in reader.keys():
            lm_head_key = embed_key if cfg.tie_word_embeddings else None
        with torch.device("meta"):
            model = Qwen3OmniThinker(cfg, layer_indices, with_lm_head=lm_head_key is not None)

        # Every sparse layer's experts: resident (stacked into the state dict) or on demand.
        layer_prefix = file_key("model.layers.", layout)
        sources = {
            i: ExpertSource(reader, f"{layer_prefix}{i}.mlp.experts.", cfg, dtype, device)
            for i in layer_indices
            if cfg.is_sparse(i)
        }
        cache = None if max_resident_experts is None else ExpertCache(max_resident_experts)
        if cache is not None:
            for i, source in sources.items():
                model.model.layers[str(i)].mlp.experts = OnDemandExperts(i, source, cache)

        # Pass 1: every key and shape, from the headers, before reading any data.
        plan = {}  # model key -> checkpoint key, for everything but the stacked experts
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for key, shape in expected.items():
            if EXPERT_KEY.match(key):
                continue
            source_key = lm_head_key if key == "lm_head.weight" else file_key(key, layout)
            _check_header(reader, source_key, shape)
            plan[key] = source_key
        for source in sources.values():
            source.validate()

        # Pass 2: read exactly those tensors, converted once to dtype on device.
        state = {}
        for key, source_key in plan.items():
            if key == "lm_head.weight" and source_key == embed_key:  # tied: one copy
                continue
            state[key] = _owned(reader.read(source_key), device, dtype)
        if plan.get("lm_head.weight") == embed_key:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        if cache is None:
            for i, source in sources.items():
                prefix = f"model.layers.{i}.mlp.experts."
                state[prefix + "gate_up_proj"], state[prefix + "down_proj"] = source.read_all()
        model.load_state_dict(state, strict=True, assign=True)
        if plan.get("lm_head.weight") == embed_key:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary_emb.reset_buffers(device)
    finally:
        # Resident weights are copies; on-demand experts reopen their shards lazily.
        reader.close()

    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"load_thinker left tensors on the meta device: {leftover}")
    model.expert_cache = cache
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _balanced_shards(tensors: dict[str, torch.Tensor], num_shards: int) -> list[list[str]]:
    """Split keys into `num_shards` groups of nearly equal bytes (largest first, greedy)."""
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    sizes = [0] * num_shards
    for key in sorted(tensors, key=lambda k: (-tensors[k].nbytes, k)):
        smallest = min(range(num_shards), key=lambda s: (sizes[s], s))
        shards[smallest].append(key)
        sizes[smallest] += tensors[key].nbytes
    return [sorted(keys) for keys in shards]


def _checkpoint_tensors(state_dict, layout: str, experts: str, dtype) -> dict[str, torch.Tensor]:
    """The model's state dict renamed (and split, for per-expert) into checkpoint keys,
    every tensor a row-major copy (a loaded model's experts are stored transposed)."""
    out, row_major = {}, torch.contiguous_format
    for key, tensor in state_dict.items():
        if layout == "text" and key == "lm_head.weight":
            continue  # a bare text export has no lm_head
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        match = EXPERT_KEY.match(key)
        if match is None or experts == "fused":
            out[file_key(key, layout)] = tensor.clone(memory_format=row_major)
            continue
        prefix = file_key(f"model.layers.{match.group(1)}.mlp.experts.", layout)
        for e, weight in enumerate(tensor):
            if match.group(2) == "down_proj":
                out[f"{prefix}{e}.down_proj.weight"] = weight.clone(memory_format=row_major)
            else:
                gate, up = weight.chunk(2, dim=0)  # gate rows first, then up
                out[f"{prefix}{e}.gate_proj.weight"] = gate.clone(memory_format=row_major)
                out[f"{prefix}{e}.up_proj.weight"] = up.clone(memory_format=row_major)
    return out


def save_thinker_checkpoint(
    state_dict,
    config: ThinkerTextConfig,
    out_dir,
    *,
    layout: str = "thinker",
    experts: str = "per_expert",
    num_shards: int = 2,
    dtype=None,
    extra_tensors=None,
) -> Path:
    """Write a thinker checkpoint in the real Qwen3-Omni layout; returns `out_dir`.

    state_dict: in the model's key space (`Qwen3OmniThinker.state_dict()`).
    layout: "thinker" (`thinker.model.*`, `thinker.lm_head.weight`), "thinker_only"
        (`model.*`, `lm_head.weight`) or "text" (`embed_tokens.weight`, `layers.*`,
        `norm.weight`, no lm_head).
    experts: "per_expert" (`...experts.{e}.{gate,up,down}_proj.weight`) or "fused".
    num_shards: 1 writes one `model.safetensors`; more write `model-0000k-of-0000n.safetensors`
        balanced by bytes plus `model.safetensors.index.json`.
    dtype: convert floating tensors to this dtype (None keeps theirs).
    extra_tensors: checkpoint keys written verbatim (foreign weights, a stray buffer).

    Bytes are deterministic (sorted keys, fixed metadata) and every file is written
    atomically. Stale `model*.safetensors` / index files from an earlier write are removed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if experts not in EXPERT_LAYOUTS:
        raise ValueError(f"experts must be one of {EXPERT_LAYOUTS}, got {experts!r}")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    dtype = None if dtype is None else parse_dtype(dtype)

    tensors = _checkpoint_tensors(state_dict, layout, experts, dtype)
    for key, tensor in (extra_tensors or {}).items():
        if key in tensors:
            raise ValueError(f"extra_tensors key {key!r} clashes with a model weight")
        tensors[key] = tensor.detach().to("cpu").contiguous().clone()
    if num_shards > len(tensors):
        raise ValueError(f"num_shards={num_shards} exceeds the number of tensors ({len(tensors)})")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if num_shards == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{k:05d}-of-{num_shards:05d}.safetensors" for k in range(1, num_shards + 1)]
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)

    weight_map = {}
    for name, keys in zip(names, _balanced_shards(tensors, num_shards)):
        shard = {k: tensors[k] for k in keys}
        atomic_write_bytes(out_dir / name, save(shard, {"format": "pt"}))
        weight_map.update(dict.fromkeys(keys, name))
    if num_shards > 1:
        total = sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out_dir / INDEX_FILE, index)
    _write_json(out_dir / "config.json", nested_config_dict(config))
    return out_dir


def foreign_tensors(seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Small stand-ins for the non-thinker weights the real file also holds.

    Real key names (talker, code2wav, audio tower, vision tower) with tiny random tensors,
    for `save_thinker_checkpoint(..., extra_tensors=...)`, so tests can prove the loader
    never reads them.
    """
    shapes = {
        "talker.model.layers.0.self_attn.q_proj.weight": (16, 8),
        "talker.model.layers.0.mlp.experts.0.gate_proj.weight": (4, 8),
        "talker.codec_head.weight": (12, 8),
        "talker.model.codec_embedding.weight": (12, 8),
        "code2wav.decoder.0.conv.weight": (8, 4, 3),
        "code2wav.upsample.0.0.conv.weight": (8, 8, 2),
        "thinker.audio_tower.layers.0.fc1.weight": (16, 8),
        "thinker.audio_tower.conv2d1.weight": (4, 1, 3, 3),
        "thinker.visual.blocks.0.attn.qkv.weight": (24, 8),
        "thinker.visual.merger.mlp.0.weight": (8, 16),
    }
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------------
# Memory arithmetic
# ---------------------------------------------------------------------------------------------


def memory_estimate(
    config: ThinkerTextConfig,
    dtype=torch.bfloat16,
    *,
    layers=None,
    max_resident_experts=None,
) -> dict:
    """Bytes of the thinker's weights by part, in `dtype` (what `load_thinker` holds).

    Keys: bytes_per_expert, num_experts_total, experts (all of them), attention_norms_router
    (attention, q/k norms, layer norms, router, final norm), dense_mlp, embeddings_lm_head,
    thinker (the sum). With `layers` / `max_resident_experts` (as for load_thinker) it adds
    `resident`: what that load keeps in memory, with the expert cache full.
    """
    size = parse_dtype(dtype).itemsize
    c = config
    hidden, head_dim = c.hidden_size, c.head_dim
    per_expert = 3 * hidden * c.moe_intermediate_size * size
    attention = (
        hidden * c.num_attention_heads * head_dim * 2  # q_proj, o_proj
        + hidden * c.num_key_value_heads * head_dim * 2  # k_proj, v_proj
        + 2 * head_dim  # q_norm, k_norm
        + 2 * hidden  # input and post-attention layer norms
    ) * size
    router = c.num_experts * hidden * size
    dense_mlp = 3 * hidden * c.intermediate_size * size
    embeddings = c.vocab_size * hidden * size * (1 if c.tie_word_embeddings else 2)

    def part_bytes(indices, experts_cap=None):
        sparse = [i for i in indices if c.is_sparse(i)]
        n_experts = len(sparse) * c.num_experts
        if experts_cap is not None:
            n_experts = min(n_experts, experts_cap)
        return {
            "num_experts_total": len(sparse) * c.num_experts,
            "experts": n_experts * per_expert,
            "attention_norms_router": len(indices) * attention
            + len(sparse) * router
            + hidden * size,
            "dense_mlp": (len(indices) - len(sparse)) * dense_mlp,
        }

    whole = part_bytes(range(c.num_hidden_layers))
    out = {"bytes_per_expert": per_expert, **whole, "embeddings_lm_head": embeddings}
    out["thinker"] = (
        whole["experts"] + whole["attention_norms_router"] + whole["dense_mlp"] + embeddings
    )
    if layers is not None or max_resident_experts is not None:
        _check_resident_bound(max_resident_experts)
        chosen = part_bytes(_layer_indices(layers, c.num_hidden_layers), max_resident_experts)
        out["resident"] = (
            chosen["experts"] + chosen["attention_norms_router"] + chosen["dense_mlp"] + embeddings
        )
    return out
