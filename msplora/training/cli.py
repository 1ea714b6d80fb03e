"""``msplora fit|validate|test --config ...``: LightningCLI over the module and any DataModule.

Repeated ``--config`` files compose (base, task, ablation overlay); the resolved config is
saved beside every run as ``config.yaml``. Unless ``trainer.logger`` is set, each run logs
to ``<default_root_dir>/version_N/`` with CSV (metrics.csv) and TensorBoard (tb/); the folder
is claimed with an atomic ``mkdir`` when the run starts (building one writes nothing), so
two fits started at once never share one.

Resuming: ``fit --ckpt_path last`` continues the newest run under ``default_root_dir`` that has
a ``checkpoints/last.ckpt`` (``--ckpt_path <run>/checkpoints/x.ckpt`` continues that run), in
the same folder: metrics.csv keeps the rows before the checkpoint's step, TensorBoard hides the
later ones, status.json keeps the earlier attempts. Settings that the checkpoint would silently
replace (the pyramid, the base model, the optimizer's lr and weight decay, the data order's
batch size and sample set) are compared first and a difference is refused.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import re
import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

import msplora
from msplora.errors import UsageError, explain_parse_error
from msplora.hf import resolve_model
from msplora.io import CKPT_PATH_KEYWORDS, check_checkpoint_file
from msplora.training.callbacks import LastCheckpoint, RunStatus, progress_bar
from msplora.training.fsdp import resolve_strategy  # also registers the msplora_fsdp strategy
from msplora.training.module import MSPLoRAModule, pyramid_label

RUN_DIR = re.compile(r"version_(\d+)")

# Module settings that a resumed fit takes from its command line although the checkpoint holds
# state made under the old value: they change how the rest is computed, not what was restored.
HONOURED_ON_RESUME = {"dtype", "gradient_checkpointing", "warmup_ratio", "compile", "compile_bucket"}
# DataModule settings that fix which sample is the k-th of an epoch: a resumed loader's position
# means something else under another value.
DATA_ORDER = ("task", "data", "data_dir", "batch_size", "max_train_samples", "val_fraction", "seed")


def claim_run_dir(root: Path) -> int:
    """Create ``root/version_N`` for the next free N and return N. ``mkdir`` fails when the folder
    exists, so of two processes racing for one N exactly one gets it; the other tries N+1."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := RUN_DIR.fullmatch(p.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (what a
    ``mkdir(parents=True)`` of ``path`` would create first), or None when ``path`` exists."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


class RunFolderLogger(CSVLogger):
    """CSV metrics in ``root/version_N``. Without a version, N is claimed (``claim_run_dir``, an
    atomic mkdir) the first time the run asks for it, i.e. when fit or validate starts.

    ``claimed`` is then the folder and ``made`` the outermost folder the claim created (the folder
    or a parent of it): :class:`RunStatus` removes them when the run fails before its first step."""

    def __init__(self, root: Path, version: int | None = None) -> None:
        super().__init__(root, name="", version=version)
        self.claimed: Path | None = None
        self.made: Path | None = None

    def _get_next_version(self) -> int:
        if rank_zero_only.rank != 0:  # other DDP ranks write no logs; their log dir is rank 0's (broadcast)
            return super()._get_next_version()
        root = Path(self.root_dir)
        made = first_missing(root)
        version = claim_run_dir(root)
        self.claimed, self.made = root / f"version_{version}", made or root / f"version_{version}"
        return version


class FollowingTensorBoardLogger(TensorBoardLogger):
    """TensorBoard in ``<run>/tb``, the run folder of ``lead`` (claimed by it when first needed)."""

    def __init__(self, lead: CSVLogger, root: Path, version: int | None = None, purge_step: int | None = None) -> None:
        super().__init__(root, name="", version=version, sub_dir="tb", purge_step=purge_step)
        self.lead = lead

    def _get_next_version(self) -> int:
        return self.lead.version


def find_last_checkpoint(root: Path) -> Path | None:
    """The newest ``root/version_N/checkpoints/last.ckpt``, or None."""
    found = [p for p in root.glob("version_*/checkpoints/last.ckpt") if RUN_DIR.fullmatch(p.parent.parent.name)]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def run_version_of(ckpt: Path, root: Path) -> int | None:
    """N when ``ckpt`` lies in ``root/version_N/checkpoints/``, else None."""
    run = ckpt.resolve().parent.parent
    m = RUN_DIR.fullmatch(run.name)
    if m and ckpt.resolve().parent.name == "checkpoints" and run.parent == root.resolve():
        return int(m.group(1))
    return None


def resume_problems(checkpoint: dict, module: MSPLoRAModule, datamodule) -> list[str]:
    """What the given settings change against the checkpoint that resuming would not honour."""
    saved = checkpoint.get("hyper_parameters", {})
    given = dict(module.hparams)
    problems = []
    saved_pyr, given_pyr = saved.get("pyramid"), module.pyramid.to_dict() if module.pyramid is not None else None
    if saved_pyr is not None:
        from msplora.config import MSPLoRAConfig

        # No pyramid given = paper defaults on the model's default targets; the saved run's are
        # those targets when it was given none either (the key check on load covers the rest).
        norm = given_pyr if given_pyr is not None else MSPLoRAConfig(targets=saved_pyr["targets"]).to_dict()
        if not norm.get("modules_to_save"):  # filled with the task head when the model is built
            norm = {**norm, "modules_to_save": saved_pyr.get("modules_to_save")}
        diff = sorted(k for k in set(saved_pyr) | set(norm) if saved_pyr.get(k) != norm.get(k))
        if diff:
            problems.append(
                f"model.pyramid: the checkpoint holds the pyramid {pyramid_label(saved_pyr)}, this run gives "
                f"{pyramid_label(norm)} (differs in {', '.join(diff)}); its tensors cannot be loaded into another pyramid"
            )
    for key, value in given.items():
        if key == "pyramid" or key in HONOURED_ON_RESUME or key not in saved or saved[key] == value:
            continue
        if value is None and key in ("problem", "num_labels"):  # resolved from the data when built
            continue
        why = {
            "model": "the adapter was trained on that base model",
            "lr": "the checkpoint's optimizer state carries its own learning rates and would replace it",
            "head_lr": "the checkpoint's optimizer state carries its own learning rates and would replace it",
            "weight_decay": "the checkpoint's optimizer state carries its own weight decay and would replace it",
        }.get(key, "the checkpoint's state was made with the saved value and would not follow the new one")
        problems.append(f"model.{key}: the checkpoint has {saved[key]!r}, this run gives {value!r}; {why}")
    saved_data = checkpoint.get("datamodule_hyper_parameters", {})
    given_data = dict(getattr(datamodule, "hparams", {}) or {})
    for key in DATA_ORDER:
        if key in saved_data and key in given_data and saved_data[key] != given_data[key]:
            problems.append(
                f"data.{key}: the checkpoint has {saved_data[key]!r}, this run gives {given_data[key]!r}; "
                "the saved place in the epoch would point at other samples"
            )
    return problems


def _keep_metric_rows(path: Path, before_step: int) -> list[tuple[int, dict[str, float]]]:
    """Rows of a run's metrics.csv logged before ``before_step``, as (step, {name: value})."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step")))
            values = {k: _number(v) for k, v in row.items() if v not in ("", None)}
            if step < before_step and values:
                rows.append((step, values))
    return rows


def _number(text: str) -> int | float:
    try:
        return int(text)  # epoch
    except ValueError:
        return float(text)


class MSPLoRACLI(LightningCLI):
    """LightningCLI for the module and any DataModule. With ``run=False`` it parses and builds
    only; :mod:`msplora.training.run` runs the fit (``msplora fit`` goes through it), so the
    parser then takes fit's ``--ckpt_path`` itself, as the ``fit`` subcommand would."""

    def __init__(self, *args, run: bool = True, **kwargs) -> None:
        self.deferred = not run
        self.resumed_checkpoints: Path | None = None  # a resumed run's own checkpoints folder
        super().__init__(*args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer always comes from the model being tuned. Resolving it here, at parse time,
        # also refuses a model path that does not exist (Hub names: in prepare_data).
        parser.link_arguments("model.model", "data.init_args.tokenizer", compute_fn=resolve_model)
        # `--last_checkpoint.every_n_steps=N`, `--last_checkpoint.on_validation=false`
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        if self.deferred:
            parser.add_argument(
                "--ckpt_path",
                type=str | None,
                default=None,
                help="resume the fit: a checkpoint file, or 'last' for the newest last.ckpt under default_root_dir",
            )

    def parse_arguments(self, parser, args) -> None:
        # With exit_on_error=False (cli_main) jsonargparse raises instead of printing a dump of
        # the whole namespace; say in one line which key is wrong and what it accepts.
        # A Composition (msplora.training.run.compose) is parsed as data, stage by stage.
        composed = hasattr(args, "parse") and hasattr(args, "describe")
        try:
            if composed:
                self.config = args.parse(parser)
            else:
                super().parse_arguments(parser, args)
        except argparse.ArgumentError as e:
            argv = args.describe() if composed else args
            command = "fit" if self.deferred else argv[0] if argv and argv[0] in self.subcommands() else ""
            raise UsageError(explain_parse_error(e, argv, self._valid_keys, command)) from e
        # Lightning torch.loads ckpt_path right after parsing (for its hyperparameters): refuse a
        # missing or broken file first, before anything is read or written.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else self.config.get("ckpt_path")
        if ckpt and str(ckpt) not in CKPT_PATH_KEYWORDS:
            check_checkpoint_file(ckpt)

    def _valid_keys(self, parent: str) -> list[str]:
        """Keys accepted directly under ``parent`` ("" = top level), for unknown-option errors."""
        parser = self.init_parser(**self.parser_kwargs.get("fit", self.parser_kwargs))
        self.add_default_arguments_to_parser(parser)
        self.add_core_arguments_to_parser(parser)
        keys = set(parser.get_defaults(skip_validation=True).keys())
        if self.auto_configure_optimizers:
            keys |= {"optimizer", "lr_scheduler"}
        keys |= set(inspect.signature(self.trainer_class.fit).parameters) - {"self"} - self.subcommands()["fit"]
        prefix = f"{parent}." if parent else ""
        return sorted({k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix) and k != parent})

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = cfg["trainer"]
        # `fsdp` is this package's FSDP2 strategy on a GPU; on a CPU, a refusal naming msplora_fsdp.
        trainer_cfg["strategy"] = resolve_strategy(trainer_cfg.get("strategy"), trainer_cfg.get("accelerator"))
        callbacks = list(trainer_cfg.get("callbacks") or [])
        # The progress bar is a setting: --trainer.enable_progress_bar=false turns it off.
        if trainer_cfg.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(progress_bar())

        own_logger = trainer_cfg.get("logger") in (None, True)
        root = Path(trainer_cfg.get("default_root_dir") or ".")
        version, resumed_from, keep_rows, purge_step = None, None, [], None
        if (self.subcommand == "fit" or self.deferred) and cfg.get("ckpt_path"):
            ckpt = self._resolve_ckpt_path(cfg, root)
            if ckpt is not None:
                checkpoint = _load_checkpoint(ckpt)
                problems = resume_problems(checkpoint, self.model, self.datamodule)
                if problems:
                    raise msplora.ConfigError(
                        f"ckpt_path: resuming {ckpt} with other settings: {'; '.join(problems)}. "
                        "Fix: resume with the checkpoint's settings (drop those overrides), or start a new fit "
                        "without --ckpt_path"
                    )
                version = run_version_of(ckpt, root) if own_logger else None
                resumed_from = str(ckpt)
                if version is not None:
                    # Rows are logged at the count of optimizer steps taken before them: what the
                    # killed run logged from the checkpoint's step on, this run logs again.
                    purge_step = checkpoint["global_step"]
                    keep_rows = _keep_metric_rows(root / f"version_{version}" / "metrics.csv", purge_step)
                    # ModelCheckpoint warns that the folder it writes to is not empty: it is ours
                    # (the run API silences that warning for this folder during the fit).
                    self.resumed_checkpoints = root / f"version_{version}" / "checkpoints"
                    # The first attempt's config.yaml stays; this one's is saved beside it.
                    self.save_config_kwargs = {
                        **self.save_config_kwargs,
                        "config_filename": f"config.resumed_at_step_{checkpoint['global_step']}.yaml",
                    }

        trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        fresh = version is None
        claim = None
        if own_logger:
            # A new run's folder is claimed when the run starts (fit/validate first asks for the log
            # dir), not here: building a run (compose, the ablation runner's parse) writes nothing.
            csv_logger = RunFolderLogger(root, version=version)
            tb = FollowingTensorBoardLogger(csv_logger, root, version=version, purge_step=purge_step)
            trainer.loggers = [csv_logger, tb]
            claim = csv_logger if fresh else None
            if keep_rows:
                with warnings.catch_warnings():  # "...will be deleted": it is, and rewritten from keep_rows
                    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
                    csv_logger.experiment  # noqa: B018 (creates the writer, which empties metrics.csv)
                for step, values in keep_rows:
                    csv_logger.log_metrics(values, step)
        run = root / f"version_{version}" if own_logger and version is not None else None
        trainer.callbacks.append(RunStatus(run, fresh=fresh, resumed_from=resumed_from, claim=claim))
        return trainer

    def _resolve_ckpt_path(self, cfg, root: Path) -> Path | None:
        """``last`` -> the newest last.ckpt under root (None: nothing to resume, a new run);
        a path -> itself, checked to exist. Sets the fit's ckpt_path to the resolved file."""
        given = cfg["ckpt_path"]
        if given == "last":
            ckpt = find_last_checkpoint(root)
            if ckpt is None:
                # As Lightning does: "last" before the first run starts one (said, not silent).
                print(f"msplora fit: no last.ckpt under {root}; starting a new run", file=sys.stderr)
                cfg["ckpt_path"] = None
                return None
        elif given in ("best", "hpc", "registry"):  # Lightning's own names, resolved by it
            return None
        else:
            ckpt = Path(given)
            if not ckpt.is_file():
                raise msplora.ConfigError(
                    f"ckpt_path: no file {ckpt}. Fix: pass a checkpoint file, or 'last' for the newest run's last.ckpt"
                )
        cfg["ckpt_path"] = str(ckpt)
        return ckpt


def _load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)  # as Lightning loads it


def cli_main(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> MSPLoRACLI:
    """exit_on_error=False: a bad argument raises ``UsageError`` (one line, see msplora.errors)
    instead of jsonargparse printing the usage and exiting.

    run=False parses one fit's config (what :func:`msplora.training.run.compose` builds on; every
    fit runs through that API). run=True runs the other subcommands (validate, test, predict) in
    LightningCLI."""
    with warnings.catch_warnings():
        # Called from Python (ablation, search, demos) with `args`, the caller's own sys.argv is
        # not meant for this parser; Lightning warns about every such call.
        warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python")
        return MSPLoRACLI(
            MSPLoRAModule,
            L.LightningDataModule,  # GLUEDataModule (base.yaml) or InstructionDataModule, by class_path
            subclass_mode_data=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            # run=False parses one fit (msplora.training.run): its --help is `msplora fit`'s.
            parser_kwargs={"exit_on_error": exit_on_error, "prog": "msplora" if run else "msplora fit"},
        )
