"""The ablation suite: every overlay parses, smoke-runs and has the formula's trainable count;
the runner sweeps, selects, skips finished seeds and reruns interrupted ones; the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import msplora
from msplora import ablation
from msplora.training.predictions import decode, encode
from tests.conftest import fit_cli

VARIANTS = ablation.variant_names()
REQUIRED = {
    "full",
    "no_global",
    "no_mid",
    "no_layer",
    "uniform",
    "uniform_budget",
    "group_size_1",
    "group_size_2",
    "group_size_3",
    "decay_half",
    "decay_quarter",
    "decay_flat",
    "two_level",
    "four_level",
    "lora",
    "lora_budget",
}
TINY = [
    "--data.init_args.max_train_samples=64",
    "--data.init_args.max_eval_samples=32",
    "--data.init_args.batch_size=16",
    "--data.init_args.max_length=32",
]


def composed(name: str, model_dir: Path, *extra: str):
    """The CLI's parse of base + demo + overlay (+ extra), as the runner builds it."""
    recipe = ablation.base_recipe(
        ablation.variant_path(name),
        ablation.task_config("sentiment", None),
        None,
        [f"--model.model={model_dir}", *TINY, *extra],
    )
    return recipe.as_args(), ablation.parse(recipe).cli


def test_the_issue_s_variants_all_exist():
    assert REQUIRED <= set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_overlay_is_a_hypothesis_plus_pyramid_keys_only(name):
    path = ablation.variant_path(name)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Hypothesis: ") and len(first) > 30
    data = yaml.safe_load(path.read_text())
    # pyramid keys only; the head-only floor also freezes the adapter (model.train_adapter)
    assert set(data) == {"model"} and set(data["model"]) - {"train_adapter"} == {"pyramid"}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_ablation_parses_and_smoke_runs(name, tmp_path, tiny_bert_dir):
    args, cli = composed(name, tiny_bert_dir)
    cfg = cli.model.pyramid
    assert isinstance(cfg, msplora.MSPLoRAConfig) and cfg.targets == ["query", "value"]
    fit = fit_cli([*args, "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"])
    cfg = msplora.get_bank(fit.model.model).config  # as injected (budget_of resolved on the model)
    m = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    formula = msplora.parameter_count([vars(lv) for lv in cfg.levels], 4, {"query": (32, 32), "value": (32, 32)})
    # the head-only floor trains no adapter: its trainable adapter count is 0, the head alone trains
    trains_adapter = fit.model.hparams.train_adapter
    assert m["adapter_params"] == (formula if trains_adapter else 0)
    if not trains_adapter:
        assert m["trainable_params"] == msplora.trainable_parameters(fit.model.model) > 0
        assert all(not p.requires_grad for p in msplora.get_bank(fit.model.model).parameters())


# MiniLM's shape: 6 layers, q/v maps of 384 -> 384: one rank-cell costs 2 * (384 + 384) = 1,536.
MINILM_PER_RANK_CELL = 1536
RANK_CELLS = {
    "full": 8 + 4 * 3 + 2 * 6,
    "lora": 8 * 6,
    "no_global": 4 * 3 + 2 * 6,
    "no_mid": 8 + 2 * 6,
    "no_layer": 8 + 4 * 3,
    "uniform": 8 + 8 * 3 + 8 * 6,
    "uniform_budget": 3 + 3 * 3 + 3 * 6,
    "group_size_1": 8 + 4 * 6 + 2 * 6,
    "group_size_2": 8 + 4 * 3 + 2 * 6,
    "group_size_3": 8 + 4 * 2 + 2 * 6,
    "decay_half": 8 + 4 * 3 + 2 * 6,
    "decay_quarter": 8 + 2 * 3 + 1 * 6,
    "decay_flat": 8 + 8 * 3 + 8 * 6,
    "two_level": 8 + 4 * 6,
    "four_level": 8 + 4 * 2 + 2 * 3 + 1 * 6,
    "lora_budget": 5 * 6,
}


@pytest.mark.parametrize("name", VARIANTS)
def test_trainable_count_matches_the_formula_on_minilm_shape(name, tiny_bert_dir):
    from transformers import BertConfig, BertForSequenceClassification

    _, cli = composed(name, tiny_bert_dir)
    cfg = cli.model.pyramid
    with torch.device("meta"):  # MiniLM's architecture, no weights, no memory
        model = BertForSequenceClassification(
            BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
        )
    msplora.inject(model, cfg)
    cfg = msplora.get_bank(model).config  # as injected (budget_of resolved on the model)
    formula = msplora.parameter_count([vars(lv) for lv in cfg.levels], 6, {"query": (384, 384), "value": (384, 384)})
    assert msplora.adapter_parameters(model) == formula
    if name in RANK_CELLS:
        assert formula == RANK_CELLS[name] * MINILM_PER_RANK_CELL


def test_budget_variants_sit_near_full():
    full = RANK_CELLS["full"]
    for name in ("uniform_budget", "lora_budget", "two_level"):
        assert abs(RANK_CELLS[name] - full) / full <= 0.1, name


def test_unknown_name_fails_at_once_listing_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ablation.main(["run", "full", "no_such_variant", "--root", str(tmp_path)])
    assert e.value.code == 2
    msg = str(e.value)
    assert "no_such_variant" in msg and "full" in msg and "no_mid" in msg and "Fix" in msg
    assert not any(tmp_path.iterdir())  # checked before anything ran


def test_task_that_disagrees_with_the_config_is_refused(tmp_path, tiny_bert_dir):
    with pytest.raises(SystemExit, match="--task rte"):
        ablation.run_variant(
            "full", "rte", 1, [1e-3], "configs/demo.yaml", 2, [f"--model.model={tiny_bert_dir}"], root=tmp_path
        )
    assert not (tmp_path / "rte").exists()


# -- the runner's bookkeeping, with a fake fit (fast) -------------------------------------------------
S = ablation.SELECTION_SEED  # the seed that chooses the LR; reported seeds are 0..n-1


def test_runner_sweeps_on_the_selection_seed_then_runs_the_reported_seeds_at_the_chosen_lr(
    tmp_path, tiny_bert_dir, fake_fit
):
    calls, _ = fake_fit
    extra = [f"--model.model={tiny_bert_dir}"]
    recs = ablation.run_variant(
        "no_mid", "sentiment", 3, [1e-3, 2e-3, 4e-3], None, 2, extra, root=tmp_path, log=lambda *_: None
    )
    # best val: 2e-3; no reported seed took part in choosing it
    assert calls == [(1e-3, S), (2e-3, S), (4e-3, S), (2e-3, 0), (2e-3, 1), (2e-3, 2)]
    assert [r["lr"] for r in recs] == [2e-3] * 3 and [r["seed"] for r in recs] == [0, 1, 2]
    out = tmp_path / "sentiment" / "no_mid"
    seed0 = json.loads((out / "seed0.json").read_text())
    assert seed0["lr_sweep"] == {"0.001": 0.7, "0.002": 0.8, "0.004": 0.75} and seed0["variant"] == "no_mid"
    assert seed0["selection_seeds"] == [S] and seed0["role"] == "report" and seed0["protocol"] == 2
    assert seed0["hypothesis"].startswith("the mid level")
    names = sorted(p.name for p in (out / "lr_sweep").iterdir())
    assert names == [f"lr0.001_seed{S}.json", f"lr0.002_seed{S}.json", f"lr0.004_seed{S}.json"]
    assert json.loads((out / "lr_sweep" / names[0]).read_text())["role"] == "selection"

    calls.clear()  # a rerun does nothing
    ablation.run_variant(
        "no_mid", "sentiment", 3, [1e-3, 2e-3, 4e-3], None, 2, extra, root=tmp_path, log=lambda *_: None
    )
    assert calls == []
    # other settings (here: steps) do not count as done
    ablation.run_variant(
        "no_mid", "sentiment", 1, [1e-3, 2e-3, 4e-3], None, 3, extra, root=tmp_path, log=lambda *_: None
    )
    assert calls == [(1e-3, S), (2e-3, S), (4e-3, S), (2e-3, 0)]


def test_several_selection_seeds_choose_by_their_mean(tmp_path, tiny_bert_dir, fake_fit):
    calls, knobs = fake_fit
    knobs["vals"] = {1e-3: 0.7, 2e-3: 0.8}
    knobs["val_of"] = lambda lr, seed: 0.9 if (lr, seed) == (1e-3, S) else knobs["vals"][lr]  # mean 0.8 vs 0.8: tie
    extra = [f"--model.model={tiny_bert_dir}"]
    recs = ablation.run_variant(
        "full", "sentiment", 1, [1e-3, 2e-3], None, 2, extra, root=tmp_path, log=lambda *_: None, selection_seeds=2
    )
    assert calls[:4] == [(1e-3, S), (1e-3, S + 1), (2e-3, S), (2e-3, S + 1)] and calls[4][1] == 0
    assert recs[0]["selection_seeds"] == [S, S + 1] and recs[0]["lr_sweep"] == {"0.001": 0.8, "0.002": 0.8}


def test_the_head_lr_is_the_task_s_for_every_swept_lr(tiny_bert_dir, monkeypatch):
    """Protocol 2: the head trains at the config's head_lr (demo.yaml: 2e-3) whatever the adapter LR."""
    seen = []

    def fake_fit(setup, test):
        seen.append((setup.model.hparams.lr, setup.model.hparams.head_lr))
        raise KeyboardInterrupt

    import msplora.training.run as run

    monkeypatch.setattr(run, "fit", fake_fit)
    for lr in (1e-3, 4e-3):
        with pytest.raises(KeyboardInterrupt):
            recipe = ablation.base_recipe(
                ablation.variant_path("full"),
                ablation.task_config("sentiment", None),
                2,
                [f"--model.model={tiny_bert_dir}"],
            )
            recipe = ablation.Recipe(recipe.configs, {**recipe.overrides, "model.head_lr": 2e-3}, recipe.extra)
            ablation.fit_and_test(recipe, lr, 0, Path("/nonexistent/run"))
    assert seen == [(1e-3, 2e-3), (4e-3, 2e-3)]


def test_a_wider_grid_runs_only_new_lrs_and_redoes_seeds_when_the_choice_moves(tmp_path, tiny_bert_dir, fake_fit):
    calls, _ = fake_fit
    extra = [f"--model.model={tiny_bert_dir}"]
    quiet = {"root": tmp_path, "log": lambda *_: None}
    ablation.run_variant("full", "sentiment", 3, [1e-3, 4e-3], None, 2, extra, **quiet)
    assert calls == [(1e-3, S), (4e-3, S), (4e-3, 0), (4e-3, 1), (4e-3, 2)]  # best of the two: 4e-3
    calls.clear()
    recs = ablation.run_variant("full", "sentiment", 3, [1e-3, 2e-3, 4e-3], None, 2, extra, **quiet)
    assert calls == [(2e-3, S), (2e-3, 0), (2e-3, 1), (2e-3, 2)]  # only the new LR, then the seeds at the new choice
    assert [r["lr"] for r in recs] == [2e-3] * 3
    seed0 = json.loads((tmp_path / "sentiment" / "full" / "seed0.json").read_text())
    assert seed0["lr"] == 2e-3 and seed0["lr_sweep"] == {"0.001": 0.7, "0.002": 0.8, "0.004": 0.75}
    calls.clear()  # back to the narrow grid: its runs are all still there, the seeds move back
    ablation.run_variant("full", "sentiment", 3, [1e-3, 4e-3], None, 2, extra, **quiet)
    assert calls == [(4e-3, 0), (4e-3, 1), (4e-3, 2)]


def test_editing_an_overlay_makes_its_results_stale(tmp_path, tiny_bert_dir, fake_fit):
    calls, _ = fake_fit
    folder = tmp_path / "abl"
    folder.mkdir()
    overlay = folder / "mine.yaml"
    overlay.write_text((ablation.ABLATIONS / "no_mid.yaml").read_text())
    kw = {"root": tmp_path / "res", "folder": folder, "log": lambda *_: None}
    extra = [f"--model.model={tiny_bert_dir}"]
    ablation.run_variant("mine", "sentiment", 1, [1e-3], None, 2, extra, **kw)
    calls.clear()
    ablation.run_variant("mine", "sentiment", 1, [1e-3], None, 2, extra, **kw)
    assert calls == []
    overlay.write_text(overlay.read_text().replace("rank: 8", "rank: 6"))
    ablation.run_variant("mine", "sentiment", 1, [1e-3], None, 2, extra, **kw)
    assert calls == [(1e-3, S), (1e-3, 0)]


def test_the_embedded_task_sweeps_its_own_grid(tmp_path, tiny_bert_dir, fake_fit):
    calls, _ = fake_fit
    ablation.run_variant(
        "full", "sentiment", 1, None, None, 2, [f"--model.model={tiny_bert_dir}"], root=tmp_path, log=lambda *_: None
    )
    assert [lr for lr, seed in calls if seed == S] == list(ablation.EMBEDDED_LRS)


def test_next_lr_steps_outwards_only_from_an_edge():
    assert ablation.next_lr([1e-3, 2e-3, 4e-3], 4e-3) == 8e-3
    assert ablation.next_lr([1e-3, 2e-3, 4e-3], 1e-3) == 5e-4
    assert ablation.next_lr([1e-3, 2e-3, 4e-3], 2e-3) is None
    assert ablation.next_lr([1e-3, 3e-3], 3e-3) == 9e-3
    assert ablation.next_lr([1e-3], 1e-3) is None


def test_a_best_lr_on_the_edge_extends_the_sweep_until_it_is_inside(tmp_path, tiny_bert_dir, fake_fit, capsys):
    calls, knobs = fake_fit
    knobs["vals"] = {5e-4: 0.1, 1e-3: 0.7, 2e-3: 0.75, 4e-3: 0.8, 8e-3: 0.85, 1.6e-2: 0.6}
    extra = [f"--model.model={tiny_bert_dir}"]
    quiet = {"root": tmp_path, "log": lambda *_: None}
    ablation.run_variant("full", "sentiment", 2, [1e-3, 2e-3, 4e-3], None, 2, extra, extend=1, **quiet)
    assert calls == [(1e-3, S), (2e-3, S), (4e-3, S), (8e-3, S), (8e-3, 0), (8e-3, 1)]  # one step: still on the edge
    ablation.report("sentiment", tmp_path)
    row = next(r for r in ablation.summarise(ablation.collect("sentiment", tmp_path)) if r["variant"] == "full")
    assert row["lr_edge"] == "top" and row["swept"] == ["0.001", "0.002", "0.004", "0.008"]
    assert "| 0.008 ↑ | 0.001, 0.002, 0.004, 0.008 |" in (tmp_path / "sentiment" / "report.md").read_text()
    calls.clear()  # a second step finds the peak: 1.6e-2 is worse, so 8e-3 is inside and stays chosen
    recs = ablation.run_variant("full", "sentiment", 2, [1e-3, 2e-3, 4e-3], None, 2, extra, extend=2, **quiet)
    assert calls == [(1.6e-2, S)] and [r["lr"] for r in recs] == [8e-3, 8e-3]
    row = ablation.summarise(ablation.collect("sentiment", tmp_path))[0]
    assert row["lr_edge"] == "" and len(row["swept"]) == 5
    calls.clear()  # and at the bottom edge
    knobs["vals"] = {5e-4: 0.9, 2.5e-4: 0.8, 1e-3: 0.7, 2e-3: 0.6}
    ablation.run_variant("no_mid", "sentiment", 1, [1e-3, 2e-3], None, 2, extra, extend=3, **quiet)
    assert calls == [(1e-3, S), (2e-3, S), (5e-4, S), (2.5e-4, S), (5e-4, 0)]


def test_an_interrupted_seed_leaves_no_file_and_is_rerun(tmp_path, tiny_bert_dir, fake_fit):
    calls, fail_at = fake_fit
    extra = [f"--model.model={tiny_bert_dir}"]
    fail_at["at"] = (2e-3, 2)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_variant("full", "sentiment", 3, [1e-3, 2e-3], None, 2, extra, root=tmp_path, log=lambda *_: None)
    out = tmp_path / "sentiment" / "full"
    # every file there, hidden ones included (pathlib's "*" matches dot-files): nothing but the finished runs
    finished = [f"lr_sweep/lr0.001_seed{S}.json", f"lr_sweep/lr0.002_seed{S}.json", "seed0.json", "seed1.json"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == finished
    # interrupted while seed2.json is being written: no seed file, no half-written temp file beside it
    fail_at.clear()
    fail_at["write_at"] = (2e-3, 2)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_variant("full", "sentiment", 3, [1e-3, 2e-3], None, 2, extra, root=tmp_path, log=lambda *_: None)
    assert calls[-1] == (2e-3, 2)  # the fit did finish; only the write was cut
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == finished
    calls.clear()
    fail_at.clear()
    ablation.run_variant("full", "sentiment", 3, [1e-3, 2e-3], None, 2, extra, root=tmp_path, log=lambda *_: None)
    assert calls == [(2e-3, 2)]
    # a seed file that vanished (or was half-written) is redone, nothing else
    (out / "seed1.json").write_text('{"truncated": ')
    calls.clear()
    ablation.run_variant("full", "sentiment", 3, [1e-3, 2e-3], None, 2, extra, root=tmp_path, log=lambda *_: None)
    assert calls == [(2e-3, 1)]


@pytest.mark.slow
def test_real_runner_on_a_tiny_model_writes_complete_seed_files(tmp_path, tiny_bert_dir):
    extra = [f"--model.model={tiny_bert_dir}", *TINY]
    recs = ablation.run_variant(
        "no_layer", "sentiment", 2, [1e-3, 2e-3], None, 2, extra, root=tmp_path, log=lambda *_: None
    )
    assert len(recs) == 2 and recs[0]["lr"] == recs[1]["lr"] in (1e-3, 2e-3)
    rec = json.loads((tmp_path / "sentiment" / "no_layer" / "seed1.json").read_text())
    assert rec["seed"] == 1 and rec["metric"] == "accuracy" and 0 <= rec["test"] <= 1 and 0 <= rec["val"] <= 1
    assert rec["global_step"] == 2 and rec["wall_time_s"] > 0
    assert rec["head_lr"] == 2e-3  # demo.yaml's head_lr, whatever LR was chosen
    p, y = decode(rec["predictions"]["test"]["test"])  # per-example dev predictions, dev order
    assert len(p) == len(y) == 32 and (p == y).mean() == pytest.approx(rec["test"])
    assert rec["predictions"]["val"]["val"]["n"] > 0 and "predictions" not in rec["metrics"]
    assert rec["levels"] == "G8 M4x3" and set(rec["params_per_level"]) == {"global", "mid"}
    assert rec["adapter_params"] == sum(rec["params_per_level"].values())
    assert rec["config"]["model"]["pyramid"]["levels"][1]["groups"] == 3  # the resolved config
    assert rec["config"]["data"]["init_args"]["val_fraction"] == ablation.VAL_FRACTION
    machine = rec["machine"]  # what it ran on
    assert machine["device"].startswith("cpu (") and machine["processes"] == 1 and machine["threads"] >= 1
    assert machine["torch"] == torch.__version__ and machine["msplora"] == msplora.__version__


# -- report -------------------------------------------------------------------------------------------
def fabricate(root: Path, name: str, tests: list[float], params: int, lr: float, levels: str) -> None:
    for k, t in enumerate(tests):
        rec = {
            "variant": name,
            "metric": "accuracy",
            "test": t,
            "val": t,
            "lr": lr,
            "seed": k,
            "levels": levels,
            "adapter_params": params,
            "lora_r8_adapter_params": 73728,
        }
        path = root / "sentiment" / name / f"seed{k}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))


def test_report_leaves_out_seed_files_from_another_lr(tmp_path, capsys):
    fabricate(tmp_path, "full", [0.80, 0.82, 0.84], 49152, 1e-3, "G8 M4x3 L2")
    stale = tmp_path / "sentiment" / "full" / "seed3.json"  # an older, longer run at another LR
    stale.write_text(json.dumps({**json.loads((stale.parent / "seed2.json").read_text()), "lr": 4e-3, "seed": 3}))
    rows = ablation.summarise(ablation.collect("sentiment", tmp_path))
    assert rows[0]["n"] == 3 and rows[0]["lr"] == "0.001"
    assert "seed3.json: made at another LR" in capsys.readouterr().out


def test_report_on_fabricated_results(tmp_path, capsys):
    fabricate(tmp_path, "full", [0.80, 0.82, 0.84], 49152, 1e-3, "G8 M4x3 L2")
    fabricate(tmp_path, "lora", [0.85, 0.85], 73728, 5e-4, "L8")
    fabricate(tmp_path, "no_mid", [0.78], 30720, 2e-3, "G8 L2")
    fabricate(tmp_path, "uniform_budget", [0.90, 0.70, 0.71], 46080, 2e-3, "G3 M3x3 L3")  # median != mean
    (tmp_path / "sentiment" / "no_mid" / "seed1.json").write_text("{")  # half-written: ignored
    ablation.main(["report", "--task", "sentiment", "--root", str(tmp_path)])
    text = (tmp_path / "sentiment" / "report.md").read_text()
    assert text in capsys.readouterr().out
    table, compared = text.split("\nPaired comparisons")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    names = [r.split("|")[1].strip() for r in rows]
    # against the default baseline (lora): these fabricated protocol-1 records hold no predictions
    assert "| full | lora | 0 | | | | | no paired predictions (protocol-1 results" in compared
    assert names == ["no_mid", "uniform_budget", "full", "lora"]  # by parameter count
    full = rows[2]
    assert "| G8 M4x3 L2 | 0.001 | - | 0.8200 ± 0.0200 (3) | 0.8200 | 49,152 | 0.67x |" in full  # no sweep recorded
    assert "| 0.7700 ± 0.1127 (3) | 0.7100 | 46,080 | 0.62x |" in rows[1]
    assert "0.8500 ± 0.0000 (2) | 0.8500 |" in rows[3] and "| 1.00x |" in rows[3] and "| 0.0005 |" in rows[3]
    assert "(1) | 0.7800 |" in rows[0]
    png = tmp_path / "sentiment" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    stats = {r["variant"]: r for r in json.loads((tmp_path / "sentiment" / "report.json").read_text())["rows"]}
    assert math.isclose(stats["full"]["std"], 0.02) and math.isclose(stats["uniform_budget"]["median"], 0.71)
    assert stats["uniform_budget"]["values"] == [0.90, 0.70, 0.71] and stats["uniform_budget"]["seeds"] == [0, 1, 2]


def test_report_says_when_runs_were_made_on_several_devices(tmp_path):
    fabricate(tmp_path, "full", [0.80, 0.82, 0.84], 49152, 1e-3, "G8 M4x3 L2")
    fabricate(tmp_path, "lora", [0.85, 0.85], 73728, 5e-4, "L8")
    rows = ablation.summarise(ablation.collect("sentiment", tmp_path))
    assert "Devices" not in ablation.table.markdown(rows, "sentiment")  # none recorded
    for name, k, device in (("full", 0, "cpu (x86_64)"), ("full", 1, "cpu (x86_64)"), ("lora", 0, "NVIDIA H100")):
        path = tmp_path / "sentiment" / name / f"seed{k}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "machine": {"device": device}}))
    rows = ablation.summarise(ablation.collect("sentiment", tmp_path))
    note = "Devices of the runs: NVIDIA H100 (1), cpu (x86_64) (2), not recorded (2)."
    assert note in ablation.table.markdown(rows, "sentiment")
    for name in ("full", "lora"):  # one device throughout: nothing to say
        for path in (tmp_path / "sentiment" / name).glob("seed*.json"):
            path.write_text(json.dumps({**json.loads(path.read_text()), "machine": {"device": "cpu (x86_64)"}}))
    assert "Devices" not in ablation.table.markdown(ablation.summarise(ablation.collect("sentiment", tmp_path)), "s")


def test_report_without_results_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="make ablation NAME=full"):
        ablation.main(["report", "--task", "sentiment", "--root", str(tmp_path)])


def fabricate_predictions(root: Path, name: str, p_right: float, seeds: int, labels: np.ndarray, rng) -> None:
    """Protocol-2 records of a variant whose runs are right on each dev example with p_right."""
    for k in range(seeds):
        right = rng.random(len(labels)) < p_right
        pred = np.where(right, labels, 1 - labels)
        rec = {
            "variant": name,
            "metric": "accuracy",
            "test": float((pred == labels).mean()),
            "val": 0.5,
            "lr": 1e-3,
            "head_lr": 2e-3,
            "seed": k,
            "protocol": 2,
            "levels": "L2",
            "adapter_params": 100,
            "lora_r8_adapter_params": 400,
            "predictions": {"test": {"test": encode(pred, labels, False)}},
        }
        path = root / "sentiment" / name / f"seed{k}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))


def test_report_gives_paired_verdicts_against_the_baseline_and_asked_pairs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000)
    fabricate_predictions(tmp_path, "lora_budget", 0.70, 4, labels, rng)
    fabricate_predictions(tmp_path, "strong", 0.85, 4, labels, rng)
    fabricate_predictions(tmp_path, "twin", 0.70, 4, labels, rng)
    ablation.main(
        ["report", "--task", "sentiment", "--root", str(tmp_path), "--margin", "5", "--compare", "twin:strong"]
    )
    text = (tmp_path / "sentiment" / "report.md").read_text()
    assert "Head LR 0.002 for every variant" in text and "Protocol 2" in text
    rows = {
        (r["variant"], r["against"]): r
        for r in json.loads((tmp_path / "sentiment" / "report.json").read_text())["comparisons"]
    }
    assert set(rows) == {("strong", "lora_budget"), ("twin", "lora_budget"), ("twin", "strong")}
    assert rows["strong", "lora_budget"]["decision"] == "better" and rows["twin", "strong"]["decision"] == "worse"
    assert rows["twin", "lora_budget"]["decision"] == "equivalent" and rows["twin", "lora_budget"]["n"] == 4
    assert "| strong | lora_budget | 4 | +14.98 | [+14.22, +15.73] | 0.000 |" in text and "equivalent within ±5" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--baseline", "nosuch"], "--baseline nosuch: no results of it"),
        (["--compare", "twin-strong"], "not A:B"),
        (["--compare", "twin:nosuch"], "no results of 'nosuch' to compare"),
        (["--margin", "0"], "need a positive margin"),
    ],
)
def test_a_bad_report_option_is_one_line_and_writes_nothing(tmp_path, args, message):
    rng = np.random.default_rng(0)
    fabricate_predictions(tmp_path, "twin", 0.7, 2, rng.integers(0, 2, 50), rng)
    with pytest.raises(SystemExit, match=message) as e:
        ablation.main(["report", "--task", "sentiment", "--root", str(tmp_path), *args])
    assert e.value.code == 2
    assert sorted(p.name for p in (tmp_path / "sentiment").iterdir()) == ["twin"]
