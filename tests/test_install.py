"""The core (config, pyramid, layers, inject) runs on torch + transformers + safetensors + pyyaml
alone: the extras (`[train]`, `[search]`, `[peft]`, `[instruct]`, `[plots]`) are never imported."""

import subprocess
import sys

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
