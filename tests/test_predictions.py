"""Per-example predictions in a run's record: encoded compactly, in dataset order, and they
recompute the metrics the run logged (so a paired comparison reads the same numbers)."""

from __future__ import annotations

import numpy as np
import pytest

from msplora.training.predictions import decode, encode
from msplora.training.run import compose, fit
from tests.conftest import REPO, run_ddp_script
from tests.test_run_api import tiny

BASE = REPO / "configs" / "base.yaml"


@pytest.mark.parametrize(
    "pred, label, regression, fmt",
    [
        ([0, 1, 1, 0], [1, 1, 0, 0], False, "digits"),
        ([0, 12, 3], [12, 0, 3], False, "ints"),
        ([0.1234567, -2.5, 4.0], [0.0, 1.5, 5.0], True, "floats"),
        ([], [], False, "digits"),
    ],
)
def test_encode_decode_round_trip(pred, label, regression, fmt):
    rec = encode(np.array(pred), np.array(label), regression)
    assert rec["format"] == fmt and rec["n"] == len(pred)
    p, y = decode(rec)
    assert np.allclose(p, pred, rtol=1e-6) and np.allclose(y, label)
    assert p.dtype == (np.float64 if regression else np.int64)


def test_decode_refuses_a_record_that_does_not_add_up():
    rec = encode(np.array([0, 1]), np.array([1, 1]), False)
    with pytest.raises(ValueError, match="n=3"):
        decode({**rec, "n": 3})
    with pytest.raises(ValueError, match="unknown predictions format"):
        decode({**rec, "format": "pickle"})


def test_a_run_records_val_and_test_predictions_that_recompute_its_metrics(tmp_path, tiny_bert_dir):
    setup = compose([BASE], tiny(tiny_bert_dir), root_dir=tmp_path)
    result = fit(setup, test=True)
    preds = result.metrics["predictions"]
    dm = setup.datamodule
    # test: the dev split (the carved validation is "val"), every row, in dataset order
    p, y = decode(preds["test"]["test"])
    assert len(p) == len(dm.datasets["test"]) == 32
    assert y.tolist() == list(dm.raw["test"]["label"])
    assert (p == y).mean() == pytest.approx(result.test_value, abs=1e-6)
    # val: the predictions of the best validation, which gave result.value
    p, y = decode(preds["val"]["val"])
    assert y.tolist() == list(dm.raw["validation"]["label"])
    assert (p == y).mean() == pytest.approx(result.value, abs=1e-6)


def test_regression_predictions_are_values(tmp_path, tiny_bert_dir, glue_dir):
    overrides = tiny(tiny_bert_dir) | {"data.init_args.task": "stsb", "data.init_args.data_dir": str(glue_dir)}
    overrides["trainer.max_epochs"] = 1
    result = fit(compose([BASE], overrides, root_dir=tmp_path), test=True)
    p, y = decode(result.metrics["predictions"]["test"]["test"])
    assert p.dtype == np.float64 and len(p) == len(y) == 32
    pearson = np.corrcoef(p, y)[0, 1]
    assert pearson == pytest.approx(result.test["test/pearson"], abs=1e-4)


DDP_SCRIPT = """
import json, sys
import torch
import msplora
from msplora.training.cli import cli_main
cli = cli_main(sys.argv[1:])
rank = cli.trainer.global_rank
bank = msplora.get_bank(cli.model.model)
torch.save({k: v.detach().clone() for k, v in bank.state_dict().items()}, f"{cli.trainer.default_root_dir}/rank{rank}.pt")
if rank == 0:
    dm = cli.datamodule
    with open(f"{cli.trainer.default_root_dir}/val_labels.json", "w") as f:
        json.dump(list(dm.raw["validation"]["label"]), f)
"""


@pytest.mark.slow
def test_ddp_predictions_come_back_in_dataset_order(tmp_path, tiny_bert_dir):
    """2 ranks each see every other row (and rank 1 a padded repeat of row 0): the record holds
    every row once, in order, so its labels equal the split's."""
    import json

    over = tiny(tiny_bert_dir) | {"trainer.max_epochs": 1, "data.init_args.max_eval_samples": 31}
    args = ["fit", "--config", str(BASE), *[f"--{k}={v}" for k, v in over.items()]]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.devices=2", "--trainer.strategy=ddp"]
    run_ddp_script(DDP_SCRIPT, args, tmp_path)
    m = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    p, y = decode(m["predictions"]["val"]["val"])
    labels = json.loads((tmp_path / "val_labels.json").read_text())
    assert len(p) == len(labels) and y.tolist() == labels
    # the logged metric counts the sampler's padding (row 0 twice): 32 rows for 31; the record does not
    correct = (p == y).astype(float)
    assert (correct.sum() + correct[0]) / 32 == pytest.approx(m["value"], abs=1e-6)
