"""``msplora fit|validate|test --config ...``: LightningCLI over the module and any DataModule.

Repeated ``--config`` files compose (base, task, ablation overlay); the resolved config is
saved beside every run as ``config.yaml``. Unless ``trainer.logger`` is set, each run logs
to ``<default_root_dir>/version_N/`` with CSV (metrics.csv) and TensorBoard (tb/).
"""

from __future__ import annotations

import argparse
import inspect
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from msplora.errors import UsageError, explain_parse_error
from msplora.hf import resolve_model
from msplora.io import CKPT_PATH_KEYWORDS, check_checkpoint_file
from msplora.training.module import MSPLoRAModule


class MSPLoRACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer always comes from the model being tuned. Resolving it here, at parse time,
        # also refuses a model path that does not exist (Hub names: in prepare_data).
        parser.link_arguments("model.model", "data.init_args.tokenizer", compute_fn=resolve_model)

    def parse_arguments(self, parser, args) -> None:
        # With exit_on_error=False (cli_main) jsonargparse raises instead of printing a dump of
        # the whole namespace; say in one line which key is wrong and what it accepts.
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as e:
            command = args[0] if args and args[0] in self.subcommands() else ""
            raise UsageError(explain_parse_error(e, args, self._valid_keys, command)) from e
        # Lightning torch.loads ckpt_path right after parsing (for its hyperparameters): refuse a
        # missing or broken file first, before anything is read or written.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
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
        trainer = super().instantiate_trainer(**kwargs)
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.logger in (None, True):
            csv = CSVLogger(trainer.default_root_dir, name="")
            tb = TensorBoardLogger(trainer.default_root_dir, name="", version=csv.version, sub_dir="tb")
            trainer.loggers = [csv, tb]
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> MSPLoRACLI:
    """exit_on_error=False: a bad argument raises ``UsageError`` (one line, see msplora.errors)
    instead of jsonargparse printing the usage and exiting."""
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
            parser_kwargs={"exit_on_error": exit_on_error},
        )
