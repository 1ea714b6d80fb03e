"""Injection into any Hugging Face model with numbered blocks, and what follows from it:
merge / unmerge, adapter save / load, export to ``peft``, parameter reports.

Module names are parsed as ``<stack>.<N>.<path inside the block>``, where the stack ends
in ``layer``, ``layers``, ``h``, ``block`` or ``blocks`` (BERT/RoBERTa, LLaMA, GPT-2, T5, ...).
Target kind = the module's last name (``query``), or its path inside the block where
two targets of one block share a last name; models with several stacks (encoder and
decoder) get one kind per stack.

Modules (each imports only those above it)::

    adapted     get_bank, wrapped_layers, modules_to_save, the save_pretrained guard
    targets     find_targets, target_layout: what would be wrapped, checked
    merging     merge, unmerge, merge_and_unload, disable_adapters
    injection   inject, reset_adapter
    reports     parameter counts and reports, dense updates
    files       save_adapter, load_adapter, read_adapter_config, adapter_state_dict
"""

from __future__ import annotations

from msplora.inject.adapted import (
    _SavePretrainedRefusal,
    get_bank,
    modules_to_save_of,
    release_save_guard,
    wrapped_layers,
)
from msplora.inject.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    adapter_state_dict,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from msplora.inject.injection import inject, reset_adapter
from msplora.inject.merging import disable_adapters, merge, merge_and_unload, unmerge
from msplora.inject.reports import (
    adapter_parameters,
    format_report,
    layer_updates,
    level_updates,
    parameter_report,
    trainable_parameters,
)
from msplora.inject.targets import BLOCK_PATTERN, Target, find_targets, target_layout
from msplora.layers import PREFIX

# _SavePretrainedRefusal stays importable from here for pickles of adapted models made before this
# was a package; no other module outside inject/ uses an underscored name of it.
__all__ = [
    "ADAPTER_CONFIG",
    "BLOCK_PATTERN",
    "ADAPTER_WEIGHTS",
    "FORMAT_VERSION",
    "PREFIX",
    "Target",
    "_SavePretrainedRefusal",
    "modules_to_save_of",
    "adapter_parameters",
    "adapter_state_dict",
    "disable_adapters",
    "find_targets",
    "format_report",
    "get_bank",
    "inject",
    "layer_updates",
    "level_updates",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "parameter_report",
    "read_adapter_config",
    "release_save_guard",
    "reset_adapter",
    "save_adapter",
    "target_layout",
    "trainable_parameters",
    "unmerge",
    "wrapped_layers",
]
