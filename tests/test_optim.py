"""msplora.optim: the parameter groups of `msplora fit` (unchanged, so seeded runs do not move)
and the same groups for a transformers.Trainer user of the peft door."""

from __future__ import annotations

import copy

import torch
from peft import get_peft_model

import msplora
from msplora import MSPLoRAConfig
from msplora.optim import create_optimizer, param_groups
from msplora.peft import MSPLoRAPeftConfig
from tests.conftest import REPO
from tests.tiny import fit_module, tiny_bert

LEVELS = [
    {"share": "global", "rank": 8, "lr_scale": 0.5},
    {"share": "group", "rank": 4, "groups": 3},
    {"share": "layer", "rank": 2, "lr_scale": 2.0},
]


def reference_groups(module, lr, head_lr, weight_decay) -> list[dict]:
    """MSPLoRAModule.configure_optimizers' groups as they were before msplora.optim (frozen copy)."""
    prefix = "msplora_bank"
    ratio_b = msplora.get_bank(module.model).config.lr_ratio_B
    groups: dict[tuple[float, float], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        p_lr = lr if prefix in name or head_lr is None else head_lr
        if prefix in name and name.endswith(".B") and ratio_b != 1:
            p_lr = p_lr * ratio_b
        wd = weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((p_lr, wd), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def as_ids(groups) -> list:
    return [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups]


def test_fit_optimizer_groups_are_unchanged():
    for head_lr in (None, 5e-3):
        for ratio in (1.0, 4.0):
            cfg = MSPLoRAConfig(levels=LEVELS, lr_ratio_B=ratio, modules_to_save=["classifier"])
            module = fit_module(cfg, lr=1e-3, head_lr=head_lr, weight_decay=0.1)
            opt = module.configure_optimizers()["optimizer"]
            want = reference_groups(module, 1e-3, head_lr, 0.1)
            assert as_ids(opt.param_groups) == as_ids(want)
            assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.999)
            assert len(opt._optimizer_step_pre_hooks) == 1  # the per-level step hooks (lr_scale != 1)


def test_trainer_users_get_the_same_groups_through_peft():
    cfg = MSPLoRAConfig(targets=["query", "value"], levels=LEVELS, lr_ratio_B=4.0)
    pm = get_peft_model(copy.deepcopy(tiny_bert()), MSPLoRAPeftConfig.from_msplora(cfg, task_type="SEQ_CLS"))
    groups = param_groups(pm, lr=1e-3, head_lr=5e-3, weight_decay=0.1)
    bank = msplora.get_bank(pm.get_base_model())
    a = [id(kb.A) for kb in bank.kinds.values()]
    b = [id(kb.B) for kb in bank.kinds.values()]
    by_lr = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in groups}
    assert by_lr[(1e-3, 0.1)] == set(a) and by_lr[(4e-3, 0.1)] == set(b)  # LoRA+: B at lr x 4
    head = {id(p) for n, p in pm.named_parameters() if ".modules_to_save." in n and p.requires_grad}
    assert by_lr[(5e-3, 0.1)] | by_lr[(5e-3, 0.0)] == head
    opt = create_optimizer(pm, lr=1e-3)
    # one AdamW step (B's first step: B starts at zero, A gets no gradient yet) moves each element
    # by lr x multiplier x sign(grad): the global level's B columns (lr_scale 0.5) half as far as
    # the mid level's (1), both at lr x lr_ratio_B
    kb = bank.kinds["query"]
    before = kb.B.detach().clone()
    pm.train()
    pm(input_ids=torch.randint(0, 100, (2, 7)), labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    moved = (kb.B.detach() - before).abs()
    torch.testing.assert_close(moved[:, :8].amax(), torch.tensor(0.5 * 4e-3), rtol=1e-2, atol=0)  # Adam eps: ~0.2 %
    torch.testing.assert_close(moved[:, 8:20].amax(), torch.tensor(4e-3), rtol=1e-2, atol=0)  # Adam eps: ~0.2 %


def test_fit_schedule_is_transformers_linear_warmup_step_for_step():
    """The fit's schedule (msplora.optim.linear_warmup_decay) gives transformers'
    get_linear_schedule_with_warmup's lrs exactly, and resumes from its state (checkpoints
    written before the switch)."""
    from transformers import get_linear_schedule_with_warmup

    from msplora.optim import linear_warmup_decay

    def opt():
        return torch.optim.AdamW(
            [
                {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3},
                {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 2e-3},
            ]
        )

    for warmup, total in ((0, 10), (3, 10), (10, 10), (5, 3), (1, 1), (6, 345)):
        ours, theirs = linear_warmup_decay(opt(), warmup, total), get_linear_schedule_with_warmup(opt(), warmup, total)
        seen = []
        for _ in range(total + 3):
            assert ours.get_last_lr() == theirs.get_last_lr()
            seen.append(ours.get_last_lr()[0])
            for s in (ours, theirs):
                s.optimizer.step()
                s.step()
        assert seen[-1] == 0.0 and max(seen) <= 1e-3
        resumed = linear_warmup_decay(opt(), warmup, total)
        resumed.load_state_dict(theirs.state_dict())
        assert resumed.last_epoch == theirs.last_epoch and resumed.get_last_lr() == theirs.get_last_lr()

    cfg = MSPLoRAConfig(levels=LEVELS, modules_to_save=["classifier"])
    sched = fit_module(cfg, max_steps=12, lr=1e-3, head_lr=5e-3, warmup_ratio=0.25).configure_optimizers()[
        "lr_scheduler"
    ]["scheduler"]
    ref = get_linear_schedule_with_warmup(copy.deepcopy(sched.optimizer), 3, 12)
    for _ in range(12):
        assert sched.get_last_lr() == ref.get_last_lr()
        for s in (sched, ref):
            s.optimizer.step()
            s.step()


def test_a_fit_imports_neither_peft_nor_bitsandbytes():
    """transformers' scheduler module imports its trainer, hence peft and bitsandbytes (seconds,
    and a bitsandbytes kernel message in the log of every fit); the fit's own path does not."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from msplora import MSPLoRAConfig\n"
        "from tests.tiny import fit_module\n"
        "cfg = MSPLoRAConfig(levels=[{'share': 'global', 'rank': 2}], modules_to_save=['classifier'])\n"
        "fit_module(cfg, max_steps=4, lr=1e-3).configure_optimizers()\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'peft', 'bitsandbytes'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
