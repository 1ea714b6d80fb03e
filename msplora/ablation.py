"""Ablation suite: run the overlays in ``ablations/`` fairly, and tabulate what exists.

    ablations/<name>.yaml ──┐
    configs/base.yaml ──────┼─> LR sweep on seed 0 (select on a validation split carved
    task config ────────────┘      from train) -> all seeds at the chosen LR
                                 -> dev-split metric from the best checkpoint
    results/ablations/<task>/<name>/seed<k>.json   (one per finished seed, written atomically)
    results/ablations/<task>/<name>/lr_sweep/lr<lr>.json
    results/ablations/<task>/report.{md,png}

Why a sweep: levels have different scales (alpha / r) and shared tensors gather gradient
from several layers, so one learning rate would favour some variants. Each variant gets its
own best LR from ``--lrs`` (default: 1e-3, 2e-3, 4e-3 on the embedded task, else the
config's lr x 0.5, 1, 2; the head LR keeps the config's head_lr / lr ratio), chosen on the
carved validation split; the dev split is only ever used for the reported number.

A result file exists only once its run has fully finished (fit + test), so a rerun skips
finished work and reruns an interrupted seed; a file written under other settings
(steps, extra overrides) does not count and is redone. A finished run at one LR counts for
any grid holding that LR, so widening ``--lrs`` runs only the new LRs (and the other seeds
again if the chosen LR moves).

Usage (see the Makefile)::

    python -m msplora.ablation run NAME [NAME ...] | --all [--task T] [--seeds N]
        [--lrs "a b c"] [--config C] [--steps S] [--root DIR] -- EXTRA_CLI_OVERRIDES
    python -m msplora.ablation report [--task T] [--root DIR]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from msplora.errors import ArgumentParser, run_command
from msplora.io import atomic_write, split_passthrough, write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = REPO / "ablations"
CONFIGS = REPO / "configs"
RESULTS = REPO / "results" / "ablations"
DEFAULT_TASK = "sentiment"
# Embedded default (MiniLM, sentiment, CPU): sized so the ten required variants x (3 sweep
# LRs + 2 more seeds) fit in about an hour on 2 shared CPU cores; see README.
EMBEDDED_STEPS = 100
# Its LR grid. 100 steps is short, so the best LRs lie above demo.yaml's 1e-3 (tuned for two
# epochs), and they differ by variant: measured at seed 0, `full` is best at 2e-3 and collapses
# to chance at 4e-3, while `lora` gains from 4e-3. 5e-4 was the worst for every variant.
EMBEDDED_LRS = (1e-3, 2e-3, 4e-3)
# A best LR on the edge of the grid gets up to this many more LRs outwards.
DEFAULT_EXTEND = 2
VAL_FRACTION = 0.1


class AblationError(SystemExit):
    """Bad input: the message names the problem and the fix; exit status 2.

    A SystemExit whose message ``msplora.errors.run_command`` prints as the one line."""

    def __init__(self, msg: str) -> None:
        super().__init__(f"msplora.ablation: {msg}")
        self.code = 2


# -- the variants ---------------------------------------------------------------------------------
def variant_names(folder: Path = ABLATIONS) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def variant_path(name: str, folder: Path = ABLATIONS) -> Path:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise AblationError(
            f"unknown ablation {name!r}. Fix: use one of {', '.join(variant_names(folder))} "
            f"(or add {folder.name}/{name}.yaml)"
        )
    return path


def hypothesis(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    return first.lstrip("# ").removeprefix("Hypothesis:").strip()


def levels_label(levels: list[dict], n_layers: int | None) -> str:
    """``G8 M4x3 L2``: G = global, M = group (rank x cells), L = per-layer (``pyramid.short_label``)."""
    from msplora.pyramid import short_label

    return short_label(levels, n_layers)


# -- one run ------------------------------------------------------------------------------------------
def is_embedded(task: str, config: str | None) -> bool:
    """The built-in task with its own config: the embedded steps and LR grid apply."""
    return config is None and task == DEFAULT_TASK


def task_config(task: str, config: str | None) -> Path:
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise AblationError(f"--config {config}: no such file. Fix: pass a task config such as configs/rte.yaml")
        return path
    if task == DEFAULT_TASK:
        return CONFIGS / "demo.yaml"
    path = CONFIGS / f"{task}.yaml"
    if not path.is_file():
        raise AblationError(f"--task {task}: no configs/{task}.yaml. Fix: pass --config with a config for this task")
    return path


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One variant on one task, bar its LR and seed: config files (base, task, overlay), the
    runner's typed overrides, then the user's EXTRA command-line overrides."""

    configs: tuple[Path, ...]
    overrides: dict
    extra: tuple[str, ...] = ()

    def as_args(self) -> list[str]:
        """The command-line form (``--config F ... --key=value ...``): what the signature hashes."""
        from msplora.training.run import override_args

        return [x for c in self.configs for x in ("--config", str(c))] + override_args(self.overrides) + [*self.extra]


# Set per run by the runner: an EXTRA override of these would be silently replaced (or, for the
# seed and LR, would make every run of the sweep the same).
_RUNNER_KEYS = ("--model.lr", "--model.head_lr", "--seed_everything", "--trainer.default_root_dir")


def base_recipe(overlay: Path, cfg: Path, steps: int | None, extra: list[str]) -> Recipe:
    for a in extra:
        if a.split("=", 1)[0] in _RUNNER_KEYS:
            raise AblationError(
                f"{a.split('=', 1)[0]} in the extra overrides: the runner sets it for each run. "
                'Fix: drop it; choose LRs with --lrs "a b c" (LRS=), seeds with --seeds'
            )
    overrides: dict = {
        "data.init_args.val_fraction": VAL_FRACTION,
        "trainer.num_sanity_val_steps": 0,
        "trainer.enable_checkpointing": True,
    }
    if steps is not None:
        # A fixed step budget, validated once at the end (the selection metric of the sweep).
        overrides |= {
            "trainer.max_steps": steps,
            "trainer.max_epochs": -1,
            "trainer.val_check_interval": steps,
            "trainer.check_val_every_n_epoch": None,
        }
    return Recipe((CONFIGS / "base.yaml", cfg, overlay), overrides, tuple(extra))


def parse(recipe: Recipe):
    """The composed config, parsed and instantiated (no model weights loaded)."""
    from msplora.training.run import compose

    return compose(recipe.configs, recipe.overrides, recipe.extra)  # a bad override: one line (msplora.errors)


def fit_and_test(recipe: Recipe, lr: float, seed: int, ratio: float | None, run_dir: Path) -> dict:
    """One fit + test on the dev split (best checkpoint); returns the run's record."""
    from msplora.training.run import compose, fit

    if run_dir.exists():  # leftovers of an interrupted run
        shutil.rmtree(run_dir)
    per_run = {"model.lr": lr, "seed_everything": seed}
    if ratio is not None:
        per_run["model.head_lr"] = lr * ratio
    setup = compose(recipe.configs, {**recipe.overrides, **per_run}, recipe.extra, root_dir=run_dir)
    r = fit(setup, test=True)
    bank_kinds = __import__("msplora").get_bank(setup.model.model).kinds
    n_layers = len(next(iter(bank_kinds.values())).layer_ids)
    levels = setup.model.hparams["pyramid"]["levels"]
    tests = {k: v for k, v in r.test.items() if k.endswith(f"/{r.metric}")}
    return {
        "task": r.task,
        "model": r.model,
        "metric": r.metric,
        "val": r.value,
        "test": r.test_value,
        "test_all": tests,
        "lr": r.lr,
        "head_lr": r.head_lr,
        "seed": r.seed,
        "levels": levels_label(levels, n_layers),
        "n_layers": n_layers,
        "trainable_params": r.trainable_params,
        "adapter_params": r.adapter_params,
        "lora_r8_adapter_params": r.lora_r8_adapter_params,
        "lora_r8_params": r.lora_r8_params,
        "params_per_level": r.params_per_level,
        "majority_baseline": r.majority_baseline,
        "global_step": r.global_step,
        "wall_time_s": r.wall_time_s,
        "fit_wall_time_s": r.fit_wall_time_s,
        "run_dir": str(r.run_dir),
        "config": setup.config_dict(),
        "metrics": r.metrics,
    }


def run_signature(args: Recipe | list[str], ratio: float | None) -> str:
    """The settings of one run, bar its LR and seed (those are checked on their own).

    Config files count by their parsed content, not path or comments: editing a key of an overlay
    or a task config makes its old results stale, while a moved checkout, a reworded comment or a
    progress/logging setting (:data:`_NO_OUTCOME_KEYS`) keeps them. A finished run at an LR counts for any
    grid that holds that LR.
    """
    if isinstance(args, Recipe):
        args = args.as_args()
    parts = [_outcome_keys(Path(a)) if prev == "--config" else a for prev, a in zip(["", *args], args)]
    return hashlib.sha1(json.dumps([parts, ratio], sort_keys=True).encode()).hexdigest()[:12]


# Settings that cannot change a run's numbers: how it reports progress and where it logs. A result
# stays valid when only these change (a comment, a progress bar, a logger), so long GLUE results
# survive such edits of configs/base.yaml; any other key, a new callback included, makes it stale.
_NO_OUTCOME_KEYS = {"trainer": ("enable_progress_bar", "default_root_dir", "logger", "log_every_n_steps")}
_NO_OUTCOME_SECTIONS = ("last_checkpoint",)  # when last.ckpt is written
_NO_OUTCOME_CALLBACKS = (
    "lightning.pytorch.callbacks.RichProgressBar",
    "lightning.pytorch.callbacks.TQDMProgressBar",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "msplora.analysis.SpectrumRecorder",
)


def _outcome_keys(path: Path) -> object:
    """A config file's content as data, less the keys that cannot change a run's numbers."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        return data
    data = {k: v for k, v in data.items() if k not in _NO_OUTCOME_SECTIONS}
    for section, keys in _NO_OUTCOME_KEYS.items():
        if isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k not in keys}
            callbacks = data[section].get("callbacks")
            if isinstance(callbacks, list):
                kept = [
                    c for c in callbacks if not (isinstance(c, dict) and c.get("class_path") in _NO_OUTCOME_CALLBACKS)
                ]
                data[section]["callbacks"] = kept
    return data


def _same_run(rec: dict, signature: str | None, lr: float) -> bool:
    """Made under these settings at this LR (the seed is checked apart)."""
    return rec.get("signature") == signature and math.isclose(rec.get("lr", math.nan), lr, rel_tol=1e-9)


def _read(path: Path, signature: str, lr: float, seed: int) -> dict | None:
    """A finished result of this very run (same settings, LR and seed), else None."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return rec if _same_run(rec, signature, lr) and rec.get("seed") == seed else None


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


def best_of(sweep: list[dict]) -> dict:
    return max(sweep, key=lambda r: r["val"])  # selection metrics here are all higher-is-better


def next_lr(tried: list[float], best: float) -> float | None:
    """The next LR outwards when `best` is the largest or smallest tried (same geometric step), else None."""
    grid = sorted(set(tried))
    if len(grid) < 2:
        return None
    if math.isclose(best, grid[-1]):
        return float(f"{grid[-1] ** 2 / grid[-2]:.6g}")
    if math.isclose(best, grid[0]):
        return float(f"{grid[0] ** 2 / grid[1]:.6g}")
    return None


# -- a variant ------------------------------------------------------------------------------------------
def run_variant(
    name: str,
    task: str,
    seeds: int,
    lrs: list[float] | None,
    config: str | None,
    steps: int | None,
    extra: list[str],
    root: Path = RESULTS,
    folder: Path = ABLATIONS,
    log=print,
    extend: int = 0,
) -> list[dict]:
    overlay = variant_path(name, folder)
    cfg = task_config(task, config)
    recipe = base_recipe(overlay, cfg, steps, extra)
    setup = parse(recipe)  # fail fast on a bad overlay / override, and read lr, head_lr, task
    data_task = setup.datamodule.hparams.task
    if data_task != task:
        raise AblationError(
            f"--task {task} but the config {cfg} trains {data_task!r}. "
            f"Fix: pass --task {data_task} (TASK={data_task}), or a config for {task}"
        )
    lr0, head0 = setup.model.hparams.lr, setup.model.hparams.head_lr
    ratio = None if head0 is None else head0 / lr0
    lrs = lrs or (list(EMBEDDED_LRS) if is_embedded(task, config) else [lr0 * 0.5, lr0, lr0 * 2])
    out = root / task / name
    signature = run_signature(recipe, ratio)

    def run_one(lr: float, seed: int, path: Path) -> dict:
        rec = _read(path, signature, lr, seed)
        if rec is not None:
            log(f"[{name}] lr={lr_tag(lr)} seed={seed}: done before ({rec['test']:.4f}), skipped")
            return rec
        log(f"[{name}] lr={lr_tag(lr)} seed={seed}: running")
        rec = fit_and_test(recipe, lr, seed, ratio, out / "runs" / f"lr{lr_tag(lr)}_seed{seed}")
        rec.update(variant=name, hypothesis=hypothesis(overlay), signature=signature, overlay=overlay.read_text())
        write_json_atomic(path, rec)
        log(
            f"[{name}] lr={lr_tag(lr)} seed={seed}: val {rec['val']:.4f} dev {rec['test']:.4f} "
            f"({rec['wall_time_s']:.0f} s)"
        )
        return rec

    def sweep_run(lr: float) -> dict:
        return run_one(lr, 0, out / "lr_sweep" / f"lr{lr_tag(lr)}.json")

    sweep = [sweep_run(lr) for lr in lrs]
    best = best_of(sweep)
    for _ in range(extend):  # a best LR on the grid's edge is not known to be the best: step outwards
        nxt = next_lr([r["lr"] for r in sweep], best["lr"])
        if nxt is None:
            break
        log(f"[{name}] best LR {lr_tag(best['lr'])} lies on the edge of the sweep: trying {lr_tag(nxt)}")
        sweep.append(sweep_run(nxt))
        best = best_of(sweep)
    records = []
    for seed in range(seeds):
        path = out / f"seed{seed}.json"
        if seed == 0:  # the sweep's run at the chosen LR is seed 0 (rewritten: the grid may have changed)
            rec = dict(best, lr_sweep={lr_tag(r["lr"]): r["val"] for r in sweep})
            write_json_atomic(path, rec)
        else:  # done before at the same LR counts; a seed run at an LR no longer chosen is redone
            rec = run_one(best["lr"], seed, path)
        records.append(rec)
    return records


# -- report -------------------------------------------------------------------------------------------
def collect(task: str, root: Path = RESULTS, log=print) -> dict[str, list[dict]]:
    """Each variant's seed records that belong with its seed 0 (same settings and LR).

    A seed file left from an older grid or seed count (another LR, other settings) is named
    and left out, so a table never mixes runs.
    """
    found: dict[str, list[dict]] = {}
    for folder in sorted(p for p in (root / task).glob("*") if p.is_dir()):
        recs = []
        for path in sorted(folder.glob("seed*.json"), key=lambda p: (len(p.name), p.name)):
            try:
                recs.append((path, json.loads(path.read_text())))
            except json.JSONDecodeError:
                log(f"[report] {path}: unreadable, left out (rerun the variant to redo it)")
        if not recs:
            continue
        ref = recs[0][1]
        keep = []
        for path, rec in recs:
            if _same_run(rec, ref.get("signature"), ref["lr"]):
                keep.append(rec)
            else:
                log(f"[report] {path}: made at another LR or with other settings than {recs[0][0].name}, left out")
        found[folder.name] = keep
    return found


def _fmt_lr(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def summarise(found: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, recs in found.items():
        vals = [r["test"] for r in recs]
        lrs = sorted({r["lr"] for r in recs})
        lora = recs[0].get("lora_r8_adapter_params")
        swept = sorted(float(k) for k in recs[0].get("lr_sweep", {}))
        edge = ""
        if len(swept) > 1 and len(lrs) == 1:  # a chosen LR on the sweep's edge may not be the best one
            edge = "top" if math.isclose(lrs[0], swept[-1]) else "bottom" if math.isclose(lrs[0], swept[0]) else ""
        rows.append(
            {
                "variant": name,
                "levels": recs[0].get("levels", "?"),
                "lr": ", ".join(_fmt_lr(x) for x in lrs),
                "swept": [_fmt_lr(x) for x in swept],
                "lr_edge": edge,
                "metric": recs[0]["metric"],
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "n": len(vals),
                "adapter_params": recs[0]["adapter_params"],
                "vs_lora": recs[0]["adapter_params"] / lora if lora else math.nan,
            }
        )
    return sorted(rows, key=lambda r: (r["adapter_params"], r["variant"]))


def markdown(rows: list[dict], task: str) -> str:
    metric = rows[0]["metric"] if rows else "metric"
    lines = [
        f"Task `{task}`: dev-split {metric}, mean ± std over seeds, at each variant's LR "
        "(chosen on a validation split carved from train). Params: trainable adapter parameters; "
        "vs LoRA: relative to LoRA r=8 on the same targets. LR chosen: ↑ / ↓ = the largest / smallest "
        "LR swept, so a better one may lie beyond.",
        "",
        f"| variant | levels | LR chosen | LRs swept | dev {metric} (mean ± std, n) | adapter params | vs LoRA r=8 |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        mark = {"top": " ↑", "bottom": " ↓"}.get(r.get("lr_edge", ""), "")
        swept = ", ".join(r.get("swept", [])) or "-"
        lines.append(
            f"| {r['variant']} | {r['levels']} | {r['lr']}{mark} | {swept} | {r['mean']:.4f} ± {r['std']:.4f} "
            f"({r['n']}) | {r['adapter_params']:,} | {r['vs_lora']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Variants that land on the same point (same pyramid, e.g. group_size_2 = full on 6 layers)
    # share one label; in a column of points, labels alternate above and below.
    points: dict[tuple[int, float], list[dict]] = {}
    for r in rows:
        points.setdefault((r["adapter_params"], round(r["mean"], 6)), []).append(r)
    column_seen: dict[int, int] = {}
    for (x, _), group in sorted(points.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        r = group[0]
        lora_like = r["levels"].startswith("L") and " " not in r["levels"]
        ax.errorbar(
            x,
            r["mean"],
            yerr=r["std"],
            fmt="s" if lora_like else "o",
            color="tab:gray" if lora_like else "tab:blue",
            capsize=3,
        )
        below = column_seen.get(x, 0) % 2 == 1
        column_seen[x] = column_seen.get(x, 0) + 1
        ax.annotate(
            " = ".join(g["variant"] for g in group),
            (x, r["mean"]),
            textcoords="offset points",
            xytext=(6, -11) if below else (6, 4),
            fontsize=8,
        )
    ax.margins(x=0.12)  # room for the labels of the rightmost points
    ax.set_xlabel("trainable adapter parameters")
    ax.set_ylabel(f"dev {rows[0]['metric'] if rows else 'metric'} (mean ± std over seeds)")
    ax.set_title(f"MSPLoRA ablations: {task}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:  # mode=None: the mode open() gives, as the report always had
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True, mode=None)
    finally:
        plt.close(fig)


def report(task: str, root: Path = RESULTS) -> str:
    found = collect(task, root)
    if not found:
        raise AblationError(f"no results under {root / task}. Fix: run `make ablation NAME=full TASK={task}` first")
    rows = summarise(found)
    text = markdown(rows, task)
    out = root / task
    write_text_atomic(out / "report.md", text, mode=None)
    write_json_atomic(out / "report.json", {"task": task, "rows": rows})
    plot(rows, out / "report.png", task)
    return text


# -- CLI ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = ArgumentParser(prog="msplora ablation", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run variants (LR sweep on seed 0, then every seed at the chosen LR)")
    r.add_argument("names", nargs="*", metavar="NAME", help="variants (file stems in ablations/)")
    r.add_argument("--all", action="store_true", help="every variant in ablations/")
    r.add_argument("--task", default=DEFAULT_TASK, help="task name (results folder; checked against the config)")
    r.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    r.add_argument(
        "--lrs",
        default=None,
        help='adapter LRs to sweep, e.g. "5e-4 1e-3 2e-3" (default: 1e-3 2e-3 4e-3 on the embedded '
        "task, else config lr x 0.5/1/2)",
    )
    r.add_argument(
        "--config",
        default=None,
        help="task config composed after configs/base.yaml "
        "(default: configs/demo.yaml for sentiment, else configs/<task>.yaml)",
    )
    r.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per run (default {EMBEDDED_STEPS} on the embedded task, else the config's epochs)",
    )
    r.add_argument(
        "--extend",
        type=int,
        default=DEFAULT_EXTEND,
        help="when the best LR is the grid's largest or smallest, try up to this many more LRs outwards "
        f"(same geometric step), stopping once the best is inside (default {DEFAULT_EXTEND}; 0: the grid only)",
    )
    r.add_argument("--root", type=Path, default=RESULTS, help="results root")
    rp = sub.add_parser("report", help="markdown table + PNG of whatever results exist")
    rp.add_argument("--task", default=DEFAULT_TASK)
    rp.add_argument("--root", type=Path, default=RESULTS)
    a = p.parse_args(argv)

    if a.cmd == "report":
        print(report(a.task, a.root))
        print(f"wrote {a.root / a.task / 'report.md'} and {a.root / a.task / 'report.png'}")
        return
    if a.all == bool(a.names):
        raise AblationError(
            "give variant names or --all (not both, not neither). "
            f"Fix: e.g. `msplora ablation run full no_mid`; valid names: {', '.join(variant_names())}"
        )
    names = variant_names() if a.all else a.names
    for n in names:
        variant_path(n)  # every name checked before anything runs
    if a.steps is not None and a.steps < 1:
        # Lightning would train nothing and then fail to find a "best" checkpoint to test.
        raise AblationError(f"--steps {a.steps}: need at least 1 training step. Fix: e.g. --steps 100, or leave it out")
    if a.seeds < 1:
        raise AblationError(f"--seeds {a.seeds}: need at least 1. Fix: e.g. --seeds 3")
    if a.extend < 0:
        raise AblationError(f"--extend {a.extend}: need 0 or more. Fix: e.g. --extend 2")
    lrs = None
    if a.lrs:
        try:
            lrs = [float(x) for x in a.lrs.replace(",", " ").split()]
        except ValueError:
            raise AblationError(f'--lrs {a.lrs!r}: not numbers. Fix: e.g. --lrs "5e-4 1e-3 2e-3"') from None
        if not lrs or any(x <= 0 for x in lrs):
            raise AblationError(f'--lrs {a.lrs!r}: need positive values. Fix: e.g. --lrs "5e-4 1e-3 2e-3"')
    steps = a.steps if a.steps is not None else (EMBEDDED_STEPS if is_embedded(a.task, a.config) else None)
    t0 = time.perf_counter()
    for n in names:
        run_variant(n, a.task, a.seeds, lrs, a.config, steps, extra, root=a.root, extend=a.extend)
        print(f"[suite] {n} finished; {time.perf_counter() - t0:.0f} s so far", flush=True)
    print(report(a.task, a.root))


if __name__ == "__main__":
    sys.exit(run_command("ablation", main, sys.argv[1:]))
