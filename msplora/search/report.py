"""``report``: best trials, the Pareto front, plots, and the best config as an overlay.

study --report--> <out>/<study>/summary.md, best.yaml, front/trial_NNNN.yaml,
                  history.png, importances.png, pareto_front.png
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from msplora.pyramid import short_label
from msplora.search.space import SearchError
from msplora.search.study import counts, space_of


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trials_table(trials, multi: bool, monitor: str) -> str:
    head = ["trial", monitor, "trainable", "adapter", "levels", "alpha", "lr"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        ov = t.user_attrs.get("overlay", {}).get("model", {})
        lv = ov.get("pyramid", {}).get("levels", [])
        shape = short_label(lv)
        alpha = sorted({x.get("alpha") for x in lv})
        value = t.values[0] if t.values else None
        trainable = t.values[1] if multi and t.values else t.user_attrs.get("trainable_params")
        cells = (
            t.number,
            value,
            int(trainable) if trainable is not None else "-",
            t.user_attrs.get("adapter_params", "-"),
            shape,
            ",".join(_fmt(a) for a in alpha),
            ov.get("lr", "config"),
        )
        rows.append("| " + " | ".join(_fmt(x) for x in cells) + " |")
    return "\n".join(rows)


def best_overlay_text(study, trial, monitor: str) -> str:
    value = trial.values[0]
    head = (
        f"# Optuna study {study.study_name!r}, trial {trial.number}: {monitor} = {value:.4f} "
        f"(selection split), {trial.user_attrs.get('trainable_params')} trainable params.\n"
        "# Use: msplora fit --config configs/base.yaml --config configs/demo.yaml --config best.yaml\n"
    )
    return head + yaml.safe_dump(trial.user_attrs["overlay"], sort_keys=False)


def importance_target(study):
    """The first objective, signed so that lower is better.

    Optuna 5's default importance evaluator (PED-ANOVA) asks which parameters set the best
    quantile of trials; given a ``target`` it takes *low* values as best whatever the study's
    direction, so a maximized accuracy passed as is ranks parameters by what makes it *lowest*.
    """
    sign = -1.0 if study.directions[0].name == "MAXIMIZE" else 1.0
    return lambda t: sign * t.values[0]


def param_importances(study) -> dict[str, float]:
    """Parameter importances for the first objective, in the study's own direction."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA's "low target values are better" note: handled above
        return optuna.importance.get_param_importances(study, target=importance_target(study))


def report(study, out_dir: Path, top: int = 10) -> str:
    """Write summary.md, best.yaml, front/*.yaml and PNGs under out_dir; return the markdown."""
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    sp = space_of(study) if "space" in study.user_attrs else None
    multi = len(study.directions) > 1
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    if not complete:
        raise SearchError(
            f"study {study.study_name!r} has no complete trial yet ({counts(study)}). "
            "Fix: let `run` finish some trials first"
        )
    monitor = (study.metric_names or [complete[0].user_attrs.get("monitor", "value")])[0]
    sign = 1 if study.directions[0].name == "MAXIMIZE" else -1
    ranked = sorted(complete, key=lambda t: -sign * t.values[0])
    lines = [
        f"# Search `{study.study_name}`",
        "",
        f"Objective: {'metric vs trainable params (NSGA-II)' if multi else 'validation metric'}; "
        f"trials: {counts(study)}; space: `{sp.name if sp else '?'}`.",
        "",
        f"## Best {min(top, len(ranked))} trials by {monitor}",
        "",
        trials_table(ranked[:top], multi, monitor),
    ]
    best = ranked[0]
    (out_dir / "best.yaml").write_text(best_overlay_text(study, best, monitor))
    if multi:
        front = sorted(study.best_trials, key=lambda t: t.values[1])
        lines += ["", f"## Pareto front ({monitor} up, trainable params down)", "", trials_table(front, multi, monitor)]
        fdir = out_dir / "front"
        fdir.mkdir(exist_ok=True)
        for old in fdir.glob("*.yaml"):
            old.unlink()
        for t in front:
            (fdir / f"trial_{t.number:04d}.yaml").write_text(best_overlay_text(study, t, monitor))
    if len(complete) >= 2:
        try:
            imp = param_importances(study)
            lines += ["", f"Importance for {monitor}: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items())]
        except (ValueError, RuntimeError) as e:  # e.g. a constant objective
            print(f"skipped importances: {e}", file=sys.stderr)
    plots = _plots(study, out_dir, multi, monitor, len(complete))
    lines += [
        "",
        "Best config: `best.yaml`"
        + (" (front members: `front/`)" if multi else "")
        + "; plots: "
        + ", ".join(f"`{p.name}`" for p in plots),
    ]
    md = "\n".join(lines) + "\n"
    (out_dir / "summary.md").write_text(md)
    return md


def _plots(study, out_dir: Path, multi: bool, monitor: str, n_complete: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    first = (lambda t: t.values[0]) if multi else None
    names = study.metric_names or [monitor, "trainable params"]
    jobs = [("history.png", lambda: ovm.plot_optimization_history(study, target=first, target_name=monitor))]
    if n_complete >= 2:
        jobs.append(
            (
                "importances.png",
                lambda: ovm.plot_param_importances(study, target=importance_target(study), target_name=monitor),
            )
        )
    if multi:
        jobs.append(("pareto_front.png", lambda: ovm.plot_pareto_front(study, target_names=names[:2])))
    done = []
    for fname, fn in jobs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-API and PED-ANOVA target notes
            try:
                ax = fn()
            except (ValueError, RuntimeError) as e:  # e.g. importances with a constant objective
                print(f"skipped {fname}: {e}", file=sys.stderr)
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        done.append(out_dir / fname)
    return done
