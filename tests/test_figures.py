"""save_figure: three formats, byte-identical reruns, no dates or version stamps."""

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import pytest  # noqa: E402

from sage_core.notebook.figures import save_figure, setup_notebook  # noqa: E402
from sage_core.paths import NOTEBOOKS  # noqa: E402

# What a date or a software stamp looks like in PNG text chunks, SVG metadata and PDF info.
STAMPS = [
    re.compile(rb"\d{4}-\d{2}-\d{2}"),  # ISO dates (SVG dc:date)
    re.compile(rb"D:\d{8}"),  # PDF dates
    re.compile(rb"CreationDate|ModDate|Producer|Creator|Software|dc:date"),
    re.compile(rb"[Mm]atplotlib v(?:ersion)?\s?\d"),
    re.compile(re.escape(matplotlib.__version__.encode())),
]


def make_figure():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1.0, 0.5, 2.0], label="float32")
    ax.set_title("inv_freq dtype")
    ax.legend()
    return fig


@pytest.fixture
def figure():
    fig = make_figure()
    yield fig
    plt.close(fig)


def test_three_formats_byte_identical_on_rerun_and_from_a_new_figure(figure, tmp_path):
    paths = save_figure(figure, "01_example", tmp_path)
    assert set(paths) == {"png", "svg", "pdf"}
    assert all(p == tmp_path / f"01_example.{fmt}" for fmt, p in paths.items())
    first = {fmt: p.read_bytes() for fmt, p in paths.items()}
    assert first["png"].startswith(b"\x89PNG") and first["pdf"].startswith(b"%PDF")
    assert b"<svg" in first["svg"]

    again = save_figure(figure, "01_example", tmp_path)
    assert {fmt: p.read_bytes() for fmt, p in again.items()} == first

    fresh = make_figure()
    try:
        other = save_figure(fresh, "01_example", tmp_path / "other")
    finally:
        plt.close(fresh)
    assert {fmt: p.read_bytes() for fmt, p in other.items()} == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "01_example.pdf",
        "01_example.png",
        "01_example.svg",
    ]  # no temporary files left


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_no_dates_or_version_stamps(figure, tmp_path, fmt):
    data = save_figure(figure, "01_example", tmp_path)[fmt].read_bytes()
    found = [m.group() for pattern in STAMPS for m in pattern.finditer(data)]
    assert found == []


def test_stamp_patterns_catch_matplotlibs_defaults(figure, tmp_path):
    # Guard for the test above: with matplotlib's default metadata every format has a stamp.
    for fmt in ("png", "svg", "pdf"):
        figure.savefig(tmp_path / f"default.{fmt}", format=fmt)
        data = (tmp_path / f"default.{fmt}").read_bytes()
        assert any(pattern.search(data) for pattern in STAMPS), fmt


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "../up"])
def test_rejects_names_that_are_not_plain_file_stems(figure, tmp_path, name):
    with pytest.raises(ValueError, match="plain file stem"):
        save_figure(figure, name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_setup_notebook_resets_rcparams_outside_ipython():
    with matplotlib.rc_context({"lines.linewidth": 7.0, "figure.dpi": 33}):
        setup_notebook()
        assert (
            matplotlib.rcParams["lines.linewidth"] == matplotlib.rcParamsDefault["lines.linewidth"]
        )
        assert matplotlib.rcParams["figure.dpi"] == matplotlib.rcParamsDefault["figure.dpi"]
        assert matplotlib.get_backend().lower() == "agg"  # the backend is left alone


# --- the notebooks' figures go where the run says ------------------------------------------

SAVE_CALL = re.compile(r"save_figure\(([^()]*(?:\([^()]*\)[^()]*)*)\)")


@pytest.mark.parametrize(
    "notebook",
    sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")),
    ids=lambda p: p.stem,
)
def test_notebooks_declare_figures_dir_and_save_every_figure_there(notebook):
    """`run --out DIR` sets figures_dir to DIR/figures: a save_figure call that ignores it
    would overwrite the committed figures on such a rerun."""
    nb = nbformat.read(notebook, as_version=4)
    [parameters] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert re.search(r"^figures_dir = None\b", parameters.source, re.MULTILINE)
    calls = [
        m.group(1) for c in nb.cells if c.cell_type == "code" for m in SAVE_CALL.finditer(c.source)
    ]
    assert calls, "a notebook without figures need not declare figures_dir; this one has some"
    for args in calls:
        assert "directory=figures_dir" in args, f"save_figure({args}) ignores figures_dir"
