"""The batch runner: selection, parameters, in-place and --out runs, failures, determinism.

Each executed notebook starts a kernel (about a second); the module stays well under a minute.
"""

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from sage_core.notebook import cli, runner

PARAMS = "model_path = None\ndevice = 'cpu'\ndtype = 'float32'\nn = 2"


def outputs_text(cell):
    return "".join(
        out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in cell.outputs
    )


# --- no kernel needed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-1.5e-3", -1.5e-3),
        ("True", True),
        ("None", None),
        ("[1, 2]", [1, 2]),
        ("{'a': 1}", {"a": 1}),
        ("'3'", "3"),
        ("float32", "float32"),
        ("cuda:0", "cuda:0"),
        ("/models/Qwen3-Omni", "/models/Qwen3-Omni"),
        ("", ""),
        ("1 +", "1 +"),
    ],
)
def test_parameter_values_are_literals_else_strings(text, value):
    assert runner.parse_value(text) == value
    assert type(runner.parse_value(text)) is type(value)


def test_discovery_is_sorted_and_only_numbered(make_notebook, tmp_path):
    for name in ("02_b", "01_a", "scratch", "1_bad"):
        make_notebook(name, [PARAMS])
    assert [p.name for p in runner.discover_notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb"]
    bare = runner.resolve_notebook("02_b", directory=tmp_path)
    assert bare == (tmp_path / "02_b.ipynb").resolve()
    assert runner.resolve_notebook(tmp_path / "scratch.ipynb") == (tmp_path / "scratch.ipynb")
    with pytest.raises(runner.RunError, match="'03_c' not found.*01_a, 02_b"):
        runner.resolve_notebook("03_c", directory=tmp_path)


def test_each_notebook_gets_only_the_parameters_it_declares(make_notebook):
    a = make_notebook("01_a", [PARAMS])
    b = make_notebook("02_b", ["model_path = None\ndevice = 'cpu'\ndtype = 'float32'\nseed = 0"])
    given = {"n": 5, "seed": 1, "device": "cuda"}
    assert runner.parameters_per_notebook([a, b], given) == {
        a: {"n": 5, "device": "cuda"},
        b: {"seed": 1, "device": "cuda"},
    }


def test_unknown_parameter_exits_2_naming_it_and_the_declared_ones(make_notebook, capsys):
    path = make_notebook("01_a", [PARAMS])
    before = path.read_bytes()
    assert cli.main(["run", str(path), "-p", "n", "3", "-p", "layers", "4"]) == 2
    err = capsys.readouterr().err
    assert "'layers'" in err and "declared: device, dtype, model_path, n" in err
    assert path.read_bytes() == before  # nothing ran


def test_missing_notebook_exits_2(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.ipynb")]) == 2
    assert "nope.ipynb" in capsys.readouterr().err


def test_normalise_removes_volatile_metadata_and_pins_added_cell_ids():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("x", metadata={"tags": ["papermill-error-cell-tag"]}),
            nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["injected-parameters"]}),
            nbformat.v4.new_code_cell("n", metadata={"tags": []}),
        ],
        metadata={
            "papermill": {"start_time": "2025-01-01T00:00:00", "input_path": "/abs/in.ipynb"},
            "widgets": {"application/vnd.jupyter.widget-state+json": {}},
            "language_info": {"name": "python", "version": "3.11.7"},
        },
    )
    for cell in nb.cells:
        cell.metadata["papermill"] = {"duration": 0.1}
        cell.metadata["execution"] = {"iopub.status.busy": "2025-01-01T00:00:00"}
    nb = runner.normalise(nb)
    text = nbformat.writes(nb)
    for volatile in ('papermill"', "widgets", "2025-", "/abs/", "iopub"):
        assert volatile not in text
    # What the kernel reports, and JupyterLab writes on save, is kept as it is.
    assert nb.metadata.language_info == {"name": "python", "version": "3.11.7"}
    assert nb.metadata.kernelspec.display_name == runner.KERNEL_DISPLAY_NAME
    assert [c.id for c in nb.cells] == [
        "papermill-error-marker-0",
        "injected-parameters",
        nb.cells[2].id,
    ]
    assert "tags" not in nb.cells[2].metadata
    assert nb.metadata.kernelspec.name == "sage-dtype-trust"


# --- executing notebooks ------------------------------------------------------------------------


def test_in_place_run_updates_outputs_is_byte_identical_and_uses_this_python(make_notebook):
    path = make_notebook(
        "01_a",
        [
            "from sage_core.notebook.figures import setup_notebook\nsetup_notebook()",
            PARAMS,
            "import sys\nprint(sys.executable)\nn * 3",
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
        ],
        parameters=False,
    )
    nb = nbformat.read(path, 4)
    nb.cells[2].metadata["tags"] = ["parameters"]
    nbformat.write(nb, path)

    assert cli.main(["run", str(path), "-p", "n", "5"]) == 0
    first = path.read_bytes()
    nb = nbformat.read(path, 4)
    injected = [c for c in nb.cells if c.id == "injected-parameters"]
    assert len(injected) == 1 and "n = 5" in injected[0].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert outputs_text(code[3]) == f"{sys.executable}\n15"
    png = [o for o in code[4].outputs if "image/png" in o.get("data", {})]
    assert len(png) == 1  # the inline backend, whatever MPLBACKEND the shell has
    assert b"Software" not in base64.b64decode(png[0].data["image/png"])  # setup_notebook
    for volatile in (b"start_time", b"duration", b"iopub", str(path.parent).encode()):
        assert volatile not in first

    assert runner.run([path], {"n": 5}, progress=False)[0].status == "ok"
    assert path.read_bytes() == first

    # Without -p the stale injected cell goes: a run is defined by its command line alone.
    assert runner.run([path], progress=False)[0].status == "ok"
    nb = nbformat.read(path, 4)
    assert not [c for c in nb.cells if c.id == "injected-parameters"]
    assert outputs_text([c for c in nb.cells if c.cell_type == "code"][2]).endswith("6")


def test_out_writes_copies_and_run_json(make_notebook, tmp_path):
    a = make_notebook("01_a", [PARAMS, "print(n, device)"])
    b = make_notebook("02_b", ["model_path = None\ndevice = 'cpu'\ndtype = 'float32'", "2 + 2"])
    sources = {p: p.read_bytes() for p in (a, b)}
    out = tmp_path / "out"
    assert cli.main(["run", str(a), str(b), "-p", "n", "7", "--out", str(out)]) == 0

    assert {p: p.read_bytes() for p in (a, b)} == sources  # sources untouched
    first = nbformat.read(out / "01_a.ipynb", 4)
    assert outputs_text(first.cells[-1]) == "7 cpu\n"
    second = nbformat.read(out / "02_b.ipynb", 4)
    assert not [c for c in second.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert outputs_text(second.cells[-1]) == "4"

    record = json.loads((out / "run.json").read_text())
    assert record["parameters"] == {"n": 7}
    for key in ("python", "torch", "numpy", "scikit-learn", "papermill", "sage_core"):
        assert record["versions"][key], key
    assert set(record["git"]) == {"commit", "dirty"}
    assert [(r["name"], r["status"], r["error"]) for r in record["notebooks"]] == [
        ("01_a", "ok", None),
        ("02_b", "ok", None),
    ]
    assert record["notebooks"][0]["parameters"] == {"n": 7}
    assert record["notebooks"][1]["parameters"] == {}
    assert all(r["duration_s"] > 0 for r in record["notebooks"])


def test_failing_cell_exits_nonzero_names_cell_and_keeps_partial(make_notebook, tmp_path):
    bad = make_notebook("01_bad", [PARAMS, "print('before')", "1 / 0", "print('after')"])
    later = make_notebook("02_later", [PARAMS, "print('ran')"])
    later_before = later.read_bytes()
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sage_core", "run", str(bad), str(later), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "without encryption" not in proc.stderr  # the kernel runs with CurveZMQ keys
    assert "01_bad: failed at code cell 2 (In [3]): ZeroDivisionError: division by zero" in (
        proc.stderr
    )

    partial = nbformat.read(out / "01_bad.ipynb", 4)
    code = [c for c in partial.cells if c.cell_type == "code"]
    assert outputs_text(code[1]) == "before\n"
    assert code[2].outputs[0].output_type == "error"
    assert code[3].execution_count is None and code[3].outputs == []
    record = json.loads((out / "run.json").read_text())
    assert record["notebooks"][0]["status"] == "failed"
    assert record["notebooks"][0]["error"] == "ZeroDivisionError: division by zero"
    assert (record["notebooks"][0]["code_cell"], record["notebooks"][0]["execution_count"]) == (
        2,
        3,
    )
    assert record["not_run"] == ["02_later"]
    assert not (out / "02_later.ipynb").exists() and later.read_bytes() == later_before
    assert not list(out.glob(".*"))  # no temporary files left behind


FIGURE_CELL = (
    "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
    "from sage_core.notebook.figures import save_figure\n"
    "fig, ax = plt.subplots()\nax.plot([1, n])\n"
    "paths = save_figure(fig, '99_runner_test', directory=figures_dir)"
)


def test_out_sends_figures_to_out_figures_and_lists_them(make_notebook, tmp_path):
    from sage_core.paths import FIGURES

    with_figures = make_notebook("01_fig", [PARAMS + "\nfigures_dir = None", FIGURE_CELL])
    without = make_notebook("02_plain", [PARAMS, "n + 1"])
    out = tmp_path / "out"
    assert (
        cli.main(["run", str(with_figures), str(without), "-p", "n", "4", "--out", str(out)]) == 0
    )
    assert not list(FIGURES.glob("99_runner_test.*"))  # the project's figures/ untouched
    expected = [f"figures/99_runner_test.{fmt}" for fmt in ("pdf", "png", "svg")]
    assert all((out / name).is_file() for name in expected)
    record = json.loads((out / "run.json").read_text())
    assert record["parameters"] == {"n": 4}
    first, second = record["notebooks"]
    assert first["figures"] == expected and second["figures"] == []
    assert first["parameters"] == {"n": 4, "figures_dir": str(out / "figures")}
    assert second["parameters"] == {"n": 4}  # it does not declare figures_dir

    # An explicit figures_dir wins over --out's; a rerun that rewrites the same bytes is
    # still listed, since the notebook wrote them.
    elsewhere = tmp_path / "elsewhere"
    argv = ["run", str(with_figures), "-p", "figures_dir", str(elsewhere), "--out", str(out)]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in elsewhere.iterdir()) == [e.split("/")[1] for e in expected]
    assert json.loads((out / "run.json").read_text())["notebooks"][0]["figures"] == []


def test_progress_bars_are_one_stdout_line_in_the_notebook(make_notebook):
    path = make_notebook(
        "01_progress",
        [
            PARAMS,
            "from sage_core.notebook.progress import progress\n"
            "for _ in progress(range(50), desc='work'):\n    pass",
        ],
    )
    assert runner.run([path], progress=False)[0].status == "ok"
    [output] = nbformat.read(path, 4).cells[-1].outputs
    assert (output.output_type, output.name) == ("stream", "stdout")
    assert output.text == "work: 100%|########################| 50/50\n"


def test_failing_cell_in_place_keeps_the_partial_notebook(make_notebook):
    bad = make_notebook("01_bad", [PARAMS, "n = n + 1", "raise ValueError(f'bad n={n}')"])
    [result] = runner.run([bad], progress=False)
    assert (result.status, result.error) == ("failed", "ValueError: bad n=3")
    assert (result.code_cell, result.execution_count) == (2, 3)
    code = [c for c in nbformat.read(bad, 4).cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2, 3]
    assert code[2].outputs[0].ename == "ValueError"
    assert not list(bad.parent.glob(".*"))


# --- the runner's files pass nbval with tests/nbval_sanitize.cfg ---------------------------------

SANITIZE = Path(__file__).parent / "nbval_sanitize.cfg"
VOLATILE_CELLS = [
    PARAMS,
    "from tqdm import tqdm\nfor _ in tqdm(range(3)):\n    pass",
    "print(object())",
    "import time\nt = time.perf_counter()\nprint(f'took {time.perf_counter() - t:.6f} s')",
    "import tqdm as tqdm_module\nprint(tqdm_module.__file__)",
    "2 + 2",
]


def nbval(path):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbval",
            str(path),
            "--nbval-sanitize-with",
            str(SANITIZE),
            "--nbval-kernel-name",
            "sage-dtype-trust",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=path.parent,
    )


def test_sanitize_config_is_ascii_and_parsed_by_nbval():
    from nbval.plugin import get_sanitize_patterns

    text = SANITIZE.read_text(encoding="utf-8")
    assert text.isascii()  # nbval opens it in the locale's encoding
    patterns = get_sanitize_patterns(text)
    assert len(patterns) == text.count("\nregex: ")
    for regex, _ in patterns:
        re.compile(regex)


def test_runner_output_passes_nbval_and_nbval_still_compares(make_notebook):
    path = make_notebook("01_volatile", VOLATILE_CELLS)
    assert runner.run([path], progress=False)[0].status == "ok"
    proc = nbval(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    nb = nbformat.read(path, 4)
    nb.cells[-1].outputs[0].data["text/plain"] = "5"  # a claim that is no longer true
    nbformat.write(nb, path)
    proc = nbval(path)
    assert proc.returncode == 1 and "Cell outputs differ" in proc.stdout


@pytest.mark.parametrize("notebook", runner.discover_notebooks(), ids=lambda p: p.stem)
def test_committed_metadata_is_what_lab_and_the_kernel_write(notebook):
    """JupyterLab rewrites kernelspec and language_info from the running kernel on open; if the
    committed ones differ, the tab shows "modified" at once and a save changes the file. (The
    Python version is the one the notebooks were last run with; the browser test checks the
    whole file on this machine.)"""
    from ipykernel.ipkernel import IPythonKernel

    metadata = nbformat.read(notebook, as_version=4).metadata
    assert metadata.kernelspec == {
        "display_name": runner.KERNEL_DISPLAY_NAME,
        "language": "python",
        "name": runner.KERNEL_NAME,
    }
    reported = dict(IPythonKernel.language_info)
    assert metadata.language_info.keys() == reported.keys()
    assert {k: v for k, v in metadata.language_info.items() if k != "version"} == {
        k: v for k, v in reported.items() if k != "version"
    }
