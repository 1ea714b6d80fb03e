"""Spectra, KL and plots of msplora.analysis, on adapters with hand-built, known spectra."""

from __future__ import annotations

import copy
import json
import math
import os

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import msplora
from msplora import MSPLoRAConfig
from msplora.analysis import (
    SpectrumRecorder,
    analyze,
    effective_rank,
    kl,
    kl_difference,
    kl_matrix,
    level_info,
    main,
    mean_adjacent_kl,
    normalize,
    record_spectra,
)
from tests.tiny import MODELS, N_LAYERS, VARIANTS, VOCAB, randomize_adapter


def build(model_name: str = "bert", variant: str = "paper"):
    factory, targets, _ = MODELS[model_name]
    model = factory()
    msplora.inject(model, MSPLoRAConfig(targets=targets, levels=copy.deepcopy(VARIANTS[variant]), dropout=0.0))
    return model


@torch.no_grad()
def set_known_spectra(model, seed: int = 0) -> dict:
    """Make every s_k B_k A_k = U_k diag(sv) V_k^T with chosen sv. Each level owns its own
    block of columns of one orthogonal U and V, so a layer's whole delta has exactly the
    union of its cells' values as spectrum. Returns the expected record."""
    g = torch.Generator().manual_seed(seed)
    want = {"level": {}, "layer": {}}
    for kind, kb in model.msplora_bank.kinds.items():
        u = torch.linalg.qr(torch.randn(kb.d_out, kb.d_out, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(kb.d_in, kb.d_in, generator=g, dtype=torch.float64))[0]
        per_pos = [[] for _ in kb.layer_ids]
        col = 0
        for k, lv in enumerate(kb.levels):
            a, b = kb.level_block(k)  # views: (n_cells, r, d_in), (n_cells, d_out, r)
            for c in range(kb.n_cells[k]):
                sv = torch.sort(torch.rand(lv.rank, generator=g, dtype=torch.float64) * 3 + 0.1, descending=True)[0]
                a[c] = v[:, col : col + lv.rank].T.to(a.dtype)
                b[c] = (u[:, col : col + lv.rank] * sv / lv.scale).to(b.dtype)
                want["level"][f"{lv.name}/{kind}/{c}"] = sv.tolist()
                for pos, cell in enumerate(kb.cells[k]):
                    if cell == c:
                        per_pos[pos] += sv.tolist()
            col += lv.rank
        for pos, layer_id in enumerate(kb.layer_ids):
            want["layer"][f"{kind}/{layer_id}"] = sorted(per_pos[pos], reverse=True)
    return want


def assert_same(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=tol, err_msg=key)


# -- recording ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["paper", "no_global", "four_level", "lora"])
def test_record_spectra_known_values(variant):
    model = build("bert", variant)
    want = set_known_spectra(model)
    got = record_spectra(model)
    assert_same(got["level"], want["level"])
    assert_same(got["layer"], want["layer"])
    names = [lv["name"] for lv in level_info(model)]
    assert {k.split("/")[0] for k in got["level"]} == set(names)


@pytest.mark.parametrize("model_name,variant", [("gpt2", "paper"), ("llama", "four_level"), ("llama", "no_global")])
def test_record_spectra_matches_full_svd(model_name, variant):
    """Conv1D layout and non-square v_proj: the QR shortcut equals a full SVD of the updates."""
    model = build(model_name, variant)
    randomize_adapter(model)
    got = record_spectra(model)
    for (level, kind, cell), delta in msplora.level_updates(model).items():
        full = torch.linalg.svdvals(delta.double())
        sv = got["level"][f"{level}/{kind}/{cell}"]
        np.testing.assert_allclose(sv, full[: len(sv)], rtol=1e-5, atol=1e-5)
        assert full[len(sv) :].abs().max() < 1e-4  # nothing beyond the top r
    for (kind, layer_id), delta in msplora.layer_updates(model).items():
        full = torch.linalg.svdvals(delta.double())
        sv = got["layer"][f"{kind}/{layer_id}"]
        np.testing.assert_allclose(sv, full[: len(sv)], rtol=1e-5, atol=1e-5)


# -- analysis functions ---------------------------------------------------------------------
def test_kl_known_values():
    m = kl_matrix([[1.0, 1.0], [1.0, 3.0], [2.0, 2.0]])
    assert np.allclose(np.diag(m), 0, atol=1e-12)
    assert m[0, 2] == pytest.approx(0, abs=1e-12)  # same shape, different scale
    # p = (1/2, 1/2), q = (1/4, 3/4)
    assert m[0, 1] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-5)
    assert m[1, 0] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-5)
    assert kl(normalize([1, 3]), normalize([1, 1])) == pytest.approx(m[1, 0])
    # padding: a shorter or all-zero spectrum keeps KL finite
    m = kl_matrix([[1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0]])
    assert np.isfinite(m).all() and (m >= -1e-12).all()
    assert normalize([0.0, 0.0]) == pytest.approx([0.5, 0.5])


def test_effective_rank():
    for r in (1, 2, 5, 16):
        assert effective_rank([0.7] * r) == pytest.approx(r)
    assert effective_rank([3.0, 0.0, 0.0]) == pytest.approx(1)
    assert effective_rank([0.0, 0.0]) == 0.0
    assert 1 < effective_rank([3.0, 1.0]) < 2


def test_adjacent_and_difference_sign():
    m = np.array([[0.0, 1.0, 9.0], [3.0, 0.0, 2.0], [9.0, 4.0, 0.0]])
    assert mean_adjacent_kl(m) == pytest.approx(((1 + 3) / 2 + (2 + 4) / 2) / 2)
    lora = np.zeros((3, 3))
    assert (kl_difference(m, lora) >= 0).all()  # MSPLoRA more distinct -> positive
    assert (kl_difference(lora, m) <= 0).all()
    with pytest.raises(ValueError, match="shape"):
        kl_difference(m, np.zeros((2, 2)))


# -- the callback in a real Trainer ---------------------------------------------------------
class TinyModule(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model.train()  # the tiny factories return eval-mode models

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids).logits.pow(2).mean() * -1  # push B away from 0

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_recorder_in_trainer(tmp_path):
    model = build("bert", "paper")
    ids = torch.randint(0, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[
            SpectrumRecorder(),
            SpectrumRecorder("with_init.json", record_init=True),
            SpectrumRecorder("by_step.json", every_n_steps=1),
        ],
    )
    trainer.fit(TinyModule(model), DataLoader(TensorDataset(ids), batch_size=4))
    with_init = json.loads((tmp_path / "with_init.json").read_text())["records"]
    assert [r["epoch"] for r in with_init] == [-1, 0, 1]
    by_step = json.loads((tmp_path / "by_step.json").read_text())["records"]
    assert [(r["epoch"], r["step"]) for r in by_step] == [(0, 1), (0, 2), (1, 3), (1, 4)]
    assert by_step[1]["level"] != by_step[0]["level"]  # each step's state, not copies
    assert all(v == 0 for sv in with_init[0]["layer"].values() for v in sv)  # LoRA init: B = 0
    doc = json.loads((tmp_path / "spectra.json").read_text())
    assert [r["epoch"] for r in doc["records"]] == [0, 1]
    assert [lv["name"] for lv in doc["levels"]] == ["global", "mid", "layer"]
    last = doc["records"][-1]
    assert_same(last["level"], record_spectra(model)["level"])  # the file holds the final state
    assert len(last["layer"]) == 2 * N_LAYERS  # query, value
    assert all(len(sv) == 8 + 4 + 2 for sv in last["layer"].values())
    assert max(max(sv) for sv in last["layer"].values()) > 0  # training moved B off zero
    assert not list(tmp_path.glob(".spectra.json*"))  # no temp file left behind


def test_recorder_needs_adapter(tmp_path):
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[SpectrumRecorder()],
    )
    module = TinyModule(MODELS["bert"][0]())
    with pytest.raises(RuntimeError, match="Fix"):
        trainer.fit(module, DataLoader(TensorDataset(torch.zeros(4, 3, dtype=torch.long)), batch_size=2))


# -- analyze --------------------------------------------------------------------------------
def write_run(run_dir, variant: str, seeds=(1, 2)):
    """A run directory whose spectra.json holds one record per seed (as if epochs)."""
    model = build("bert", variant)
    records = []
    for epoch, seed in enumerate(seeds):
        randomize_adapter(model, seed=seed)
        records.append({"epoch": epoch, **record_spectra(model)})
    path = run_dir / "version_0" / "spectra.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"levels": level_info(model), "records": records}))
    return run_dir


@pytest.mark.parametrize("variant", ["paper", "four_level"])
def test_analyze_writes_plots_and_summary(tmp_path, variant, capsys):
    run = write_run(tmp_path / "ms", variant)
    lora = write_run(tmp_path / "lora", "lora", seeds=(3,))
    summary = analyze(str(run), against=str(lora))
    out = run / "analysis"
    names = {p.name for p in out.iterdir()}
    levels = [lv.name for lv in MSPLoRAConfig(levels=copy.deepcopy(VARIANTS[variant])).levels]
    assert {f"spectrum_{lv}.png" for lv in levels} <= names
    assert {"kl_query.png", "kl_value.png", "kl_diff_query.png", "kl_diff_value.png", "summary.md"} <= names
    assert all((out / n).stat().st_size > 1000 for n in names)
    assert set(summary["effective_rank"]) == set(levels)
    for level, kinds in summary["effective_rank"].items():
        rank = next(lv["rank"] for lv in summary["levels"] if lv["name"] == level)
        assert all(0 < e <= rank + 1e-9 for cells in kinds.values() for e in cells.values())
    cmp = summary["against"]
    for kind in ("query", "value"):
        assert cmp["adjacent_difference"][kind] == pytest.approx(
            summary["mean_adjacent_kl"][kind] - cmp["mean_adjacent_kl"][kind]
        )
    assert "Effective rank" in (out / "summary.md").read_text()
    assert "Mean adjacent-layer KL" in capsys.readouterr().out


def test_analyze_picks_newest_and_explicit_file(tmp_path):
    run = write_run(tmp_path / "ms", "no_global")
    old = run / "version_1" / "spectra.json"  # an older run beside it must not be picked
    old.parent.mkdir()
    old.write_text(json.dumps({"levels": [], "records": [{"epoch": 7, "level": {}, "layer": {}}]}))
    os.utime(old, (0, 0))
    assert analyze(str(run))["epochs"] == [0, 1]
    out = tmp_path / "out"
    main([str(run / "version_0" / "spectra.json"), "--out", str(out)])
    assert (out / "summary.md").is_file() and (out / "kl_query.png").is_file()


def test_analyze_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run"):
        analyze(str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing")])
    assert "Fix" in str(e.value.code)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "empty")])
    assert "SpectrumRecorder" in str(e.value.code)
