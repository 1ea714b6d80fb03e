"""When a finished result counts: the run signature, and reading back a result of this very run.

A result file stores the signature of the settings it was made under; a rerun skips it only when
the signature, LR and seed all match, so a result made under other settings is redone.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import yaml

from msplora.ablation.recipe import Recipe

# The protocol a result was made under; part of the signature, so results of another protocol never
# count as done. 1: head LR = the config's head_lr/lr ratio x the swept LR, seed 0 both selected
# the LR and was reported, no predictions (results/ablations/protocol1/). 2: one head LR per task,
# selection seeds apart from the reported ones, per-example predictions (msplora.ablation.runner).
PROTOCOL = 2


def run_signature(recipe: Recipe) -> str:
    """The settings of one run, bar its LR and seed (those are checked on their own), as data:
    the config files' content, the runner's typed overrides, the user's extra overrides, the protocol.

    Config files count by their parsed content, not path or comments: editing a key of an overlay
    or a task config makes its old results stale, while a moved checkout, a reworded comment or a
    progress/logging setting (:data:`_NO_OUTCOME_KEYS`) keeps them; so does such a setting given
    as an extra override (``--trainer.enable_progress_bar=false``). A finished run at an LR counts
    for any grid that holds that LR. Typed values, not their command-line spelling, so how the
    composer hands them to the parser does not change the signature.
    """
    data = {
        "configs": [_outcome_keys(Path(c)) for c in recipe.configs],
        "overrides": dict(sorted(recipe.overrides.items())),
        "extra": _outcome_extra(recipe.extra),
        "protocol": PROTOCOL,
    }
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


# Settings that cannot change a run's numbers: how it reports progress and where it logs. A result
# stays valid when only these change (a comment, a progress bar, a logger), so long GLUE results
# survive such edits of configs/base.yaml; any other key, a new callback included, makes it stale.
_NO_OUTCOME_KEYS = {"trainer": ("enable_progress_bar", "default_root_dir", "logger", "log_every_n_steps")}
_NO_OUTCOME_SECTIONS = ("last_checkpoint",)  # when last.ckpt is written
_NO_OUTCOME_CALLBACKS = (
    "lightning.pytorch.callbacks.RichProgressBar",
    "lightning.pytorch.callbacks.TQDMProgressBar",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "msplora.analysis.SpectrumRecorder",
)


def _outcome_keys(path: Path) -> object:
    """A config file's content as data, less the keys that cannot change a run's numbers."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        return data
    data = {k: v for k, v in data.items() if k not in _NO_OUTCOME_SECTIONS}
    for section, keys in _NO_OUTCOME_KEYS.items():
        if isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k not in keys}
            callbacks = data[section].get("callbacks")
            if isinstance(callbacks, list):
                kept = [
                    c for c in callbacks if not (isinstance(c, dict) and c.get("class_path") in _NO_OUTCOME_CALLBACKS)
                ]
                data[section]["callbacks"] = kept
    return data


def _no_outcome_key(key: str) -> bool:
    """A dotted key (``trainer.enable_progress_bar``) that cannot change a run's numbers."""
    section, _, name = key.partition(".")
    return section in _NO_OUTCOME_SECTIONS or name in _NO_OUTCOME_KEYS.get(section, ())


def _outcome_extra(extra: tuple[str, ...] | list[str]) -> list[str]:
    """The extra command-line overrides, less those of :func:`_no_outcome_key` keys, in both
    spellings: ``--key=value`` and ``--key value``."""
    kept, skip_value = [], False
    for token in extra:
        if skip_value and not token.startswith("--"):
            skip_value = False
            continue
        skip_value = False
        if token.startswith("--"):
            key, eq, _ = token[2:].partition("=")
            if _no_outcome_key(key):
                skip_value = not eq  # "--key value": the next token is the value
                continue
        kept.append(token)
    return kept


def same_run(rec: dict, signature: str | None, lr: float) -> bool:
    """Made under these settings at this LR (the seed is checked apart)."""
    return rec.get("signature") == signature and math.isclose(rec.get("lr", math.nan), lr, rel_tol=1e-9)


def read_result(path: Path, signature: str, lr: float, seed: int) -> dict | None:
    """A finished result of this very run (same settings, LR and seed), else None."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return rec if same_run(rec, signature, lr) and rec.get("seed") == seed else None
