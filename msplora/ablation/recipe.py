"""What one run of a variant is made of, bar its LR and seed: the config files and overrides.

``base_recipe`` composes configs/base.yaml, the task config and the variant's overlay with the
runner's overrides (a validation split carved from train, checkpointing, a fixed step budget)
and the user's extra command-line overrides.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from msplora.ablation.variants import CONFIGS, AblationError

VAL_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One variant on one task, bar its LR and seed: config files (base, task, overlay), the
    runner's typed overrides, then the user's EXTRA command-line overrides."""

    configs: tuple[Path, ...]
    overrides: dict
    extra: tuple[str, ...] = ()

    def as_args(self) -> list[str]:
        """The command-line form (``--config F ... --key=value ...``): what the signature hashes."""
        from msplora.training.run import override_args

        return [x for c in self.configs for x in ("--config", str(c))] + override_args(self.overrides) + [*self.extra]


# Set per run by the runner: an EXTRA override of these would be silently replaced (or, for the
# seed and LR, would make every run of the sweep the same). The head LR is the task's, one value
# for every run: --model.head_lr in EXTRA sets it.
_RUNNER_KEYS = ("--model.lr", "--seed_everything", "--trainer.default_root_dir")


def base_recipe(overlay: Path, cfg: Path, steps: int | None, extra: list[str]) -> Recipe:
    for a in extra:
        if a.split("=", 1)[0] in _RUNNER_KEYS:
            raise AblationError(
                f"{a.split('=', 1)[0]} in the extra overrides: the runner sets it for each run. "
                'Fix: drop it; choose LRs with --lrs "a b c" (LRS=), seeds with --seeds'
            )
    overrides: dict = {
        "data.init_args.val_fraction": VAL_FRACTION,
        "trainer.num_sanity_val_steps": 0,
        "trainer.enable_checkpointing": True,
    }
    if steps is not None:
        # A fixed step budget, validated once at the end (the selection metric of the sweep).
        overrides |= {
            "trainer.max_steps": steps,
            "trainer.max_epochs": -1,
            "trainer.val_check_interval": steps,
            "trainer.check_val_every_n_epoch": None,
        }
    return Recipe((CONFIGS / "base.yaml", cfg, overlay), overrides, tuple(extra))


def parse(recipe: Recipe):
    """The composed config, parsed and instantiated (no model weights loaded)."""
    from msplora.training.run import compose

    return compose(recipe.configs, recipe.overrides, recipe.extra)  # a bad override: one line (msplora.errors)
