"""The pyramid as data: one dataclass, validated once, (de)serialised as plain dicts.

    h = W x + sum_k  s_k * B_{k,c} A_{k,c} drop(x),   c = cell_k(l),   s_k = alpha_k / r_k

s_k follows ``scale_rule`` (alpha / r by default; alpha / sqrt(r); alpha). Training-only
options live here too, so an ablation overlay or a search trial is one config: per-level
learning-rate multipliers (``lr_scale``, ``lr_rule``) and B's LR ratio (``lr_ratio_B``); see
the README, "Scaling and learning rates per level".

Every check that needs no model lives in ``__post_init__``; checks that need the
model (layer count, target names) run in :func:`msplora.inject`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msplora.errors import ConfigError
from msplora.pyramid import LR_RULES, SCALE_RULES, SHARE_SCHEMES, budget_rank, level_scale, rank_schedule


def _fail(field_name: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{field_name}: {problem}. Fix: {fix}")


@dataclass
class Level:
    """One level of the pyramid: which layers share an (A, B) pair, its rank, scale and LR.

    Args:
        share: ``global`` (one cell: all layers), ``group`` (consecutive layers; set
            ``groups`` or ``group_size``), or ``layer`` (one cell per layer = plain LoRA).
        rank: rank r_k of every cell of this level (>= 1).
        alpha: scale numerator; the update is multiplied by s_k = alpha / rank under the
            default ``scale_rule``.
        groups: for ``share=group``: number of groups G (uneven splits put the extra
            layers in the first groups).
        group_size: for ``share=group``: layers per group S (the last group may be smaller).
        name: key of the level in reports and adapter files; default ``global``, ``mid``
            or ``layer``, with the level index appended when two levels would clash.
        scale_rule: how s_k follows from alpha and rank: ``lora`` alpha / r, ``rslora``
            alpha / sqrt(r), ``constant`` alpha. None = the pyramid's ``scale_rule``.
        lr_scale: this level's learning rate as a multiple of the adapter's (> 0); one
            optimizer step moves the level's A and B rows lr_scale times as far.
    """

    share: str = "layer"
    rank: int = 8
    alpha: float = 16.0
    groups: int | None = None
    group_size: int | None = None
    name: str | None = None
    scale_rule: str | None = None
    lr_scale: float = 1.0

    @property
    def scale(self) -> float:
        """s_k: alpha / rank, alpha / sqrt(rank) or alpha, by ``scale_rule``."""
        return level_scale(self.scale_rule or "lora", self.alpha, self.rank)


def paper_levels() -> list[Level]:
    """The paper's pyramid: global r=8, mid r=4 over 3 groups, layer r=2, alpha 16 each."""
    return [Level("global", 8), Level("group", 4, groups=3), Level("layer", 2)]


@dataclass
class MSPLoRAConfig:
    """MSPLoRA adapter configuration (paper defaults when only ``targets`` is given).

    Args:
        targets: module names to adapt, matched against the last component of each
            module's qualified name (``["query", "value"]``), or one string taken as a
            regular expression that must match the full qualified name.
        levels: ordered coarse -> fine; any number. Default: the paper's global/mid/layer.
        ranks: shortcut: explicit rank per level (overrides the levels' ranks).
        r0: shortcut: rank of the first level; later ranks follow ``decay``.
        decay: geometric factor between consecutive levels' ranks (0.5 halves).
        dropout: dropout on the adapter input; one mask shared by all levels, since all
            levels see the same ``drop(x)`` in the paper's equation.
        fan_in_fan_out: whether base weights are stored (d_in, d_out) as in GPT-2's Conv1D;
            ``None`` detects it per module.
        init: ``lora`` (A kaiming-uniform(a=sqrt(5)), B zero: the model starts equal to the
            base) or ``gaussian`` (A ~ N(0, 1/r), B zero).
        modules_to_save: extra modules (e.g. a task head ``classifier``) trained in full
            and saved with the adapter.
        scale_rule: s_k of every level that does not set its own: ``lora`` s_k = alpha_k / r_k
            (the paper's), ``rslora`` s_k = alpha_k / sqrt(r_k), ``constant`` s_k = alpha_k.
        lr_rule: divides each cell's learning rate by the number n of layers it serves:
            ``none`` (x 1), ``layers`` (x 1/n), ``sqrt_layers`` (x 1/sqrt(n)); on top of each
            level's ``lr_scale``. A per-layer cell has n = 1.
        lr_ratio_B: learning rate of every B as a multiple of A's (LoRA+; 1 = equal).
        budget_of: a pyramid (list of levels) whose adapter parameter count this config
            matches on the model it is injected into: every level of ``levels`` then gets one
            rank, the one whose count is nearest (a tie goes to the smaller rank, at least 1),
            replacing their ``rank``. One per-layer level = the equal-budget plain LoRA.
            Resolved by ``inject``, which keeps the resolved config (``budget_of`` cleared).
    """

    targets: list[str] | str = field(default_factory=lambda: ["query", "value"])
    levels: list[Level] = field(default_factory=paper_levels)
    ranks: list[int] | None = None
    r0: int | None = None
    decay: float | None = None
    dropout: float = 0.05
    fan_in_fan_out: bool | None = None
    init: str = "lora"
    modules_to_save: list[str] = field(default_factory=list)
    scale_rule: str = "lora"
    lr_rule: str = "none"
    lr_ratio_B: float = 1.0
    budget_of: list[Level] | None = None

    def __post_init__(self) -> None:
        self.levels = [lv if isinstance(lv, Level) else Level(**lv) for lv in self.levels]
        if self.budget_of is not None:
            self.budget_of = [lv if isinstance(lv, Level) else Level(**lv) for lv in self.budget_of]
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        self._resolve_rank_shortcuts()
        self._validate()
        self._name_levels()
        # After validation: a level without its own rule takes the pyramid's, so Level.scale
        # and a saved config need no context.
        for lv in self.levels:
            lv.scale_rule = lv.scale_rule or self.scale_rule

    # -- validation -------------------------------------------------------------------------
    def _resolve_rank_shortcuts(self) -> None:
        # The shortcuts are folded into the levels and cleared, so a saved config
        # holds one source of truth and reloading it cannot apply a schedule twice.
        if self.ranks is not None and self.r0 is not None:
            _fail("ranks", "both ranks and r0 given", "use either an explicit list or r0 + decay")
        if self.budget_of is not None and (self.ranks is not None or self.r0 is not None):
            _fail(
                "budget_of",
                "given with ranks / r0, which it would override",
                "drop ranks / r0: budget_of sets the ranks from the model",
            )
        if self.ranks is not None:
            if len(self.ranks) != len(self.levels):
                _fail("ranks", f"{len(self.ranks)} ranks for {len(self.levels)} levels", "give one rank per level")
            for lv, r in zip(self.levels, self.ranks):
                lv.rank = r
        elif self.r0 is not None:
            if not isinstance(self.r0, int) or self.r0 < 1:
                _fail("r0", f"{self.r0!r} is not an integer >= 1", "set r0 to a positive integer such as 8")
            decay = 0.5 if self.decay is None else self.decay
            if not 0 < decay <= 1:
                _fail("decay", f"{decay} is outside (0, 1]", "use e.g. 0.5 to halve the rank at each finer level")
            for lv, r in zip(self.levels, rank_schedule(len(self.levels), self.r0, decay)):
                lv.rank = r
        elif self.decay is not None:
            _fail("decay", "decay given without r0", "also set r0, the first level's rank")
        self.ranks = self.r0 = self.decay = None

    def _validate(self) -> None:
        if not self.levels:
            _fail("levels", "the level list is empty", "give at least one level, e.g. {share: layer, rank: 8}")
        self._validate_levels("levels", self.levels)
        if self.budget_of is not None:
            if not self.budget_of:
                _fail("budget_of", "the budget pyramid is empty", "give its levels, or drop budget_of")
            self._validate_levels("budget_of", self.budget_of)
        if self.scale_rule not in SCALE_RULES:
            _fail("scale_rule", f"unknown rule {self.scale_rule!r}", f"use one of {_rules(SCALE_RULES)}")
        if self.lr_rule not in LR_RULES:
            _fail("lr_rule", f"unknown rule {self.lr_rule!r}", f"use one of {_rules(LR_RULES, 'x ')}")
        if not _positive(self.lr_ratio_B):
            _fail("lr_ratio_B", f"{self.lr_ratio_B!r} is not a positive number", "use e.g. 1 (equal) or 16 (LoRA+)")
        if not 0 <= self.dropout < 1:
            _fail("dropout", f"{self.dropout} is outside [0, 1)", "use e.g. 0.05")
        if self.init not in ("lora", "gaussian"):
            _fail("init", f"unknown init {self.init!r}", "use lora or gaussian")
        if not self.targets:
            _fail("targets", "no target modules", "name the linear maps to adapt, e.g. [query, value]")

    @staticmethod
    def _validate_levels(key: str, levels: list[Level]) -> None:
        for i, lv in enumerate(levels):
            where = f"{key}[{i}]"
            if not isinstance(lv.share, str) or lv.share not in SHARE_SCHEMES:
                _fail(f"{where}.share", f"unknown scheme {lv.share!r}", f"use one of {', '.join(SHARE_SCHEMES)}")
            if isinstance(lv.rank, bool) or not isinstance(lv.rank, int):
                _fail(f"{where}.rank", f"{lv.rank!r} is not an integer", "use a whole number >= 1")
            if lv.rank < 1:
                _fail(f"{where}.rank", f"rank {lv.rank} < 1", "use a rank >= 1, or drop the level")
            if not lv.alpha > 0:
                _fail(f"{where}.alpha", f"alpha {lv.alpha} <= 0", "use a positive alpha such as 16")
            if SHARE_SCHEMES[lv.share].grouped:
                if (lv.groups is None) == (lv.group_size is None):
                    _fail(where, f"a {lv.share} level needs exactly one of groups / group_size", "set e.g. groups: 3")
                if lv.groups is not None and lv.groups < 1:
                    _fail(f"{where}.groups", f"groups {lv.groups} < 1", "use at least 1 group")
                if lv.group_size is not None and lv.group_size < 1:
                    _fail(f"{where}.group_size", f"group_size {lv.group_size} < 1", "use at least 1 layer per group")
            elif lv.groups is not None or lv.group_size is not None:
                grouped = " or ".join(s.name for s in SHARE_SCHEMES.values() if s.grouped)
                _fail(where, f"groups/group_size given for share={lv.share}", f"set share: {grouped}, or drop them")
            if lv.scale_rule is not None and lv.scale_rule not in SCALE_RULES:
                _fail(
                    f"{where}.scale_rule",
                    f"unknown rule {lv.scale_rule!r}",
                    f"use one of {_rules(SCALE_RULES)}, or drop it to use the pyramid's scale_rule",
                )
            if not _positive(lv.lr_scale):
                _fail(f"{where}.lr_scale", f"{lv.lr_scale!r} is not a positive number", "use e.g. 1 (the adapter's LR)")
        for scheme in SHARE_SCHEMES.values():
            if scheme.only_one and sum(lv.share == scheme.name for lv in levels) > 1:
                _fail(key, f"more than one {scheme.name} level", scheme.only_one)

    def _name_levels(self) -> None:
        defaults = [lv.name or SHARE_SCHEMES[lv.share].level_name for lv in self.levels]
        for i, lv in enumerate(self.levels):
            if lv.name is None:
                lv.name = defaults[i] if defaults.count(defaults[i]) == 1 else f"{defaults[i]}{i}"
        names = [lv.name for lv in self.levels]
        if len(set(names)) != len(names):
            _fail("levels[].name", f"duplicate level names {names}", "give each level a distinct name")
        if any("." in n for n in names):
            _fail("levels[].name", f"a name contains '.': {names}", "use names without dots")

    # -- resolution on a model ----------------------------------------------------------------
    def resolve_budget(self, layout: dict[str, tuple[int, int, int]]) -> MSPLoRAConfig:
        """This config with ``budget_of`` turned into ranks for ``layout`` (target kind ->
        (adapted layers, d_in, d_out)); ``self`` when there is no ``budget_of``. A copy: the
        caller's config is not changed. Raises ConfigError (changing nothing) when the budget
        pyramid's groups do not fit the layers."""
        if self.budget_of is None:
            return self
        for kind, (n, _, _) in layout.items():
            for i, lv in enumerate(self.budget_of):
                if (lv.groups or 0) > n or (lv.group_size or 0) > n:
                    _fail(
                        f"budget_of[{i}]",
                        f"{lv.groups or lv.group_size} {'groups' if lv.groups else 'layers per group'} "
                        f"for {n} adapted layers of {kind}",
                        f"use at most {n}",
                    )
        rank = budget_rank([vars(lv) for lv in self.budget_of], [vars(lv) for lv in self.levels], layout)
        resolved = copy.deepcopy(self)
        for lv in resolved.levels:
            lv.rank = rank
        resolved.budget_of = None
        return resolved

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict; the scale / LR options appear only where they differ from their
        defaults, so a default config is written (adapter files, hparams) exactly as before
        they existed, and older readers still read it."""
        d = dataclasses.asdict(self)
        for k in ("ranks", "r0", "decay"):
            d.pop(k)
        for k, default in _OPTION_DEFAULTS.items():
            if d[k] == default:
                d.pop(k)
        for lv in [*d["levels"], *(d.get("budget_of") or [])]:
            if lv["scale_rule"] in (None, self.scale_rule):  # None, or the pyramid's: implied
                lv.pop("scale_rule")
            if lv["lr_scale"] == 1.0:
                lv.pop("lr_scale")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MSPLoRAConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            _fail(
                ", ".join(sorted(unknown)),
                "unknown config keys",
                f"use only {[f.name for f in dataclasses.fields(cls)]}",
            )
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write JSON (``.json``) or YAML (any other suffix)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2))
        else:
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> MSPLoRAConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file. Fix: check the path")
        if path.suffix == ".json":
            from msplora.io import read_json

            return cls.from_dict(read_json(path, "pyramid config", fix="correct the JSON at that place"))
        import yaml

        return cls.from_dict(yaml.safe_load(path.read_text()))

    @property
    def total_rank(self) -> int:
        return sum(lv.rank for lv in self.levels)


# The scaling and learning-rate options and their defaults (left out of to_dict when at them).
_OPTION_DEFAULTS = {"scale_rule": "lora", "lr_rule": "none", "lr_ratio_B": 1.0, "budget_of": None}


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _rules(rules: dict[str, str], prefix: str = "") -> str:
    return ", ".join(f"{name} ({prefix}{formula})" for name, formula in rules.items())


def scale_lr_options(
    levels: list[dict[str, Any]],
    scale_rule: str = "lora",
    lr_scales: list[float] | None = None,
    lr_rule: str = "none",
    lr_ratio_B: float = 1.0,
) -> dict[str, Any]:
    """The ``model.pyramid`` keys for a sampled pyramid with these scale / LR options: what a
    search trial calls after sampling, so trial configs and ablation overlays are one format.

    ``levels``: dicts as the search builds them (share, rank, alpha, groups / group_size);
    ``lr_scales``: one multiplier per level (None = 1 each). Validated through
    :class:`MSPLoRAConfig` (ConfigError naming the field), nothing else is touched. Options at
    their defaults are left out, so a default trial's config is what it was before them.
    """
    levels = [dict(lv) for lv in levels]
    if lr_scales is not None:
        if len(lr_scales) != len(levels):
            _fail("lr_scales", f"{len(lr_scales)} multipliers for {len(levels)} levels", "give one per level")
        for lv, m in zip(levels, lr_scales):
            if m != 1.0:
                lv["lr_scale"] = m
    out: dict[str, Any] = {"levels": levels}
    for key, value, default in (
        ("scale_rule", scale_rule, "lora"),
        ("lr_rule", lr_rule, "none"),
        ("lr_ratio_B", lr_ratio_B, 1.0),
    ):
        if value != default:
            out[key] = value
    MSPLoRAConfig(**copy.deepcopy(out))  # validate: raises ConfigError naming the field
    return out
