"""Batch reruns of the notebooks through papermill, with byte-identical results.

`run()` executes notebooks in order with the running interpreter as kernel, injects only the
parameters each notebook declares, stops at the first failing cell, and writes every notebook
with its volatile metadata (timestamps, durations, absolute paths, widget state) removed, so that
two runs of the same code give the same bytes. What the kernel itself writes into a notebook's
metadata (kernelspec, language_info with the Python version) is kept exactly as JupyterLab
writes it, so opening and saving a notebook in Lab changes no byte. With `out`, the notebooks
that declare `figures_dir` write their figures to `out/figures`, never over the committed ones.
`python -m sage_core run` is the command line.
"""

from __future__ import annotations

import ast
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path

import nbformat

from sage_core.atomic import atomic_write_json, atomic_write_text
from sage_core.errors import RunError
from sage_core.paths import NOTEBOOKS, ROOT

KERNEL_NAME = "sage-dtype-trust"
# What Lab writes as the notebook's kernelspec display_name: the installed kernelspec's.
KERNEL_DISPLAY_NAME = "sage-dtype-trust (.venv)"
# The parameter a notebook declares to say where its figures go (None: the project's figures/).
FIGURES_PARAMETER = "figures_dir"
# Distributions whose versions a run records; those marked optional are recorded only if present.
RECORDED_DISTRIBUTIONS = {
    "sage-dtype-trust": False,  # sage_core itself
    "torch": False,
    "numpy": False,
    "scikit-learn": False,
    "papermill": False,
    "nbval": True,
    "transformers": True,
}
# Papermill's markers around a failing cell; their ids are random unless pinned.
_ERROR_MARKER_TAG = "papermill-error-cell-tag"
_INJECTED_TAG = "injected-parameters"


@dataclass
class NotebookRun:
    """What happened to one notebook of a run."""

    name: str
    output: str  # where the executed notebook was written
    status: str  # "ok" or "failed"
    duration_s: float
    parameters: dict = field(default_factory=dict)
    error: str | None = None  # "ExceptionType: message"
    code_cell: int | None = None  # 0-based index of the failing cell among code cells
    execution_count: int | None = None  # the failing cell's In [n]
    figures: list[str] = field(default_factory=list)  # files written under `--out`'s figures/


# --- selecting notebooks and parameters -------------------------------------------------------


def discover_notebooks(directory: Path = NOTEBOOKS) -> list[Path]:
    """Every `NN_name.ipynb` in `directory`, in order."""
    return sorted(Path(directory).glob("[0-9][0-9]_*.ipynb"))


def resolve_notebook(arg: str | Path, directory: Path = NOTEBOOKS) -> Path:
    """A notebook given as a path, or as a bare name like `01_rope_buffer_dtype`."""
    path = Path(arg)
    if path.is_file():
        return path.resolve()
    stem = path.name.removesuffix(".ipynb")
    if path.parent == Path(".") and (Path(directory) / f"{stem}.ipynb").is_file():
        return (Path(directory) / f"{stem}.ipynb").resolve()
    available = ", ".join(p.stem for p in discover_notebooks(directory)) or "none"
    raise RunError(f"notebook {str(arg)!r} not found (in {directory}: {available})")


def parse_value(text: str):
    """A command-line parameter value: a Python literal if it parses as one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def declared_parameters(notebook: Path) -> list[str]:
    """Names assigned in the notebook's cell tagged `parameters`, in order."""
    import papermill

    return list(papermill.inspect_notebook(str(notebook)))


def parameters_per_notebook(notebooks: list[Path], parameters: dict) -> dict[Path, dict]:
    """Give each notebook the parameters it declares; a name no notebook declares is an error."""
    declared = {nb: declared_parameters(nb) for nb in notebooks}
    known = sorted({name for names in declared.values() for name in names})
    unknown = [name for name in parameters if name not in known]
    if unknown:
        raise RunError(
            f"unknown parameter {', '.join(map(repr, unknown))}: not declared in the parameters "
            f"cell of any selected notebook (declared: {', '.join(known) or 'none'})"
        )
    return {nb: {k: v for k, v in parameters.items() if k in declared[nb]} for nb in notebooks}


# --- the kernel: always the running interpreter -----------------------------------------------


def ensure_kernelspec() -> None:
    """Install the `sage-dtype-trust` kernelspec into this environment unless it already runs
    this interpreter, so that JupyterLab and nbval find the same Python as the runner."""
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    spec = None
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        pass
    if (
        spec is None
        or spec.argv[:1] != [sys.executable]
        or spec.display_name != KERNEL_DISPLAY_NAME
    ):
        install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME, prefix=sys.prefix)


def _kernel_manager_class():
    """A kernel manager that resolves `sage-dtype-trust` to this interpreter whatever kernelspecs
    are installed (a user-level one would shadow the environment's), so NoSuchKernel and a
    kernel from another environment cannot happen."""
    import zmq
    from ipykernel.kernelspec import make_ipkernel_cmd
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from traitlets import default

    class ThisInterpreterSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            if kernel_name != KERNEL_NAME:
                return super().get_kernel_spec(kernel_name)
            return KernelSpec(
                argv=make_ipkernel_cmd(),
                display_name=KERNEL_DISPLAY_NAME,
                language="python",
                # An MPLBACKEND inherited from the shell (e.g. Agg) would drop every inline figure.
                env={"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
                # As ipykernel's own kernelspec declares: the kernel manager then provisions
                # CurveZMQ keys, and the kernel does not warn about plain-text TCP on every run.
                metadata={"debugger": True, "supported_encryption": ["curve"]},
            )

    class ThisInterpreterKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return ThisInterpreterSpecs(data_dir=self.data_dir)

        @default("transport_encryption")
        def _transport_encryption_default(self):
            # Provision CurveZMQ keys where pyzmq can; without them ipykernel warns, on every
            # notebook, that the kernel runs over TCP in plain text.
            return "auto" if zmq.has("curve") else "disabled"

    return ThisInterpreterKernelManager


# --- deterministic notebook files ------------------------------------------------------------


def _prepare(source: Path) -> nbformat.NotebookNode:
    """The notebook as papermill should see it: stale injected parameters and error markers of an
    earlier run removed (the command line is the whole truth of a run), cell ids present."""
    nb = nbformat.read(source, as_version=4)
    if nb.nbformat_minor < 5:  # upgrading adds random ids: replace them by positional ones
        nb = nbformat.v4.upgrade(nb)
        for i, cell in enumerate(nb.cells):
            cell.id = f"cell-{i}"
    nb.cells = [
        cell
        for cell in nb.cells
        if not {_INJECTED_TAG, _ERROR_MARKER_TAG} & set(cell.metadata.get("tags", []))
    ]
    return nb


def normalise(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove what differs between two runs of the same code: papermill's timestamps, durations
    and input/output paths, nbclient's timing, widget state; pin the ids of the cells papermill
    adds. The kernelspec is set to what JupyterLab writes for the project's kernel, and the
    kernel's language_info (Python version included) is kept as the kernel reported it, which
    is what Lab writes too: a notebook opened and saved in Lab stays byte-identical."""
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = {
        "display_name": KERNEL_DISPLAY_NAME,
        "language": "python",
        "name": KERNEL_NAME,
    }
    markers = 0
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        tags = cell.metadata.get("tags", [])
        if "tags" in cell.metadata and not tags:  # papermill adds empty lists
            del cell.metadata["tags"]
        if _INJECTED_TAG in tags:
            cell.id = _INJECTED_TAG
        elif _ERROR_MARKER_TAG in tags:
            cell.id = f"papermill-error-marker-{markers}"
            markers += 1
    return nb


def write_notebook(nb: nbformat.NotebookNode, path: Path) -> None:
    """nbformat's fixed JSON layout (what nbformat.write produces), written atomically."""
    text = nbformat.writes(nb)
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def _absolute_paths_in_outputs(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of code cells whose outputs mention this checkout or environment by absolute
    path; such outputs differ between machines and are worth a warning."""
    needles = {str(ROOT), sys.prefix}
    found = []
    for index, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        text = json.dumps(cell.get("outputs", []))
        if any(needle in text for needle in needles):
            found.append(index)
    return found


# --- running ---------------------------------------------------------------------------------


def _failing_cell(nb: nbformat.NotebookNode, cell_index: int) -> tuple[int, int | None]:
    """(index among code cells, execution count) of the cell at `cell_index` once papermill's
    error markers are left out, which is how papermill counted it."""
    cells = [c for c in nb.cells if _ERROR_MARKER_TAG not in c.metadata.get("tags", [])]
    code_index = sum(1 for c in cells[:cell_index] if c.cell_type == "code")
    return code_index, cells[cell_index].get("execution_count")


def execute_notebook(source: Path, destination: Path, parameters: dict) -> NotebookRun:
    """Execute `source` into `destination` (which may be `source` itself).

    The notebook is executed into a temporary file beside `destination` and moved into place at
    the end, also after a failing cell (the partial notebook is kept); an interrupt leaves
    `destination` untouched.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    partial = destination.with_name(f".{destination.stem}.partial.ipynb")
    write_notebook(_prepare(source), partial)
    run = NotebookRun(
        name=source.stem,
        output=str(destination),
        status="ok",
        duration_s=0.0,
        parameters=parameters,
    )
    start = time.perf_counter()
    try:
        try:
            papermill.execute_notebook(
                str(partial),
                str(partial),
                parameters=parameters or None,
                kernel_name=KERNEL_NAME,
                progress_bar=False,
                cwd=str(source.parent),  # as nbval and JupyterLab run it
                kernel_manager_class=_kernel_manager_class(),
                record_timing=False,
                coalesce_streams=True,  # tqdm's \r updates collapse to what a terminal shows
            )
        except PapermillExecutionError as exc:
            run.status = "failed"
            run.error = f"{exc.ename}: {exc.evalue}"
            run.code_cell, run.execution_count = _failing_cell(
                nbformat.read(partial, as_version=4), exc.cell_index
            )
        except Exception as exc:  # the kernel died or did not start: still keep what ran
            run.status = "failed"
            run.error = f"{type(exc).__name__}: {exc}"
        run.duration_s = round(time.perf_counter() - start, 3)
        write_notebook(normalise(nbformat.read(partial, as_version=4)), destination)
    finally:
        partial.unlink(missing_ok=True)
    return run


def _file_states(directory: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under `directory`, by path relative to it."""
    if not directory.is_dir():
        return {}
    return {
        p.relative_to(directory).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _written(before: dict, after: dict) -> list[str]:
    return sorted(name for name, state in after.items() if before.get(name) != state)


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist, optional in RECORDED_DISTRIBUTIONS.items():
        key = "sage_core" if dist == "sage-dtype-trust" else dist
        try:
            versions[key] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            if not optional:
                versions[key] = None
    return versions


def _git_state() -> dict:
    def git(*args):
        result = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        )
        return result.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def run(
    notebooks: list[str | Path] | None = None,
    parameters: dict | None = None,
    out: Path | str | None = None,
    directory: Path = NOTEBOOKS,
    progress: bool = True,
) -> list[NotebookRun]:
    """Execute `notebooks` (default: every `NN_*.ipynb` in `directory`) in order.

    Without `out` the notebooks are updated in place; with it, executed copies and `run.json`
    go to `out`, and every notebook that declares `figures_dir` gets `out/figures` for it
    (unless `parameters` sets it), so a rerun never overwrites the committed figures; run.json
    lists the figure files each notebook wrote there. Stops after the first failing notebook.
    Raises RunError before executing anything if a notebook or parameter name is unknown.
    """
    from tqdm import tqdm

    parameters = dict(parameters or {})
    if notebooks:
        paths = [resolve_notebook(nb, directory) for nb in notebooks]
    else:
        paths = [p.resolve() for p in discover_notebooks(directory)]
    if not paths:
        raise RunError(f"no notebooks to run: none named NN_*.ipynb in {directory}")
    names = [p.name for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RunError(f"notebook given twice: {', '.join(duplicates)}")
    per_notebook = parameters_per_notebook(paths, parameters)

    out_dir = Path(out).resolve() if out is not None else None
    figures_dir = out_dir / "figures" if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path, given in per_notebook.items():
            if FIGURES_PARAMETER in declared_parameters(path) and FIGURES_PARAMETER not in given:
                given[FIGURES_PARAMETER] = str(figures_dir)
    ensure_kernelspec()
    # Build matplotlib's font cache here, if it is missing, so that its one-time "building the
    # font cache" warning lands on our stderr rather than in a notebook's committed outputs.
    import matplotlib.font_manager  # noqa: F401

    record = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "parameters": parameters,
        "versions": _versions(),
        "git": _git_state(),
        "notebooks": [],
    }
    results: list[NotebookRun] = []
    try:
        bar = tqdm(paths, unit="notebook", disable=not progress, file=sys.stderr)
        for path in bar:
            bar.set_postfix_str(path.stem)
            destination = out_dir / path.name if out_dir is not None else path
            figures_before = _file_states(figures_dir) if figures_dir is not None else {}
            result = execute_notebook(path, destination, per_notebook[path])
            if figures_dir is not None:
                result.figures = [
                    f"figures/{name}"
                    for name in _written(figures_before, _file_states(figures_dir))
                ]
            results.append(result)
            if result.status == "ok":
                for index in _absolute_paths_in_outputs(nbformat.read(destination, 4)):
                    tqdm.write(
                        f"warning: {path.name} code cell {index}: output contains an absolute "
                        f"path of this machine; print paths relative to sage_core.paths.ROOT",
                        file=sys.stderr,
                    )
            else:
                break
        bar.close()
    finally:
        if out_dir is not None:
            record["notebooks"] = [{**asdict(r), "output": Path(r.output).name} for r in results]
            record["not_run"] = [p.stem for p in paths[len(results) :]]
            atomic_write_json(out_dir / "run.json", record)
    return results
