"""Every user error of every command: one line ``msplora <cmd>: <problem>. Fix: <what to do>``,
exit status 2, no traceback, and nothing created or changed on disk.

The table runs in-process through ``msplora.__main__.main`` (one interpreter: Lightning and
transformers are imported once); a few cases run as real subprocesses to prove that what
reaches the terminal is that one line and no traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import msplora
from msplora.__main__ import COMMANDS, main
from tests.conftest import REPO
from tests.tiny import tiny_bert

BASE = str(REPO / "configs" / "base.yaml")


# -- inputs, good and bad, built once -------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_bert_dir) -> dict[str, Path]:
    """Every file the cases point at (never inside a case's own folder, which must stay empty)."""
    root = tmp_path_factory.mktemp("inputs")
    p: dict[str, Path] = {"model": tiny_bert_dir, "root": root}

    def data(name: str, train: bytes | str, dev: bytes | str | None = None, ext: str = "tsv") -> None:
        d = root / name
        d.mkdir()
        for stem, body in (("train", train), ("dev", train if dev is None else dev)):
            (d / f"{stem}.{ext}").write_bytes(body if isinstance(body, bytes) else body.encode())
        p[name] = d

    good = "sentence\tlabel\nit is good\t1\nit is bad\t0\nnice\t1\nawful\t0\n"
    data("good", good)
    data("missing_column", "text\tlabel\nit is good\t1\n")
    data("wrong_label", "sentence\tlabel\nit is good\t1\nso so\t2\n")
    data("non_utf8", good.encode() + b"caf\xe9 au lait\t1\n")
    data("empty_file", "", good)
    data("header_only", good, "sentence\tlabel\n")
    data("ragged_row", good + "a\tb\t1\n")
    data("bad_jsonl", '{"sentence": "fine", "label": 1}\n{"sentence": "broken", "label": \n', ext="jsonl")
    data("json_not_objects", "[[1, 2], [3, 4]]", ext="json")
    (root / "only_dev").mkdir()
    (root / "only_dev" / "dev.tsv").write_text(good)
    p["only_dev"] = root / "only_dev"
    stsb = root / "stsb"
    stsb.mkdir()
    for stem in ("train", "dev"):
        (stsb / f"{stem}.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\t1.0\nc\td\t7.5\n")
    p["stsb"] = stsb

    # YAML overlays
    for name, text in {
        "bad_yaml": "model:\n  lr: [1, 2\n",
        "tab_yaml": "model:\n\tlr: 3\n",
        "unknown_yaml_key": "model:\n  pyramid:\n    rnak: 3\n",
        "unknown_trainer_key": "trainer:\n  max_stepz: 3\n",
    }.items():
        p[name] = root / f"{name}.yaml"
        p[name].write_text(text)

    # checkpoints: a real one, cut short, and random bytes
    ckpt = root / "real.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "epoch": 0}, ckpt)
    blob = ckpt.read_bytes()
    p["truncated_ckpt"] = root / "truncated.ckpt"
    p["truncated_ckpt"].write_bytes(blob[: len(blob) // 2])
    p["random_ckpt"] = root / "random.ckpt"
    p["random_ckpt"].write_bytes(os.urandom(4096))

    # adapters: a real one, then copies with cut weights, random weights, a broken config
    model = msplora.inject(tiny_bert(), msplora.MSPLoRAConfig(targets=["query", "value"]))
    real = msplora.save_adapter(model, root / "adapter")
    for name, damage in {
        "adapter_truncated": lambda d: _cut(d / "adapter_model.safetensors"),
        "adapter_random": lambda d: (d / "adapter_model.safetensors").write_bytes(os.urandom(2048)),
        "adapter_bad_config": lambda d: (d / "adapter_config.json").write_text('{"format": "msplora", '),
    }.items():
        d = root / name
        d.mkdir()
        for f in real.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        damage(d)
        p[name] = d
    (root / "not_an_adapter").mkdir()
    p["not_an_adapter"] = root / "not_an_adapter"

    # runs for summary / analyze
    p["corrupt_metrics"] = root / "corrupt_metrics"
    (p["corrupt_metrics"] / "version_0").mkdir(parents=True)
    (p["corrupt_metrics"] / "version_0" / "metrics.json").write_text('{"task": "sst2", "val')
    p["corrupt_spectra"] = root / "corrupt_spectra"
    (p["corrupt_spectra"] / "version_0").mkdir(parents=True)
    (p["corrupt_spectra"] / "version_0" / "spectra.json").write_bytes(b'{"levels": [], "rec')
    p["empty_run"] = root / "empty_run"
    p["empty_run"].mkdir()

    # MT-bench questions
    p["questions"] = root / "question.jsonl"
    p["questions"].write_text(json.dumps({"question_id": 1, "turns": ["Hi?"]}) + "\n")
    p["bad_questions"] = root / "bad_question.jsonl"
    p["bad_questions"].write_text(json.dumps({"question_id": 1, "turns": "not a list"}) + "\n")
    p["not_a_model_file"] = tiny_bert_dir / "config.json"

    # instruction data: an Alpaca record without its output
    p["alpaca_no_output"] = root / "alpaca_no_output.jsonl"
    p["alpaca_no_output"].write_text(
        json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n" + '{"instruction": "a"}\n'
    )
    p["a_file"] = root / "a_file.txt"
    p["a_file"].write_text("not a folder")
    p["db_folder"] = root / "folder.db"
    p["db_folder"].mkdir()
    return p


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


# -- the table --------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: callable  # (inputs, out) -> argv after `msplora`
    expect: str  # a piece of the problem that names what is wrong
    fix: str = ""  # a piece of the fix, if the case checks it
    marks: list = field(default_factory=list)


def fit(*extra: str, data: str | None = "good", task: str = "sst2", cmd: str = "fit"):
    """``msplora <cmd>`` on the tiny model and a local data folder, writing under ``out``."""

    def argv(p: dict, out: Path) -> list[str]:
        args = [
            cmd,
            "--config",
            BASE,
            f"--model.model={p['model']}",
            f"--trainer.default_root_dir={out}",
            "--trainer.accelerator=cpu",
            "--trainer.max_epochs=1",
            f"--data.init_args.task={task}",
            "--data.init_args.batch_size=2",
        ]
        if data is not None:
            args.append(f"--data.init_args.data_dir={p[data]}")
        return args + [_fill(e, p) for e in extra]

    return argv


def _fill(arg: str, paths: dict) -> str:
    """``{name}`` -> the path of input ``name`` (YAML braces such as ``{share: layer}`` stay)."""
    return re.sub(r"\{(\w+)\}", lambda m: str(paths.get(m.group(1), m.group(0))), arg)


def instruct(data: str):
    """``msplora fit`` of the instruction-data config (tiny BERT's query/value) on ``data``."""
    return fit(
        "--config",
        str(REPO / "configs" / "instruct_demo.yaml"),
        "--model.model={model}",  # the config names its own model
        "--model.pyramid.targets=[query, value]",
        f"--data.init_args.data={data}",
        data=None,
    )


def levels(yaml_list: str):
    return fit(f"--model.pyramid.levels={yaml_list}")


def cmd(*args: str):
    def argv(p: dict, out: Path) -> list[str]:
        return [_fill(a, {**p, "out": out}) for a in args]

    return argv


ANSWER = ("answer", "--questions", "{questions}", "--model-id", "m", "--out", "{out}/answers.jsonl")
ABLATION = ("ablation", "run", "--root", "{out}")
SEARCH = ("search", "run", "--trials", "1", "--out", "{out}/search", "--storage")
REPORT = ("search", "report", "--out", "{out}/report", "--storage")

CASES = [
    # -- every pyramid field, through the CLI: the library's ConfigError is the line
    Case("rank_0", levels("[{share: layer, rank: 0}]"), "levels[0].rank: rank 0 < 1", "use a rank >= 1"),
    Case("rank_negative", levels("[{share: layer, rank: -1}]"), "levels[0].rank: rank -1 < 1"),
    Case("rank_not_int", levels("[{share: layer, rank: two}]"), "model.pyramid.levels.rank: 'two' is not an int"),
    Case("alpha_0", levels("[{share: layer, rank: 2, alpha: 0}]"), "levels[0].alpha: alpha 0.0 <= 0"),
    Case("alpha_negative", levels("[{share: layer, rank: 2, alpha: -4}]"), "levels[0].alpha"),
    Case("share_banana", levels("[{share: banana, rank: 2}]"), "unknown scheme 'banana'", "global, group, layer"),
    Case("levels_empty", levels("[]"), "levels: the level list is empty"),
    Case("groups_and_group_size", levels("[{share: group, rank: 2, groups: 2, group_size: 2}]"), "exactly one of"),
    Case("group_without_groups", levels("[{share: group, rank: 2}]"), "exactly one of groups / group_size"),
    Case("groups_0", levels("[{share: group, rank: 2, groups: 0}]"), "levels[0].groups: groups 0 < 1"),
    Case("group_size_0", levels("[{share: group, rank: 2, group_size: 0}]"), "group_size 0 < 1"),
    Case("groups_on_layer_share", levels("[{share: layer, rank: 2, groups: 2}]"), "groups/group_size given"),
    Case("two_global", levels("[{share: global, rank: 2}, {share: global, rank: 2}]"), "more than one global"),
    Case("duplicate_names", levels("[{share: layer, rank: 2, name: a}, {share: global, rank: 2, name: a}]"), "dupl"),
    Case("dot_in_name", levels("[{share: layer, rank: 2, name: a.b}]"), "contains '.'"),
    Case("dropout_1_5", fit("--model.pyramid.dropout=1.5"), "dropout: 1.5 is outside [0, 1)"),
    Case("dropout_negative", fit("--model.pyramid.dropout=-0.1"), "dropout: -0.1 is outside"),
    Case("init_unknown", fit("--model.pyramid.init=orthogonal"), "unknown init 'orthogonal'"),
    Case("targets_empty", fit("--model.pyramid.targets=[]"), "targets: no target modules"),
    Case("ranks_length", fit("--model.pyramid.ranks=[8, 4]"), "2 ranks for 3 levels"),
    Case("ranks_and_r0", fit("--model.pyramid.ranks=[8, 4, 2]", "--model.pyramid.r0=8"), "both ranks and r0"),
    Case("r0_0", fit("--model.pyramid.r0=0"), "r0: 0 is not an integer >= 1"),
    Case("decay_2", fit("--model.pyramid.r0=8", "--model.pyramid.decay=2"), "decay: 2.0 is outside (0, 1]"),
    Case("decay_without_r0", fit("--model.pyramid.decay=0.5"), "decay given without r0"),
    Case("pyramid_typo_key", fit("--model.pyramid.rnak=3"), "--model.pyramid.rnak: unknown key", "levels, ranks, r0"),
    Case("targets_match_nothing", fit("--model.pyramid.targets=[q_proj]"), "['q_proj'] matches no module", "query"),
    Case("groups_exceed_layers", levels("[{share: group, rank: 2, groups: 9}]"), "9 groups for 4 adapted layers"),
    Case("level_typo_key", levels("[{share: layer, rnak: 3}]"), "levels.rnak: unknown key", "share, rank, alpha"),
    # -- data
    Case("unknown_task", fit(task="sst3"), "unknown task 'sst3'", "cola, sst2"),
    Case("val_fraction_1", fit("--data.init_args.val_fraction=1.0"), "val_fraction must be in [0, 1)"),
    Case("batch_size_0", fit("--data.init_args.batch_size=0"), "batch_size must be >= 1"),
    Case("max_length_0", fit("--data.init_args.max_length=0"), "max_length must be >= 1"),
    Case("data_dir_missing", fit("--data.init_args.data_dir={root}/nowhere", data=None), "is not a folder"),
    Case("no_train_file", fit(data="only_dev"), "no 'train' file in", "put the file there"),
    Case("missing_column", fit(data="missing_column"), "missing column(s) ['sentence']", "rename them"),
    Case("wrong_label", fit(data="wrong_label"), "label '2' is outside sst2's label set", "use one of"),
    Case("regression_label", fit(data="stsb", task="stsb"), "label '7.5' is not a number in [0.0, 5.0]"),
    Case("non_utf8", fit(data="non_utf8"), "train.tsv: line 6 is not UTF-8", "re-save the file as UTF-8"),
    Case("empty_file", fit(data="empty_file"), "train.tsv: the file is empty"),
    Case("empty_split", fit(data="header_only"), "split 'validation' is empty"),
    Case("ragged_row", fit(data="ragged_row"), "row 4 (0-based, header not counted) has 3 fields"),
    Case("malformed_jsonl", fit(data="bad_jsonl"), "train.jsonl: line 2 is not valid JSON"),
    Case("json_not_objects", fit(data="json_not_objects"), "train.json: expected JSON objects"),
    Case("data_class_typo", fit("--data=Nope"), "--data: "),
    Case("data_typo_key", fit("--data.init_args.tsk=x"), "--data.tsk: unknown key", "task, data_dir"),
    # -- instruction data
    Case("instruct_record_no_output", instruct("{alpaca_no_output}"), "record 1: Alpaca field 'output'", "'output'"),
    Case("instruct_file_missing", instruct("{root}/none.jsonl"), "none.jsonl does not exist", "check the path"),
    Case("instruct_hub_name_unreadable", instruct("someorg/nodata"), "no Hub dataset of that name can be read"),
    # -- model path
    Case("model_no_such_folder", fit("--model.model={root}/no_model"), "no such folder", "an alias (smollm2, minilm)"),
    Case("model_hub_name_offline", fit("--model.model=someorg/somemodel"), "not a Hub name reachable offline"),
    Case("model_alias_typo", fit("--model.model=minilmm"), "model 'minilmm'", "did you mean 'minilm'"),
    Case("model_is_a_file", fit("--model.model={not_a_model_file}"), "is a file, not a model folder"),
    # -- YAML, keys, types
    Case("malformed_yaml", fit("--config", "{bad_yaml}"), "bad_yaml.yaml: line 3, column 1: invalid YAML"),
    Case("tab_in_yaml", fit("--config", "{tab_yaml}"), "tab_yaml.yaml: line 2, column 1: invalid YAML"),
    Case("config_missing", fit("--config", "{root}/nope.yaml"), "nope.yaml: no such file"),
    Case("yaml_unknown_key", fit("--config", "{unknown_yaml_key}"), "--model.pyramid.rnak: unknown key"),
    Case("yaml_unknown_trainer_key", fit("--config", "{unknown_trainer_key}"), "--trainer.max_stepz", "max_steps"),
    Case("trainer_typo", fit("--trainer.max_stepz=3"), "--trainer.max_stepz: unknown option", "--trainer.max_steps"),
    Case("model_typo", fit("--model.lrr=3"), "--model.lrr: unknown option", "model.lr, model.model"),
    Case("top_level_typo", fit("--modle.lr=3"), "--modle.lr: unknown option", "model"),
    Case("lr_not_a_number", fit("--model.lr=abc"), "--model.lr: 'abc' is not a float"),
    Case("epochs_not_a_number", fit("--trainer.max_epochs=many"), "--trainer.max_epochs: 'many'"),
    # -- checkpoints
    Case("ckpt_missing", fit("--ckpt_path={root}/none.ckpt"), "none.ckpt: no such file", "last.ckpt"),
    Case("ckpt_truncated", fit("--ckpt_path={truncated_ckpt}"), "truncated or corrupt"),
    Case("ckpt_random", fit("--ckpt_path={random_ckpt}"), "not a readable torch checkpoint"),
    Case("test_ckpt_random", fit("--ckpt_path={random_ckpt}", cmd="test"), "not a readable torch checkpoint"),
    Case("validate_ckpt_truncated", fit("--ckpt_path={truncated_ckpt}", cmd="validate"), "truncated or corrupt"),
    # -- summary
    Case("summary_no_args", cmd("summary"), "the following arguments are required: RUN_DIR"),
    Case("summary_two_args", cmd("summary", "{out}/a", "{out}/b"), "unrecognized arguments"),
    Case("summary_missing_dir", cmd("summary", "{root}/no_run"), "no such run directory"),
    Case("summary_no_metrics", cmd("summary", "{empty_run}"), "no metrics.json under"),
    Case("summary_corrupt_metrics", cmd("summary", "{corrupt_metrics}"), "metrics.json is not valid JSON"),
    # -- analyze
    Case("analyze_no_args", cmd("analyze"), "the following arguments are required: RUN"),
    Case("analyze_missing_run", cmd("analyze", "{root}/no_run", "--out", "{out}/a"), "no such run directory"),
    Case("analyze_adapter_dir", cmd("analyze", "{adapter_truncated}", "--out", "{out}/a"), "no spectra.json under"),
    Case("analyze_corrupt_spectra", cmd("analyze", "{corrupt_spectra}", "--out", "{out}/a"), "file is not valid JSON"),
    # -- answer
    Case("answer_missing_args", cmd("answer"), "the following arguments are required"),
    Case("answer_no_questions", cmd(*ANSWER[:2], "{root}/none.jsonl", *ANSWER[3:]), "no such file"),
    Case("answer_bad_record", cmd(*ANSWER[:2], "{bad_questions}", *ANSWER[3:]), "'turns' must be a non-empty list"),
    Case("answer_model_id_path", cmd(*ANSWER[:3], "--model-id", "a/b"), "file name"),
    Case("answer_zero_tokens", cmd(*ANSWER, "--max-new-tokens", "0"), "--max-new-tokens 0: must be at least 1"),
    Case("answer_bad_dtype", cmd(*ANSWER, "--dtype", "float7"), "'float7' is not a torch dtype"),
    Case("answer_not_adapter", cmd(*ANSWER, "--adapter", "{not_an_adapter}"), "not an MSPLoRA adapter directory"),
    Case("answer_adapter_truncated", cmd(*ANSWER, "--adapter", "{adapter_truncated}"), "are truncated"),
    Case("answer_adapter_random", cmd(*ANSWER, "--adapter", "{adapter_random}"), "not a safetensors file"),
    Case("answer_adapter_bad_config", cmd(*ANSWER, "--adapter", "{adapter_bad_config}"), "adapter_config.json"),
    Case("answer_no_such_model", cmd(*ANSWER, "--model", "{root}/no_model"), "no such folder"),
    # -- ablation
    Case("ablation_unknown_variant", cmd(*ABLATION, "no_such_variant"), "unknown ablation 'no_such_variant'"),
    Case("ablation_steps_0", cmd(*ABLATION, "full", "--steps", "0"), "--steps 0: need at least 1 training step"),
    Case("ablation_seeds_0", cmd(*ABLATION, "full", "--seeds", "0"), "--seeds 0: need 1 to 1000"),
    Case("ablation_lrs_words", cmd(*ABLATION, "full", "--lrs", "fast slow"), "not numbers"),
    Case("ablation_lrs_negative", cmd(*ABLATION, "full", "--lrs=-1e-3"), "need positive values"),
    Case("ablation_extend_negative", cmd(*ABLATION, "full", "--extend", "-1"), "--extend -1"),
    Case("ablation_names_and_all", cmd(*ABLATION, "full", "--all"), "give variant names or --all"),
    Case("ablation_no_names", cmd(*ABLATION), "give variant names or --all"),
    Case("ablation_config_missing", cmd(*ABLATION, "full", "--config", "{root}/none.yaml"), "no such file"),
    Case(
        "ablation_plan_unknown",
        cmd("ablation", "plan", "no_such_plan", "--root", "{out}"),
        "unknown plan 'no_such_plan'",
    ),
    Case("ablation_plan_missing_file", cmd("ablation", "plan", "{root}/none.yaml"), "no such file"),
    Case(
        "ablation_plan_workers_0", cmd("ablation", "plan", "mrpc", "--workers", "0", "--root", "{out}"), "--workers 0"
    ),
    Case("ablation_plan_hours_0", cmd("ablation", "plan", "mrpc", "--hours", "0", "--root", "{out}"), "--hours 0.0"),
    Case(
        "ablation_config_missing_names_the_tasks_configs",
        cmd(*ABLATION, "full", "--task", "rte", "--config", "{root}/configs/minilm/rte.yml"),
        "rte.yml: no such file",
        "configs/minilm/rte.yaml or configs/rte.yaml",
    ),
    Case("ablation_task_without_config", cmd(*ABLATION, "full", "--task", "imdb"), "no configs/imdb.yaml"),
    Case("ablation_no_subcommand", cmd("ablation"), "required: cmd"),
    Case("ablation_report_empty", cmd("ablation", "report", "--root", "{out}"), "no results under"),
    Case(
        "ablation_bad_override",
        cmd(*ABLATION, "full", "--", "--model.model={model}", "--model.lrr=3"),
        "--model.lrr: unknown option",
    ),
    # -- search storage
    Case("search_storage_under_a_file", cmd(*SEARCH, "{a_file}/study.db"), "a_file.txt is a file, not a folder"),
    Case("search_journal_under_a_file", cmd(*SEARCH, "{a_file}/sub/study.log"), "is a file, not a folder"),
    Case("search_storage_is_a_folder", cmd(*SEARCH, "{db_folder}"), "folder.db is a folder", "name a file in it"),
    Case("search_report_missing_folder", cmd(*REPORT, "{out}/nowhere/study.db"), "no such file", "search run"),
    Case("search_report_under_a_file", cmd(*REPORT, "{a_file}/study.db"), "is a file, not a folder"),
    # -- the dispatcher
    Case("unknown_command", cmd("frobnicate"), "unknown command 'frobnicate'", "fit, validate, test"),
    Case("command_typo", cmd("analyse"), "unknown command 'analyse'", "did you mean `msplora analyze`"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its content (folders: "dir")."""
    return {
        str(f.relative_to(root)): "dir" if f.is_dir() else hashlib.sha1(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
    }


def test_the_table_is_large():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_user_error_is_one_line_exit_2_and_changes_nothing(case, inputs, tmp_path, monkeypatch, capsys, caplog):
    out = tmp_path / "out"
    out.mkdir()
    # Lightning's info lines ("Seed set to 0") go to a logging handler bound to the stderr of an
    # earlier test (closed by now); they are not part of the error. The subprocess test below
    # checks the real terminal.
    for name in ("lightning.pytorch", "lightning.fabric"):
        caplog.set_level(logging.WARNING, logger=name)
    monkeypatch.chdir(tmp_path)  # anything written to a relative path would land in the snapshot
    argv = case.argv(inputs, out)
    before, before_inputs = snapshot(tmp_path), snapshot(inputs["root"])
    capsys.readouterr()
    try:
        code = main(argv)  # `msplora search` writes its line itself and returns the status
    except SystemExit as e:  # every other command: run_command raises SystemExit(2)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    command = argv[0]
    last = lines[-1]
    assert last.startswith(f"msplora {command}: "), err
    assert "Fix:" in last and [ln for ln in lines if "Fix:" in ln] == [last], err
    assert case.expect in last, last
    assert case.fix in last.split("Fix:", 1)[1], last
    assert "weights_only=False" not in err  # torch's advice for an unreadable checkpoint must never reach the user
    assert snapshot(tmp_path) == before, "a refusal created or changed files"
    assert snapshot(inputs["root"]) == before_inputs


# -- the boundary itself ----------------------------------------------------------------------------
def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user errors become one line: anything else is ours to fix and must show where."""
    from msplora import errors

    def broken(argv):
        raise ValueError("list index out of range")  # not the house "problem. Fix:" shape

    with pytest.raises(ValueError, match="list index"):
        errors.run_command("fit", broken, [])
    with pytest.raises(KeyError):
        errors.run_command("fit", lambda argv: {}["x"], [])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, monkeypatch, inputs):
    from msplora.config import ConfigError

    flag = ["--debug"] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("MSPLORA_DEBUG", "1")
    with pytest.raises(Exception, match="no such run directory") as e:
        main(["summary", str(inputs["root"] / "no_run"), *flag])
    assert not isinstance(e.value, SystemExit)
    # and the library's own exception survives a jsonargparse wrapper in debug mode
    with pytest.raises(Exception) as e:
        main([*levels("[{share: layer, rank: 0}]")(inputs, inputs["root"] / "unused"), *flag])
    assert not isinstance(e.value, SystemExit)
    chain, c = [], e.value
    while c is not None:
        chain.append(c)
        c = c.__cause__ or c.__context__
    assert any(isinstance(x, ConfigError) for x in chain)


def test_a_missing_command_module_is_a_clean_error(monkeypatch, capsys):
    # `export` lives in its own module (another branch); a command whose module is absent
    # must say so in one line, not raise ModuleNotFoundError.
    monkeypatch.setitem(COMMANDS, "export", ("msplora._no_such_module", "main", "x"))
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("msplora export: ") and "Fix:" in err and "\n" not in err


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("fit", "validate", "test", "summary", "analyze", "answer", "export", "ablation", "search", "bench"):
        assert f"\n  {name} " in text, name


def test_summary_succeeds_with_exit_0(tmp_path, capsys):
    run = tmp_path / "run" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"task": "sst2", "metric": "accuracy", "value": 0.75}))
    assert main(["summary", str(tmp_path / "run")]) == 0  # it used to return a dict: exit status 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == 0.75


# -- through a real terminal: exactly one line, no traceback ----------------------------------------
def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MSPLORA_DEBUG", None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_subprocess_errors_are_one_line(inputs, tmp_path):
    out = tmp_path / "out"
    cases = {
        "pyramid": ["msplora", *levels("[{share: layer, rank: 0}]")(inputs, out)],
        "typo": ["msplora", *fit("--model.pyramid.rnak=3")(inputs, out)],
        "ckpt": ["msplora", *fit("--ckpt_path={random_ckpt}")(inputs, out)],
        "summary": ["msplora", "summary", str(inputs["empty_run"])],
        "ablation": ["msplora.ablation", "run", "full", "--steps", "0", "--root", str(out)],
    }
    for name, args in cases.items():
        proc = _run(*args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, name
        assert len([ln for ln in lines if "Fix:" in ln]) == 1 and "Fix:" in lines[-1], (name, proc.stderr)
        assert lines[-1].startswith("msplora "), (name, lines[-1])
        if name in ("typo", "summary", "ablation"):  # refused while parsing: nothing else was printed
            assert len(lines) == 1, (name, proc.stderr)
    assert not out.exists()
    proc = _run("msplora", "summary", str(inputs["empty_run"]), "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
