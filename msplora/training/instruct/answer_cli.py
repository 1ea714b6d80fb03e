"""`msplora answer`: the command line of the MT-bench answer files. It checks its arguments,
loads the model (and an MSPLoRA adapter), and calls `answer_mt_bench`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from msplora.training.instruct.mtbench import answer_mt_bench, load_mt_bench_questions


def answer_main(argv: Sequence[str] | None = None) -> None:
    """``msplora answer --questions Q --model-id NAME``: FastChat `model_answer` JSONL for MT-bench questions.

    Returns None (the console script exits with its return value). Loads the model (+ an MSPLoRA adapter with ``--adapter``), answers every question turn by
    turn (greedy; turn 2 sees turn 1's answer) and writes ``--out`` (default
    ``results/mt_bench/model_answer/<model-id>.jsonl``, FastChat's layout), resumable (see
    `answer_mt_bench`). Bad input exits non-zero with one message before anything is written.
    """
    import sys

    from msplora.errors import ArgumentParser, UserError
    from msplora.io import check_safetensors_file

    parser = ArgumentParser(
        prog="msplora answer", description=answer_main.__doc__.split("\n\n", 1)[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "--questions", required=True, help="FastChat question.jsonl ({question_id, turns, ...} per line)"
    )
    parser.add_argument(
        "--model-id", required=True, help="name written into every record and, by default, the file name"
    )
    parser.add_argument(
        "--model", default="smollm2", help="alias (smollm2), Hub name or local folder (default: smollm2)"
    )
    parser.add_argument(
        "--adapter", help="MSPLoRA adapter folder to load into the model (e.g. RUN/version_0/best_adapter)"
    )
    parser.add_argument("--out", help="answer file (default: results/mt_bench/model_answer/<model-id>.jsonl)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=1024, help="token budget of each turn's answer (default: 1024)"
    )
    parser.add_argument("--limit", type=int, help="answer only the first N questions")
    parser.add_argument("--batch-size", type=int, default=8, help="questions generated together (default: 8)")
    parser.add_argument(
        "--template", choices=["auto", "chat", "alpaca"], default="auto", help="prompt format (default: auto)"
    )
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 (default: float32)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    # Everything that can be checked without the model is checked first: no model load, no file, on bad input.
    questions = Path(args.questions).expanduser()
    if not questions.is_file():
        parser.error(f"--questions {questions}: no such file. Fix: pass FastChat's question.jsonl")
    for flag, value in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--batch-size", args.batch_size),
        ("--limit", args.limit),
    ):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: must be at least 1")
    if args.out is None and ("/" in args.model_id or "\\" in args.model_id or args.model_id in (".", "..")):
        parser.error(f"--model-id {args.model_id!r} cannot be a file name. Fix: drop the path separators or pass --out")
    out = Path(args.out or Path("results") / "mt_bench" / "model_answer" / f"{args.model_id}.jsonl").expanduser()
    if not hasattr(torch, args.dtype) or not isinstance(getattr(torch, args.dtype), torch.dtype):
        parser.error(f"--dtype {args.dtype!r} is not a torch dtype. Fix: float32, bfloat16 or float16")
    # A user error is raised as one line, exit 2 (msplora.errors).
    try:
        n_questions = len(load_mt_bench_questions(questions)[: args.limit])
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"{e}" if "Fix:" in str(e) else f"{e}. Fix: correct that record") from None
    if args.adapter is not None:
        from msplora.inject import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config

        adapter = Path(args.adapter).expanduser()
        try:
            read_adapter_config(adapter)
        except (ValueError, FileNotFoundError) as e:  # e.g. JSON cut short: name the file
            text = " ".join(str(e).split())
            where = "" if str(adapter) in text else f"--adapter {adapter / ADAPTER_CONFIG}: "
            fix = "" if "Fix:" in text else ". Fix: save the adapter again (msplora.save_adapter)"
            raise UserError(f"{where}{text}{fix}") from None
        check_safetensors_file(adapter / ADAPTER_WEIGHTS)

    from msplora.hf import load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    try:
        tokenizer = load_tokenizer(args.model)
        model = load_causal_lm(args.model, dtype=getattr(torch, args.dtype))
        if args.adapter is not None:
            import msplora

            msplora.load_adapter(model, Path(args.adapter).expanduser())
    except (OSError, ImportError, ValueError) as e:  # unknown model / offline Hub / adapter that does not fit
        what = f"--model {args.model!r}{f' with --adapter {args.adapter}' if args.adapter else ''}"
        text = " ".join(str(e).split())
        fix = "" if "Fix:" in text else ". Fix: pass a model folder or an alias (smollm2), and an adapter trained on it"
        raise UserError(f"cannot load {what}: {text}{fix}") from None
    if torch.cuda.is_available():
        model = model.to("cuda")
    loaded = time.perf_counter()
    try:
        path = answer_mt_bench(
            model,
            tokenizer,
            questions,
            args.model_id,
            out,
            args.max_new_tokens,
            args.limit,
            args.batch_size,
            args.template,
        )
    except ValueError as e:  # e.g. the answer file already holds another model's answers
        text = " ".join(str(e).split())
        raise UserError(text if "Fix:" in text else f"{text}. Fix: pass another --out, or remove that file") from None
    done = time.perf_counter()
    print(
        f"wrote {n_questions} answers of {args.model_id!r} to {path} "
        f"(load {loaded - t0:.1f} s, generation {done - loaded:.1f} s)"
    )
