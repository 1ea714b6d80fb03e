"""The scaling and learning-rate options: scale rule, per-level LR multipliers, LoRA+ ratio, equal-budget rank.

Defaults must change nothing (an old adapter file loads; default optimizer groups); each
option does what its formula says, measured on a tiny model.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import msplora
from msplora import ConfigError, Level, MSPLoRAConfig
from msplora.config import scale_lr_options
from msplora.layers import KindBank
from msplora.pyramid import alpha_for_scale, budget_rank, cell_lr_multipliers, level_scale, lora_budget_rank
from msplora.training.module import MSPLoRAModule
from tests.tiny import N_LAYERS, fit_module, inputs, logits, randomize_adapter, tiny_bert

PAPER = [{"share": "global", "rank": 8}, {"share": "group", "rank": 4, "groups": 3}, {"share": "layer", "rank": 2}]


def paper_config(**kw) -> MSPLoRAConfig:
    return MSPLoRAConfig(levels=copy.deepcopy(PAPER), dropout=0.0, modules_to_save=["classifier"], **kw)


# -- scale rules ------------------------------------------------------------------------------------
def test_scale_rule_formulas():
    assert level_scale("lora", 16, 4) == 4.0
    assert level_scale("rslora", 16, 4) == 8.0
    assert level_scale("constant", 16, 4) == 16.0
    assert Level(rank=2).scale == 8.0  # a level alone: alpha / r, as before
    for rule in ("lora", "rslora", "constant"):
        assert math.isclose(level_scale(rule, alpha_for_scale(rule, 2.0, 8), 8), 2.0)
    cfg = paper_config(scale_rule="rslora")
    assert [lv.scale for lv in cfg.levels] == [16 / math.sqrt(8), 8.0, 16 / math.sqrt(2)]
    # a level's own rule wins over the pyramid's
    levels = [{**PAPER[0], "scale_rule": "constant", "alpha": 2}, *PAPER[1:]]
    assert [lv.scale for lv in MSPLoRAConfig(levels=levels, scale_rule="rslora").levels] == [2.0, 8.0, 16 / 2**0.5]


@pytest.mark.parametrize("rule", ["lora", "rslora", "constant"])
def test_forward_merge_and_export_use_the_rule(rule, tmp_path):
    """The wrapped layer's delta is sum_k s_k B_k A_k with s_k from the rule (computed here
    from alpha and rank, not from the code under test), for forward, merge and peft export."""
    s = {"lora": lambda a, r: a / r, "rslora": lambda a, r: a / r**0.5, "constant": lambda a, r: a}[rule]
    base = tiny_bert()
    model = msplora.inject(copy.deepcopy(base), paper_config(scale_rule=rule))
    randomize_adapter(model)
    kb = model.msplora_bank.kinds["query"]
    name, layer = next((n, m) for n, m in msplora.wrapped_layers(model) if m.kind == "query")
    expected = torch.zeros(kb.d_out, kb.d_in)
    for k, lv in enumerate(kb.levels):
        a, b = kb.level_block(k)  # (cells, r, d_in), (cells, d_out, r)
        c = kb.cells[k][layer.pos]
        expected += s(16.0, lv.rank) * b[c] @ a[c]
    # float32 matmuls of 14 rank-terms of size ~0.3^2 * 32: agreement to ~1e-5 is rounding
    torch.testing.assert_close(layer.delta_weight().detach(), expected, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, kb.d_in)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-5, rtol=1e-5)
        unmerged = logits(model, inputs())
        msplora.merge(model)
        torch.testing.assert_close(logits(model, inputs()), unmerged, atol=1e-5, rtol=1e-5)
        msplora.unmerge(model)
    pytest.importorskip("peft")
    from peft import PeftModel

    msplora.export_peft(model, tmp_path / "peft")
    exported = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(exported, inputs()), unmerged, atol=1e-5, rtol=1e-5)
    assert name


def test_one_gather_serves_forward_merge_export_and_analysis(monkeypatch, tmp_path):
    from msplora.analysis import record_spectra

    model = msplora.inject(tiny_bert(), paper_config())
    calls = []
    original = KindBank.gather

    def counting(self, rows):
        calls.append(rows.dim())
        return original(self, rows)

    monkeypatch.setattr(KindBank, "gather", counting)
    n_wrapped = len(list(msplora.wrapped_layers(model)))
    with torch.no_grad():
        logits(model, inputs())
        assert len(calls) == n_wrapped
        msplora.merge(model)
        assert len(calls) == 2 * n_wrapped
        msplora.unmerge(model)
        calls.clear()
        msplora.export_peft(model, tmp_path / "peft")
        assert len(calls) == n_wrapped
        calls.clear()
        record_spectra(model)
        assert calls == [2, 2]  # one batched gather per kind (query, value)


# -- learning rates -----------------------------------------------------------------------------------
def test_cell_lr_multipliers():
    # 4 layers, 3 groups -> sizes 2, 1, 1
    assert cell_lr_multipliers("global", 4) == [1.0]
    assert cell_lr_multipliers("global", 4, rule="layers") == [0.25]
    assert cell_lr_multipliers("global", 4, lr_scale=2.0, rule="sqrt_layers") == [1.0]
    assert cell_lr_multipliers("group", 4, groups=3, rule="layers") == [0.5, 1.0, 1.0]
    assert cell_lr_multipliers("layer", 4, lr_scale=0.5, rule="layers") == [0.5] * 4


def _module(cfg: MSPLoRAConfig, **kw) -> MSPLoRAModule:
    return fit_module(cfg, warmup_ratio=0.0, **kw)  # no warmup: the first step has lr


def _steps(cfg: MSPLoRAConfig, n: int = 1, **kw) -> tuple[MSPLoRAModule, dict[str, torch.Tensor]]:
    """n optimizer steps from the module's own configure_optimizers; returns each bank
    tensor's total move."""
    module = _module(cfg, **kw)
    opt = module.configure_optimizers()["optimizer"]
    before = {k: v.detach().clone() for k, v in module.model.msplora_bank.state_dict().items()}
    batch = {**inputs(), "labels": torch.tensor([0, 1])}
    for _ in range(n):
        module(batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = module.model.msplora_bank.state_dict()
    return module, {k: after[k] - before[k] for k in before}


def test_default_optimizer_groups_are_todays():
    module = _module(paper_config(), lr=1e-3, head_lr=5e-3)
    opt = module.configure_optimizers()["optimizer"]
    bank = module.model.msplora_bank
    adapter = [p for kb in bank.kinds.values() for p in (kb.A, kb.B)]
    groups = [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups]
    head = module.model.classifier
    assert groups == [  # in named_parameters order: the head, then the bank (attached last)
        (5e-3, 0.1, [id(head.weight)]),
        (5e-3, 0.0, [id(head.bias)]),
        (1e-3, 0.1, [id(p) for p in adapter]),
    ]


@pytest.mark.parametrize("lr_rule", ["none", "layers", "sqrt_layers"])
def test_one_step_moves_each_level_by_its_multiplier(lr_rule):
    """Per-level lr_scale x lr_rule x lr_ratio_B (for B) reach the optimizer: after one AdamW
    step (weight decay on), each row of A / column of B moved exactly its multiplier times
    the step it takes with every option at its default. Gradients are the same in both runs
    (same init, same batch, the options do not touch the forward)."""
    _, base = _steps(paper_config(), lr=1e-3)
    scales = [1.0, 0.5, 3.0]
    levels = [{**lv, "lr_scale": m} for lv, m in zip(PAPER, scales)]
    cfg = MSPLoRAConfig(levels=levels, dropout=0.0, modules_to_save=["classifier"], lr_rule=lr_rule, lr_ratio_B=4.0)
    module, moved = _steps(cfg, lr=1e-3)
    f = {"none": lambda n: 1.0, "layers": lambda n: 1 / n, "sqrt_layers": lambda n: n**-0.5}[lr_rule]
    sizes = {"global": [N_LAYERS], "mid": [2, 1, 1], "layer": [1] * N_LAYERS}  # layers per cell, 4 layers / 3 groups
    for kind, kb in module.model.msplora_bank.kinds.items():
        row = []
        for lv, m in zip(kb.levels, scales):
            for n in sizes[lv.name]:
                row += [m * f(n)] * lv.rank
        c = torch.tensor(row)  # (R_tot,) expected multiplier per row
        assert not torch.allclose(c, torch.ones_like(c))
        # A step here is ~lr = 1e-3 per element; rounding of theta (|theta| < 1, float32) and
        # of the rescale leaves < 1e-7, so a wrong multiplier (off by >= 5e-4) cannot pass.
        torch.testing.assert_close(moved[f"kinds.{kind}.A"], base[f"kinds.{kind}.A"] * c[:, None], atol=1e-7, rtol=0)
        # B starts at zero, so weight decay is nil on this step; B's step also carries the ratio 4
        torch.testing.assert_close(
            moved[f"kinds.{kind}.B"], base[f"kinds.{kind}.B"] * 4.0 * c[None, :], atol=1e-7, rtol=0
        )
        assert base[f"kinds.{kind}.B"].abs().amax(0).min() > 1e-4  # every column did move


def test_multipliers_match_adamw_with_per_level_learning_rates():
    """The step rescale is AdamW with lr * c, not an approximation: three steps (weight decay
    and Adam's moments in play) against AdamW on separate per-level tensors, one parameter
    group per level at lr * lr_scale, fed the same gradients."""
    scales = [0.25, 2.0, 0.5]
    cfg = MSPLoRAConfig(
        levels=[{**lv, "lr_scale": m} for lv, m in zip(PAPER, scales)], dropout=0.0, modules_to_save=["classifier"]
    )
    module = _module(cfg, lr=1e-2)
    opt = module.configure_optimizers()["optimizer"]
    kb = module.model.msplora_bank.kinds["value"]
    with torch.no_grad():
        kb.B.normal_(std=0.1)  # non-zero B: weight decay acts on both factors
    ref = [(torch.nn.Parameter(kb.level_block(k)[0].detach().clone()), m) for k, m in enumerate(scales)]
    ref_opt = torch.optim.AdamW([{"params": [p], "lr": 1e-2 * m, "weight_decay": 0.1} for p, m in ref])
    batch = {**inputs(), "labels": torch.tensor([0, 1])}
    for _ in range(3):
        module(batch).loss.backward()
        for k, (p, _) in enumerate(ref):
            p.grad = kb.A.grad[kb.offsets[k] : kb.offsets[k] + p.numel() // kb.d_in].view_as(p).clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for k, (p, _) in enumerate(ref):
        # float32 rounding of theta + c * (theta_new - theta) vs AdamW's own update: ~1e-8
        torch.testing.assert_close(kb.level_block(k)[0].detach(), p.detach(), atol=1e-7, rtol=0)


# -- equal budget -------------------------------------------------------------------------------------
def test_lora_budget_rank_rounds_to_nearest_tie_down():
    minilm = {"query": (6, 384, 384), "value": (6, 384, 384)}
    roberta = {"query": (12, 768, 768), "value": (12, 768, 768)}
    assert lora_budget_rank(PAPER, minilm) == 5  # 32 rank-cells / 6 layers = 5.33
    assert lora_budget_rank(PAPER, roberta) == 4  # 44 / 12 = 3.67
    two = {"q": (2, 8, 8)}
    assert lora_budget_rank([{"share": "global", "rank": 3}], two) == 1  # 1.5: the tie goes down
    assert lora_budget_rank([{"share": "global", "rank": 5}], two) == 2  # 2.5 -> 2
    assert lora_budget_rank([{"share": "global", "rank": 7}], two) == 3  # 3.5 -> 3
    assert lora_budget_rank([{"share": "global", "rank": 1}], {"q": (9, 8, 8)}) == 1  # 0.11: at least 1
    # uniform ranks over the paper's three levels at the paper's budget on MiniLM: 32 / 10 -> 3
    assert budget_rank(PAPER, [{**lv, "rank": 1} for lv in PAPER], minilm) == 3


def _minilm_shape():
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):  # MiniLM's architecture, no weights
        return BertForSequenceClassification(
            BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
        )


def test_budget_of_resolves_at_inject_and_saves_resolved(tmp_path):
    cfg = MSPLoRAConfig(levels=[{"share": "layer"}], budget_of=copy.deepcopy(PAPER))
    model = msplora.inject(_minilm_shape(), cfg)
    resolved = msplora.get_bank(model).config
    assert [lv.rank for lv in resolved.levels] == [5] and resolved.budget_of is None
    assert cfg.budget_of is not None and cfg.levels[0].rank == 8  # the caller's config is untouched
    full = msplora.parameter_count(PAPER, 6, {"query": (384, 384), "value": (384, 384)})
    assert msplora.adapter_parameters(model) == 5 * 6 * 2 * 768
    # no other rank is nearer to the pyramid's count
    assert all(abs(r * 6 * 2 * 768 - full) >= abs(5 * 6 * 2 * 768 - full) for r in range(1, 9))
    # on a 4-layer tiny BERT the same config gives another rank: 28 rank-cells / 4 layers = 7
    tiny = msplora.inject(tiny_bert(), cfg)
    assert msplora.get_bank(tiny).config.levels[0].rank == 7
    msplora.save_adapter(tiny, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["config"]
    assert "budget_of" not in saved and saved["levels"][0]["rank"] == 7
    assert msplora.get_bank(msplora.load_adapter(tiny_bert(), tmp_path / "ad")).config.levels[0].rank == 7


def test_budget_that_does_not_fit_is_refused_before_anything_changes():
    base = tiny_bert()
    model = copy.deepcopy(base)
    cfg = MSPLoRAConfig(levels=[{"share": "layer"}], budget_of=[{"share": "group", "rank": 4, "groups": 9}])
    with pytest.raises(ConfigError, match=r"budget_of\[0\].*Fix: use at most 4"):
        msplora.inject(model, cfg)
    assert not hasattr(model, "msplora_bank")
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.state_dict().values()))
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]


# -- defaults and old files -----------------------------------------------------------------------
def test_default_config_is_written_as_before_and_options_round_trip(tmp_path):
    """A default config's adapter file has exactly the keys written before these options
    existed (so old readers read it, and old files are what new readers get); set options are
    written and come back."""
    base = tiny_bert()
    model = msplora.inject(copy.deepcopy(base), paper_config())
    msplora.save_adapter(model, tmp_path / "default")
    saved = json.loads((tmp_path / "default" / "adapter_config.json").read_text())["config"]
    old_keys = {"targets", "levels", "dropout", "fan_in_fan_out", "init", "modules_to_save"}
    assert set(saved) == old_keys
    assert all(set(lv) == {"share", "rank", "alpha", "groups", "group_size", "name"} for lv in saved["levels"])

    levels = [{**PAPER[0], "scale_rule": "lora"}, {**PAPER[1], "lr_scale": 0.5}, PAPER[2]]
    cfg = MSPLoRAConfig(levels=levels, dropout=0.0, scale_rule="rslora", lr_rule="layers", lr_ratio_B=2.0)
    model = msplora.inject(copy.deepcopy(base), cfg)
    randomize_adapter(model)
    msplora.save_adapter(model, tmp_path / "options")
    saved = json.loads((tmp_path / "options" / "adapter_config.json").read_text())["config"]
    assert (saved["scale_rule"], saved["lr_rule"], saved["lr_ratio_B"]) == ("rslora", "layers", 2.0)
    assert [lv.get("scale_rule") for lv in saved["levels"]] == ["lora", None, None]  # None: the pyramid's
    assert [lv.get("lr_scale") for lv in saved["levels"]] == [None, 0.5, None]  # None: 1
    loaded = msplora.load_adapter(copy.deepcopy(base), tmp_path / "options")
    assert msplora.get_bank(loaded).config.to_dict() == cfg.to_dict()
    assert [lv.scale for lv in msplora.get_bank(loaded).config.levels] == [2.0, 8.0, 16 / 2**0.5]
    with torch.no_grad():
        assert torch.equal(logits(loaded, inputs()), logits(model, inputs()))


def test_defaults_keep_the_scales_and_take_no_optimizer_hooks():
    cfg = paper_config()
    assert [lv.scale for lv in cfg.levels] == [16 / 8, 16 / 4, 16 / 2]
    model = msplora.inject(tiny_bert(), cfg)
    assert model.msplora_bank.lr_multipliers() == []
    # and one step of the default config is plain AdamW on the adapter
    module, moved = _steps(paper_config(), lr=1e-3)
    plain = msplora.inject(tiny_bert(), paper_config())
    opt = torch.optim.AdamW(
        [
            {"params": [p for kb in plain.msplora_bank.kinds.values() for p in (kb.A, kb.B)], "weight_decay": 0.1},
            {"params": [plain.classifier.weight], "weight_decay": 0.1},
            {"params": [plain.classifier.bias], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    before = {k: v.detach().clone() for k, v in plain.msplora_bank.state_dict().items()}
    plain(**inputs(), labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    for k, v in plain.msplora_bank.state_dict().items():
        assert torch.equal(moved[k], v - before[k]), k


# -- the config's one door -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(scale_rule="alpha/r"), "scale_rule: unknown rule 'alpha/r'. Fix: use one of lora (alpha / r)"),
        (dict(levels=[{"share": "layer", "scale_rule": "sqrt"}]), "levels[0].scale_rule: unknown rule"),
        (dict(levels=[{"share": "layer", "lr_scale": 0}]), "levels[0].lr_scale: 0 is not a positive number"),
        (dict(levels=[{"share": "layer", "lr_scale": float("nan")}]), "levels[0].lr_scale: nan"),
        (dict(levels=[{"share": "layer", "lr_scale": True}]), "levels[0].lr_scale: True"),
        (dict(lr_rule="cells"), "lr_rule: unknown rule 'cells'. Fix: use one of none (x 1), layers (x 1 / n)"),
        (dict(lr_ratio_B=-2), "lr_ratio_B: -2 is not a positive number"),
        (dict(lr_ratio_B="16"), "lr_ratio_B: '16' is not a positive number"),
        (dict(budget_of=[]), "budget_of: the budget pyramid is empty"),
        (dict(budget_of=[{"share": "mid"}]), "budget_of[0].share: unknown scheme 'mid'"),
        (dict(budget_of=[{"share": "global"}, {"share": "global"}]), "budget_of: more than one global level"),
        (dict(budget_of=PAPER, r0=4), "budget_of: given with ranks / r0"),
    ],
)
def test_bad_options_name_the_field_and_the_fix(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        MSPLoRAConfig(**copy.deepcopy(kwargs))
    assert needle in str(e.value) and "Fix: " in str(e.value)


def test_unknown_key_in_a_saved_config_is_refused():
    with pytest.raises(ConfigError, match="lr_ratio_b: unknown config keys"):
        MSPLoRAConfig.from_dict({"lr_ratio_b": 2})


# -- what a search trial calls ----------------------------------------------------------------------
def test_scale_lr_options_for_the_search():
    levels = [{"share": "global", "rank": 8, "alpha": 16}, {"share": "layer", "rank": 2, "alpha": 16}]
    assert scale_lr_options(levels) == {"levels": levels}  # defaults: the trial's config as before
    out = scale_lr_options(levels, scale_rule="rslora", lr_scales=[1.0, 0.25], lr_rule="layers", lr_ratio_B=4.0)
    assert out == {
        "levels": [levels[0], {**levels[1], "lr_scale": 0.25}],
        "scale_rule": "rslora",
        "lr_rule": "layers",
        "lr_ratio_B": 4.0,
    }
    cfg = MSPLoRAConfig(**out)
    assert [lv.scale for lv in cfg.levels] == [16 / 8**0.5, 16 / 2**0.5] and cfg.levels[1].lr_scale == 0.25
    assert "lr_scale" not in levels[1]  # the caller's dicts are not changed
    with pytest.raises(ConfigError, match="lr_scales: 1 multipliers for 2 levels"):
        scale_lr_options(levels, lr_scales=[2.0])
    with pytest.raises(ConfigError, match="scale_rule: unknown rule"):
        scale_lr_options(levels, scale_rule="sqrt")
