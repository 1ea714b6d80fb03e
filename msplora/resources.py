"""Where the data beside the package lives: ``ablations/`` (variant overlays) and ``configs/``.

    running from a checkout (source tree, ``pip install -e .``)  -> <checkout>/ablations, configs
    installed from a wheel or an sdist                         -> msplora/_resources/ablations, configs

The top-level folders of the repository are the source of truth; ``setup.py``'s ``build_py``
copies them into the wheel as ``msplora/_resources`` (never kept in the source tree). Results go
under the checkout's ``results/`` in a checkout, else under ``./results`` of the working folder
(never into an installed package).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHECKOUT", "PACKAGED", "from_checkout", "resource_root", "results_root"]

CHECKOUT = Path(__file__).resolve().parents[1]  # msplora/resources.py -> the repository root
PACKAGED = Path(__file__).resolve().parent / "_resources"  # written by setup.py's build_py
FOLDERS = ("ablations", "configs")


def from_checkout() -> bool:
    """True when this msplora is a source tree's (its folders beside the package are there)."""
    return (CHECKOUT / "pyproject.toml").is_file() and all((CHECKOUT / f).is_dir() for f in FOLDERS)


def resource_root() -> Path:
    """The folder that holds ``ablations/`` and ``configs/``: the checkout's when msplora runs
    from one, else the copy packaged with the wheel."""
    return CHECKOUT if from_checkout() else PACKAGED


def results_root() -> Path:
    """Where results are written by default: ``<checkout>/results`` or ``./results``."""
    return CHECKOUT / "results" if from_checkout() else Path("results")
