import json

import pytest

from msplora.io import write_json_atomic


def test_write_json_atomic(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "m.json", {"a": 1, "b": [1.5]})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5]}
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = write_json_atomic(tmp_path / "m.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_split_passthrough():
    from msplora.io import split_passthrough

    assert split_passthrough(["run", "a", "--", "--x=1", "--", "y"]) == (["run", "a"], ["--x=1", "--", "y"])
    assert split_passthrough(["report"]) == (["report"], [])
    assert split_passthrough(("--",)) == ([], [])
