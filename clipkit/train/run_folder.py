"""The run folder, as OpenCLIP lays it out: ``{logs}/{name}/`` with ``out.log``, ``params.txt``,
``checkpoints/`` and ``tensorboard/``; and clipkit's ``settings.json`` (the resolved settings, which
``--config`` reads back to repeat the run). Process 0 holds its lock (``_runlock``) for the whole run."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .settings import SETTINGS_FILE, Settings, write_settings_file


@dataclass(frozen=True)
class RunPaths:
    """A run folder's fixed places. ``run_folder`` is ``{logs}/{name}``, or ``None`` for a run without one
    (``--logs none``), and then every place is ``None`` too."""

    run_folder: Optional[Path]

    def _inside(self, *parts: str) -> Optional[Path]:
        return self.run_folder.joinpath(*parts) if self.run_folder is not None else None

    @property
    def checkpoints(self) -> Optional[Path]:
        """``RUN/checkpoints``, where OpenCLIP writes ``results.jsonl``."""
        return self._inside("checkpoints")

    @property
    def tensorboard(self) -> Optional[Path]:
        """``RUN/tensorboard``."""
        return self._inside("tensorboard")


class RunFolder(RunPaths):
    """Where one run writes; ``run_folder`` is ``None`` under ``--logs none`` (nothing is written)."""

    @classmethod
    def of(cls, logs: Optional[str], name: Optional[str]) -> RunFolder:
        # resolved settings always name the run; an unnamed one has no folder to write
        return cls(Path(logs) / name if logs and name is not None else None)

    def log_file(self, rank: int, world: int, per_process: bool) -> Optional[Path]:
        """``out.log``, or with ``--log-local`` in a distributed run ``out-RANK.log`` (every rank, 0 too)."""
        if self.run_folder is None or rank != 0 and not per_process:
            return None
        return self.run_folder / ("out.log" if not per_process or rank == 0 and world == 1 else f"out-{rank}.log")

    def write_settings(self, settings: Settings) -> None:
        """``params.txt`` exactly as OpenCLIP writes it (every flag, ``name: value``, sorted), and
        ``settings.json``, the same settings by group as ``--config`` reads them."""
        assert self.run_folder is not None
        flat = settings.flat()
        with open(self.run_folder / "params.txt", "w", encoding="utf-8") as f:
            for key in sorted(flat):
                f.write(f"{key}: {flat[key]}\n")
        write_settings_file(settings, self.run_folder / SETTINGS_FILE)

    def copy_codebase(self) -> None:
        """``--copy-codebase``: the installed clipkit package, into ``code/clipkit``."""
        assert self.run_folder is not None
        package = Path(__file__).resolve().parents[1]
        target = self.run_folder / "code" / "clipkit"
        if not target.exists():
            shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
