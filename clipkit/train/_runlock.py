"""One trainer per run folder: an exclusive ``flock`` on a file in it, held until the process ends.

The operating system drops the lock when the process dies, however it dies (SIGKILL included), so a
lock is never stale; the file records who holds it, so that the next trainer can say.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Dict

from ..errors import ClipkitError

logger = logging.getLogger("clipkit.train")

LOCK_FILE = ".clipkit-train.lock"
# open lock files by run folder: a process that runs twice in the same folder (a notebook resuming) holds it once
_HELD: Dict[Path, int] = {}


class RunFolderInUse(ClipkitError):
    """Another live process trains in this run folder."""


def lock_run_folder(run_dir: Path) -> None:
    """Take ``run_dir`` for this process until it ends; :class:`RunFolderInUse` naming the holder if another has it.

    Where the filesystem offers no locks, a warning says that nothing stops a second trainer.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderInUse(f"run folder {run_dir} is in use by another trainer ({_holder(path)}); wait for it "
                             f"to end, or pass another --name") from None
    except OSError as exc:  # e.g. a network filesystem mounted without lock support
        os.close(fd)
        logger.warning("cannot lock run folder %s (%s): nothing stops a second trainer from using it at the same "
                       "time", run_dir, exc.strerror or exc)
        return
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    _HELD[run_dir] = fd  # never closed: the lock lasts as long as the process


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {int(record['pid'])} on host {record['host']}, since {record['since']}: "
                f"{str(record['command'])[:200]}")
    except (OSError, ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing
        return f"a process that has not yet recorded itself in {path}"
