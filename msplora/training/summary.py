"""``msplora summary RUN_DIR``: the newest metrics.json under RUN_DIR, as a small table and
one JSON line (the last line of output, for scripts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from msplora.errors import ArgumentParser, UserError
from msplora.io import read_json
from msplora.training.record import RunRecord


def find_metrics(run: str | Path) -> Path:
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory or file. Fix: pass trainer.default_root_dir of a finished fit")
    found = sorted(run.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(
            f"no metrics.json under {run}. Fix: pass the run's directory (trainer.default_root_dir of a finished fit)"
        )
    return found[-1]


def main(argv: list[str] | None = None) -> dict:
    """Print the summary; returns it (``msplora summary`` itself exits 0 through msplora.errors)."""
    parser = ArgumentParser(prog="msplora summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", metavar="RUN_DIR", help="a run's directory (newest metrics.json under it) or the file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    path = find_metrics(args.run)
    m = read_json(path, "metrics.json", fix="pass a finished run's directory", error=UserError)
    if not isinstance(m, dict):
        raise UserError(f"{path}: not a metrics.json (a JSON object). Fix: pass a finished run's directory")
    r = RunRecord.from_dict(m)
    counts = ("trainable_params", "lora_r8_params", "adapter_params", "lora_r8_adapter_params")
    line = {k: getattr(r, k) for k in ("task", "metric", "value", *counts[:2], "majority_baseline", *counts[2:])}
    line["wall_time_s"] = r.wall_time_s
    line["run"] = str(path.parent)
    print(f"run            {path.parent}")
    print(f"task           {r.task}   ({r.model})")
    print(f"{r.metric!s:14s} {r.value}   (majority-class baseline {r.majority_baseline})")
    n = {k: f"{getattr(r, k):,}" if isinstance(getattr(r, k), int) else "?" for k in counts}
    print(
        f"trainable      {n['trainable_params']} MSPLoRA vs {n['lora_r8_params']} LoRA r=8 "
        f"(adapter only: {n['adapter_params']} vs {n['lora_r8_adapter_params']})"
    )
    print(json.dumps(line))
    return line
