"""Parameter sweeps: notebooks x a parameter grid, one papermill run per combination, on Dask.

A sweep expands a grid (`-p seed 0..3 -p num_windows 96,192`, or a JSON/YAML grid file) into
combinations, names each by a stable hash of (notebook, parameters, commit), and hands every
combination that has not already finished to a Dask distributed cluster: a local one by default
(one single-threaded worker per core, or one per GPU), or the user's, given by address or by
Dask's own `DASK_SCHEDULER_ADDRESS`. Each run executes through the runner
(`runner.execute_notebook`) into its own folder, whose `run.json` is written atomically and last,
so a folder without one is a run that did not finish. The runs are then gathered into one table
(`sweep_table`).

Dask rather than Ray: runs are whole notebook processes, so the engine only needs to place
tasks, retry those whose worker died and count GPUs; Dask distributed does that as a small
pure-Python dependency, and `dask-jobqueue` starts its workers as Slurm/PBS jobs.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from sage_core.atomic import atomic_write_json
from sage_core.errors import RunError
from sage_core.notebook import headline, runner
from sage_core.notebook.progress import progress
from sage_core.notebook.runner import FIGURES_PARAMETER
from sage_core.paths import NOTEBOOKS

RUN_RECORD = "run.json"
# Dask's resource name for GPUs; workers of a user's cluster advertise it with
# `dask worker ... --resources GPU=1`.
GPU_RESOURCE = "GPU"
# Retries of a run whose task raised (the notebook's own failures are recorded, not raised);
# a run whose worker died is rescheduled by the scheduler itself
# (`distributed.scheduler.allowed-failures`).
TASK_RETRIES = 1
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


@dataclass(frozen=True)
class Combination:
    """One run of a sweep: a notebook, the parameters it is given, and where it is written."""

    notebook: Path
    parameters: dict
    key: str  # stable hash of (notebook, parameters, commit)
    folder: Path

    @property
    def record_path(self) -> Path:
        return self.folder / RUN_RECORD


# --- the grid --------------------------------------------------------------------------------


def parse_values(text: str) -> list:
    """The values one `-p NAME VALUES` stands for: `0..3` (inclusive integer range), `1,2,4`, or a
    single value; every value is read as the runner reads a parameter (`runner.parse_value`)."""
    text = text.strip()
    match = _RANGE.fullmatch(text)
    if match:
        first, last = int(match[1]), int(match[2])
        if last < first:
            raise RunError(f"range {text!r} is empty: write FIRST..LAST with FIRST <= LAST")
        return list(range(first, last + 1))
    if "," in text and not text.startswith(("[", "(", "{", "'", '"')):
        return [runner.parse_value(part.strip()) for part in text.split(",")]
    return [runner.parse_value(text)]


def load_grid(path: Path | str) -> dict[str, list]:
    """A grid file: a JSON or YAML mapping of parameter name to a list of values, a single value,
    or a `FIRST..LAST` range string."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunError(f"grid file {path}: {exc.strerror}") from exc
    try:
        if path.suffix.lower() in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError: both say where
        raise RunError(f"grid file {path} does not parse: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise RunError(f"grid file {path} must hold a mapping of parameter name to values")
    grid = {}
    for name, values in data.items():
        if isinstance(values, str) and _RANGE.fullmatch(values.strip()):
            values = parse_values(values)
        grid[name] = list(values) if isinstance(values, list) else [values]
    return grid


def grid_from_arguments(pairs: list[tuple[str, str]], grid_file: Path | str | None = None) -> dict:
    """The grid of a command line: the grid file's entries, then `-p NAME VALUES` pairs (which
    replace an entry of the file of the same name)."""
    grid = load_grid(grid_file) if grid_file is not None else {}
    given = set()
    for name, text in pairs:
        if name in given:
            raise RunError(f"parameter {name!r} given twice: list its values once, as 1,2,4")
        given.add(name)
        grid[name] = parse_values(text)
    return grid


# --- combinations ----------------------------------------------------------------------------


def run_key(notebook: Path | str, parameters: dict, commit: str | None) -> str:
    """A stable name for one run: the same notebook, parameters and commit give the same key."""
    identity = {"notebook": Path(notebook).stem, "parameters": parameters, "commit": commit}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def combinations(
    notebooks: list[str | Path],
    grid: dict[str, list],
    out: Path | str,
    commit: str | None,
    directory: Path = NOTEBOOKS,
) -> list[Combination]:
    """Every (notebook, parameters) of the sweep, each notebook crossed with the grid entries it
    declares. Raises RunError, before anything runs, for an unknown notebook or parameter name
    or an empty list of values."""
    if not notebooks:
        raise RunError("sweep needs at least one notebook")
    paths = [runner.resolve_notebook(nb, directory) for nb in notebooks]
    names = [p.name for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RunError(f"notebook given twice: {', '.join(duplicates)}")
    if FIGURES_PARAMETER in grid:
        raise RunError(f"{FIGURES_PARAMETER!r} is set by the sweep: each run writes its own")
    empty = [name for name, values in grid.items() if not values]
    if empty:
        raise RunError(f"parameter {', '.join(map(repr, empty))} has no values")
    # The runner's check: every name must be declared by some selected notebook.
    per_notebook = runner.parameters_per_notebook(paths, {name: None for name in grid})
    out = Path(out).resolve()
    found = []
    for path in paths:
        names = list(per_notebook[path])
        for values in itertools.product(*(grid[name] for name in names)):
            parameters = dict(zip(names, values))
            key = run_key(path, parameters, commit)
            found.append(Combination(path, parameters, key, out / f"{path.stem}-{key}"))
    return found


def read_record(combination: Combination) -> dict | None:
    """The finished run's record, or None if the run has not finished (no or unreadable
    run.json, or one written for another key)."""
    try:
        record = json.loads(combination.record_path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == combination.key else None


def is_finished(combination: Combination) -> bool:
    """Finished means recorded as ok; a failed run is run again."""
    record = read_record(combination)
    return record is not None and record.get("status") == "ok"


# --- one run, on a worker --------------------------------------------------------------------


def _write_record(combination: Combination, commit: str | None, **outcome) -> dict:
    """Write the run's `run.json` (atomically: the last thing a run writes) and return it."""
    record = {
        "key": combination.key,
        "notebook": combination.notebook.stem,
        "parameters": combination.parameters,
        "commit": commit,
        "status": "failed",
        "error": None,
        "code_cell": None,
        "execution_count": None,
        "duration_s": None,
        "started_utc": None,
        "worker": None,
        "output": None,
        "headline": {},
        **outcome,
    }
    atomic_write_json(combination.record_path, record)
    return record


def execute_run(combination: Combination, commit: str | None) -> dict:
    """Execute one combination into its folder and record it; the task a worker runs.

    The notebook is executed by the runner; `figures_dir` points at the folder's `figures/` when
    the notebook declares it. `run.json` is removed first and written last, atomically, so it
    exists only for a run that ended, and says how.
    """
    folder = combination.folder
    folder.mkdir(parents=True, exist_ok=True)
    combination.record_path.unlink(missing_ok=True)
    parameters = dict(combination.parameters)
    if FIGURES_PARAMETER in runner.declared_parameters(combination.notebook):
        parameters[FIGURES_PARAMETER] = str(folder / "figures")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    destination = folder / combination.notebook.name
    result = runner.execute_notebook(combination.notebook, destination, parameters)
    return _write_record(
        combination,
        commit,
        status=result.status,
        error=result.error,
        code_cell=result.code_cell,
        execution_count=result.execution_count,
        duration_s=result.duration_s,
        started_utc=started,
        worker=socket.gethostname(),
        output=destination.name,
        headline=headline.read(destination) if destination.exists() else {},
    )


# --- the engine ------------------------------------------------------------------------------


@functools.cache
def _default_device(notebook: Path):
    import papermill

    default = papermill.inspect_notebook(str(notebook)).get("device", {})
    return runner.parse_value(str(default.get("default", "")))


def wants_gpu(combination: Combination) -> bool:
    """A run is a GPU run when its `device` (given, or the notebook's default) is CUDA."""
    device = combination.parameters.get("device", _default_device(combination.notebook))
    return isinstance(device, str) and device.startswith("cuda")


def _local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch build with CUDA: no GPUs to count
        return 0


class OneGpuPerWorker(WorkerPlugin):
    """Worker plugin of a local GPU cluster: worker i (Dask names them 0..n-1) sees GPU i only,
    and so do the notebook kernels it starts."""

    name = "sage-core-one-gpu-per-worker"

    def setup(self, worker):
        os.environ["CUDA_VISIBLE_DEVICES"] = str(worker.name)


@contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, gpus: bool = False):
    """A Dask client: on the scheduler at `scheduler` (or DASK_SCHEDULER_ADDRESS), else on a local
    cluster of `workers` single-threaded worker processes (default: one per core, or one per GPU
    when `gpus`), which is closed on exit."""
    import dask
    from distributed import Client, LocalCluster

    address = scheduler or dask.config.get("scheduler-address", None)
    if address:
        with Client(address) as client:
            if gpus and not any(
                w.get("resources", {}).get(GPU_RESOURCE)
                for w in client.scheduler_info()["workers"].values()
            ):
                print(
                    f"warning: no worker of {address} offers a {GPU_RESOURCE} resource yet; GPU "
                    f"runs wait for one (start workers with --resources {GPU_RESOURCE}=1)",
                    file=sys.stderr,
                )
            yield client
        return
    resources = None
    if gpus:
        count = _local_gpu_count()
        if count == 0:
            raise RunError("the sweep has CUDA runs (device='cuda...') but this machine has no GPU")
        workers = min(workers or count, count)
        resources = {GPU_RESOURCE: 1}
    workers = workers or os.cpu_count() or 1
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            resources=resources,
        ) as cluster,
        Client(cluster) as client,
    ):
        if gpus:
            client.register_plugin(OneGpuPerWorker())
        yield client


# --- the sweep -------------------------------------------------------------------------------


@dataclass
class SweepResult:
    combinations: list[Combination]
    records: list[dict]  # one per combination, in order
    skipped: int  # already finished before this sweep
    table_paths: dict  # {"csv": Path, "json": Path}

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r.get("status") != "ok"]


def sweep(
    notebooks: list[str | Path],
    grid: dict[str, list],
    out: Path | str,
    scheduler: str | None = None,
    workers: int | None = None,
    force: bool = False,
    directory: Path = NOTEBOOKS,
    show_progress: bool = True,
) -> SweepResult:
    """Run every combination of `notebooks` x `grid` that has not finished yet, then write the
    table of all of them (`out`/sweep.csv and sweep.json). `force` reruns finished ones too.

    A failing run is recorded with its error and does not stop the others.
    """
    from sage_core.notebook import sweep_table

    commit = runner._git_state()["commit"]
    todo_and_done = combinations(notebooks, grid, out, commit, directory)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for path in dict.fromkeys(c.notebook for c in todo_and_done):
        if FIGURES_PARAMETER not in runner.declared_parameters(path):
            print(
                f"warning: {path.name} does not declare {FIGURES_PARAMETER!r}: any figure it "
                f"saves goes to the project's figures/, not to its run folder",
                file=sys.stderr,
            )
    todo = [c for c in todo_and_done if force or not is_finished(c)]
    skipped = len(todo_and_done) - len(todo)
    if todo:
        _run_on_cluster(
            todo, commit, scheduler, workers, show_progress, skipped, len(todo_and_done)
        )
    elif show_progress:
        print(f"sweep: all {skipped} runs already finished in {out}", file=sys.stderr)
    records = [read_record(c) for c in todo_and_done]
    table = sweep_table.build_table(records, [c.folder.name for c in todo_and_done])
    paths = sweep_table.write_table(table, out)
    return SweepResult(todo_and_done, records, skipped, paths)


def _run_on_cluster(todo, commit, scheduler, workers, show_progress, skipped, total):
    from distributed import as_completed

    gpu_runs = {c.key for c in todo if wants_gpu(c)}
    with dask_client(scheduler, workers, gpus=bool(gpu_runs)) as client:
        futures = {}
        for combination in todo:
            future = client.submit(
                execute_run,
                combination,
                commit,
                key=f"sweep-run-{combination.key}",
                pure=False,
                retries=TASK_RETRIES,
                resources={GPU_RESOURCE: 1} if combination.key in gpu_runs else None,
            )
            futures[future] = combination
        failed = 0
        bar = progress(
            total=total, initial=skipped, unit="run", desc="sweep", disable=not show_progress
        )
        bar.set_postfix(failed=failed)
        start = time.perf_counter()
        for future in as_completed(futures):
            combination = futures[future]
            try:
                record = future.result()
            except Exception as exc:  # the task itself failed: KilledWorker, a full disk, ...
                # (a failing cell is not one: the worker records those itself)
                record = _write_record(combination, commit, error=f"{type(exc).__name__}: {exc}")
            if record["status"] != "ok":
                failed += 1
                bar.set_postfix(failed=failed)
                bar.write(f"failed: {combination.folder.name}: {record['error']}", file=sys.stderr)
            bar.update(1)
        bar.close()
        if show_progress:
            print(
                f"sweep: {len(todo)} runs in {time.perf_counter() - start:.1f} s, {failed} failed"
                + (f", {skipped} already finished" if skipped else ""),
                file=sys.stderr,
            )
