"""One fit, typed: the call `msplora fit`, the ablation runner, the search objective and the
instruct demo all make.

    setup = compose(["configs/base.yaml", "configs/minilm/mrpc.yaml", "ablations/no_mid.yaml"],
                    {"model.lr": 1e-3, "seed_everything": 0}, root_dir="runs/mrpc")
    result = fit(setup, test=True)   # RunResult: metric and value, test metrics, params per level,
                                     # global step, wall time, run folder, best adapter

Composition stays LightningCLI / jsonargparse, so what a YAML overlay or a dotted override does
from Python is exactly what it does on the command line. Sources apply in this order, a later
one winning on the same key: the config files, then ``overrides`` (typed values, handed to the
parser as objects: never turned into ``--key=value`` text), then ``args`` (command-line pieces as
a user typed them), then ``root_dir``.

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

__all__ = ["Composition", "RunResult", "Setup", "compose", "fit", "override_args"]


@dataclasses.dataclass(frozen=True)
class Composition:
    """What one fit is composed of, as data: what ``compose`` hands the CLI's parser, which
    parses it in stages (:meth:`parse`) instead of a command line."""

    configs: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    args: tuple[str, ...] = ()
    root_dir: str | None = None

    def parse(self, parser):
        """The config files (as ``--config`` would read them), then each typed override as an
        object at its dotted key, then the user's command-line pieces, then the run folder; each
        stage starts from the namespace of the one before, so a later source wins on its keys."""
        files = [x for c in self.configs for x in ("--config", c)]
        if not self.overrides:  # files then the user's pieces: exactly a command line
            cfg = parser.parse_args(files + list(self.args))
        else:
            cfg = parser.parse_args(files)  # (so the files must make a whole config by themselves)
            cfg = parser.parse_object(_nested(self.overrides), namespace=cfg)
        if self.overrides and self.args:
            # The user's pieces go on top as they would after those config files on a command line:
            # the namespace so far, in the parser's own serialisation, is their first config. (Parsing
            # them into the namespace directly makes jsonargparse take a dataclass value such as
            # model.pyramid for a subclass spec and refuse it.)
            cfg = parser.parse_args(["--config", parser.dump(cfg, skip_link_targets=True), *self.args])
        if self.root_dir is not None:
            cfg = parser.parse_object({"trainer": {"default_root_dir": self.root_dir}}, namespace=cfg)
        return cfg

    def describe(self) -> list[str]:
        """A command line that means the same, for error messages only (they name files and keys)."""
        out = [x for c in self.configs for x in ("--config", c)] + override_args(self.overrides) + list(self.args)
        return out + ([f"--trainer.default_root_dir={self.root_dir}"] if self.root_dir is not None else [])


def _nested(overrides: Mapping[str, Any]) -> dict:
    """``{"data.init_args.seed": 1}`` -> ``{"data": {"init_args": {"seed": 1}}}`` (values kept as given)."""
    out: dict = {}
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r} goes below {part!r}, which another override sets to a value")
        node[leaf] = value
    return out


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

    composition = Composition(
        tuple(str(c) for c in configs),
        dict(overrides or {}),
        tuple(args),
        None if root_dir is None else str(root_dir),
    )
    return Setup(cli_main(composition, run=False, exit_on_error=False))


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
    from msplora.training.record import RunRecord

    trainer, model = setup.trainer, setup.model
    rec = model.run_record if isinstance(model.run_record, RunRecord) else RunRecord.from_dict(model.run_record)
    run = Path(trainer.log_dir) if trainer.log_dir else None
    best_adapter = run / "best_adapter" if run is not None and (run / "best_adapter").is_dir() else None
    ckpt = trainer.checkpoint_callback
    best_ckpt = Path(ckpt.best_model_path) if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
    hp = model.hparams
    return RunResult(
        task=rec.task,
        model=rec.model or hp.get("model"),
        metric=rec.metric or "",
        monitor=rec.monitor or "",
        value=rec.value,
        best_epoch=rec.best_epoch,
        test={k: v for k, v in rec.final.items() if k.startswith("test")},
        trainable_params=rec.trainable_params or 0,
        adapter_params=rec.adapter_params or 0,
        params_per_level=dict(rec.params_per_level),
        lora_r8_adapter_params=rec.lora_r8_adapter_params or 0,
        lora_r8_params=rec.lora_r8_params or 0,
        majority_baseline=rec.majority_baseline,
        global_step=trainer.global_step,
        epochs=trainer.current_epoch,
        wall_time_s=round(wall, 1),
        fit_wall_time_s=rec.wall_time_s,
        seed=setup.seed,
        lr=hp.get("lr"),
        head_lr=hp.get("head_lr"),
        run_dir=run,
        best_adapter=best_adapter,
        best_checkpoint=best_ckpt,
        val_before=val_before,
        metrics=rec.to_dict(),
    )


def fit_main(argv: list[str]) -> None:
    """``msplora fit ARGS``: the command line's config through the same two calls."""
    fit(compose(args=argv))
