"""``msplora fit|validate|test --config ...``: LightningCLI over the module and any DataModule.

Repeated ``--config`` files compose (base, task, ablation overlay); the resolved config is
saved beside every run as ``config.yaml``. Unless ``trainer.logger`` is set, each run logs
to ``<default_root_dir>/version_N/`` with CSV (metrics.csv) and TensorBoard (tb/).
"""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from msplora.hf import resolve_model
from msplora.training.module import MSPLoRAModule


class MSPLoRACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer always comes from the model being tuned.
        parser.link_arguments("model.model", "data.init_args.tokenizer", compute_fn=resolve_model)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.logger in (None, True):
            csv = CSVLogger(trainer.default_root_dir, name="")
            tb = TensorBoardLogger(trainer.default_root_dir, name="", version=csv.version, sub_dir="tb")
            trainer.loggers = [csv, tb]
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True) -> MSPLoRACLI:
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
        )
