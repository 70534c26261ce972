"""One trainer per run folder: an exclusive lock on a file in it, held while the run lasts.

The operating system drops the lock when the process dies, however it dies (SIGKILL included), so a
lock is never stale; the file records who holds it, so that the next trainer can say. It is a POSIX
record lock (``lockf``), not ``flock``: forked data workers share an ``flock`` and would keep it after
a killed trainer. The price: closing any descriptor of the file drops a POSIX lock, so this process
opens the file once and nothing else in it opens the file (remote sync skips it).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import weakref
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import RunFolderInUse

logger = logging.getLogger("clipkit.train")

LOCK_FILE = ".clipkit-train.lock"


class _Held:
    """An open, locked lock file and how many runs of this process use it."""

    def __init__(self, fd: int) -> None:
        self.fd, self.runs = fd, 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = -1


# by run folder: a process that runs twice in the same folder (a notebook resuming) holds its lock once
_HELD: Dict[Path, _Held] = {}


def lock_run_folder(run_dir: Path, owner: Any) -> None:
    """Take ``run_dir`` for this process while ``owner`` (the run's flags) lives, or until the process ends;
    :class:`RunFolderInUse` naming the holder if another process has it.

    Where the filesystem offers no locks, a warning says that nothing stops a second trainer.
    """
    run_dir = Path(run_dir).resolve()
    path = run_dir / LOCK_FILE
    held = _HELD.get(run_dir)
    if held is not None and not _holds(held, path):  # the folder was deleted and made anew since
        held.close()
        held = None
    if held is None:
        fd = _lock(run_dir, path)
        if fd is None:
            return
        held = _HELD[run_dir] = _Held(fd)
    held.runs += 1
    try:
        weakref.finalize(owner, _release, run_dir, held)
    except TypeError:  # flags that cannot be referenced weakly: the lock lasts as long as the process
        pass


def _lock(run_dir: Path, path: Path) -> Optional[int]:
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise RunFolderInUse(f"run folder {run_dir} is in use by another trainer ({_holder(path)}); wait for "
                                 f"it to end, or pass another --name") from None
        # e.g. a network filesystem mounted without lock support
        logger.warning("cannot lock run folder %s (%s): nothing stops a second trainer from using it at the same "
                       "time", run_dir, exc.strerror or exc)
        return None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    return fd


def _holds(held: _Held, path: Path) -> bool:
    try:
        mine, there = os.fstat(held.fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _release(run_dir: Path, held: _Held) -> None:
    held.runs -= 1
    if held.runs == 0:
        held.close()
        if _HELD.get(run_dir) is held:
            del _HELD[run_dir]


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {int(record['pid'])} on host {record['host']}, since {record['since']}: "
                f"{str(record['command'])[:200]}")
    except (OSError, ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing
        return f"a process that has not yet recorded itself in {path}"
