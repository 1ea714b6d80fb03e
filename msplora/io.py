"""Small file and command-line helpers shared by every floor (no torch, no Lightning)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write JSON to a temp file beside ``path``, then rename: a reader (or a crash) never
    sees half a file. Non-JSON numbers (numpy, tensors via float()) are written as floats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, default=float)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[own options] -- [options passed on to the fit]`` -> (own, passed on); no ``--``: nothing passed on."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


# -- files the user points at: refuse a broken one before anything reads (or unpickles) it ------
# Values of Lightning's ckpt_path that are not file paths.
CKPT_PATH_KEYWORDS = ("best", "last", "hpc", "registry")


def check_checkpoint_file(path: str | Path, flag: str = "--ckpt_path") -> Path:
    """``path`` if it is a complete torch checkpoint, else a ``CheckpointError`` saying so.

    torch writes checkpoints as zip archives; a truncated file has no central directory and a
    corrupt one fails the members' CRC. Checking that needs no unpickling, so a random file
    never reaches ``torch.load`` (whose advice for such a file, ``weights_only=False``, would
    run arbitrary code from it)."""
    import zipfile

    from msplora.errors import CheckpointError

    path = Path(path)
    fix = "pass a complete .ckpt written by `msplora fit` (e.g. RUN/version_0/checkpoints/last.ckpt)"
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such file. Fix: {fix}")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()  # reads every member: the CRC of each is checked
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{flag} {path}: not a readable torch checkpoint, truncated or corrupt ({e}). Fix: {fix}"
        ) from None
    if bad is not None or not any(n.endswith("data.pkl") for n in names):
        raise CheckpointError(f"{flag} {path}: damaged torch checkpoint (bad member {bad}). Fix: {fix}")
    return path


def check_safetensors_file(path: str | Path, what: str = "adapter weights") -> Path:
    """``path`` if its safetensors header parses and every tensor's bytes lie inside the file.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}}, then the data; offsets count from the end of the header."""
    import struct

    from msplora.errors import CheckpointError

    path = Path(path)
    fix = "save the adapter again (msplora.save_adapter, or the run's best_adapter folder)"
    size = path.stat().st_size if path.is_file() else -1
    if size < 0:
        raise CheckpointError(f"{path}: no such file ({what}). Fix: {fix}")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            end = info["data_offsets"][1]
            if 8 + n + end > size:
                raise ValueError(f"tensor {name} ends at byte {8 + n + end}, the file has {size}")
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: {what} are truncated or not a safetensors file ({_first_line(e)}). Fix: {fix}"
        ) from None
    return path


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
