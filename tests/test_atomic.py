import json
import stat

import pytest

from sage_core.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_writes_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "state.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_text(path, "two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["state.bin"]


def test_new_files_are_0644_and_existing_modes_are_kept(tmp_path):
    new = atomic_write_bytes(tmp_path / "new", b"x")
    assert stat.S_IMODE(new.stat().st_mode) == 0o644
    old = tmp_path / "old"
    old.write_bytes(b"x")
    old.chmod(0o600)
    atomic_write_bytes(old, b"y")
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_table_is_written_as_csv_and_json(tmp_path):
    from sage_core.atomic import atomic_write_table

    rows = [{"seed": 0, "value": 0.5, "grid": [1, 2]}, {"seed": 1, "note": None}]
    paths = atomic_write_table(tmp_path / "t", rows)
    assert paths == {"csv": tmp_path / "t.csv", "json": tmp_path / "t.json"}
    assert paths["csv"].read_text() == 'seed,value,grid,note\n0,0.5,"[1, 2]",\n1,,,\n'
    assert json.loads(paths["json"].read_text()) == rows
    only = atomic_write_table(tmp_path / "u", rows, columns=["note", "seed"])
    assert only["csv"].read_text() == "note,seed\n,0\n,1\n"
