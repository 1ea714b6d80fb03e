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
