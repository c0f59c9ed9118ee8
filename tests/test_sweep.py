"""Parameter sweeps on Dask: the grid, run keys, the table, and sweeps of real kernels on a local
cluster, through a killed worker, and on an explicitly started scheduler."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import dask
import matplotlib
import psutil
import pytest

from sage_core.errors import RunError
from sage_core.notebook import cli, sweep, sweep_table
from sage_core.paths import FIGURES, NOTEBOOKS, ROOT

# A tiny notebook: appends "worker_pid kernel_pid" to started_dir/<x>.pids when it starts, sleeps,
# fails when x == fail_on, and records headline numbers that depend on x.
TINY_CELLS = [
    "x = 0\nsleep_s = 0.0\nfail_on = None\nstarted_dir = None\nfigures_dir = None",
    "import os, time\n"
    "from pathlib import Path\n"
    "from sage_core.notebook import headline\n"
    "if started_dir is not None:\n"
    "    with open(Path(started_dir) / f'{x}.pids', 'a') as f:\n"
    "        f.write(f'{os.getppid()} {os.getpid()}\\n')\n"
    "time.sleep(sleep_s)\n"
    "if figures_dir is not None:\n"
    "    Path(figures_dir).mkdir(parents=True, exist_ok=True)\n"
    "    (Path(figures_dir) / 'x.txt').write_text(str(x))\n"
    "assert x != fail_on, f'x = {x} fails on purpose'\n"
    "headline.record(square=x * x, label=f'x{x}')",
]


@pytest.fixture
def tiny(make_notebook, tmp_path):
    """The tiny notebook's path and the folder its runs log their process ids to."""
    started = tmp_path / "started"
    started.mkdir()
    return make_notebook("01_tiny", TINY_CELLS), started


def starts(started, x) -> list[tuple[int, int]]:
    """(worker pid, kernel pid) of every start of the run with this x."""
    path = started / f"{x}.pids"
    lines = path.read_text().splitlines() if path.exists() else []
    return [tuple(map(int, line.split())) for line in lines]


def stop_orphan_kernel(pid):
    """A kernel whose worker was killed exits by itself (ipykernel polls its parent); make sure."""
    try:
        process = psutil.Process(pid)
        if any("ipykernel" in part for part in process.cmdline()):
            process.kill()
    except psutil.Error:
        pass


# --- the grid and the keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("0..3", [0, 1, 2, 3]),
        ("-1..1", [-1, 0, 1]),
        ("1,2,4", [1, 2, 4]),
        ("cpu, cuda", ["cpu", "cuda"]),
        ("0.5", [0.5]),
        ("'a,b'", ["a,b"]),
        ("[1, 2]", [[1, 2]]),
        ("bfloat16", ["bfloat16"]),
    ],
)
def test_values_of_a_parameter(text, values):
    assert sweep.parse_values(text) == values


def test_empty_range_and_repeated_name_are_errors(tmp_path):
    with pytest.raises(RunError, match="'3..1' is empty"):
        sweep.parse_values("3..1")
    with pytest.raises(RunError, match="'seed' given twice"):
        sweep.grid_from_arguments([("seed", "0"), ("seed", "1")])


def test_grid_files_json_and_yaml_and_command_line_overrides(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({"seed": "0..2", "dtype": "float32", "k": [1, 2]}))
    (tmp_path / "g.yaml").write_text("seed: 0..2\ndtype: float32\nk: [1, 2]\n")
    expected = {"seed": [0, 1, 2], "dtype": ["float32"], "k": [1, 2]}
    assert sweep.load_grid(tmp_path / "g.json") == expected
    assert sweep.load_grid(tmp_path / "g.yaml") == expected
    assert sweep.grid_from_arguments([("k", "4")], tmp_path / "g.yaml")["k"] == [4]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="bad.json must hold a mapping"):
        sweep.load_grid(tmp_path / "bad.json")
    with pytest.raises(RunError, match="missing.yaml"):
        sweep.load_grid(tmp_path / "missing.yaml")


def test_run_keys_are_stable_and_change_with_what_defines_a_run():
    key = sweep.run_key("a/02_x.ipynb", {"seed": 1, "k": 2}, "abc")
    assert key == sweep.run_key("b/02_x.ipynb", {"k": 2, "seed": 1}, "abc")  # order, folder
    expected = hashlib.sha256(
        b'{"commit":"abc","notebook":"02_x","parameters":{"k":2,"seed":1}}'
    ).hexdigest()[:16]
    assert key == expected  # stable across processes and Python versions: no hash()
    assert key != sweep.run_key("02_x.ipynb", {"seed": 1, "k": 2}, "abd")
    assert key != sweep.run_key("02_x.ipynb", {"seed": 1, "k": 3}, "abc")
    assert key != sweep.run_key("03_x.ipynb", {"seed": 1, "k": 2}, "abc")


def test_each_notebook_is_crossed_with_the_names_it_declares(make_notebook, tmp_path):
    first = make_notebook("01_a", ["seed = 0\nk = 1"])
    second = make_notebook("02_b", ["seed = 0"])
    found = sweep.combinations([first, second], {"seed": [0, 1], "k": [1, 2, 4]}, tmp_path, "c")
    assert [(c.notebook.stem, c.parameters) for c in found] == [
        ("01_a", {"seed": 0, "k": 1}),
        ("01_a", {"seed": 0, "k": 2}),
        ("01_a", {"seed": 0, "k": 4}),
        ("01_a", {"seed": 1, "k": 1}),
        ("01_a", {"seed": 1, "k": 2}),
        ("01_a", {"seed": 1, "k": 4}),
        ("02_b", {"seed": 0}),
        ("02_b", {"seed": 1}),
    ]
    assert len({c.folder for c in found}) == 8
    assert all(c.folder.parent == tmp_path.resolve() for c in found)
    assert found[0].folder.name == f"01_a-{found[0].key}"


def test_bad_grids_are_refused_before_anything_runs(make_notebook, tmp_path):
    nb = make_notebook("01_a", ["seed = 0\nfigures_dir = None"])
    with pytest.raises(RunError, match="unknown parameter 'sed'.*declared: figures_dir, seed"):
        sweep.combinations([nb], {"sed": [1]}, tmp_path, None)
    with pytest.raises(RunError, match="'figures_dir' is set by the sweep"):
        sweep.combinations([nb], {"figures_dir": ["x"]}, tmp_path, None)
    with pytest.raises(RunError, match="'seed' has no values"):
        sweep.combinations([nb], {"seed": []}, tmp_path, None)
    with pytest.raises(RunError, match="notebook given twice"):
        sweep.combinations([nb, nb], {}, tmp_path, None)
    assert cli.main(["sweep", str(nb), "-p", "sed", "1", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_a_half_written_or_foreign_run_is_not_finished(make_notebook, tmp_path):
    nb = make_notebook("01_a", ["seed = 0"])
    (combination,) = sweep.combinations([nb], {"seed": [3]}, tmp_path, "c")
    assert not sweep.is_finished(combination)  # no run.json
    combination.folder.mkdir()
    combination.record_path.write_text('{"key": "')  # torn write (atomic writes prevent it)
    assert not sweep.is_finished(combination)
    combination.record_path.write_text(json.dumps({"key": "other", "status": "ok"}))
    assert not sweep.is_finished(combination)
    combination.record_path.write_text(json.dumps({"key": combination.key, "status": "failed"}))
    assert not sweep.is_finished(combination)
    combination.record_path.write_text(json.dumps({"key": combination.key, "status": "ok"}))
    assert sweep.is_finished(combination)


def test_cuda_runs_ask_for_a_gpu_and_need_one(make_notebook, tmp_path, monkeypatch):
    nb = make_notebook("01_a", ['device = "cpu"\nseed = 0'])
    cpu, cuda = sweep.combinations([nb], {"device": ["cpu", "cuda:0"]}, tmp_path, None)
    (default,) = sweep.combinations([nb], {"seed": [1]}, tmp_path, None)
    assert [sweep.wants_gpu(c) for c in (cpu, cuda, default)] == [False, True, False]
    monkeypatch.setattr(sweep, "_local_gpu_count", lambda: 0)
    with pytest.raises(RunError, match="CUDA runs .* no GPU"):
        with sweep.dask_client(gpus=True):
            pass
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    sweep.OneGpuPerWorker().setup(type("Worker", (), {"name": 1})())
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


# --- the table -------------------------------------------------------------------------------


def record(notebook, seed, status="ok", values=None):
    return {
        "notebook": notebook,
        "parameters": {"seed": seed},
        "status": status,
        "error": None if status == "ok" else "AssertionError: no",
        "duration_s": 1.5,
        "headline": values or {},
    }


def test_table_rows_columns_and_files(tmp_path):
    records = [
        record("02_b", 0, values={"recovery": 0.5, "seed": 7}),
        record("02_b", 1, "failed"),
        None,
        record("02_b", 3, values={"recovery": 0.75, "ok": True}),
    ]
    rows = sweep_table.build_table(records, ["02_b-k0", "02_b-k1", "02_b-k2", "02_b-k3"])
    assert list(rows[0]) == [
        "notebook",
        "run",
        "status",
        "seed",
        "ok",
        "recovery",
        "headline_seed",
        "error",
        "duration_s",
    ]
    assert [r["status"] for r in rows] == ["ok", "failed", "missing", "ok"]
    assert rows[0]["headline_seed"] == 7 and rows[0]["seed"] == 0
    assert rows[1]["error"] == "AssertionError: no" and rows[1]["recovery"] is None
    assert rows[2]["notebook"] == "02_b" and rows[2]["seed"] is None
    paths = sweep_table.write_table(rows, tmp_path)
    assert sweep_table.read_table(tmp_path) == rows
    lines = paths["csv"].read_text().splitlines()
    assert lines[0] == "notebook,run,status,seed,ok,recovery,headline_seed,error,duration_s"
    assert lines[2] == "02_b,02_b-k1,failed,1,,,,AssertionError: no,1.5"
    assert lines[4] == "02_b,02_b-k3,ok,3,True,0.75,,,1.5"


def test_plot_headline_across_seeds(tmp_path):
    matplotlib.use("Agg")
    records = [
        record("05_x", seed, values={"recovery": 0.1 * seed, "other": 1}) for seed in range(5)
    ]
    records.append(record("05_x", 5, "failed"))
    rows = sweep_table.build_table(records, [f"05_x-{i}" for i in range(6)])
    fig = sweep_table.plot_headline(rows, "recovery", x="seed")
    ax = fig.axes[0]
    assert ax.get_title() == "recovery over 5 runs (mean, 95% t-interval)"
    assert sorted(ax.collections[0].get_offsets()[:, 1].round(6)) == [0.0, 0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="headline column 'recall' is not in the table"):
        sweep_table.plot_headline(rows, "recall")
    with pytest.raises(ValueError, match="no finished run has a number for 'notebook'"):
        sweep_table.plot_headline(rows, "notebook")
    fig2 = sweep_table.plot_headline(rows, "recovery", x="seed", by="other")
    assert fig2.axes[0].get_legend().get_texts()[0].get_text() == "other = 1"


# --- sweeps of real kernels ------------------------------------------------------------------


def test_failed_runs_are_recorded_rerun_and_finished_ones_skipped(tiny, tmp_path, capsys):
    nb, started = tiny
    out = tmp_path / "out"
    argv = ["sweep", str(nb), "-p", "x", "0..2", "-p", "fail_on", "1"]
    argv += ["-p", "started_dir", repr(str(started)), "--out", str(out), "--workers", "2"]
    assert cli.main(argv) == 1
    rows = sweep_table.read_table(out)
    assert [(r["x"], r["status"], r["square"], r["label"]) for r in rows] == [
        (0, "ok", 0, "x0"),
        (1, "failed", None, None),
        (2, "ok", 4, "x2"),
    ]
    assert rows[1]["error"] == "AssertionError: x = 1 fails on purpose"
    assert "failed: 01_tiny-" in capsys.readouterr().err
    for row in rows:  # each run in its own folder, with its notebook and its figures_dir
        folder = out / row["run"]
        assert (folder / "01_tiny.ipynb").is_file()
        assert (folder / "figures" / "x.txt").read_text() == str(row["x"])
        assert json.loads((folder / "run.json").read_text())["status"] == row["status"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [r["run"] for r in rows]
        + [
            "sweep.csv",
            "sweep.json",
        ]
    )
    # Again: the finished runs are skipped, the failed one runs again (and fails again).
    assert cli.main(argv) == 1
    assert [len(starts(started, x)) for x in range(3)] == [1, 2, 1]
    again = sweep_table.read_table(out)
    assert again[0] == rows[0] and again[2] == rows[2]  # read back from the first sweep's runs
    assert again[1]["error"] == rows[1]["error"]


def test_a_killed_worker_has_its_run_retried_and_a_rerun_does_no_work(tiny, tmp_path, monkeypatch):
    nb, started = tiny
    out = tmp_path / "out"
    grid = {"x": [0, 1, 2], "sleep_s": [1.0], "started_dir": [str(started)]}
    killed = {}

    def kill_the_first_worker_that_starts_a_run():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for x in range(3):
                if starts(started, x):
                    worker, kernel = starts(started, x)[0]
                    os.kill(worker, signal.SIGKILL)
                    killed.update(x=x, worker=worker, kernel=kernel)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_worker_that_starts_a_run)
    killer.start()
    try:
        result = sweep.sweep([nb], grid, out, workers=2, show_progress=False)
    finally:
        killer.join()
        if killed:
            stop_orphan_kernel(killed["kernel"])
    assert killed, "no run started within 120 s"
    assert [(r["parameters"]["x"], r["status"]) for r in result.records] == [
        (x, "ok") for x in range(3)
    ]
    assert [r["headline"]["square"] for r in result.records] == [0, 1, 4]
    retried = starts(started, killed["x"])
    assert len(retried) == 2 and retried[1][0] != killed["worker"]
    assert [r["status"] for r in sweep_table.read_table(out)] == ["ok"] * 3
    # The same sweep again: every run finished, so no cluster, no kernel, no file rewritten.
    table = (out / "sweep.csv").read_bytes()
    stamps = [c.record_path.stat().st_mtime_ns for c in result.combinations]
    monkeypatch.setattr(sweep, "_run_on_cluster", lambda *a, **k: pytest.fail("did work"))
    again = sweep.sweep([nb], grid, out, show_progress=False)
    assert again.skipped == 3 and again.records == result.records
    assert [c.record_path.stat().st_mtime_ns for c in again.combinations] == stamps
    assert (out / "sweep.csv").read_bytes() == table
    assert [len(starts(started, x)) for x in range(3)] == [1 + (x == killed["x"]) for x in range(3)]


def test_the_sweep_runs_on_an_explicitly_started_scheduler(tiny, tmp_path):
    nb, started = tiny
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            *common,
            "--port",
            "0",
            "--scheduler-file",
            str(scheduler_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, *common]
            + ["--nthreads", "1", "--nworkers", "1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        grid = {"started_dir": [str(started)]}
        out = tmp_path / "out"
        result = sweep.sweep([nb], {**grid, "x": [5]}, out, scheduler=address, show_progress=False)
        assert [r["headline"]["square"] for r in result.records] == [25]
        # What DASK_SCHEDULER_ADDRESS sets: Dask's own configuration of where its scheduler is.
        with dask.config.set({"scheduler-address": address}):
            result = sweep.sweep([nb], {**grid, "x": [6]}, out, show_progress=False)
        assert [r["headline"]["square"] for r in result.records] == [36]
        for x in (5, 6):  # the kernels ran under the worker this test started
            ((worker_pid, _),) = starts(started, x)
            parents = {p.pid for p in psutil.Process(worker_pid).parents()}
            assert worker.pid in parents | {worker_pid}
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
        for process in (worker, scheduler):
            if process is not None:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _tree_digest(directory):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.iterdir()
        if p.is_file()
    }


@pytest.mark.skipif(
    "figures_dir" not in NOTEBOOKS.joinpath("02_sklearn_float64_boundary.ipynb").read_text(),
    reason="notebook 02 does not declare figures_dir: its runs would overwrite figures/",
)
def test_seed_sweep_of_notebook_02(tmp_path, monkeypatch):
    figures_before = _tree_digest(FIGURES)
    out = tmp_path / "demo"
    argv = ["sweep", "02_sklearn_float64_boundary", "-p", "seed", "0..3", "--out", str(out)]
    assert cli.main([*argv, "--workers", "2"]) == 0
    rows = sweep_table.read_table(out)
    assert [(r["seed"], r["status"]) for r in rows] == [(s, "ok") for s in range(4)]
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 4
    for folder in runs:
        assert (folder / "02_sklearn_float64_boundary.ipynb").is_file()
        assert (folder / "figures" / "02_sklearn_boundary.png").is_file()
    assert _tree_digest(FIGURES) == figures_before
    # Again: nothing to do, no cluster.
    monkeypatch.setattr(sweep, "_run_on_cluster", lambda *a, **k: pytest.fail("did work"))
    assert cli.main(argv) == 0
    assert sweep_table.read_table(out) == rows
