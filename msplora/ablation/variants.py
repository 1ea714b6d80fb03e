"""The suite's inputs: where things live, the variant overlays in ``ablations/`` and the task configs.

A variant is data (one YAML overlay); this module only finds overlays and configs and names
them, it never looks inside a variant by its name.
"""

from __future__ import annotations

from pathlib import Path

from msplora.resources import resource_root, results_root

REPO = resource_root()  # the checkout when running from one, else the wheel's msplora/_resources
ABLATIONS = REPO / "ablations"
CONFIGS = REPO / "configs"
RESULTS = results_root() / "ablations"
DEFAULT_TASK = "sentiment"


class AblationError(SystemExit):
    """Bad input: the message names the problem and the fix; exit status 2.

    A SystemExit whose message ``msplora.errors.run_command`` prints as the one line."""

    def __init__(self, msg: str) -> None:
        super().__init__(f"msplora.ablation: {msg}")
        self.code = 2


def variant_names(folder: Path = ABLATIONS) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def variant_path(name: str, folder: Path = ABLATIONS) -> Path:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise AblationError(
            f"unknown ablation {name!r}. Fix: use one of {', '.join(variant_names(folder))} "
            f"(or add {folder.name}/{name}.yaml)"
        )
    return path


def hypothesis(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    return first.lstrip("# ").removeprefix("Hypothesis:").strip()


def levels_label(levels: list[dict], n_layers: int | None) -> str:
    """``G8 M4x3 L2``: G = global, M = group (rank x cells), L = per-layer (``pyramid.short_label``)."""
    from msplora.pyramid import short_label

    return short_label(levels, n_layers)


def is_embedded(task: str, config: str | None) -> bool:
    """The built-in task with its own config: the embedded steps and LR grid apply."""
    return config is None and task == DEFAULT_TASK


def task_config(task: str, config: str | None) -> Path:
    if config is not None:
        path = Path(config)
        if not path.is_file():
            found = sorted(str(p.relative_to(CONFIGS.parent)) for p in CONFIGS.rglob(f"{task}.yaml"))
            such = " or ".join(found) if found else "configs/rte.yaml"
            raise AblationError(f"--config {config}: no such file. Fix: pass a task config such as {such}")
        return path
    if task == DEFAULT_TASK:
        return CONFIGS / "demo.yaml"
    path = CONFIGS / f"{task}.yaml"
    if not path.is_file():
        raise AblationError(f"--task {task}: no configs/{task}.yaml. Fix: pass --config with a config for this task")
    return path
