"""The space file (``configs/search/*.yaml``) and define-by-run sampling of one pyramid.

space file --load_space--> Space (validated: every choice list non-empty, every range low <= high)
Space + ModelInfo --check_sampleable--> refused before any trial if nothing can be sampled
trial --sample_levels--> levels (coarse -> fine, ranks non-increasing), lr --overlay_of--> overlay
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from msplora.config import ConfigError
from msplora.pyramid import group_sizes, parameter_count, rank_schedule, short_label
from msplora.resources import resource_root

REPO = resource_root()  # a checkout's folders, else the copy shipped in the wheel
DEFAULT_SPACE = REPO / "configs" / "search" / "default.yaml"


class SearchError(ConfigError):
    """Bad search input or a search that cannot go on; the message reads ``problem. Fix: ...``."""


# -- the space file ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Space:
    """A parsed, validated ``configs/search/*.yaml`` (see configs/search/default.yaml)."""

    name: str
    objective: str = "single"
    direction: str = "maximize"
    max_adapter_params: int | None = None
    space: dict = dataclasses.field(default_factory=dict)
    sampler: dict = dataclasses.field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = dataclasses.field(default_factory=lambda: {"name": "median"})
    configs: list[str] = dataclasses.field(default_factory=lambda: ["configs/base.yaml"])
    fit_args: list[str] = dataclasses.field(default_factory=list)
    enqueue: list[dict] = dataclasses.field(default_factory=list)  # points evaluated first

    @property
    def multi(self) -> bool:
        return self.objective == "multi"

    @property
    def directions(self) -> list[str]:
        return [self.direction, "minimize"] if self.multi else [self.direction]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Space:
        return cls(**d)


_SPACE_KEYS = {"r0", "decay", "n_levels", "grouping", "alpha", "lr"}
# Scale / LR options of the pyramid (README, "Scaling and learning rates per level"); each is
# optional, and a space without them samples exactly what it sampled before they existed.
_OPTION_KEYS = {"scale_rule", "scale", "lr_scale", "lr_rule", "lr_ratio_B"}
_FILE_KEYS = {"objective", "direction", "budget", "space", "sampler", "pruner", "configs", "fit_args", "enqueue"}


def load_space(path: str | Path) -> Space:
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"--space {path}: no such file. Fix: give a file like {DEFAULT_SPACE.relative_to(REPO)}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SearchError(f"{path}: not a mapping. Fix: see {DEFAULT_SPACE.name} for the layout")
    if set(raw) - _FILE_KEYS:
        raise SearchError(f"{path}: unknown keys {sorted(set(raw) - _FILE_KEYS)}. Fix: use only {sorted(_FILE_KEYS)}")
    sp = Space(name=path.stem)
    for k in ("objective", "direction", "sampler", "pruner", "configs", "fit_args", "enqueue"):
        if raw.get(k) is not None:
            setattr(sp, k, raw[k])
    sp.max_adapter_params = (raw.get("budget") or {}).get("max_adapter_params")
    sp.space = raw.get("space") or {}
    _validate_space(sp, path)
    sp.configs = [str(_repo_path(c)) for c in sp.configs]
    return sp


def _repo_path(p: str) -> Path:
    """Config paths in a space file are relative to the working directory, else to the repo."""
    return Path(p) if Path(p).exists() or Path(p).is_absolute() else REPO / p


def _check_spec(key: str, spec: Any, bad, number=(int, float)) -> None:
    """A choice list must be non-empty; a range must have low <= high (and low > 0 if log)."""
    if isinstance(spec, list):
        if not spec:
            bad(
                f"space.{key}",
                "an empty choice list (nothing to sample)",
                f"give at least one value, e.g. {key}: [...]",
            )
        return
    if isinstance(spec, dict):
        lo, hi = spec.get("low"), spec.get("high")
        if set(spec) - {"low", "high", "log"} or not all(isinstance(x, number) for x in (lo, hi)):
            bad(f"space.{key}", f"{spec!r} is not a range", f"write {key}: {{low: A, high: B, log: true|false}}")
        if lo > hi or not all(math.isfinite(x) for x in (lo, hi)):
            bad(f"space.{key}", f"low {lo} > high {hi} (an empty range)", "swap them, or give a list of values")
        if spec.get("log") and lo <= 0:
            bad(f"space.{key}", f"log range with low {lo} <= 0", "use a positive low, or log: false")


def _validate_space(sp: Space, path: Path) -> None:
    def bad(field: str, problem: str, fix: str) -> None:
        raise SearchError(f"{path}: {field}: {problem}. Fix: {fix}")

    if sp.objective not in ("single", "multi"):
        bad("objective", f"{sp.objective!r} is unknown", "use single or multi")
    if sp.direction not in ("maximize", "minimize"):
        bad("direction", f"{sp.direction!r} is unknown", "use maximize or minimize")
    known = _SPACE_KEYS | _OPTION_KEYS
    if set(sp.space) - known:
        bad("space", f"unknown keys {sorted(set(sp.space) - known)}", f"use only {sorted(known)}")
    for k in ("scale", "lr_scale", "lr_ratio_B"):
        if sp.space.get(k) is not None:
            _check_spec(k, sp.space[k], bad)
            spec = sp.space[k]
            values = spec if isinstance(spec, list) else [spec["low"], spec["high"]]
            if not all(isinstance(x, (int, float)) and x > 0 for x in values):
                bad(f"space.{k}", f"{spec!r} has values <= 0", f"use positive values, e.g. {k}: [1, 2, 4]")
    for k, allowed in (("scale_rule", ("lora", "rslora", "constant")), ("lr_rule", ("none", "layers", "sqrt_layers"))):
        v = sp.space.get(k)
        if v is not None and not (isinstance(v, list) and v and set(v) <= set(allowed)):
            bad(f"space.{k}", f"{v!r} is not a non-empty list of {list(allowed)}", f"e.g. {k}: {list(allowed)}")
    for k in ("r0", "n_levels"):
        v = sp.space.get(k)
        if not (isinstance(v, list) and v and all(isinstance(x, int) and x >= 1 for x in v)):
            bad(f"space.{k}", f"{v!r} is not a non-empty list of integers >= 1", f"e.g. {k}: [1, 2, 3, 4]")
    if max(sp.space["n_levels"]) > 4:
        bad("space.n_levels", "more than 4 levels", "use values from 1 (plain LoRA) to 4")
    for k in ("decay", "alpha", "lr"):
        if sp.space.get(k) is not None:
            _check_spec(k, sp.space[k], bad)
    d = sp.space.get("decay", [0.5])
    values = d if isinstance(d, list) else [d.get("low"), d.get("high")] if isinstance(d, dict) else [d]
    if not all(isinstance(x, (int, float)) and 0 < x <= 1 for x in values):
        bad("space.decay", f"{d!r} is not in (0, 1]", "ranks must not grow toward finer levels: e.g. [0.25, 0.5, 1.0]")
    a = sp.space.get("alpha", [16])
    if isinstance(a, list) and not all(isinstance(x, (int, float)) and x > 0 for x in a):
        bad("space.alpha", f"{a!r} has values <= 0", "use positive alphas, e.g. [8, 16, 32]")
    lr = sp.space.get("lr")
    lrs = lr if isinstance(lr, list) else [lr["low"]] if isinstance(lr, dict) else [] if lr is None else [lr]
    if not all(isinstance(x, (int, float)) and x > 0 for x in lrs):
        bad("space.lr", f"{lr!r} has values <= 0", "use positive learning rates, e.g. {low: 5.0e-4, high: 5.0e-3}")
    g = sp.space.get("grouping") or {"by": "groups", "choices": [3]}
    choices = g.get("choices") if isinstance(g, dict) else None
    if (
        not isinstance(g, dict)
        or g.get("by") not in ("groups", "group_size")
        or not isinstance(choices, list)
        or not choices
        or not all(isinstance(x, int) and x >= 1 for x in choices)
    ):
        bad("space.grouping", f"{g!r}", "use {by: groups, choices: [2, 3]} or {by: group_size, choices: [2, 3]}")
    if sp.max_adapter_params is not None and not (isinstance(sp.max_adapter_params, int) and sp.max_adapter_params > 0):
        bad("budget.max_adapter_params", f"{sp.max_adapter_params!r}", "use a positive integer or null")
    if sp.sampler.get("name") not in ("tpe", "nsga2", "random"):
        bad("sampler.name", f"{sp.sampler.get('name')!r}", "use tpe, nsga2 or random")
    if sp.pruner.get("name") not in ("median", "threshold", "none"):
        bad("pruner.name", f"{sp.pruner.get('name')!r}", "use median, threshold or none")
    if not isinstance(sp.fit_args, list) or not all(isinstance(a, str) for a in sp.fit_args):
        bad("fit_args", "not a list of strings", "write one --key=value per list item")
    if not isinstance(sp.enqueue, list) or not all(isinstance(p, dict) for p in sp.enqueue):
        bad("enqueue", "not a list of parameter mappings", "e.g. enqueue: [{n_levels: 3, r0: 8, decay: 0.5}]")
    for c in sp.configs:
        if not _repo_path(c).is_file():
            bad("configs", f"{c} does not exist", "list existing fit configs, e.g. configs/base.yaml")


# -- the model the search runs on -------------------------------------------------------------------
@dataclasses.dataclass
class ModelInfo:
    n_layers: int
    shapes: dict[str, tuple[int, int]]  # target kind -> (d_in, d_out)

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> ModelInfo:
        return cls(int(d["n_layers"]), {k: (int(v[0]), int(v[1])) for k, v in d["shapes"].items()})


def compose_fit(configs: list[str], args: list[str]):
    """The fit every trial starts from (the space's configs and command-line overrides), parsed and
    built by the run API's one composer, so the search reads the model, targets and devices the
    trials will train with. No weights are loaded; nothing is written."""
    from msplora.errors import UserError
    from msplora.training.run import compose

    try:
        return compose(configs, args=args)
    except UserError as e:
        raise SearchError(
            f"the fit arguments do not parse: {e}. Fix: correct the space's configs / fit_args or the EXTRA args after --"
        ) from None


def model_info(configs: list[str], args: list[str], setup=None) -> ModelInfo:
    """Layer count and target shapes from the model's config, on the meta device (no weights),
    found exactly as `inject` finds them. ``setup``: an already composed fit (``compose_fit``)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from msplora.config import MSPLoRAConfig
    from msplora.hf import resolve_model
    from msplora.inject import target_layout

    setup = setup or compose_fit(configs, args)
    name = setup.config["model"]["model"]
    pyramid = setup.config["model"].get("pyramid")
    targets = getattr(pyramid, "targets", None) or (pyramid or {}).get("targets") or ["query", "value"]
    try:
        cfg = AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError, ImportError) as e:  # not a local folder / alias, hub offline
        raise SearchError(
            f"model {name}: cannot read its config ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Fix: pass a local model folder or an installed alias with -- --model.model=..."
        ) from None
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    try:
        layout = target_layout(model, MSPLoRAConfig(targets=targets))
    except ConfigError as e:
        raise SearchError(f"model {name}: {e}") from None
    layers = {i for kind in layout.values() for i in kind["layers"]}
    return ModelInfo(len(layers), {k: (int(v["d_in"]), int(v["d_out"])) for k, v in layout.items()})


# -- define-by-run sampling ---------------------------------------------------------------------------
def _suggest(trial, name: str, spec: Any):
    if spec is None:
        return None
    if isinstance(spec, list):
        return spec[0] if len(spec) == 1 else trial.suggest_categorical(name, spec)
    if isinstance(spec, dict):
        lo, hi, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if isinstance(lo, int) and isinstance(hi, int) and not log:
            return trial.suggest_int(name, lo, hi)
        return trial.suggest_float(name, float(lo), float(hi), log=log)
    return spec


def mid_choices(n_layers: int, grouping: dict, n_mid: int) -> list[str]:
    """Valid mid-level groupings, as strings: ``"3"`` for one mid level, ``"2-4"`` for two.

    A mid level is valid when it has more than one cell and fewer cells than layers (else it is
    the global or the layer level again); two mid levels must go from coarser to finer.
    """
    by = grouping["by"]

    def cells(v: int) -> int:
        return len(group_sizes(n_layers, **{by: v})) if (by == "group_size" or v <= n_layers) else n_layers

    ok = sorted({v for v in grouping["choices"] if 1 < cells(v) < n_layers}, key=cells)
    if n_mid == 1:
        return [str(v) for v in ok]
    return [f"{a}-{b}" for i, a in enumerate(ok) for b in ok[i + 1 :] if cells(a) < cells(b)]


def feasible_level_counts(space: dict, n_layers: int) -> list[int]:
    grouping = space.get("grouping") or {"by": "groups", "choices": [3]}
    return [n for n in space["n_levels"] if n <= 2 or mid_choices(n_layers, grouping, n - 2)]


def sample_levels(trial, space: dict, n_layers: int) -> tuple[list[dict], float | None]:
    """Sample one pyramid: levels (coarse -> fine, ranks non-increasing) and the lr (None = config's)."""
    grouping = space.get("grouping") or {"by": "groups", "choices": [3]}
    feasible = feasible_level_counts(space, n_layers)
    if not feasible:
        raise SearchError(
            f"space.n_levels {space['n_levels']}: no valid shape for {n_layers} layers. "
            "Fix: allow 1 or 2 levels, or grouping choices with 1 < cells < layers"
        )
    n_levels = feasible[0] if len(feasible) == 1 else trial.suggest_categorical("n_levels", feasible)
    r0 = _suggest(trial, "r0", space["r0"])
    decay = _suggest(trial, "decay", space.get("decay", [0.5])) if n_levels > 1 else 1.0
    alpha = float(_suggest(trial, "alpha", space.get("alpha", [16])))
    lr = _suggest(trial, "lr", space.get("lr"))
    shares: list[dict] = [{"share": "layer"}]
    if n_levels >= 2:
        shares = [{"share": "global"}, {"share": "layer"}]
    if n_levels >= 3:
        # One categorical per level count: TPE / NSGA-II see a fixed choice list per name.
        choices = mid_choices(n_layers, grouping, n_levels - 2)
        mids = trial.suggest_categorical(f"mid_{grouping['by']}_{n_levels}", choices)
        shares[1:1] = [{"share": "group", grouping["by"]: int(v)} for v in str(mids).split("-")]
    ranks = rank_schedule(n_levels, r0, decay)
    levels = [{**s, "rank": r, "alpha": alpha} for s, r in zip(shares, ranks)]
    return levels, lr


def sample_options(trial, space: dict, levels: list[dict]) -> dict:
    """Sample the pyramid's scale / LR options the space asks for; returns the ``model.pyramid``
    keys (``levels`` included), only those off their defaults (``config.scale_lr_options``).

    ``scale``: the coarsest level's scale s_0; every level's alpha then follows from the rule
    (``alpha_for_scale(rule, s_0, r_0)``), so rules are compared at one magnitude instead of at
    one alpha. ``lr_scale``: a multiplier per level after the first (the first trains at the
    sampled ``lr``).
    """
    from msplora.config import scale_lr_options
    from msplora.pyramid import alpha_for_scale

    rule = _suggest(trial, "scale_rule", space.get("scale_rule")) or "lora"
    levels = [dict(lv) for lv in levels]
    if space.get("scale") is not None:
        alpha = alpha_for_scale(rule, float(_suggest(trial, "scale", space["scale"])), levels[0]["rank"])
        for lv in levels:
            lv["alpha"] = alpha
    lr_scales = None
    if space.get("lr_scale") is not None and len(levels) > 1:
        lr_scales = [1.0] + [float(_suggest(trial, f"lr_scale_{k}", space["lr_scale"])) for k in range(1, len(levels))]
    return scale_lr_options(
        levels,
        scale_rule=rule,
        lr_scales=lr_scales,
        lr_rule=_suggest(trial, "lr_rule", space.get("lr_rule")) or "none",
        lr_ratio_B=float(_suggest(trial, "lr_ratio_B", space.get("lr_ratio_B")) or 1.0),
    )


def check_sampleable(sp: Space, n_layers: int, draws: int = 32) -> None:
    """Draw pyramids from the space on a throwaway in-memory study, so a space that cannot be
    sampled (no level count fits the model, a config the pyramid refuses) is refused before the
    study exists or any trial runs, instead of failing every trial."""
    import optuna

    from msplora.config import MSPLoRAConfig

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for params in sp.enqueue:  # seeded points first, as the real study takes them
        study.enqueue_trial(params)
    for i in range(len(sp.enqueue) + draws):
        trial = study.ask()
        where = f"enqueue[{i}] {sp.enqueue[i]}" if i < len(sp.enqueue) else "a sampled pyramid"
        try:
            levels, lr = sample_levels(trial, sp.space, n_layers)
            MSPLoRAConfig(**sample_options(trial, sp.space, levels))
        except SearchError:
            raise
        except (ConfigError, ValueError, TypeError) as e:
            raise SearchError(
                f"space {sp.name}: {where} is refused ({type(e).__name__}: {str(e).splitlines()[0]}). "
                "Fix: give values from the space's choices (mid groupings are strings: '3', '2-4')"
            ) from None
        study.tell(trial, 0.0)


def overlay_of(levels: list[dict], lr: float | None, options: dict | None = None) -> dict:
    """The trial's overlay: ``options`` (from :func:`sample_options`) carry the levels with
    their sampled alphas / multipliers and the pyramid-wide options."""
    model: dict[str, Any] = {"pyramid": dict(options) if options else {"levels": levels}}
    if lr is not None:
        model["lr"] = float(lr)
    return {"model": model}


def adapter_params(levels: list[dict], info: ModelInfo) -> int:
    return parameter_count(levels, info.n_layers, info.shapes)


def shape_of(levels: list[dict]) -> str:
    """``G M/3g L``: the levels' shares, mid levels by their grouping, no ranks (``pyramid.short_label``)."""
    return short_label(levels, ranks=False)
