"""The core (config, pyramid, layers, inject) runs on torch + transformers + safetensors + pyyaml
alone: the extras (`[train]`, `[search]`, `[peft]`, `[instruct]`, `[plots]`) are never imported.
A wheel, installed without the checkout, carries the ablation overlays and configs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# Packages of the extras, by import name. If the core imported one, a core-only install would fail.
EXTRA_MODULES = ("lightning", "optuna", "optuna_integration", "peft", "datasets", "torchmetrics", "matplotlib", "gguf")

SCRIPT = f"""
import sys, tempfile
import torch
import msplora
from tests.tiny import tiny_bert
model = tiny_bert()
x = torch.randint(0, 100, (2, 7))
msplora.inject(model, msplora.MSPLoRAConfig(targets=["query", "value"], dropout=0.0, modules_to_save=["classifier"]))
with torch.no_grad():
    for kb in msplora.get_bank(model).kinds.values():
        kb.B.normal_()
    ref = model(input_ids=x).logits
    d = tempfile.mkdtemp()
    msplora.save_adapter(model, d)
    fresh = msplora.load_adapter(tiny_bert(), d)
    assert torch.equal(fresh(input_ids=x).logits, ref)
    msplora.merge(model)
    assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-5)
    msplora.unmerge(model)
print("extras:" + ",".join(m for m in {EXTRA_MODULES!r} if m in sys.modules))
"""


def test_core_needs_no_extra():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = out.stdout.rstrip("\n").split("\n")[-1]  # the script's last line: extras found in sys.modules
    assert imported == "extras:", f"the core imported extras: {imported}"


def test_core_dependencies_are_the_core_four():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = sorted(d.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for d in meta["dependencies"])
    assert names == ["pyyaml", "safetensors", "torch", "transformers"]
    extras = meta["optional-dependencies"]
    assert {"train", "search", "peft", "instruct", "plots", "test", "all"} <= set(extras)


def test_fast_moving_majors_are_capped():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    every = meta["dependencies"] + [d for ds in meta["optional-dependencies"].values() for d in ds]
    for name in ("transformers", "lightning", "optuna", "peft"):
        spec = next(d for d in every if d.split("[")[0].split(">")[0].strip() == name)
        assert "<" in spec, f"{name} has no upper bound: {spec}"


# -- a non-editable install finds ablations/ and configs/ (msplora/_resources) ---------------------
SOURCE = ("msplora", "ablations", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of this checkout, installed with ``pip --target`` into a
    folder; returns (that folder, a working folder outside any checkout)."""
    import shutil

    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_resources", "*.egg-info")
    for name in SOURCE:
        p = REPO / name
        (shutil.copytree(p, src / name, ignore=ignore) if p.is_dir() else shutil.copy(p, src / name))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("msplora-*.whl")
    site = root / "site"
    done = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    work = root / "elsewhere"
    work.mkdir()
    return site, work


def _run_installed(installed, *args: str) -> subprocess.CompletedProcess:
    site, work = installed
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_installed_wheel_ships_the_overlays_and_configs(installed):
    site, work = installed
    where = _run_installed(installed, "-c", "import msplora.resources as r; print(r.resource_root())")
    assert where.returncode == 0, where.stderr
    packaged = Path(where.stdout.strip())
    assert packaged == site / "msplora" / "_resources"
    for folder in ("ablations", "configs"):
        ours = sorted(p.relative_to(REPO / folder) for p in (REPO / folder).rglob("*.yaml"))
        assert ours and ours == sorted(p.relative_to(packaged / folder) for p in (packaged / folder).rglob("*.yaml"))
        assert all((REPO / folder / p).read_bytes() == (packaged / folder / p).read_bytes() for p in ours)


@pytest.mark.slow
def test_installed_ablation_and_search_commands_find_their_files(installed):
    site, work = installed
    for args in (("ablation", "run", "--help"), ("search", "run", "--help")):
        proc = _run_installed(installed, "-m", "msplora", *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith(f"usage: msplora {args[0]} run"), proc.stdout[:200]
    # The overlay list comes from the packaged ablations/: every variant of the checkout is named.
    proc = _run_installed(installed, "-m", "msplora", "ablation", "run")
    assert proc.returncode == 2
    names = proc.stderr.strip().rsplit("valid names: ", 1)[1].split(", ")
    assert names == sorted(p.stem for p in (REPO / "ablations").glob("*.yaml"))
    assert list(work.iterdir()) == []  # nothing written where it ran


@pytest.mark.slow
def test_installed_search_finds_its_default_space(installed):
    proc = _run_installed(
        installed, "-c", "from msplora.search.space import DEFAULT_SPACE; print(DEFAULT_SPACE.is_file())"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"
