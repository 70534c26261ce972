"""The run folder, as OpenCLIP lays it out: ``{logs}/{name}/`` with ``out.log``, ``params.txt``,
``checkpoints/`` and ``tensorboard/``; and clipkit's ``settings.json`` (the resolved settings, which
``--config`` reads back to repeat the run). Process 0 holds its lock (``_runlock``) for the whole run."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from .settings import SETTINGS_FILE, Settings, write_settings_file


def subfolder(root: Optional[Path], *parts: str) -> Optional[Path]:
    """``root/parts...``, or ``None`` for a run without a folder (``--logs none``)."""
    return root.joinpath(*parts) if root is not None else None


class RunFolder:
    """Where one run writes; ``path`` is ``None`` under ``--logs none`` (nothing is written)."""

    def __init__(self, logs: Optional[str], name: Optional[str]) -> None:
        # resolved settings always name the run; an unnamed one has no folder to write
        self.path: Optional[Path] = Path(logs) / name if logs and name is not None else None

    @property
    def checkpoints(self) -> Optional[Path]:
        return subfolder(self.path, "checkpoints")

    @property
    def tensorboard(self) -> Optional[Path]:
        return subfolder(self.path, "tensorboard")

    @property
    def results(self) -> Optional[Path]:
        return subfolder(self.path, "checkpoints", "results.jsonl")

    def log_file(self, rank: int, world: int, per_process: bool) -> Optional[Path]:
        """``out.log``, or with ``--log-local`` in a distributed run ``out-RANK.log`` (every rank, 0 too)."""
        if self.path is None or rank != 0 and not per_process:
            return None
        return self.path / ("out.log" if not per_process or rank == 0 and world == 1 else f"out-{rank}.log")

    def write_settings(self, settings: Settings) -> None:
        """``params.txt`` exactly as OpenCLIP writes it (every flag, ``name: value``, sorted), and
        ``settings.json``, the same settings by group as ``--config`` reads them."""
        assert self.path is not None
        flat = settings.flat()
        with open(self.path / "params.txt", "w", encoding="utf-8") as f:
            for key in sorted(flat):
                f.write(f"{key}: {flat[key]}\n")
        write_settings_file(settings, self.path / SETTINGS_FILE)

    def copy_codebase(self) -> None:
        """``--copy-codebase``: the installed clipkit package, into ``code/clipkit``."""
        assert self.path is not None
        package = Path(__file__).resolve().parents[1]
        target = self.path / "code" / "clipkit"
        if not target.exists():
            shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
