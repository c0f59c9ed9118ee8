"""Headline numbers: what a notebook concludes, recorded in its outputs in machine-readable form.

A notebook calls `record(name=value, ...)` once per claim it wants aggregated. The values are
displayed as one output whose bundle carries a plain-text line (what a reader sees in Lab and
in the committed notebook) and a JSON payload under `MIME_TYPE` (what the runner and sweeps
read back with `read`). Like scrapbook's glue, nothing besides the executed notebook is
needed to recover them, so a notebook run by papermill's own CLI records them too.
"""

from __future__ import annotations

import json
import math
import numbers

MIME_TYPE = "application/vnd.sage-core.headline+json"


def _plain(name: str, value):
    """A JSON-safe scalar, or a clear error naming the value at fault."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"headline {name!r} is {value}: record finite numbers only")
        return value
    if hasattr(value, "item"):  # numpy and torch scalars, one-element arrays and tensors
        try:
            return _plain(name, value.item())
        except (ValueError, RuntimeError):
            pass
    raise TypeError(
        f"headline {name!r} must be a number, bool, string or None, got {type(value).__name__}"
    )


def bundle(**values) -> dict:
    """The display bundle `record` shows: {'text/plain': ..., MIME_TYPE: '{...}'}.

    The payload is JSON *text*, not a JSON object: JupyterLab rewrites JSON numbers in the
    JavaScript way on save (1.0 becomes 1, 1.2e-05 becomes 0.000012), so an object would change
    the notebook's bytes when it is opened and saved unchanged; a string survives untouched.
    """
    if not values:
        raise ValueError("record() needs at least one name=value")
    payload = {name: _plain(name, value) for name, value in values.items()}
    text = "headline: " + ", ".join(f"{k} = {v!r}" for k, v in payload.items())
    return {"text/plain": text, MIME_TYPE: json.dumps(payload, sort_keys=True)}


def record(**values) -> None:
    """Show `values` as this notebook's headline numbers (one output, plain text plus JSON)."""
    from IPython.display import display

    display(bundle(**values), raw=True)


def read(nb) -> dict:
    """Every headline recorded in an executed notebook (an nbformat node or a path), merged in
    cell order; a name recorded twice keeps its last value."""
    if not hasattr(nb, "cells"):
        import nbformat

        nb = nbformat.read(str(nb), as_version=4)
    found = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = output.get("data", {})
            if MIME_TYPE in data:
                payload = data[MIME_TYPE]
                found.update(json.loads(payload) if isinstance(payload, str) else payload)
    return found
