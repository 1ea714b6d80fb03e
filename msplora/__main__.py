"""``msplora <command>`` / ``python -m msplora <command>``: every command behind one error boundary.

    fit                               one fit through the run API (msplora.training.run); LightningCLI
                                      composes the config (``msplora fit --help`` lists every option)
    validate | test | predict         LightningCLI
    summary RUN_DIR                   a run's metrics.json as a table and one JSON line
    analyze RUN [--against LORA_RUN]  singular-value spectra and cross-layer KL plots
    answer --questions Q --model-id N MT-bench answers in FastChat format
    export SRC --to peft|merged|msplora OUT   a run, peft folder or Trainer checkpoint for other tools
    ablation run|report ...           the ablation suite (``make ablation``)
    search run|worker|report ...      the Optuna search (``make search``)
    bench                             training-step and inference timing

``msplora --version`` prints the version. A command whose optional dependencies are missing
(``fit`` in a core + [peft] install) says which extra to install, in one line.

A mistake of the user's (config, data, model path, checkpoint, arguments) ends as one line
``msplora <command>: <problem>. Fix: <what to do>`` on stderr with exit status 2; add
``--debug`` (or set ``MSPLORA_DEBUG=1``) for the traceback. See ``msplora.errors``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# command -> (module, function, one-line help); imported only when run: `msplora --help` and
# `msplora summary` need neither Lightning nor a model.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fit": ("msplora.training.run", "fit_main", "train an adapter (--config files and --key=value compose)"),
    "validate": ("msplora.training.cli", "validate", "evaluate on the validation split(s)"),
    "test": ("msplora.training.cli", "test", "evaluate on the test split(s)"),
    "predict": ("msplora.training.cli", "predict", "run prediction"),
    "summary": ("msplora.training.summary", "main", "a run's metrics.json: table + one JSON line"),
    "analyze": ("msplora.analysis", "main", "singular-value spectra and cross-layer KL of a run"),
    "answer": ("msplora.training.instruct", "answer_main", "MT-bench answers (FastChat format)"),
    "export": (
        "msplora.export_cli",
        "main",
        "a run / peft folder / checkpoint-N as peft LoRA, a merged model or an msplora adapter",
    ),
    "ablation": ("msplora.ablation", "main", "run / report the ablation suite"),
    "search": ("msplora.search.cli", "main", "Optuna search over pyramids: run / worker / report"),
    "bench": ("msplora.bench", "main", "training-step and inference timing"),
}
LIGHTNING = ("validate", "test", "predict")

# top-level module -> the extra (pyproject.toml [project.optional-dependencies]) that installs it;
# tests/test_peft_cli.py checks this table against pyproject.toml.
EXTRAS: dict[str, str] = {
    "lightning": "train",
    "jsonargparse": "train",
    "datasets": "train",
    "torchmetrics": "train",
    "scipy": "train",
    "sklearn": "train",
    "tensorboard": "train",
    "rich": "train",
    "optuna": "search",
    "optuna_integration": "search",
    "filelock": "search",
    "peft": "peft",
    "gguf": "instruct",
    "matplotlib": "plots",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:{width}s}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return (
        "usage: msplora <command> [options]     (msplora <command> --help: the command's options;"
        " msplora --version)\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "A user error ends as one line on stderr, exit status 2; --debug or MSPLORA_DEBUG=1 shows the traceback.\n"
    )


def _lightning(command: str) -> Callable[[list[str]], None]:
    def run(argv: list[str]) -> None:
        from msplora.training.cli import cli_main

        # exit_on_error=False: jsonargparse raises instead of printing its dump, and the boundary
        # explains the error in one line.
        cli_main([command, *argv], exit_on_error=False)

    return run


def _load(command: str) -> Callable[[list[str]], object]:
    if command in LIGHTNING:
        return _lightning(command)
    module, function, _ = COMMANDS[command]
    from msplora.errors import UsageError

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # a dependency of the command is missing: not ours to explain
            raise
        raise UsageError(
            f"the {command} command is not part of this installation (no module {module}). "
            "Fix: install a msplora version that has it"
        ) from None
    return getattr(mod, function)


def _missing_extra(command: str, e: ModuleNotFoundError) -> Exception:
    """A missing optional dependency as one line naming the extra; other errors unchanged."""
    from msplora.errors import UsageError

    top = (e.name or "").partition(".")[0]
    if top not in EXTRAS:
        return e
    extra = EXTRAS[top]
    return UsageError(
        f"the {command} command needs {top!r}, which is not installed (it comes with the [{extra}] extra). "
        f"Fix: pip install 'msplora[{extra}]'"
    )


def _run(command: str, argv: list[str]) -> object:
    try:
        return _load(command)(argv)
    except ModuleNotFoundError as e:
        raise _missing_extra(command, e) from None


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 on success), raises SystemExit(2) on a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from msplora import __version__

        print(f"msplora {__version__}")
        return 0
    from msplora.errors import UsageError, run_command

    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:

        def unknown(_: list[str]) -> None:
            import difflib

            close = difflib.get_close_matches(command, COMMANDS, n=1)
            hint = f"did you mean `msplora {close[0]}`? " if close else ""
            raise UsageError(f"unknown command {command!r}. Fix: {hint}use one of {', '.join(COMMANDS)}")

        return run_command(command, unknown, rest)
    return run_command(command, lambda args: _run(command, args), rest)


if __name__ == "__main__":
    sys.exit(main())
