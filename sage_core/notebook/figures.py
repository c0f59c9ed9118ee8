"""Deterministic figure export: one helper writes PNG, SVG and PDF byte-identically on rerun."""

from pathlib import Path

import matplotlib.pyplot as plt

from sage_core.atomic import atomic_write
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
            paths[fmt] = atomic_write(
                out / f"{name}.{fmt}",
                lambda f, fmt=fmt, metadata=metadata: fig.savefig(
                    f, format=fmt, dpi=dpi, metadata=metadata, bbox_inches="tight"
                ),
            )
    return paths


# What the inline backend passes to savefig for every displayed figure: without the metadata
# override each PNG embeds "Software: Matplotlib version<x.y.z>", so outputs change with the
# matplotlib version even when the pixels do not.
INLINE_PRINT_KWARGS = {"bbox_inches": "tight", "metadata": {"Software": None}}


def setup_notebook() -> None:
    """Pin what a notebook's inline figures depend on, so committed outputs are byte-identical.

    Call it once, in the first code cell of every notebook, before plotting: it resets rcParams
    to matplotlib's defaults (a user's matplotlibrc or style must not leak into committed
    outputs) and makes inline PNGs carry no software stamp. Outside IPython only the rcParams
    part applies.
    """
    import matplotlib

    matplotlib.rcdefaults()
    matplotlib.rcParams.update({"svg.hashsalt": SVG_HASH_SALT, "svg.fonttype": "path"})
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    import matplotlib.pyplot  # noqa: F401  (activates the inline backend, which sets formatters)
    from IPython.core.pylabtools import select_figure_formats

    try:
        from matplotlib_inline.config import InlineBackend
    except ImportError:
        InlineBackend = None
    if InlineBackend is not None:  # so a later `%matplotlib inline` keeps the same settings
        InlineBackend.instance(parent=shell).print_figure_kwargs = dict(INLINE_PRINT_KWARGS)
    select_figure_formats(shell, {"png"}, **INLINE_PRINT_KWARGS)
