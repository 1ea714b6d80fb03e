"""User errors: one line on stderr, exit status 2, no traceback.

    msplora <command>: <problem>. Fix: <what to do>

    command function ──raises──> UserError (ConfigError, DataError, ...) / a "... Fix: ..." message
          │                       jsonargparse's ArgumentError (explained: key, valid keys)
          ▼                       SystemExit("message") of older entry points
    run_command (the one boundary) ──> the line above, exit 2     (--debug / MSPLORA_DEBUG=1: traceback)
                                   ├─> SIGTERM (Lightning's SIGTERMException): one line, exit 143
                                   └─> any other exception: a traceback (it is our bug)

An error is the user's when the user can fix it: config, data, model path, checkpoint, adapter
file, command-line arguments. Library code raises a class below (every one a :class:`UserError`,
also re-exported where it is used: ``msplora.ConfigError``, ``msplora.training.data.DataError``),
or any exception whose message has the house shape ``problem. Fix: ...``; it never prints. Only
this module turns them into lines and exit codes.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = [
    "ArgumentParser",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelPathError",
    "UsageError",
    "UserError",
    "explain_parse_error",
    "run_command",
    "user_message",
]

DEBUG_ENV = "MSPLORA_DEBUG"
EXIT_USER_ERROR = 2  # argparse's status for bad usage; the house status for every user error
EXIT_SIGTERM = 128 + 15  # what a shell reports for a process ended by SIGTERM


class UserError(Exception):
    """Base of msplora's user errors; ``str(e)`` is ``<problem>. Fix: <what to do>``."""


class UsageError(UserError):
    """Bad command-line arguments (unknown option, wrong type, missing value)."""


class ConfigError(UserError, ValueError):
    """A pyramid or run config that is invalid or does not fit the model; the message says how to
    fix it. A ``ValueError`` too, as a dataclass's ``__post_init__`` check is one. Re-exported as
    ``msplora.ConfigError`` and ``msplora.config.ConfigError``."""


class DataError(UserError, ValueError):
    """Data cannot be loaded as asked; the message names the problem and the fix. Re-exported as
    ``msplora.training.data.DataError``."""


class CheckpointError(UserError):
    """A checkpoint or adapter file that is missing, truncated or not what it claims to be."""


class ModelPathError(UserError, OSError):
    """A model name that is neither a folder, an alias, nor a Hub name that can be reached.

    An ``OSError`` too, as ``transformers`` raises for a model it cannot find, so callers that
    catch those catch this."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises :class:`UsageError` instead of printing the usage
    and exiting, so the boundary writes the one line (``error`` is argparse's documented hook)."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise UsageError(_with_fix(message, f"see `{self.prog} --help`"))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (jsonargparse wraps our errors several times)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 32:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _with_fix(message: str, fix: str) -> str:
    message = _one_line(message).rstrip(".")
    return message if "Fix:" in message else f"{message}. Fix: {fix}"


def user_message(exc: BaseException, command: str = "") -> str | None:
    """The one-line ``<problem>. Fix: <what to do>`` for a user error, else None (a bug of ours).

    The chain of causes is searched, since jsonargparse and Lightning wrap what our code raised
    (a ``ConfigError`` from ``MSPLoRAConfig.__post_init__`` arrives inside a ValueError whose text
    is a dump of the whole namespace): the library's own message is the one shown.
    """
    chain = _chain(exc)
    help_fix = f"see `msplora {command} --help`" if command else "see `msplora --help`"
    for e in chain:  # 1. our own classes, outermost first
        if isinstance(e, UserError):
            return _with_fix(str(e), help_fix)
    for e in chain:  # 2. jsonargparse's parse errors
        if isinstance(e, argparse.ArgumentError) or type(e).__module__.startswith("jsonargparse"):
            return explain_parse_error(exc, command=command)
    for e in reversed(chain):  # 3. messages in the house shape from code that raises builtins, innermost first
        text = str(e)
        if isinstance(e, (ValueError, OSError, LookupError, RuntimeError, ImportError)) and _is_house_shape(text):
            return _one_line(text)
    return None


def _is_house_shape(text: str) -> bool:
    # "<problem>. Fix: <what to do>" on one line; jsonargparse's multi-line dumps quote such
    # messages inside a list and are not themselves one.
    return "Fix:" in text and "\n" not in text.strip()


# -- jsonargparse's errors, explained -------------------------------------------------------------
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_SUBCOMMAND_KEY = re.compile(r"Subcommand '([^']+)' does not accept option '([^']+)'")
_GROUP_KEY = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")  # a config file's key
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
_EXPECTED = re.compile(r"Expected a <class '([^']+)'>\. Got value: (.*)")
_NO_FILE = re.compile(r"File does not exist: '([^']+)'")


def explain_parse_error(
    exc: BaseException,
    args: Sequence[str] | None = None,
    valid_keys: Callable[[str], Iterable[str]] | None = None,
    command: str = "",
) -> str:
    """One line for a jsonargparse error: the full key, what is wrong, and the valid choices.

    Args:
        exc: the ``ArgumentError`` (its chain of causes holds the nested keys and class paths).
        args: the parsed arguments; the ``--config`` files among them are checked for YAML
            syntax so a syntax error names its file (jsonargparse reads them as "<unicode string>").
        valid_keys: parent key -> the keys accepted under it (``""``: top level), for
            options the parser itself defines (trainer.*, model.*); keys of classes given by
            class_path are read from the class signature.
        command: for the generic fix, ``msplora <command> --help``.
    """
    chain = _chain(exc)
    texts = [str(e) for e in chain]
    help_fix = f"run `msplora {command} --help` for every option" if command else "see --help for every option"
    # The nested keys, outermost first ("model.pyramid" -> "levels" -> "rank"), without repeats.
    keys: list[str] = []
    for t in texts:
        m = _PARSER_KEY.match(t.strip())
        if m and (not keys or keys[-1] != m.group(1)):
            keys.append(m.group(1))
    classes = [m.group(1) for t in texts for m in [_CLASS_PATH.match(t.strip())] if m]
    innermost = texts[-1].strip()
    key = ".".join(keys)

    if "Problems parsing config" in "\n".join(texts):
        bad = _yaml_problem(_config_files(args or []))
        if bad:
            return bad
    m = _NO_FILE.search(innermost)
    if m:
        return f"--{key or 'config'} {m.group(1)}: no such file. Fix: check the path"
    m = _NOT_ACCEPTED.search(innermost)
    if m:
        unknown = m.group(1)
        choices = _class_keys(classes[-1]) if classes else []
        where = f"{key}.{unknown}" if key else unknown
        owner = f" ({classes[-1]})" if classes else ""
        return f"--{where}: unknown key{owner}. Fix: {_choose(unknown, choices, help_fix, prefix=key, list_prefixed=False)}"
    m = _SUBCOMMAND_KEY.search(innermost)
    if m:
        return _unknown_option(m.group(2), valid_keys, help_fix)
    m = _GROUP_KEY.search(innermost)
    if m:
        return _unknown_option(f"{m.group(1)}.{m.group(2)}", valid_keys, help_fix)
    m = _UNRECOGNIZED.search(innermost)
    if m:
        first = m.group(1).split()[0]
        if not first.startswith("-"):
            return f"unexpected argument {first!r}. Fix: {help_fix}"
        return _unknown_option(first.lstrip("-").split("=", 1)[0], valid_keys, help_fix)
    m = _EXPECTED.search(innermost)
    if m:
        kind = m.group(1)
        article = "an" if kind[0] in "aeiou" else "a"
        return f"--{key}: {m.group(2)!r} is not {article} {kind}. Fix: give --{key} {article} {kind} value"
    # Anything else: the innermost message, which is the most specific, on one line.
    where = f"--{key}: " if key else ""
    return _with_fix(f"{where}{innermost}", help_fix)


def _unknown_option(key: str, valid_keys: Callable[[str], Iterable[str]] | None, help_fix: str) -> str:
    # The first component that is not valid decides the choices: --modle.lr lists the top level.
    parent, choices, leaf = "", [], key
    if valid_keys is not None:
        for part in key.split("."):
            choices = sorted(valid_keys(parent))
            if part not in choices:
                leaf = part
                break
            parent = f"{parent}.{part}" if parent else part
    return f"--{key}: unknown option. Fix: {_choose(leaf, choices, help_fix, prefix=parent)}"


def _choose(unknown: str, choices: Sequence[str], help_fix: str, prefix: str = "", list_prefixed: bool = True) -> str:
    """The fix for an unknown key: the closest valid keys first, then every valid key when they
    are few enough for one line (else the help command)."""
    if not choices:
        return help_fix
    full = [f"{prefix}.{c}" if prefix and list_prefixed else c for c in choices]
    close = difflib.get_close_matches(unknown, choices, n=3, cutoff=0.5)
    mean = f"did you mean {' or '.join(f'--{prefix}.{c}' if prefix else f'--{c}' for c in close)}? " if close else ""
    if len(choices) <= 20:
        return f"{mean}valid keys: {', '.join(full)}" if mean else f"use one of {', '.join(full)}"
    return f"{mean}({help_fix})" if mean else help_fix


def _class_keys(class_path: str) -> list[str]:
    """The init parameters of ``class_path`` (jsonargparse accepts exactly those)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _config_files(args: Sequence[str]) -> list[str]:
    files = []
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            files.append(args[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


def _yaml_problem(files: Sequence[str]) -> str | None:
    """The first composed config file that is not valid YAML, with line and column."""
    import yaml

    for f in files:
        path = Path(f)
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            return f"--config {f}: not UTF-8 text (byte {e.start}). Fix: save the file as UTF-8"
        try:
            # compose, not load: syntax only, so no tag is ever constructed
            yaml.compose(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or _one_line(str(e))
            return f"--config {f}:{where}: invalid YAML ({problem}). Fix: correct the YAML at that place"
    return None


# -- the boundary ---------------------------------------------------------------------------------
def debug_requested(argv: Sequence[str]) -> bool:
    own = list(argv)[: list(argv).index("--")] if "--" in argv else list(argv)
    return "--debug" in own or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def strip_debug(argv: Sequence[str]) -> list[str]:
    """``argv`` without our own ``--debug`` (options after ``--`` belong to someone else)."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return [a for a in argv[:cut] if a != "--debug"] + argv[cut:]


def run_command(command: str, fn: Callable[[list[str]], object], argv: Sequence[str]) -> int:
    """Run ``fn(argv)``; a user error becomes ``msplora <command>: ... Fix: ...`` on stderr and
    SystemExit(2). Returns 0 on success (or ``fn``'s int result), whatever else ``fn`` returns
    (the console script passes it to ``sys.exit``, where a dict would mean exit 1)."""
    debug = debug_requested(argv)
    try:
        result = fn(strip_debug(argv))
    except SystemExit as e:
        if _is_sigterm(e):
            # Lightning stops a fit at the next batch on SIGTERM with a SystemExit of no code, which
            # would exit 0: a scheduler, `make` or a shell loop would take the stopped run for done.
            sys.stderr.write(
                f"msplora {command}: stopped by SIGTERM before it finished. Fix: run the same command again "
                "(a fit continues from its newest last.ckpt with --ckpt_path last; the ablation runner "
                "and the search redo only the unfinished runs)\n"
            )
            sys.stderr.flush()
            raise SystemExit(EXIT_SIGTERM) from None
        # `raise SystemExit("message")` (older entry points) and AblationError (a SystemExit with
        # code 2 and its message in args): a message for the user. An int alone (argparse's
        # --help, or a message already printed) passes through.
        text = e.code if isinstance(e.code, str) else e.args[0] if e.args and isinstance(e.args[0], str) else None
        if text is None or debug:
            raise
        text = re.sub(r"^msplora[ .]\w+:\s*(error:\s*)?", "", text.strip())
        _fail(command, _with_fix(text, f"see `msplora {command} --help`"))
    except Exception as e:
        message = None if debug else user_message(e, command)
        if message is None:
            raise
        _fail(command, message)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _is_sigterm(e: SystemExit) -> bool:
    """Lightning's SIGTERMException (imported only if Lightning already is)."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(e, exceptions.SIGTERMException)


def _fail(command: str, message: str):
    sys.stderr.write(f"msplora {command}: {message}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USER_ERROR) from None
