"""The table of a sweep: one row per run, one column per parameter and per headline number.

Written as `sweep.csv` and `sweep.json` (a list of row objects, what `pandas.read_json` reads
as records) beside the run folders; `plot_headline` draws one headline across runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sage_core.atomic import atomic_write_table

TABLE_STEM = "sweep"
# Columns every table starts (run identity) and ends (how it went) with.
LEADING_COLUMNS = ("notebook", "run", "status")
TRAILING_COLUMNS = ("error", "duration_s")


def build_table(records: list[dict | None], runs: list[str]) -> list[dict]:
    """Rows of the table, one per run folder name in `runs`, from its record (None: the run has
    no record, status "missing"). Parameter columns come first, then headline columns; a
    headline named like a parameter is prefixed `headline_`. A run lacking a column has None."""
    parameter_names = sorted({n for r in records if r for n in r.get("parameters", {})})
    headline_names = sorted({n for r in records if r for n in r.get("headline", {})})
    headline_columns = {
        n: f"headline_{n}" if n in parameter_names or n in LEADING_COLUMNS + TRAILING_COLUMNS else n
        for n in headline_names
    }
    rows = []
    for record, run in zip(records, runs, strict=True):
        record = record or {"notebook": run.rsplit("-", 1)[0], "status": "missing"}
        row = {"notebook": record.get("notebook"), "run": run, "status": record.get("status")}
        row.update({n: record.get("parameters", {}).get(n) for n in parameter_names})
        row.update({c: record.get("headline", {}).get(n) for n, c in headline_columns.items()})
        row.update({c: record.get(c) for c in TRAILING_COLUMNS})
        rows.append(row)
    return rows


def write_table(rows: list[dict], out: Path | str) -> dict[str, Path]:
    """Write `rows` as `out`/sweep.csv and `out`/sweep.json, atomically."""
    columns = list(rows[0]) if rows else list(LEADING_COLUMNS + TRAILING_COLUMNS)
    return atomic_write_table(Path(out) / TABLE_STEM, rows, columns=columns, sort_keys=False)


def read_table(path: Path | str) -> list[dict]:
    """The rows of a written table: `sweep.json`, or the sweep's output folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{TABLE_STEM}.json"
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} is not a sweep table (a JSON list of row objects)")
    return rows


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plot_headline(rows: list[dict], headline: str, x: str = "seed", by: str | None = None, ax=None):
    """One headline number across runs: a point per finished run at its value of parameter `x`,
    and per group (value of `by`, or all runs) the mean with its 95% t-interval as a band.

    Returns the matplotlib figure. Raises ValueError naming the column if `headline`, `x` or
    `by` is not in the table, or if no finished run has a number for `headline`.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    for role, name in (("headline", headline), ("x", x), ("by", by)):
        if name is not None and name not in columns:
            raise ValueError(f"{role} column {name!r} is not in the table: {sorted(columns)}")
    used = [r for r in rows if r.get("status") == "ok" and _is_number(r.get(headline))]
    if not used:
        raise ValueError(f"no finished run has a number for {headline!r}")
    numeric_x = all(_is_number(r.get(x)) for r in used)
    categories = sorted({str(r.get(x)) for r in used})
    position = (lambda v: v) if numeric_x else (lambda v: categories.index(str(v)))
    groups = {}
    for row in used:
        groups.setdefault(row.get(by) if by else None, []).append(row)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    xs_all = [position(r.get(x)) for r in used]
    span = (min(xs_all) - 0.5, max(xs_all) + 0.5)
    for index, (group, members) in enumerate(sorted(groups.items(), key=lambda g: str(g[0]))):
        color = f"C{index % 10}"
        values = np.array([r[headline] for r in members], dtype=float)
        label = f"{by} = {group}" if by else headline
        ax.scatter([position(r.get(x)) for r in members], values, color=color, label=label, s=18)
        mean = values.mean()
        ax.hlines(mean, *span, color=color, linewidth=1)
        if len(values) > 1:
            low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
            if math.isfinite(low):  # all values equal: no band to draw
                ax.fill_between(span, low, high, color=color, alpha=0.15, linewidth=0)
    if not numeric_x:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlim(*span)
    ax.set_xlabel(x)
    ax.set_ylabel(headline)
    ax.set_title(f"{headline} over {len(used)} runs (mean, 95% t-interval)")
    ax.legend(fontsize="small")
    return fig
