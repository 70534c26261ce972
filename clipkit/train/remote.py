"""``--remote-sync``: copy complete checkpoints and logs of a run to any fsspec URL.

Only files that are complete are copied (checkpoints are renamed into place when whole), each one to
a temporary remote name first and then moved, so the remote folder never holds a torn checkpoint.
"""
from __future__ import annotations

import logging
import posixpath
import time
from pathlib import Path
from typing import Dict, Tuple

from ._runlock import LOCK_FILE
from .checkpointer import TMP_PREFIX

logger = logging.getLogger("clipkit.train")


class RemoteSync:
    def __init__(self, ckpt_dir: Path, url: str, protocol: str, every_s: int) -> None:  # protocol checked by the flags
        import fsspec

        self.run_dir, self.every_s = ckpt_dir.parent, every_s
        self.fs, self.root = fsspec.core.url_to_fs(url.rstrip("/") + "/" + self.run_dir.name)
        self.sent: Dict[str, Tuple[int, int]] = {}
        self.last = 0.0

    def sync(self, final: bool) -> None:
        if not final and time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        copied = 0
        # a Distributed Checkpoint folder's commit markers go last, after the shards they describe
        for path in sorted(self.run_dir.rglob("*"), key=lambda p: (p.name in (".metadata", "clipkit.pt"), str(p))):
            relative = path.relative_to(self.run_dir)
            if not path.is_file() or any(part.startswith(TMP_PREFIX) for part in relative.parts) \
                    or relative.parts[:2] == ("checkpoints", "fetched") or relative == Path(LOCK_FILE):
                continue
            stat = path.stat()
            key = str(path.relative_to(self.run_dir))
            if self.sent.get(key) == (stat.st_size, stat.st_mtime_ns):
                continue
            target = f"{self.root}/{key}"
            staging = posixpath.join(posixpath.dirname(target), TMP_PREFIX + path.name)
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            self.fs.put_file(str(path), staging)
            self.fs.mv(staging, target)
            self.sent[key] = (stat.st_size, stat.st_mtime_ns)
            copied += 1
        if copied:
            logger.info("remote sync: %d file(s) copied to %s", copied, self.root)


def fetch(url: str, folder: Path) -> Path:
    """Copy a checkpoint file (or a Distributed Checkpoint folder) from ``url`` into ``folder``; its local path.

    The copy is made under a temporary name and renamed when complete.
    """
    import fsspec

    path: str  # fsspec is untyped: the path inside its filesystem
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"--resume {url}: no such remote checkpoint")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / posixpath.basename(path.rstrip("/"))
    staging = folder / (TMP_PREFIX + target.name)
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(staging), recursive=True)
    else:
        fs.get_file(path, str(staging))
    if target.exists():
        import shutil

        shutil.rmtree(target) if target.is_dir() else target.unlink()
    staging.rename(target)
    logger.info("fetched %s to %s", url, target)
    return target


def pull(url: str, run_name: str, ckpt_dir: Path, folders: bool) -> None:
    """Copy a run's complete checkpoints from its ``--remote-sync`` copy into ``ckpt_dir`` (resume on a new machine):
    its ``.pt`` files, and its checkpoint folders only when ``folders`` (a ``--fsdp`` run)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url.rstrip("/") + "/" + run_name + "/checkpoints")
    if not fs.exists(root):
        logger.info("--resume latest: nothing under %s/%s/checkpoints either", url.rstrip("/"), run_name)
        return
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    wanted = [n for n in names if not n.startswith(TMP_PREFIX)
              and (n.endswith(".pt") or folders and n.startswith("epoch_"))]
    for name in wanted:
        fetch(f"{url.rstrip('/')}/{run_name}/checkpoints/{name}", ckpt_dir)
    logger.info("--resume latest: copied %d checkpoint(s) of the run back from %s", len(wanted), url)
