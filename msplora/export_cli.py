"""``msplora export RUN_DIR --to peft|merged|msplora OUT``: a run's best adapter, for other tools.

    RUN_DIR/                    (a fit's version_N folder)
      best_adapter/             msplora adapter of the best epoch
      metrics.json, config.yaml the model name the user gave, the task
          |
          |  base model (alias / hub name / folder) + load_adapter
          v
    --to peft     OUT = peft LoRA folder: AutoPeftModelFor*.from_pretrained(OUT)
    --to merged   OUT = plain transformers model (+ tokenizer): from_pretrained(OUT), costs exactly the base
    --to msplora  OUT = msplora adapter folder naming the public base model

Everything is checked before anything is written, and OUT appears complete or not at all.
A user error ends as one line on stderr, ``msplora export: <problem>. Fix: <what to do>``,
with exit status 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from msplora.config import ConfigError
from msplora.errors import ArgumentParser, run_command
from msplora.io import read_json

TARGETS = ("peft", "merged", "msplora")


class ExportError(ConfigError):
    """The run cannot be exported as asked; the message says how to fix it."""


@dataclass(frozen=True)
class RunModel:
    """What rebuilds a run's model: the name the user gave, the problem, the label count, the dtype."""

    name: str
    problem: str  # classification | regression | causal_lm
    num_labels: int | None
    dtype: str


def _read_json(path: Path) -> dict:
    return read_json(path, fix="restore the file, or pass another run", error=ExportError) if path.is_file() else {}


def _read_yaml(path: Path) -> dict:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def find_adapter(run_dir: Path) -> Path:
    """``RUN_DIR/best_adapter``, or RUN_DIR itself when it is an adapter folder."""
    from msplora.inject import ADAPTER_CONFIG

    if not run_dir.is_dir():
        raise ExportError(f"RUN_DIR: {run_dir} is not a folder. Fix: pass a run folder (<root>/version_N)")
    for cand in (run_dir / "best_adapter", run_dir):
        if (cand / ADAPTER_CONFIG).is_file():
            return cand
    found = sorted(str(p.parent.relative_to(run_dir)) for p in run_dir.glob("*/best_adapter/" + ADAPTER_CONFIG))
    hint = f"one of {found}" if found else "the run folder (<root>/version_N) that holds best_adapter/"
    raise ExportError(f"RUN_DIR: {run_dir} holds no best_adapter/. Fix: pass {hint}")


def run_model(run_dir: Path, adapter: Path) -> RunModel:
    """The model of a run, from its metrics.json and config.yaml (the names the user gave)."""
    metrics = _read_json(run_dir / "metrics.json")
    hp = _read_yaml(run_dir / "config.yaml").get("model") or {}
    hp = hp.get("init_args", hp)  # a class_path / init_args form
    name = metrics.get("model") or hp.get("model")
    if not name:
        saved = _read_json(adapter / "adapter_config.json").get("base_model")
        raise ExportError(
            f"RUN_DIR: {run_dir} names no model (no metrics.json / config.yaml with model). "
            f"Fix: export from a fit's run folder{f' (the adapter was saved from {saved})' if saved else ''}"
        )
    problem, num_labels = hp.get("problem"), hp.get("num_labels")
    if problem is None:
        task = metrics.get("task")
        data = _read_yaml(run_dir / "config.yaml").get("data") or {}
        task = task or (data.get("init_args") or {}).get("task")
        from msplora.training.data import TASKS

        spec = TASKS.get(str(task).lower().replace("-", "")) if task else None
        if spec is None:
            problem = "causal_lm"
        else:
            problem = "regression" if spec.is_regression else "classification"
            num_labels = num_labels or spec.num_labels
    if problem != "causal_lm" and not num_labels:
        raise ExportError(
            f"RUN_DIR: the run's label count is unknown. Fix: set model.num_labels in {run_dir / 'config.yaml'}"
        )
    return RunModel(str(name), problem, num_labels, hp.get("dtype") or "float32")


def load_run(run_dir: Path):
    """(model with the run's best adapter loaded, tokenizer, RunModel)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import msplora
    from msplora.hf import load_tokenizer, resolve_model

    adapter = find_adapter(run_dir)
    spec = run_model(run_dir, adapter)
    path = resolve_model(spec.name)
    dtype = getattr(torch, spec.dtype)
    if spec.problem == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=spec.num_labels, dtype=dtype)
        if model.config.pad_token_id is None:  # as the fit did (decoder backbones)
            model.config.pad_token_id = model.config.eos_token_id
    msplora.load_adapter(model, adapter)
    model.eval()
    try:
        tokenizer = load_tokenizer(spec.name)
    except (OSError, ValueError):  # a model folder without a tokenizer: export the weights alone
        tokenizer = None
    return model, tokenizer, spec


def export_run(run_dir: str | Path, to: str, out: str | Path) -> Path:
    """Export RUN_DIR's best adapter as ``to`` (peft | merged | msplora) into the new folder ``out``."""
    import msplora
    from msplora.export import export_peft, public_model_name, save_plain

    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    if to not in TARGETS:
        raise ExportError(f"--to: unknown format {to!r}. Fix: use one of {', '.join(TARGETS)}")
    if out.exists():
        raise ExportError(f"OUT: {out} already exists. Fix: choose a new folder, or remove it first")
    model, tokenizer, spec = load_run(run_dir)
    public = public_model_name(spec.name)
    if to == "peft":
        export_peft(model, out, base_model=public)
    elif to == "msplora":
        msplora.save_adapter(model, out, metadata={"base_model": public})
    else:
        save_plain(msplora.merge_and_unload(model), out, tokenizer)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="msplora export",
        description="Export a run's best adapter as a peft LoRA folder, a merged transformers model, "
        "or an msplora adapter that names its public base model.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a fit's run folder (<root>/version_N) with best_adapter/")
    parser.add_argument("--to", required=True, choices=TARGETS, help="output format")
    parser.add_argument("out", metavar="OUT", help="folder to create (must not exist)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # a usage error: UsageError, one line
    try:
        out = export_run(args.run_dir, args.to, args.out)
    except ConfigError as e:
        return _fail(str(e))
    except ImportError as e:  # an alias whose wheel is missing, or a missing extra
        return _fail(f"{e}. Fix: install what the message names")
    except (OSError, ValueError) as e:  # a model that is not there (offline hub, missing folder), a bad file
        return _fail(f"cannot load the run's model or adapter: {e}. Fix: check the run's model name and RUN_DIR")
    print(out)
    return 0


def _fail(message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the library wrote
    print(f"msplora export: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run_command("export", main, sys.argv[1:]))
