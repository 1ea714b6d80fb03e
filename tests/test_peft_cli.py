"""``msplora export RUN_DIR --to peft|merged|msplora OUT`` on a real tiny fit, and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoModelForSequenceClassification

import msplora
from msplora import MSPLoRAConfig
from msplora.__main__ import main as msplora_main
from msplora.export_cli import load_run
from tests.conftest import REPO, fit_cli
from tests.tiny import inputs, randomize_adapter, tiny_bert


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert_dir):
    """One real fit (1 epoch, tiny BERT, the embedded sentiment task): a run folder as users have."""
    from tests.test_training import fit_args

    root = tmp_path_factory.mktemp("fit")
    fit_cli(fit_args(root, tiny_bert_dir, "--trainer.max_epochs=1"))
    return next(root.rglob("metrics.json")).parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "msplora.export_cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


def assert_one_line_error(proc_or_err: str, needle: str) -> None:
    lines = proc_or_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msplora export: ") and "Fix:" in lines[0], proc_or_err
    assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_export_a_real_run_three_ways(run_dir, tiny_bert_dir, tmp_path):
    model, _, spec = load_run(run_dir)  # the run's model with its best adapter
    assert spec.name == str(tiny_bert_dir) and spec.problem == "classification"
    x = {**inputs(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        expected = model(**x).logits

    for to in ("peft", "merged", "msplora"):
        assert msplora_main(["export", str(run_dir), "--to", to, str(tmp_path / to)]) == 0

    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["task_type"] == "SEQ_CLS" and peft_cfg["base_model_name_or_path"] == str(tiny_bert_dir)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    # merged = a plain model: exactly the base's parameters, no wrapper, no bank
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    assert not any("msplora" in type(m).__name__.lower() for m in merged.modules())
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    msplora.load_adapter(fresh, tmp_path / "msplora").eval()  # eval after: new wrappers' dropout starts in train mode
    assert json.loads((tmp_path / "msplora" / "adapter_config.json").read_text())["base_model"] == str(tiny_bert_dir)
    with torch.no_grad():
        # peft (s_k folded into B) and merged (W + dW) change float rounding only
        torch.testing.assert_close(auto(**x).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(**x).logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(fresh(**x).logits, expected)


@pytest.fixture
def broken_run(tmp_path):
    """A run folder whose model cannot be loaded (its folder is gone)."""
    model = msplora.inject(tiny_bert(), MSPLoRAConfig(targets=["query", "value"], modules_to_save=["classifier"]))
    randomize_adapter(model)
    run = tmp_path / "run"
    msplora.save_adapter(model, run / "best_adapter")
    (run / "metrics.json").write_text(json.dumps({"model": str(tmp_path / "gone"), "task": "rte"}))
    return run


def _status(argv: list[str]) -> int:
    """The exit status of ``msplora <argv>``: returned, or raised by the error boundary."""
    try:
        return msplora_main(argv)
    except SystemExit as e:
        return e.code


def test_refusals_are_one_line_exit_2_and_write_nothing(broken_run, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "nope"), "--to", "peft", str(out)], "is not a folder"),
        ([str(tmp_path), "--to", "peft", str(out)], "holds no adapter"),
        ([str(broken_run), "--to", "onnx", str(out)], "invalid choice"),
        ([str(broken_run), "--to", "merged", str(out)], "cannot load the source's model"),
        ([str(broken_run), "--to", "peft"], "required"),
    ]
    for args, needle in cases:
        assert _status(["export", *args]) == 2, args
        assert_one_line_error(capsys.readouterr().err, needle)
        assert not out.exists()
    # an existing OUT is refused and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _status(["export", str(broken_run), "--to", "peft", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~45 s on this shared machine
def test_command_line_exit_status_and_stderr(broken_run, tmp_path):
    proc = run_cli(str(broken_run), "--to", "peft", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line_error(proc.stderr, "cannot load the source's model")
    assert not (tmp_path / "out").exists()


# -- the command boundary: --version, missing extras --------------------------------------------
def test_version(capsys):
    import msplora as m

    assert msplora_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"msplora {m.__version__}"


def test_extras_table_matches_pyproject():
    import re

    import tomllib

    from msplora.__main__ import EXTRAS

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dist = {"sklearn": "scikit-learn", "optuna_integration": "optuna-integration"}
    for module, extra in EXTRAS.items():
        names = {re.split(r"[\[<>=;! ]", req, maxsplit=1)[0].lower() for req in extras[extra]}
        assert dist.get(module, module) in names, (module, extra)


@pytest.mark.slow  # a fresh interpreter importing torch
def test_fit_without_the_train_extra_names_it():
    code = (
        "import sys; sys.modules['lightning'] = None\n"  # as if [train] were not installed
        "from msplora.__main__ import main; sys.exit(main(['fit', '--help']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "lightning" in lines[0] and "pip install 'msplora[train]'" in lines[0]


@pytest.mark.slow
def test_a_run_without_best_adapter_says_why_and_exports_its_last_state(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "best_adapter")  # as a short fit that never validated leaves it
    assert _status(["export", str(run), "--to", "peft", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "this fit ran none")
    assert not (tmp_path / "out").exists()
    assert _status(["export", str(run), "--from", "last", "--to", "peft", str(tmp_path / "out")]) == 0
    model, _, _ = load_run(run, "last")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(model.classifier.weight, ckpt["model.classifier.weight"])  # the trained head, not a fresh one
    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    x = {**inputs(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        expected = model(**x).logits
        assert (auto(**x).logits - expected).abs().max() <= 1e-5 * expected.abs().max()
