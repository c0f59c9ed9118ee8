"""The layout of the repository and of sage_core's rooms, and the shape of every committed notebook."""

import ast
import graphlib
import re

import nbformat
import pytest

from sage_core.paths import FIGURES, NOTEBOOKS, ROOT

KERNEL_NAME = "sage-dtype-trust"
REQUIRED_PARAMETERS = {"model_path", "device", "dtype"}
NOTEBOOK_NAME = re.compile(r"^\d\d_[a-z0-9]+(?:_[a-z0-9]+)*\.ipynb$")
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))
# Metadata that only a particular run has; committed notebooks are written without it.
VOLATILE_NOTEBOOK_METADATA = ("papermill", "widgets")
VOLATILE_CELL_METADATA = ("papermill", "execution")


@pytest.mark.parametrize(
    "entry",
    [
        "notebooks/",
        "sage_core/",
        "tests/",
        "figures/",
        "environment.yml",
        "README.md",
        "pyproject.toml",
        "Makefile",
        ".ci/run",
    ],
)
def test_top_level_layout(entry):
    path = ROOT / entry
    assert path.is_dir() if entry.endswith("/") else path.is_file(), f"{entry} is missing"


def test_ci_runs_the_readme_test_command():
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "make test" in commands
    assert "make test" in (ROOT / "README.md").read_text()


def imports_of(tree, package):
    """Absolute names of the modules a source file imports; `package` resolves relative ones."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


# The rooms of sage_core and the rooms each may import. errors, paths and atomic are the
# foundations every room may use; they import nothing from sage_core. The order is the
# architecture: the model knows nothing of checkpoints, trust or notebooks; notebook/ (runner,
# figures, progress) is tooling any room above the model may use; studies/ (one module per
# notebook) sits on top, and nothing but studies imports it.
FOUNDATIONS = {"errors", "paths", "atomic"}
ALLOWED_ROOMS = {
    "dtypes": set(),
    "model": {"dtypes"},
    "offload": {"model"},
    "checkpoint": {"dtypes", "model", "offload"},
    "corpus": {"model"},
    "trust": {"dtypes", "model"},
    "training": {"dtypes", "model", "checkpoint", "corpus", "notebook"},
    "notebook": set(),
    "studies": {
        "dtypes",
        "model",
        "checkpoint",
        "offload",
        "corpus",
        "trust",
        "training",
        "notebook",
    },
}
PUBLIC_FACE = {"__init__", "__main__"}  # sage_core/__init__.py re-exports; __main__ calls the cli


def room_of(relative):
    """('sage_core', 'model', 'moe.py') -> 'model'; ('sage_core', 'paths.py') -> 'paths'."""
    return relative.parts[1] if len(relative.parts) > 2 else relative.stem


def room_imports(root):
    """{(importing room, imported room): [files]} for every import between two rooms."""
    found = {}
    for path in sorted((root / "sage_core").rglob("*.py")):
        relative = path.relative_to(root)
        package = ".".join(relative.with_suffix("").parts[:-1])
        names = imports_of(ast.parse(path.read_text(), str(path)), package)
        here = room_of(relative)
        for name in names:
            parts = name.split(".")
            if parts[0] != "sage_core" or len(parts) < 2 or parts[1] == here:
                continue
            found.setdefault((here, parts[1]), set()).add(str(relative))
    return {edge: sorted(files) for edge, files in found.items()}


def layout_violations(root):
    problems = []
    for (here, there), files in sorted(room_imports(root).items()):
        if here in PUBLIC_FACE:
            continue
        if there not in FOUNDATIONS | set(ALLOWED_ROOMS):
            problems.append(f"{here} imports sage_core.{there}, which is not a room: {files}")
        elif here in FOUNDATIONS:
            problems.append(f"foundation {here} imports sage_core.{there}: {files}")
        elif here not in ALLOWED_ROOMS:
            problems.append(f"sage_core/{here} is not a room in ALLOWED_ROOMS: {files}")
        elif there not in FOUNDATIONS and there not in ALLOWED_ROOMS[here]:
            problems.append(f"{here} may not import {there}: {files}")
    return problems


def test_rooms_import_only_in_allowed_directions():
    assert layout_violations(ROOT) == []


def test_allowed_directions_have_no_cycle():
    graphlib.TopologicalSorter(ALLOWED_ROOMS).prepare()  # raises CycleError on a cycle


def test_only_studies_and_notebook_import_studies():
    importers = {here for (here, there) in room_imports(ROOT) if there == "studies"}
    assert importers <= {"studies", "notebook"}


def test_layout_check_can_fail(tmp_path):
    (tmp_path / "sage_core" / "model").mkdir(parents=True)
    (tmp_path / "sage_core" / "model" / "moe.py").write_text("from sage_core.trust import table\n")
    (tmp_path / "sage_core" / "paths.py").write_text("import sage_core.model.moe\n")
    (tmp_path / "sage_core" / "model" / "x.py").write_text("from ..studies import baseline\n")
    problems = "\n".join(layout_violations(tmp_path))
    assert "model may not import trust" in problems
    assert "foundation paths imports sage_core.model" in problems
    assert "model may not import studies" in problems


def importers_of_repro(root):
    found = []
    for path in sorted((root / "sage_core").rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[:3] == ("sage_core", "studies", "repro"):
            continue
        package = ".".join(relative.with_suffix("").parts[:-1])
        names = imports_of(ast.parse(path.read_text(), str(path)), package)
        if any(
            n == "sage_core.studies.repro" or n.startswith("sage_core.studies.repro.")
            for n in names
        ):
            found.append(str(relative))
    return found


def test_nothing_in_sage_core_imports_repro():
    assert importers_of_repro(ROOT) == []


@pytest.mark.parametrize(
    "source",
    [
        "import sage_core.studies.repro.rope_buffer",
        "from sage_core.studies.repro import rope_buffer",
        "from sage_core.studies import repro",
        "from . import repro",
        "from .repro.sklearn_boundary import fit",
    ],
)
def test_repro_import_scan_sees_every_form(tmp_path, source):
    (tmp_path / "sage_core" / "studies" / "repro").mkdir(parents=True)
    (tmp_path / "sage_core" / "studies" / "repro" / "__init__.py").write_text(
        "import sage_core.trust\n"
    )
    (tmp_path / "sage_core" / "studies" / "model.py").write_text(
        f'"""sage_core.studies.repro"""\n{source}\n'
    )
    assert importers_of_repro(tmp_path) == ["sage_core/studies/model.py"]


# --- notebooks ----------------------------------------------------------------------------------


def assigned_names(source):
    tree = ast.parse(source)
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def notebook_problems(nb, name):
    """Everything wrong with one committed notebook, as readable lines."""
    problems = []
    if not NOTEBOOK_NAME.match(name):
        problems.append(f"{name}: name is not NN_lower_case.ipynb")
    if nb.metadata.get("kernelspec", {}).get("name") != KERNEL_NAME:
        problems.append(f"{name}: kernelspec name is not {KERNEL_NAME!r}")
    problems += [
        f"{name}: notebook metadata {key!r} is run-specific (rerun with python -m sage_core run)"
        for key in VOLATILE_NOTEBOOK_METADATA
        if key in nb.metadata
    ]
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"{name}: {len(tagged)} cells tagged 'parameters', expected 1")
    elif tagged[0].cell_type != "code":
        problems.append(f"{name}: the 'parameters' cell is not a code cell")
    else:
        missing = REQUIRED_PARAMETERS - assigned_names(tagged[0].source)
        if missing:
            problems.append(f"{name}: parameters cell does not assign {sorted(missing)}")
    counts = []
    volatile_cells = set()
    for index, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        where = f"{name} cell {index}"
        if {"injected-parameters", "papermill-error-cell-tag"} & set(tags):
            problems.append(f"{where}: left by a parameterised or failed run; rerun with defaults")
        volatile_cells |= {key for key in VOLATILE_CELL_METADATA if key in cell.metadata}
        if cell.cell_type != "code":
            continue
        counts.append(cell.execution_count)
        if cell.execution_count is None:
            problems.append(f"{where}: not executed")
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if errors and "raises-exception" not in tags:
            problems.append(f"{where}: {errors[0].ename} output, not tagged 'raises-exception'")
    if volatile_cells:
        problems.append(
            f"{name}: cells carry run-specific metadata {sorted(volatile_cells)} "
            "(rerun with python -m sage_core run)"
        )
    if None not in counts and counts != list(range(1, len(counts) + 1)):
        problems.append(f"{name}: execution counts {counts} are not one clean top-to-bottom run")
    return problems


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_committed_notebook_shape(path):
    assert notebook_problems(nbformat.read(path, as_version=4), path.name) == []


def test_notebook_checks_can_fail():
    ok = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "model_path = None\ndevice: str = 'cpu'\ndtype = 'float32'",
                metadata={"tags": ["parameters"]},
                execution_count=1,
            ),
            nbformat.v4.new_code_cell(
                "1/0",
                metadata={"tags": ["raises-exception"]},
                execution_count=2,
                outputs=[nbformat.v4.new_output("error", ename="ZeroDivisionError")],
            ),
        ],
        metadata={"kernelspec": {"name": KERNEL_NAME, "display_name": KERNEL_NAME}},
    )
    assert notebook_problems(ok, "01_ok.ipynb") == []

    bad = nbformat.from_dict(ok)
    bad.metadata.kernelspec.name = "python3"
    bad.metadata["papermill"] = {"duration": 1.0}
    bad.cells[0].source = "model_path = None"
    del bad.cells[1].metadata["tags"]
    bad.cells.append(nbformat.v4.new_code_cell("x = 1"))
    problems = "\n".join(notebook_problems(bad, "1_Bad.ipynb"))
    for expected in (
        "NN_lower_case",
        "kernelspec",
        "'papermill' is run-specific (rerun with python -m sage_core run)",
        "does not assign ['device', 'dtype']",
        "ZeroDivisionError output",
        "cell 2: not executed",
    ):
        assert expected in problems


def test_figures_are_named_after_a_notebook():
    numbers = {p.name[:2] for p in NOTEBOOK_FILES}
    strays = [
        p.name
        for p in FIGURES.iterdir()
        if not p.name.startswith(".") and not (p.name[:3].endswith("_") and p.name[:2] in numbers)
    ]
    assert strays == [], "figures must start with the NN_ of the notebook that makes them"


def test_readme_tour_matches_the_notebooks():
    rows = re.findall(
        r"^\| (\d\d_[a-z0-9_]+) \|.*\| (present|planned) \|$",
        (ROOT / "README.md").read_text(),
        flags=re.MULTILINE,
    )
    assert rows, "README.md has no tour table"
    present = {name for name, status in rows if status == "present"}
    assert present == {p.stem for p in NOTEBOOK_FILES}, "README tour: mark notebooks present"
