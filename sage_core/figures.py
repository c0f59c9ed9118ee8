"""Deterministic figure export: one helper writes PNG, SVG and PDF byte-identically on rerun."""

from pathlib import Path

import matplotlib.pyplot as plt

from sage_core.paths import FIGURES

# No dates, no software stamps: the bytes depend only on the figure.
_METADATA = {
    "png": {"Software": None},
    "svg": {"Date": None, "Creator": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
}
SVG_HASH_SALT = "sage-dtype-trust"


def save_figure(fig, name: str, directory: Path | str | None = None, dpi: int = 120) -> dict:
    """Write `fig` as `<name>.png`, `.svg` and `.pdf` under `directory` (default: figures/).

    Returns the paths by format. Files are written atomically (temp file, then rename).
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem, got {name!r}")
    out = Path(directory) if directory is not None else FIGURES
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    with plt.rc_context({"svg.hashsalt": SVG_HASH_SALT, "svg.fonttype": "path"}):
        for fmt, metadata in _METADATA.items():
            path = out / f"{name}.{fmt}"
            tmp = path.with_suffix(f".{fmt}.tmp")
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=metadata, bbox_inches="tight")
            tmp.replace(path)
            paths[fmt] = path
    return paths
