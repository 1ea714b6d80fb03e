"""A refusal changes nothing; an operation is all-or-nothing.

One table of refusing operations (merge / merge_and_unload with safe=True, load_adapter of
adapters that do not fit or cannot be read, inject, disable_adapters whose body raises),
each run on every pyramid variant of the table in tests/tiny.py: snapshot the model, let
the operation refuse, and require every tensor bit-identical, and requires_grad, module
types, train/eval and merged flags unchanged.
"""

from __future__ import annotations

import copy
import importlib
import json
import shutil

import pytest
import torch
from torch import nn

import msplora
from msplora import ConfigError, MSPLoRAConfig
from tests.tiny import VARIANTS, assert_same, inputs, logits, randomize_adapter, snapshot, tiny_bert

inject_module = importlib.import_module("msplora.inject")  # `msplora.inject` is the function
injection = importlib.import_module("msplora.inject.injection")  # where inject() finds the wrapper class


def config(variant: str, **overrides) -> MSPLoRAConfig:
    # dropout as in every shipped config, so the wrappers hold a real nn.Dropout
    kw = dict(targets=["query", "value"], levels=copy.deepcopy(VARIANTS[variant]), dropout=0.05)
    return MSPLoRAConfig(**{**kw, "modules_to_save": ["classifier"], **overrides})


def adapted(variant: str, seed: int = 2, head_out: int | None = None):
    model = tiny_bert()
    if head_out is not None:  # a task head of another shape (another number of labels)
        model.classifier = nn.Linear(model.classifier.in_features, head_out)
    msplora.inject(model, config(variant))
    randomize_adapter(model, seed)
    return model


@torch.no_grad()
def poison_last_layer(model) -> None:
    """An infinite delta in the last wrapped layer only, so a merge that goes layer by layer
    has merged all the others before it meets it: its finest level's cell is its own."""
    _, layer = list(msplora.wrapped_layers(model))[-1]
    assert layer.bank.levels[-1].share == "layer"
    layer.bank.B[:, layer.rows[-1]] = float("inf")


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """variant -> {kind of adapter -> directory}, built once per variant."""
    cache: dict[str, dict] = {}

    def get(variant: str) -> dict:
        if variant in cache:
            return cache[variant]
        root = tmp_path_factory.mktemp(f"ad_{variant}")
        good = msplora.save_adapter(adapted(variant, seed=5), root / "good")
        other = "lora" if variant != "lora" else "paper"
        dirs = {
            "good": good,
            "other_head": msplora.save_adapter(adapted(variant, head_out=3), root / "other_head"),
            "other_variant": msplora.save_adapter(adapted(other), root / "other_variant"),
        }

        def broken(name: str, file: str, content: bytes | None = None, truncate: bool = False):
            d = root / name
            shutil.copytree(good, d)
            f = d / file
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if truncate else content)
            dirs[name] = d

        broken("truncated_weights", "adapter_model.safetensors", truncate=True)
        # a pickle where safetensors belong: must be refused, never unpickled
        pickled = root / "pickled.bin"
        torch.save(inject_module.adapter_state_dict(adapted(variant)), pickled)
        broken("pickled_weights", "adapter_model.safetensors", pickled.read_bytes())
        broken("truncated_json", "adapter_config.json", truncate=True)
        broken("json_list", "adapter_config.json", b"[1, 2]")
        info = json.loads((good / "adapter_config.json").read_text())
        info["config"]["levels"][0]["share"] = "cell"
        broken("invalid_config", "adapter_config.json", json.dumps(info).encode())
        del info["layout"]
        broken("no_layout", "adapter_config.json", json.dumps(info).encode())
        cache[variant] = dirs
        return dirs

    return get


def start(state: str, variant: str):
    """The model an operation starts from: a plain base (eval), an injected model in
    training (train mode), a merged one for inference (eval), or one with a poisoned layer."""
    if state == "base":
        return tiny_bert()
    model = adapted(variant)
    if state == "training":
        model.train()
    elif state == "merged":
        msplora.merge(model)
    elif state == "poisoned":
        poison_last_layer(model)
    return model


class FailsOnThirdWrap(injection.MSPLoRALinear):
    """Stands in for the wrapper class to make inject fail half-way through swapping."""

    made = 0

    def __init__(self, *args, **kwargs):
        type(self).made += 1
        if type(self).made == 3:
            raise RuntimeError("simulated failure while wrapping")
        super().__init__(*args, **kwargs)


def inject_failing_half_way(model, variant):
    FailsOnThirdWrap.made = 0
    orig = injection.MSPLoRALinear
    injection.MSPLoRALinear = FailsOnThirdWrap
    try:
        msplora.inject(model, config(variant))
    finally:
        injection.MSPLoRALinear = orig


def disable_and_raise(model, variant):
    with msplora.disable_adapters(model):
        logits(model, inputs())
        raise RuntimeError("body failed")


def load(kind: str):
    return lambda model, variant, dirs: msplora.load_adapter(model, dirs(variant)[kind])


# name -> (start state, operation(model, variant, dirs), exception, text in the message)
REFUSALS = {
    "merge_safe_nonfinite": (
        "poisoned",
        lambda m, v, d: msplora.merge(m, safe=True),
        ConfigError,
        "nothing was merged",
    ),
    "merge_and_unload_safe_nonfinite": (
        "poisoned",
        lambda m, v, d: msplora.merge_and_unload(m, safe=True),
        ConfigError,
        "nothing was merged",
    ),
    "merge_and_unload_without_adapter": ("base", lambda m, v, d: msplora.merge_and_unload(m), ConfigError, "Fix:"),
    "load_other_head_into_base": ("base", load("other_head"), ConfigError, "wrong shape ['modules_to_save"),
    "load_other_head_into_training": ("training", load("other_head"), ConfigError, "wrong shape ['modules_to_save"),
    "load_other_head_into_merged": ("merged", load("other_head"), ConfigError, "wrong shape ['modules_to_save"),
    "load_other_variant_into_merged": ("merged", load("other_variant"), ConfigError, "differs"),
    "load_truncated_weights_into_base": ("base", load("truncated_weights"), ConfigError, "Fix:"),
    "load_truncated_weights_into_merged": ("merged", load("truncated_weights"), ConfigError, "Fix:"),
    "load_pickled_weights_into_base": ("base", load("pickled_weights"), ConfigError, "Fix:"),
    "load_truncated_json_into_base": ("base", load("truncated_json"), ConfigError, "not valid JSON"),
    "load_truncated_json_into_training": ("training", load("truncated_json"), ConfigError, "not valid JSON"),
    "load_json_list_into_base": ("base", load("json_list"), ConfigError, "not an MSPLoRA adapter config"),
    "load_invalid_config_into_base": ("base", load("invalid_config"), ConfigError, "unknown scheme"),
    "load_no_layout_into_base": ("base", load("no_layout"), ConfigError, "'layout'"),
    "inject_into_adapted": ("training", lambda m, v, d: msplora.inject(m, config(v)), ConfigError, "already has"),
    "inject_unknown_head": (
        "base",
        lambda m, v, d: msplora.inject(m, config(v, modules_to_save=["no_such_head"])),
        ConfigError,
        "no_such_head",
    ),
    "inject_fails_half_way": ("base", lambda m, v, d: inject_failing_half_way(m, v), RuntimeError, "simulated"),
    "disable_adapters_body_raises_merged": ("merged", lambda m, v, d: disable_and_raise(m, v), RuntimeError, "body"),
    "disable_adapters_body_raises_training": (
        "training",
        lambda m, v, d: disable_and_raise(m, v),
        RuntimeError,
        "body",
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", REFUSALS)
def test_refusal_changes_nothing(case, variant, adapter_dirs):
    state, op, error, needle = REFUSALS[case]
    model = start(state, variant)
    before = snapshot(model)
    with pytest.raises(error) as e:
        op(model, variant, adapter_dirs)
    message = str(e.value)
    assert needle in message
    if error is ConfigError:
        assert "Fix:" in message
        assert "weights_only" not in message  # never advise unpickling an untrusted file
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_into_merged_model(variant, adapter_dirs):
    """The old delta leaves W before the new A/B arrive: outputs are the loaded adapter's,
    the layers stay merged, and unmerge gives back the base weights."""
    good = adapter_dirs(variant)["good"]
    base = tiny_bert()
    reference = msplora.load_adapter(copy.deepcopy(base), good)  # same adapter, never merged
    model = adapted(variant)  # another adapter (seed 2 vs 5) ...
    msplora.merge(model)  # ... merged into W
    msplora.load_adapter(model, good)
    assert all(layer.merged for _, layer in msplora.wrapped_layers(model))
    x = inputs()
    with torch.no_grad():
        # merged vs unmerged forward: same tolerance as test_core's merge equivalence
        torch.testing.assert_close(logits(model, x), logits(reference, x), atol=1e-5, rtol=1e-5)
    msplora.unmerge(model)
    base_weights = {n: m.weight for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    eps = torch.finfo(torch.float32).eps
    for name, layer in msplora.wrapped_layers(model):
        w0 = base_weights[name]
        # W went through four roundings (+old, -old, +new, -new), each at most half an ulp
        # of the largest value involved: bound 4 eps (|W| + |delta|), not an arbitrary atol.
        # Before the fix it was off by the old delta (up to ~0.3 here).
        bound = 4 * eps * (w0.abs().max() + layer.delta_weight().abs().max()).item()
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=bound, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_safe_merge_merges_all_when_finite(variant):
    """The check-first path still merges every layer, and the result equals the unsafe merge."""
    model = adapted(variant)
    plain = copy.deepcopy(model)
    msplora.merge(model, safe=True)
    msplora.merge(plain)
    for (_, a), (_, b) in zip(msplora.wrapped_layers(model), msplora.wrapped_layers(plain)):
        assert a.merged and b.merged
        assert torch.equal(a.base_layer.weight, b.base_layer.weight)


def test_disable_adapters_nests_and_restores_merged_weights_exactly():
    model = adapted("paper")
    msplora.merge(model)
    before = snapshot(model)
    x = inputs()
    with torch.no_grad():
        base_out = logits(tiny_bert(), x)
        with msplora.disable_adapters(model):
            with msplora.disable_adapters(model):
                pass
            # the inner block's exit must not switch the adapter back on inside the outer one
            assert all(layer.disabled for _, layer in msplora.wrapped_layers(model))
            torch.testing.assert_close(logits(model, x), base_out, atol=1e-5, rtol=1e-5)
    # merged weights put back bit for bit, not re-merged (which would round twice more)
    assert_same(before, snapshot(model))
