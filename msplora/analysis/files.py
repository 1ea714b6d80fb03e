"""Finding and reading a run's spectra.json."""

from __future__ import annotations

from pathlib import Path

from msplora.analysis.recording import SPECTRA_FILE
from msplora.io import read_json


def find_spectra(run: str | Path) -> Path:
    """``run`` itself if it is a file, else the newest spectra.json anywhere under it."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise FileNotFoundError(
            f"{run}: no such run directory or file. Fix: pass a run directory (e.g. lightning_logs/version_0) "
            f"or a {SPECTRA_FILE} path"
        )
    found = sorted(run.rglob(SPECTRA_FILE), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"{run}: no {SPECTRA_FILE} under this directory. Fix: train with the callback "
            "msplora.analysis.SpectrumRecorder (trainer callbacks), or pass the right run directory"
        )
    return found[-1]


def load_spectra(path: str | Path) -> dict:
    doc = read_json(path, "spectra file", fix="rerun the fit, or pass another run", error=ValueError)
    if not isinstance(doc, dict) or not doc.get("records"):
        raise ValueError(f"{path}: holds no spectrum records. Fix: let the run finish at least one epoch")
    return doc
