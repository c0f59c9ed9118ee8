"""The checkpoint writer: the real layout (or an exporter's), sharded, atomically."""

from pathlib import Path

import torch
from safetensors.torch import save

from sage_core.atomic import atomic_write_bytes, atomic_write_json
from sage_core.checkpoint.layout import (
    EXPERT_KEY,
    EXPERT_LAYOUTS,
    INDEX_FILE,
    LAYOUTS,
    SINGLE_FILE,
    file_key,
)
from sage_core.dtypes import parse_dtype
from sage_core.model.config import ThinkerTextConfig, nested_config_dict


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
        atomic_write_json(out_dir / INDEX_FILE, index)
    atomic_write_json(out_dir / "config.json", nested_config_dict(config))
    return out_dir
