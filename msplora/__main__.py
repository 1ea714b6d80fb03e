"""``msplora`` / ``python -m msplora``:

fit | validate | test | predict   LightningCLI (``--help`` lists every option)
summary RUN_DIR                   print a run's metrics.json as one JSON line
analyze RUN [--against LORA_RUN]  singular-value spectra and cross-layer KL plots
answer --questions Q --model-id N MT-bench answers in FastChat format
export RUN_DIR --to peft|merged|msplora OUT   a run's best adapter for other tools
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else "--help"
    if cmd == "summary":
        from msplora.training.summary import main as summary

        return summary(argv[1:])
    if cmd == "analyze":
        from msplora.analysis import main as analyze

        return analyze(argv[1:])
    if cmd == "export":
        from msplora.export_cli import main as export

        return export(argv[1:])
    if cmd == "answer":
        from msplora.training.instruct import answer_main

        return answer_main(argv[1:])
    from msplora.training.cli import cli_main

    cli_main(argv)


if __name__ == "__main__":
    main()
