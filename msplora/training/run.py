"""One fit, typed: the call `msplora fit`, the ablation runner, the search objective and the
instruct demo all make.

    setup = compose(["configs/base.yaml", "configs/minilm/mrpc.yaml", "ablations/no_mid.yaml"],
                    {"model.lr": 1e-3, "seed_everything": 0}, root_dir="runs/mrpc")
    result = fit(setup, test=True)   # RunResult: metric and value, test metrics, params per level,
                                     # global step, wall time, run folder, best adapter

Composition stays LightningCLI / jsonargparse, so what a YAML overlay or a dotted override does
from Python is exactly what it does on the command line. Sources apply in this order, a later
one winning on the same key: the config files, then ``overrides`` (typed values), then ``args``
(command-line pieces as a user typed them), then ``root_dir``.

Nothing here reads the run's files back: the values come from the module's record of the run
(what :class:`~msplora.training.callbacks.MetricsJSON` writes to ``metrics.json``) and the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = ["RunResult", "Setup", "compose", "fit", "override_args"]


def _value(v: Any) -> str:
    """A typed value as jsonargparse reads it back (``True`` -> ``true``, ``None`` -> ``null``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return str(v)  # str(float) is its shortest exact repr: the value parses back bit-identical


def override_args(overrides: Mapping[str, Any] | None) -> list[str]:
    """``{"model.lr": 1e-3, "trainer.enable_checkpointing": True}`` -> ``["--model.lr=0.001", ...]``,
    in the mapping's order."""
    return [f"--{k}={_value(v)}" for k, v in (overrides or {}).items()]


@dataclasses.dataclass
class Setup:
    """A parsed config with its trainer, module and data built (weights load in ``fit``)."""

    cli: Any  # msplora.training.cli.MSPLoRACLI

    @property
    def trainer(self):
        return self.cli.trainer

    @property
    def model(self):
        return self.cli.model

    @property
    def datamodule(self):
        return self.cli.datamodule

    @property
    def config(self):
        """The parsed config (jsonargparse Namespace), as saved to the run's config.yaml."""
        return self.cli.config

    def config_dict(self) -> dict:
        """The parsed config as plain data: what the run's config.yaml holds."""
        import yaml

        return yaml.safe_load(self.cli.parser.dump(self.cli.config, skip_link_targets=False, skip_unset=False))

    @property
    def seed(self) -> int | None:
        seed = self.cli.config.get("seed_everything")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def ckpt_path(self) -> str | None:
        """The checkpoint the fit resumes from (``last`` already resolved to a file), or None."""
        return self.cli.config_init.get("ckpt_path")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one fit (+ test) gave. ``metrics`` is the full record also written to metrics.json."""

    task: str | None = None
    model: str = ""
    metric: str = ""  # the task's selection metric, e.g. "accuracy" ("loss" for instruction data)
    monitor: str = ""  # its logged key, e.g. "val/accuracy"
    value: float | None = None  # best validation value of the monitor
    best_epoch: int | None = None
    test: dict[str, float] = dataclasses.field(default_factory=dict)  # by logged key; empty without test=True
    trainable_params: int = 0
    adapter_params: int = 0
    params_per_level: dict[str, int] = dataclasses.field(default_factory=dict)
    lora_r8_adapter_params: int = 0  # plain LoRA r=8 on the same targets, for comparison
    lora_r8_params: int = 0
    majority_baseline: float | None = None
    global_step: int = 0
    epochs: int = 0
    wall_time_s: float = 0.0  # the whole call: validation before, fit, test
    fit_wall_time_s: float | None = None  # the fit alone (across resumes)
    seed: int | None = None
    lr: float | None = None
    head_lr: float | None = None
    run_dir: Path | None = None
    best_adapter: Path | None = None  # <run>/best_adapter, once a validation improved
    best_checkpoint: Path | None = None
    val_before: dict[str, float] | None = None  # validation before training (validate_first=True)
    metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def test_value(self) -> float | None:
        """The selection metric on the (first) test split."""
        keys = sorted(k for k in self.test if k.endswith(f"/{self.metric}"))
        return self.test[keys[0]] if keys else None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for k in ("run_dir", "best_adapter", "best_checkpoint"):
            out[k] = None if out[k] is None else str(out[k])
        return out


def compose(
    configs: Iterable[str | PathLike] = (),
    overrides: Mapping[str, Any] | None = None,
    args: Sequence[str] = (),
    root_dir: str | PathLike | None = None,
) -> Setup:
    """Parse and build one fit. A bad key or value raises ``msplora.errors.UsageError`` (one line),
    a config that does not fit the model ``msplora.ConfigError``. Nothing is written: the run's
    folder (``root_dir/version_N``) is claimed when ``fit`` starts."""
    from msplora.training.cli import cli_main

    argv = [x for c in configs for x in ("--config", str(c))]
    argv += override_args(overrides) + list(args)
    if root_dir is not None:
        argv.append(f"--trainer.default_root_dir={root_dir}")
    return Setup(cli_main(argv, run=False, exit_on_error=False))


def fit(
    setup: Setup,
    *,
    test: bool = False,
    validate_first: bool = False,
    callbacks: Iterable = (),
) -> RunResult:
    """Train (resuming from ``setup.ckpt_path`` when set), then optionally test the best checkpoint.

    validate_first: validate the untrained model first (``RunResult.val_before``); the adapter
    starts at B = 0, so this is the base model's validation score.
    callbacks: extra Lightning callbacks for this fit (the search's pruning callback).
    """
    trainer, model, dm = setup.trainer, setup.model, setup.datamodule
    trainer.callbacks.extend(callbacks)
    t0 = time.perf_counter()
    val_before = None
    if validate_first:
        logged = trainer.validate(model, datamodule=dm, verbose=False)
        val_before = {k: float(v) for k, v in (logged[0] if logged else {}).items()}
    with warnings.catch_warnings():
        if setup.cli.resumed_checkpoints is not None:  # "... exists and is not empty": our own run's
            folder = re.escape(str(setup.cli.resumed_checkpoints))
            warnings.filterwarnings("ignore", message=f"Checkpoint directory {folder} exists and is not empty")
        trainer.fit(model, datamodule=dm, ckpt_path=setup.ckpt_path)
    if test:
        trainer.test(model, datamodule=dm, ckpt_path="best", verbose=False)
    return _result(setup, time.perf_counter() - t0, val_before)


def _result(setup: Setup, wall: float, val_before: dict | None) -> RunResult:
    trainer, model = setup.trainer, setup.model
    m = dict(model.run_record or {})
    final = m.get("final", {})
    run = Path(trainer.log_dir) if trainer.log_dir else None
    best_adapter = run / "best_adapter" if run is not None and (run / "best_adapter").is_dir() else None
    ckpt = trainer.checkpoint_callback
    best_ckpt = Path(ckpt.best_model_path) if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
    hp = model.hparams
    return RunResult(
        task=m.get("task"),
        model=m.get("model", hp.get("model")),
        metric=m.get("metric", ""),
        monitor=m.get("monitor", ""),
        value=m.get("value"),
        best_epoch=m.get("best_epoch"),
        test={k: v for k, v in final.items() if k.startswith("test")},
        trainable_params=m.get("trainable_params", 0),
        adapter_params=m.get("adapter_params", 0),
        params_per_level=dict(m.get("params_per_level", {})),
        lora_r8_adapter_params=m.get("lora_r8_adapter_params", 0),
        lora_r8_params=m.get("lora_r8_params", 0),
        majority_baseline=m.get("majority_baseline"),
        global_step=trainer.global_step,
        epochs=trainer.current_epoch,
        wall_time_s=round(wall, 1),
        fit_wall_time_s=m.get("wall_time_s"),
        seed=setup.seed,
        lr=hp.get("lr"),
        head_lr=hp.get("head_lr"),
        run_dir=run,
        best_adapter=best_adapter,
        best_checkpoint=best_ckpt,
        val_before=val_before,
        metrics=m,
    )


def fit_main(argv: list[str]) -> None:
    """``msplora fit ARGS``: the command line's config through the same two calls."""
    fit(compose(args=argv))
