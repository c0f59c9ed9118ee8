"""One versioned, checksummed file format for trust and classifier state.

A state file is one safetensors file: named tensors plus string metadata holding the
state's `kind`, its `schema_version` and a sha256 over every tensor's name, dtype, shape
and bytes. It is written atomically (temp file, fsync, rename). Reading checks, in order:
the file exists and parses, the kind, the schema version (older files are refused with a
clear error, never read as something else), the tensor names and the checksum. Every
defect is the caller's error class, with the file's path in the message.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from sage_core.atomic import atomic_write_bytes


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_state(
    path, kind: str, schema_version: int, tensors: dict[str, torch.Tensor], metadata: dict
) -> Path:
    """Write `tensors` and `metadata` (str values) with kind, version and checksum."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    reserved = {"kind", "schema_version", "sha256"} & set(metadata)
    if reserved:
        raise ValueError(f"metadata may not set {sorted(reserved)}")
    full = {
        **{k: str(v) for k, v in metadata.items()},
        "kind": kind,
        "schema_version": str(schema_version),
        "sha256": tensors_sha256(tensors),
    }
    path = Path(path)
    atomic_write_bytes(path, safetensors_save(tensors, metadata=full))
    return path


def load_state(path, kind: str, schema_version: int, names, error: type[Exception], what: str):
    """(tensors, metadata) of a file written by `save_state` for this kind and version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise error(f"{path}: not a readable {what} file ({exc})") from exc
    if metadata.get("kind") != kind:
        raise error(f"{path}: not a {what} file (kind {metadata.get('kind')!r}, expected {kind!r})")
    version = metadata.get("schema_version")
    if version != str(schema_version):
        raise error(
            f"{path}: schema_version {version!r}, this code reads {schema_version}; "
            "older files cannot be read, save the state again with this version"
        )
    if set(tensors) != set(names):
        raise error(f"{path}: expected tensors {sorted(names)}, found {sorted(tensors)}")
    if tensors_sha256(tensors) != metadata.get("sha256"):
        raise error(f"{path}: tensor checksum mismatch (corrupt file)")
    return tensors, metadata
