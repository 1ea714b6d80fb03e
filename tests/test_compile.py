"""Opt-in torch.compile of the fit (model.compile): bucketed padding, and the same run as eager
up to float noise. The aot_eager backend traces and runs the graph without a C++ build, so the
wiring is tested quickly here; `make bench` times inductor itself."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import msplora
from msplora.training.run import compose, fit
from tests.conftest import REPO
from tests.test_run_api import tiny

BASE = REPO / "configs" / "base.yaml"


def _adapter(result) -> dict[str, torch.Tensor]:
    return load_file(result.run_dir / "best_adapter" / "adapter_model.safetensors")


def test_bucketing_pads_to_a_multiple_and_masks_the_pads(tiny_bert_dir):
    setup = compose([BASE], tiny(tiny_bert_dir) | {"model.compile": "aot_eager", "model.compile_bucket": 16})
    module = setup.model
    module.configure_model()
    batch = {
        "input_ids": torch.ones(3, 21, dtype=torch.long),
        "attention_mask": torch.ones(3, 21, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0]),
    }
    out = module._bucketed(batch)
    assert out["input_ids"].shape == (3, 32) and out["attention_mask"][:, 21:].sum() == 0
    assert torch.equal(out["labels"], batch["labels"])  # one label per row: not a sequence
    assert torch.equal(out["input_ids"][:, 21:], torch.full((3, 11), module.model.config.pad_token_id or 0))
    assert module._bucketed({**batch, "input_ids": torch.ones(3, 32, dtype=torch.long)})["input_ids"].shape[1] == 32


def test_a_compiled_fit_equals_the_eager_one(tmp_path, tiny_bert_dir):
    """Without bucketing the compiled fit draws the same dropout masks, so it is the eager run up to
    float noise. (With bucketing the masks are drawn over padded shapes: the same run under other
    random draws, like another seed; see the next test for why the padding itself changes nothing.)"""
    eager = fit(compose([BASE], tiny(tiny_bert_dir), root_dir=tmp_path / "eager"), test=True)
    over = tiny(tiny_bert_dir) | {"model.compile": "aot_eager", "model.compile_bucket": 1}
    compiled = fit(compose([BASE], over, root_dir=tmp_path / "compiled"), test=True)
    assert compiled.value == pytest.approx(eager.value, abs=1e-6)
    assert compiled.test_value == pytest.approx(eager.test_value, abs=1e-6)
    a, b = _adapter(eager), _adapter(compiled)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith(".B"))  # it trained


def test_bucketed_padding_does_not_change_what_the_model_computes(tiny_bert_dir):
    """Eval mode (no dropout): logits of a batch and of its bucketed copy agree to float noise (the
    module is built without a DataModule here, so as a causal LM: logits per position)."""
    setup = compose([BASE], tiny(tiny_bert_dir) | {"model.compile": "aot_eager", "model.compile_bucket": 16})
    module = setup.model
    module.configure_model()
    module.model.eval()
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(5, 90, (4, 21), generator=g),
        "attention_mask": torch.ones(4, 21, dtype=torch.long),
        "token_type_ids": torch.zeros(4, 21, dtype=torch.long),
    }
    batch["attention_mask"][1, 15:] = 0  # a row with its own padding
    with torch.no_grad():
        plain = module.model(**batch).logits  # the module's own call buckets; the model's does not
        bucketed = module(batch).logits
    assert bucketed.shape[1] == 32
    assert torch.allclose(plain, bucketed[:, :21], atol=1e-5), (plain - bucketed[:, :21]).abs().max()


def test_a_bad_bucket_is_one_line(tmp_path, tiny_bert_dir):
    setup = compose([BASE], tiny(tiny_bert_dir) | {"model.compile": True, "model.compile_bucket": 0}, root_dir=tmp_path)
    with pytest.raises(msplora.ConfigError, match="compile_bucket: 0 .* Fix"):
        setup.model.configure_model()
