"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path | str, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, rename it over `path`,
    then fsync the directory so the rename itself survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's 0600 would end up on the result: keep the target's mode, 0644 if new.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj, **dumps_kwargs) -> Path:
    """`obj` as JSON (indent 2, sorted keys, trailing newline unless told otherwise)."""
    kwargs = {"indent": 2, "sort_keys": True, **dumps_kwargs}
    return atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def atomic_write_table(stem: Path | str, rows: list[dict], columns=None, **dumps_kwargs) -> dict:
    """`rows` as `<stem>.csv` and `<stem>.json`, both atomically; returns the paths by format.

    CSV columns are `columns` (default: every key, in order of first appearance); a dict or
    list value is JSON-encoded in its cell, None is an empty cell. The JSON file is the list
    of rows as given (`dumps_kwargs` go to `atomic_write_json`).
    """
    import csv
    import io

    stem = Path(stem)
    columns = (
        list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {c: json.dumps(v) if isinstance(v := row.get(c), dict | list) else v for c in columns}
        )
    return {
        "csv": atomic_write_text(stem.with_name(stem.name + ".csv"), buffer.getvalue()),
        "json": atomic_write_json(stem.with_name(stem.name + ".json"), rows, **dumps_kwargs),
    }
