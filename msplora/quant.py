"""Quantized bases (QLoRA-style): bitsandbytes 4-bit (nf4, fp4) and 8-bit (LLM.int8) linears.

The wrapper (:class:`msplora.layers.MSPLoRALinear`) keeps the quantized map frozen and adds the
pyramid's delta beside it, in the adapter's fp32::

    h = Q(W) x + (B * s) @ (A @ drop(x))        Q(W): uint8-packed 4-bit or int8, never trained
        \\_ bnb kernel, x's dtype _/ \\_ fp32: x cast in, the sum cast back to Q(W) x's dtype _/

Merging cannot add a delta into a quantized weight without rounding it again::

    W' = Q(deq(Q(W)) + delta)        error = max |deq(W') - (deq(Q(W)) + delta)|, measured

so :func:`merge_weight` returns the measured error (``msplora.merge`` warns once with the
largest), and keeps the pre-merge weight object so that unmerge puts it back bit for bit
instead of rounding a second time.

bitsandbytes is optional (``pip install 'msplora[quant]'``): nothing here imports it unless a
quantized model is asked for; :func:`is_quantized` only looks in ``sys.modules``, since a model
can hold a bnb layer only once bnb has been imported.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn

from msplora.config import ConfigError

QUANTIZE = ("nf4", "fp4", "int8")  # values of the `model.quantize` key (None: no quantization)


class RequantizationWarning(UserWarning):
    """A delta was merged into a quantized weight, which was rounded again."""


def import_bnb(field: str = "model.quantize"):
    """bitsandbytes, or a :class:`ConfigError` that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(
            f"{field}: a quantized base needs bitsandbytes, which does not import ({e}). "
            "Fix: pip install 'msplora[quant]' (bitsandbytes>=0.50), or set it to null"
        ) from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (nf4 / fp4) or ``Linear8bitLt``."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a quantized linear: from the layer, since a 4-bit weight is stored
    packed, (d_in * d_out / 2, 1) uint8."""
    return module.in_features, module.out_features


def quantization_config(quantize: str, compute_dtype: torch.dtype, skip: list[str] | None = None):
    """The ``transformers.BitsAndBytesConfig`` for ``quantize`` (nf4, fp4, int8), for
    ``from_pretrained(..., quantization_config=...)``; checks that bitsandbytes imports first.
    ``skip``: module names left unquantized (a head that trains); None = transformers' default."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"model.quantize: {quantize!r} is not one of {list(QUANTIZE)}. Fix: use one, or null")
    import_bnb()
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,  # transformers' name for both widths
    )


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, sys.modules["bitsandbytes"].nn.Linear4bit)


def _unpack_cpu_layout(module: nn.Module) -> None:
    """bnb >= 0.50 repacks a 4-bit weight in place into a CPU-kernel layout on its first
    eval-mode, no-grad forward on a CPU with AVX512-BF16; ``dequantize_4bit`` does not read that
    layout. bnb's own ``_save_to_state_dict`` converts it back (lossless), so the public
    ``state_dict()`` is the way to get the standard layout without calling a private function."""
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        module.state_dict()


def keep_trainable_layout(model: nn.Module) -> None:
    """Keep every 4-bit linear of ``model`` in the layout its backward works with.

    On a CPU with AVX512-BF16, bnb 0.50's ``Linear4bit`` repacks its weight on the first eval,
    no-grad forward (Lightning's sanity validation is one) for a faster inference kernel, and
    keeps that layout: every later forward, in training too, runs that kernel, which has no
    backward, so no gradient reaches the layers below and the adapter silently stops learning
    (and the kernel fails outright for d_out or d_in under 64). ``support_avx512bf16_for_cpu``
    (a public attribute of the layer, set once at its init) turns the repack off; CPU inference
    then dequantises as training does. Elsewhere (CUDA) nothing changes."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _unpack_cpu_layout(module)
            module.support_avx512bf16_for_cpu = False


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """deq(Q(W)) of a quantized linear as fp32, shape (d_out, d_in)."""
    F = import_bnb().functional
    if _is_4bit(module):
        _unpack_cpu_layout(module)
        w = module.weight
        return F.dequantize_4bit(w.data, w.quant_state).float().reshape(module.out_features, module.in_features)
    cb, scb = module.weight.data, _int8_scales(module)
    return F.int8_vectorwise_dequant(cb, scb).float()  # CB * SCB / 127 per row


def _int8_scales(module: nn.Module) -> torch.Tensor:
    # Row scales live on the weight until the first forward moves them to the matmul state.
    scb = getattr(module.weight, "SCB", None)
    return module.state.SCB if scb is None else scb


def _take(module: nn.Module) -> tuple[nn.Parameter, Any]:
    """The module's weight object and what travels with it (4-bit: its quant state; 8-bit: its
    row scales), so :func:`_put` can install it again unchanged."""
    if _is_4bit(module):
        _unpack_cpu_layout(module)
        return module.weight, module.weight.quant_state
    return module.weight, _int8_scales(module)


def _put(module: nn.Module, handle: tuple[nn.Parameter, Any]) -> None:
    weight, state = handle
    if _is_4bit(module):
        weight.quant_state = state
        module.weight = weight
        module.quant_state = state
        return
    weight.CB, weight.SCB = weight.data, state  # as freshly quantized: forward moves them to .state
    module.weight = weight
    module.state.CB = module.state.SCB = None


@torch.no_grad()
def _requantize(module: nn.Module, w: torch.Tensor) -> tuple[nn.Parameter, Any]:
    """A new weight object holding Q(w), in the module's format (block size, quant type,
    storage, dtype); bnb quantizes a not-yet-quantized parameter on ``.to(device)``."""
    bnb = import_bnb()
    old = module.weight
    if _is_4bit(module):
        new = bnb.nn.Params4bit(
            w.to(old.quant_state.dtype),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        ).to(old.device)
        return new, new.quant_state
    new = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False).to(old.device)
    return new, new.SCB


@torch.no_grad()
def merge_weight(module: nn.Module, merged: torch.Tensor) -> tuple[tuple[nn.Parameter, Any], float]:
    """Install Q(merged) as the module's weight. Returns the previous weight (for
    :func:`restore_weight`, bit for bit) and the max abs error the requantisation added."""
    new = _requantize(module, merged)
    old = _take(module)
    _put(module, new)
    return old, float((dequantize(module) - merged.float()).abs().max())


def restore_weight(module: nn.Module, handle: tuple[nn.Parameter, Any]) -> None:
    """Put back a weight that :func:`merge_weight` took out (unmerge: no second rounding)."""
    _put(module, handle)


def snapshot(module: nn.Module) -> tuple[nn.Parameter, Any]:
    """The current weight object, to :func:`restore_weight` later (no copy: merges never write
    into a quantized weight, they install a new one)."""
    return _take(module)


def warn_requantized(errors: list[tuple[str, float]]) -> None:
    """One warning for a merge into quantized weights: how many, and the largest error."""
    if not errors:
        return
    where, worst = max(errors, key=lambda e: e[1])
    warnings.warn(
        f"merge: {len(errors)} quantized base weight(s) were dequantised, added to and quantised again; "
        f"this rounding adds up to {worst:.3g} (max abs, at {where}) to the merged weights. "
        "unmerge() restores the original quantized weights exactly. For an exact merge, load the base "
        "unquantized, load_adapter, then merge_and_unload",
        RequantizationWarning,
        stacklevel=3,
    )
