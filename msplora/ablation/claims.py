"""Claims: one worker per run, however many workers share a results folder (processes, GPUs,
machines on one file system).

A run's claim is ``<result>.json.claim``, created with ``O_EXCL`` (so exactly one creator wins)
and holding ``host``, ``pid`` and ``since``. While the run goes, a thread touches the file every
``heartbeat`` seconds; the claim goes away when the run ends, finished or not. A claim is stale,
and taken over, when its process is gone (same host) or it has not been touched for ``stale_after``
seconds (another host). Two workers that find the same stale claim at the same instant could both
take it; the window is one file read, and a claim only goes stale after its worker died.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

STALE_AFTER = 600.0  # seconds without a heartbeat before another host's claim counts as abandoned
SUFFIX = ".claim"


class Busy(Exception):
    """Another live worker holds this run."""


def claim_path(result: Path) -> Path:
    return result.with_name(result.name + SUFFIX)


def holder(lock: Path) -> dict | None:
    """The claim's content (host, pid, since), or None when there is none or it is unreadable."""
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def is_stale(lock: Path, stale_after: float = STALE_AFTER) -> bool:
    info = holder(lock)
    if info is not None and info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return True  # its process is gone
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
        else:
            return False  # alive on this host, whatever its heartbeat
    try:
        return time.time() - lock.stat().st_mtime > stale_after
    except FileNotFoundError:
        return True


def _take(lock: Path, stale_after: float) -> bool:
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            seen = holder(lock)
            if not is_stale(lock, stale_after) or holder(lock) != seen:
                return False
            lock.unlink(missing_ok=True)  # abandoned: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


@contextlib.contextmanager
def claim(result: Path, stale_after: float = STALE_AFTER, heartbeat: float | None = None) -> Iterator[None]:
    """``with claim(result_path):`` run it; raises :class:`Busy` when a live worker holds it."""
    lock = claim_path(result)
    lock.parent.mkdir(parents=True, exist_ok=True)
    if not _take(lock, stale_after):
        raise Busy(str(result))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat if heartbeat is not None else stale_after / 4):
            with contextlib.suppress(OSError):
                os.utime(lock)

    thread = threading.Thread(target=beat, name=f"claim {result.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        lock.unlink(missing_ok=True)
