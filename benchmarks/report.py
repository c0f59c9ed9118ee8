"""The results table (markdown, printed and written to RESULTS.md, atomically)."""

from pathlib import Path

from benchmarks.suite import ConfigResult, Row
from sage_core.atomic import atomic_write_text

COLUMNS = (
    "config",
    "measure",
    "sage_core vs",
    "target",
    "measured",
    "spread (min-max)",
    "ceiling estimate here",
    "ceiling estimate, same products",
    "pass",
)


def _cells(row: Row) -> tuple[str, ...]:
    digits = 2 if row.unit == "x" else 3
    spread = "-" if row.low == row.high else f"{row.low:.{digits}f}-{row.high:.{digits}f}"
    return (
        row.config,
        row.measure,
        row.reference,
        row.target_text,
        f"{row.value:.{digits}f}{row.unit}",
        spread,
        "-" if row.ceiling is None else f"{row.ceiling:.2f}x",
        "-" if row.gemm_ceiling is None else f"{row.gemm_ceiling:.2f}x",
        "PASS" if row.passed else "FAIL",
    )


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def results_markdown(results: list[ConfigResult], header: list[str], skipped: list[str]) -> str:
    rows = [row for result in results for row in result.rows]
    parts = ["# Benchmarks", "", *header, "", markdown_table(rows), ""]
    for note in skipped:
        parts += [f"- {note}"]
    policies = [(result.name, row) for result in results for row in result.cache_policies]
    if policies:
        parts += [
            "",
            "Expert cache policies on the decode workload (one greedy generation, "
            "prefill and decode; bytes per generated token, as read by the real cache):",
            "",
        ]
        parts += [
            "| config | policy | cache | hit rate | hit rate / Belady's | bytes read per token |",
            "|---|---|---|---|---|---|",
        ]
        parts += [
            f"| {name} | {r['policy']} | {r['capacity']}/{r['total']} | {r['hit_rate']:.3f} | "
            f"{r['of_belady']:.2f} | {r['bytes_per_token'] / (1 << 20):.2f} MiB |"
            for name, r in policies
        ]
    for result in results:
        parts += ["", f"## {result.name}: `{result.source}`", "", "Checks:", ""]
        parts += [f"- {check}" for check in result.checks]
        parts += ["", "Measured (medians; the ratio above is the figure):", ""]
        parts += [f"- {row.measure} vs {row.reference}: {row.detail}" for row in result.rows]
        if result.notes:
            parts += ["", "Notes:", ""]
            parts += [f"- {note}" for note in result.notes]
    return "\n".join(parts) + "\n"


def write_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)
