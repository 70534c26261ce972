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

from .checkpoints import TMP_PREFIX

logger = logging.getLogger("clipkit.train")


class RemoteSync:
    def __init__(self, ckpt_dir: Path, url: str, protocol: str, every_s: int):
        import fsspec

        if protocol == "s3" and not url.startswith("s3://"):
            raise ValueError(f"--remote-sync {url}: --remote-sync-protocol s3 needs an s3:// URL "
                             f"(or pass --remote-sync-protocol fsspec)")
        self.run_dir, self.every_s = ckpt_dir.parent, every_s
        self.fs, self.root = fsspec.core.url_to_fs(url.rstrip("/") + "/" + self.run_dir.name)
        self.sent: Dict[str, Tuple[int, int]] = {}
        self.last = 0.0

    def sync(self, final: bool) -> None:
        if not final and time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        copied = 0
        for path in sorted(self.run_dir.rglob("*")):
            if not path.is_file() or path.name.startswith(TMP_PREFIX):
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
