"""``make gpu-check`` in its tiny mode on CPU: the whole path runs (both adapters train, the merged
model infers, the MiniLM fit finishes) and the JSON holds every figure, so the GPU run never rots."""

from __future__ import annotations

import json

import pytest

from msplora import gpu_check
from msplora.pyramid import parameter_count


@pytest.mark.slow  # the MiniLM fit: ~15 s on this CPU
def test_tiny_gpu_check_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["tiny"] is True and report["device"] == "cpu" and list(report["shapes"]) == ["tiny"]
    tiny = report["shapes"]["tiny"]
    shape = gpu_check.TINY["tiny"]
    assert tiny["params"] == shape.params == 180_800
    train = tiny["train"]
    qv = {"q_proj": (64, 64), "v_proj": (64, 32)}  # GQA: v_proj is 64 -> 2 heads x 16
    assert train["pyramid"]["trainable_params"] == parameter_count(gpu_check.PYRAMID, 4, qv)
    assert train["peft_lora_r8"]["trainable_params"] == 8 * (128 + 96) * 4
    for variant in ("pyramid", "peft_lora_r8"):
        assert train[variant]["tokens_per_s"] > 0 and train[variant]["step_ms"] > 0
        assert train[variant]["peak_gib"] is None  # CUDA only
    assert train["pyramid"]["estimated_gib"] > 0
    assert train["pyramid/peft_lora_r8_tokens_per_s"] > 0
    assert tiny["inference"]["base_ms"] > 0 and tiny["inference"]["merged/base"] > 0
    glue = report["glue"]
    if "skipped" not in glue:  # the MiniLM wheel is part of `make install`
        assert glue["global_step"] == 2 and glue["wall_s"] > 0
        assert any(k.startswith("val") for k in glue)
    assert report["wall_s"] > 0
