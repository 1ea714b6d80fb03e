"""The ablation runner's result signature: what makes a finished result stale, and what not."""

from pathlib import Path

from msplora.ablation import Recipe, run_signature

BASE = """# base
trainer:
  max_epochs: 3
  log_every_n_steps: 20
  default_root_dir: runs/x
  callbacks:
    - class_path: lightning.pytorch.callbacks.RichProgressBar
    - class_path: msplora.analysis.SpectrumRecorder
      init_args: {every_n_steps: 25}
model:
  lr: 1.0e-3
"""


def _sig(tmp_path: Path, text: str) -> str:
    path = tmp_path / "base.yaml"
    path.write_text(text)
    return run_signature(Recipe((path,), {"trainer.max_steps": 5}))


def test_progress_logging_and_comments_keep_results(tmp_path):
    ref = _sig(tmp_path, BASE)
    edited = (
        BASE.replace("# base", "# reworded comment")
        .replace("log_every_n_steps: 20", "log_every_n_steps: 5\n  enable_progress_bar: false")
        .replace("runs/x", "runs/y")
        .replace("lightning.pytorch.callbacks.RichProgressBar", "lightning.pytorch.callbacks.TQDMProgressBar")
    )
    assert _sig(tmp_path, edited) == ref


def test_outcome_settings_make_results_stale(tmp_path):
    ref = _sig(tmp_path, BASE)
    assert _sig(tmp_path, BASE.replace("lr: 1.0e-3", "lr: 2.0e-3")) != ref
    assert _sig(tmp_path, BASE.replace("max_epochs: 3", "max_epochs: 4")) != ref
    # A callback that can change training (early stopping) is part of the signature.
    stop = BASE.replace("  callbacks:\n", "  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n")
    assert _sig(tmp_path, stop) != ref


def test_typed_overrides_and_extra_arguments_count(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    ref = run_signature(Recipe((path,), {"trainer.max_steps": 5, "model.head_lr": 2e-3}))
    # the order of the overrides is not a setting; their values are
    assert run_signature(Recipe((path,), {"model.head_lr": 2e-3, "trainer.max_steps": 5})) == ref
    assert run_signature(Recipe((path,), {"trainer.max_steps": 5, "model.head_lr": 4e-3})) != ref
    assert run_signature(Recipe((path,), {"trainer.max_steps": 5, "model.head_lr": 2e-3}, ("--x=1",))) != ref


def test_progress_and_logging_overrides_keep_results(tmp_path):
    """An extra override of a setting that cannot change the numbers (a progress bar, a logger,
    where last.ckpt is written) is not part of the signature, in either spelling; others are."""
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    ref = run_signature(Recipe((path,), {"trainer.max_steps": 5}, ("--model.dtype=float32",)))
    same = [
        ("--trainer.enable_progress_bar=false", "--model.dtype=float32"),
        ("--model.dtype=float32", "--trainer.enable_progress_bar", "false"),
        ("--trainer.log_every_n_steps=1", "--model.dtype=float32", "--trainer.logger=false"),
        ("--last_checkpoint.every_n_steps=10", "--model.dtype=float32"),
        ("--trainer.enable_progress_bar", "--model.dtype=float32"),  # a flag without a value takes no token
    ]
    for extra in same:
        assert run_signature(Recipe((path,), {"trainer.max_steps": 5}, extra)) == ref, extra
    other = [
        ("--model.dtype=float32", "--trainer.max_epochs=4"),
        ("--trainer.enable_progress_bar", "--trainer.max_epochs=4", "--model.dtype=float32"),
        ("--model.dtype", "float32"),  # the spelling of a counted override still counts
    ]
    for extra in other:
        assert run_signature(Recipe((path,), {"trainer.max_steps": 5}, extra)) != ref, extra
