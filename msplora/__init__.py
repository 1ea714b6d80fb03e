"""MSPLoRA: Multi-Scale Pyramid LoRA (arXiv 2503.21838) for Hugging Face transformers.

    h = W x + sum_k  s_k * B_{k,c} A_{k,c} drop(x),   c = cell_k(l),   s_k = alpha_k / r_k

    level   cells (12 layers, 3 groups)          rank
    global  [                 0                ]   8
    mid     [     0     ][     1    ][     2   ]   4
    layer   [0][1][2][3][4][5][6][7][8][9][A][B]   2

The core (config, pyramid, layers, inject) needs only torch and transformers.
"""

from msplora.config import ConfigError, Level, MSPLoRAConfig
from msplora.export import export_peft
from msplora.inject import (
    adapter_parameters,
    disable_adapters,
    format_report,
    get_bank,
    inject,
    layer_updates,
    level_updates,
    load_adapter,
    merge,
    merge_and_unload,
    parameter_report,
    reset_adapter,
    save_adapter,
    trainable_parameters,
    unmerge,
    wrapped_layers,
)
from msplora.pyramid import cell_of_layer, group_sizes, parameter_count, rank_schedule

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Level",
    "MSPLoRAConfig",
    "adapter_parameters",
    "cell_of_layer",
    "disable_adapters",
    "export_peft",
    "format_report",
    "get_bank",
    "group_sizes",
    "inject",
    "layer_updates",
    "level_updates",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "parameter_count",
    "parameter_report",
    "rank_schedule",
    "reset_adapter",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
    "wrapped_layers",
]
