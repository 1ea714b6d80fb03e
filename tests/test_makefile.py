"""The Makefile's defaults as documented (``make -n`` prints the commands, runs nothing)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO


def dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize(
    ("target", "given", "workers"),
    [
        ("search", [], "2"),
        ("ablation-plan", [], "1"),
        ("search", ["WORKERS=3"], "3"),
        ("ablation-plan", ["WORKERS=2"], "2"),
    ],
)
def test_each_target_keeps_its_own_worker_default(target, given, workers):
    """One global ``WORKERS ?=`` would give both targets the first one's default."""
    tool = "msplora.search run" if target == "search" else "msplora.ablation plan"
    line = next(x for x in dry_run(target, *given).splitlines() if tool in x)
    assert re.search(rf"--workers {workers}\b", line), line


def test_plan_passes_hours_and_status():
    line = next(x for x in dry_run("ablation-plan", "PLAN=stsb", "HOURS=2.5").splitlines() if "ablation plan" in x)
    assert "plan stsb" in line and "--hours 2.5" in line and "--status" not in line
    assert "--status" in dry_run("ablation-plan", "STATUS=1")
