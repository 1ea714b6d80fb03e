"""``msplora export SRC --to FORMAT OUT``: a trained pyramid, as a folder other tools load.

    SRC, one of                                     loaded as
      a fit's run folder (<root>/version_N)           base model (alias / hub name / folder) + best_adapter/
                                                      (--from last: + checkpoints/last.ckpt's adapter and head)
      an msplora adapter folder (save_adapter)        the same, the model named by metrics.json beside it
      a peft save_pretrained folder                   base_model_name_or_path + PeftModel.from_pretrained
      a Trainer / TRL checkpoint-N/ folder            (both: adapter_config.json with peft_type MSPLORA)
          |
          |  one model with the core's adapter and the trained head (msplora.peft.to_core_model)
          v
    FORMATS: one table, format name -> writer + help (a new format is one entry)
      peft      OUT = peft LoRA folder, head included: AutoPeftModelFor*.from_pretrained(OUT)
      merged    OUT = plain transformers model (+ tokenizer): from_pretrained(OUT), costs exactly the base
      msplora   OUT = msplora adapter folder naming the public base model: msplora.load_adapter

Everything is checked before anything is written, and OUT appears complete or not at all.
A user error ends as one line on stderr, ``msplora export: <problem>. Fix: <what to do>``,
with exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msplora.config import ConfigError
from msplora.errors import ArgumentParser, run_command
from msplora.io import read_json

PEFT_TYPE = "MSPLORA"  # msplora.peft.PEFT_TYPE, without importing peft before it is needed
LAST = "checkpoints/last.ckpt"  # a run's last training state (training.callbacks.LastCheckpoint)


class ExportError(ConfigError):
    """The source cannot be exported as asked; the message says how to fix it."""


@dataclass
class Source:
    """A loaded source: the model (the core's adapter and head), its tokenizer, the base model's
    name as the user gave it."""

    model: Any
    tokenizer: Any
    name: str


# -- formats: one table -------------------------------------------------------------------------
def _write_peft(src: Source, out: Path) -> None:
    from msplora.export import export_peft, public_model_name

    export_peft(src.model, out, base_model=public_model_name(src.name))


def _write_merged(src: Source, out: Path) -> None:
    import msplora
    from msplora.export import save_plain

    save_plain(msplora.merge_and_unload(src.model), out, src.tokenizer)


def _write_msplora(src: Source, out: Path) -> None:
    import msplora
    from msplora.export import public_model_name

    msplora.save_adapter(src.model, out, metadata={"base_model": public_model_name(src.name)})


@dataclass(frozen=True)
class Format:
    write: Callable[[Source, Path], None]
    help: str


FORMATS: dict[str, Format] = {
    "peft": Format(_write_peft, "peft LoRA folder, head included: AutoPeftModelFor*.from_pretrained(OUT)"),
    "merged": Format(_write_merged, "plain transformers model + tokenizer: from_pretrained(OUT), costs the base"),
    "msplora": Format(_write_msplora, "msplora adapter naming the public base model: msplora.load_adapter"),
}
TARGETS = tuple(FORMATS)


# -- sources ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunModel:
    """What rebuilds a run's model: the name the user gave, the problem, the label count, the dtype."""

    name: str
    problem: str  # classification | regression | causal_lm
    num_labels: int | None
    dtype: str


def _read_json(path: Path) -> dict:
    return read_json(path, fix="restore the file, or pass another SRC", error=ExportError) if path.is_file() else {}


def _read_yaml(path: Path) -> dict:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _peft_type(folder: Path) -> str | None:
    """The ``peft_type`` of a peft adapter folder; None for a folder that is not one."""
    from msplora.inject import ADAPTER_CONFIG

    cfg = folder / ADAPTER_CONFIG
    info = _read_json(cfg) if cfg.is_file() else {}
    return info.get("peft_type") if isinstance(info, dict) else None


def find_adapter(run_dir: Path) -> Path:
    """``RUN_DIR/best_adapter``, or RUN_DIR itself when it is an msplora adapter folder."""
    from msplora.inject import ADAPTER_CONFIG

    if not run_dir.is_dir():
        raise ExportError(
            f"SRC: {run_dir} is not a folder. Fix: pass a run folder (<root>/version_N) or an adapter folder"
        )
    for cand in (run_dir / "best_adapter", run_dir):
        if (cand / ADAPTER_CONFIG).is_file():
            return cand
    if (run_dir / "metrics.json").is_file() or (run_dir / "checkpoints").is_dir():
        last = (run_dir / LAST).is_file()
        raise ExportError(
            f"SRC: the run {run_dir} has no best_adapter/: it is written at a validation pass that improves the "
            "selection metric, and this fit ran none (a short fit, or validation switched off). Fix: "
            + ("export the last training state with --from last, or " if last else "")
            + "fit with a validation pass (e.g. --trainer.val_check_interval / --trainer.check_val_every_n_epoch)"
        )
    found = sorted(str(p.parent.relative_to(run_dir)) for p in run_dir.glob("*/best_adapter/" + ADAPTER_CONFIG))
    hint = (
        f"one of {found}"
        if found
        else "a run folder (<root>/version_N) that holds best_adapter/, or a peft adapter folder"
    )
    raise ExportError(f"SRC: {run_dir} holds no adapter. Fix: pass {hint}")


def run_model(run_dir: Path, adapter: Path) -> RunModel:
    """The model of a run, from its metrics.json and config.yaml (the names the user gave)."""
    from msplora.training.record import RunRecord  # the typed metrics.json (no torch, no Lightning)

    metrics = RunRecord.from_dict(_read_json(run_dir / "metrics.json"))
    hp = _read_yaml(run_dir / "config.yaml").get("model") or {}
    hp = hp.get("init_args", hp)  # a class_path / init_args form
    name = metrics.model or hp.get("model")
    if not name:
        saved = _read_json(adapter / "adapter_config.json").get("base_model")
        raise ExportError(
            f"SRC: {run_dir} names no model (no metrics.json / config.yaml with model). "
            f"Fix: export from a fit's run folder{f' (the adapter was saved from {saved})' if saved else ''}"
        )
    problem, num_labels = hp.get("problem"), hp.get("num_labels")
    if problem is None:
        task = metrics.task
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
            f"SRC: the run's label count is unknown. Fix: set model.num_labels in {run_dir / 'config.yaml'}"
        )
    return RunModel(str(name), problem, num_labels, hp.get("dtype") or "float32")


def _tokenizer(name: str):
    from msplora.hf import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError):  # a model folder without a tokenizer: export the weights alone
        return None


def _base_model(spec: RunModel):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from msplora.hf import resolve_model

    path = resolve_model(spec.name)
    dtype = getattr(torch, spec.dtype)
    if spec.problem == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=spec.num_labels, dtype=dtype)
    if model.config.pad_token_id is None:  # as the fit did (decoder backbones)
        model.config.pad_token_id = model.config.eos_token_id
    return model


def _load_last(run_dir: Path):
    """(model with the adapter and head of ``checkpoints/last.ckpt``, RunModel): the state the
    fit ended with, for a run that never validated. Read with ``weights_only`` after the
    archive is checked, so a damaged or foreign file is refused, never unpickled."""
    import torch

    import msplora
    from msplora.io import check_checkpoint_file

    ckpt_path = check_checkpoint_file(run_dir / LAST, flag="SRC")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters") or {}
    if not hp.get("model") or not isinstance(hp.get("pyramid"), dict):
        raise ExportError(f"SRC: {ckpt_path} names no model or pyramid. Fix: pass a checkpoint written by msplora fit")
    spec = RunModel(
        str(hp["model"]), hp.get("problem") or "causal_lm", hp.get("num_labels"), hp.get("dtype") or "float32"
    )
    model = msplora.inject(_base_model(spec), msplora.MSPLoRAConfig.from_dict(hp["pyramid"]))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != want:
        raise ExportError(
            f"SRC: {ckpt_path} does not hold this run's adapter and head (missing {sorted(want - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - want)[:3]}). Fix: pass the run folder the checkpoint belongs to"
        )
    model.load_state_dict(state, strict=False)
    return model, spec


def load_run(run_dir: Path, which: str = "best"):
    """(model with the run's best adapter, or its last training state, loaded; tokenizer; RunModel)."""
    import msplora

    if which == "last":
        if not (run_dir / LAST).is_file():
            raise ExportError(f"SRC: {run_dir} has no {LAST}. Fix: pass a fit's run folder, or drop --from last")
        model, spec = _load_last(run_dir)
    else:
        adapter = find_adapter(run_dir)
        spec = run_model(run_dir, adapter)
        model = _base_model(spec)
        msplora.load_adapter(model, adapter)
    model.eval()
    return model, _tokenizer(spec.name), spec


# peft task type -> transformers auto class (the ones AutoPeftModelFor* builds)
_AUTO = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
    None: "AutoModel",
}


def _label_count(folder: Path, auto, config) -> int | None:
    """The label count the saved head was trained with: the first dimension of a head tensor
    whose shape differs from the base config's head only there (a base saved without a head
    builds one for its default 2 labels)."""
    import torch
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with torch.device("meta"):
        model = auto.from_config(config)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix("base_model.model.")
            shape = tuple(f.get_slice(key).get_shape())
            if name in params and params[name] != shape and params[name][1:] == shape[1:]:
                return shape[0]
    return None


def load_peft_folder(folder: Path, base_model: str | None = None) -> Source:
    """A peft ``save_pretrained`` / Trainer ``checkpoint-N/`` folder of an MSPLoRA adapter, as
    the core's model (adapter + trained head)."""
    import transformers
    from peft import PeftConfig, PeftModel

    import msplora.peft as mpeft
    from msplora.hf import resolve_model

    cfg = PeftConfig.from_pretrained(str(folder))
    name = base_model or cfg.base_model_name_or_path
    if not name:
        raise ExportError(
            f"SRC: {folder}/adapter_config.json names no base model (base_model_name_or_path). "
            "Fix: pass --base-model <hub name or folder>"
        )
    if cfg.task_type not in _AUTO:
        raise ExportError(
            f"SRC: task_type {cfg.task_type!r} is not supported here. Fix: use one of {sorted(k for k in _AUTO if k)}"
        )
    auto = getattr(transformers, _AUTO[cfg.task_type])
    path = resolve_model(name)
    kwargs = {}
    if cfg.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        n = _label_count(folder, auto, transformers.AutoConfig.from_pretrained(path))
        kwargs = {"num_labels": n} if n else {}
    base = auto.from_pretrained(path, **kwargs)
    if cfg.task_type == "SEQ_CLS" and base.config.pad_token_id is None:
        base.config.pad_token_id = base.config.eos_token_id
    model = mpeft.to_core_model(PeftModel.from_pretrained(base, str(folder)))
    model.eval()
    return Source(model, _tokenizer(name), str(name))


def load_source(src: Path, base_model: str | None = None, which: str = "best") -> Source:
    """SRC (see the module docstring) -> the model to write; refuses, naming what SRC is.
    ``which``: a run's ``best`` adapter or its ``last`` training state."""
    if not src.is_dir():
        raise ExportError(
            f"SRC: {src} is not a folder. Fix: pass a run folder, a peft adapter folder or a checkpoint-N/ folder"
        )
    kind = _peft_type(src)
    if kind is not None:
        if kind != PEFT_TYPE:
            raise ExportError(
                f"SRC: {src} is a peft {kind} adapter, not an MSPLoRA one. Fix: load it with peft as it is "
                "(PeftModel.from_pretrained), or pass an MSPLoRA source"
            )
        if which != "best":
            raise ExportError(f"--from {which}: applies to a fit's run folder, not a peft folder. Fix: drop --from")
        return load_peft_folder(src, base_model)
    checkpoints = sorted(
        (p for p in src.glob("checkpoint-*") if _peft_type(p) is not None),
        key=lambda p: int(p.name.rpartition("-")[2]) if p.name.rpartition("-")[2].isdigit() else -1,
    )
    if checkpoints:
        raise ExportError(
            f"SRC: {src} is a Trainer output folder with {len(checkpoints)} checkpoints "
            f"({', '.join(p.name for p in checkpoints)}). Fix: pass one of them, e.g. {checkpoints[-1]}"
        )
    model, tokenizer, spec = load_run(src, which)
    return Source(model, tokenizer, spec.name)


def export(src: str | Path, to: str, out: str | Path, base_model: str | None = None, which: str = "best") -> Path:
    """Export SRC as ``to`` (a key of :data:`FORMATS`) into the new folder ``out``; ``which``:
    a run's ``best`` adapter or its ``last`` training state."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if to not in FORMATS:
        raise ExportError(f"--to: unknown format {to!r}. Fix: use one of {', '.join(FORMATS)}")
    if out.exists():
        raise ExportError(f"OUT: {out} already exists. Fix: choose a new folder, or remove it first")
    FORMATS[to].write(load_source(src, base_model, which), out)
    return out


def export_run(run_dir: str | Path, to: str, out: str | Path) -> Path:
    """Export a run folder's best adapter (kept for callers of the earlier name)."""
    return export(run_dir, to, out)


def main(argv: list[str] | None = None) -> int:
    formats = "\n".join(f"  {name:8s} {fmt.help}" for name, fmt in FORMATS.items())
    import argparse

    parser = ArgumentParser(
        prog="msplora export",
        description="Export a trained pyramid as a peft LoRA folder, a merged transformers model, or an msplora "
        "adapter that names its public base model.\n\nSRC: a fit's run folder (<root>/version_N, with "
        "best_adapter/), an msplora adapter folder, a peft save_pretrained folder of an MSPLoRA adapter, or a "
        "Trainer / TRL checkpoint-N/ folder.\n\nformats:\n" + formats,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="run folder, adapter folder, peft folder or checkpoint-N/")
    parser.add_argument("--to", required=True, choices=TARGETS, help="output format (see above)")
    parser.add_argument("--base-model", help="base model for a peft folder that names none (hub name or folder)")
    parser.add_argument(
        "--from",
        dest="which",
        choices=("best", "last"),
        default="best",
        help="a run folder's best_adapter/ (default) or its last training state (checkpoints/last.ckpt)",
    )
    parser.add_argument("out", metavar="OUT", help="folder to create (must not exist)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # a usage error: UsageError, one line
    try:
        out = export(args.src, args.to, args.out, args.base_model, args.which)
    except ConfigError as e:
        return _fail(str(e))
    except ImportError as e:  # an alias whose wheel is missing, or a missing extra
        return _fail(f"{e}. Fix: install what the message names")
    except (OSError, ValueError) as e:  # a model that is not there (offline hub, missing folder), a bad file
        return _fail(f"cannot load the source's model or adapter: {e}. Fix: check the base model's name and SRC")
    print(out)
    return 0


def _fail(message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the library wrote
    print(f"msplora export: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run_command("export", main, sys.argv[1:]))
