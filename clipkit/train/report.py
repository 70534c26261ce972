"""Where a run reports: the log (terminal and ``out.log``), TensorBoard, wandb, and ``results.jsonl``."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..errors import ClipkitError

logger = logging.getLogger("clipkit.train")
_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"


def setup_logging(log_file: Optional[Path], debug: bool, rank: int, all_ranks: bool) -> Callable[[], None]:
    """Log to stderr and ``log_file``; other processes only warn unless ``--log-local``.

    Returns a function that puts the ``clipkit`` logger back as it was (a run inside a larger program).
    """
    root = logging.getLogger("clipkit")
    saved = (root.level, root.propagate)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler._clipkit_train = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(_FORMAT if rank == 0 else f"rank {rank} | " + _FORMAT))
        if rank != 0 and not all_ranks:
            handler.setLevel(logging.WARNING)
        root.addHandler(handler)
    root.propagate = False

    def restore() -> None:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved[0])
        root.propagate = saved[1]
    return restore


class TensorBoardReporter:
    """Scalars as TensorBoard events in ``folder``."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def result(self, metrics: Dict[str, Any]) -> None:
        """Evaluation results reach TensorBoard as ``val/`` scalars."""

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """Scalars to a wandb run named (and identified, so that a resume continues it) by the run's name."""

    def __init__(self, project: str, name: str, notes: str, config: Dict[str, Any], folder: Optional[Path]):
        try:
            import wandb
        except ImportError as exc:
            raise ClipkitError("--report-to wandb needs the wandb package: pip install wandb") from exc
        try:
            self.run = wandb.init(project=project, name=name, id=name, resume="allow", notes=notes, config=config,
                                  dir=str(folder) if folder is not None else None)
        except Exception as exc:  # no API key, no network, ...: say so in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClipkitError(f"--report-to wandb: wandb.init failed: {first} (WANDB_MODE=offline logs "
                               f"locally; `wandb login` sets the API key)") from exc

    def scalars(self, values: Dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step}, step=step)

    def result(self, metrics: Dict[str, Any]) -> None:
        """Evaluation results reach wandb as ``val/`` scalars."""

    def close(self) -> None:
        self.run.finish()


class ResultsFile:
    """``checkpoints/results.jsonl``: one JSON object per evaluation, as OpenCLIP writes it."""

    def __init__(self, path: Path):
        self.path = path

    def scalars(self, values: Dict[str, float], step: int) -> None:
        """Only evaluation results are written here."""

    def result(self, metrics: Dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        """Every result is closed when written."""


class Reporters:
    """Every reporter of the run, called alike: ``scalars`` (training and ``val/`` values by step),
    ``result`` (one evaluation's metrics) and ``close``. Empty on processes other than 0."""

    def __init__(self, reporters: List[Any]):
        self.reporters = reporters

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for reporter in self.reporters:
            reporter.scalars(values, step)

    def result(self, metrics: Dict[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.result(metrics)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


def build_reporters(settings: Any, folder: Any, flat_settings: Dict[str, Any], enabled: bool) -> Reporters:
    """The reporters ``--report-to`` names (``settings``: the logging group), plus ``results.jsonl`` when the
    run has a folder; none where not ``enabled`` (processes other than 0)."""
    if not enabled:
        return Reporters([])
    targets = settings.report_to.split(",") if settings.report_to else []
    reporters: List[Any] = [ResultsFile(folder.results)] if folder.path is not None else []
    if "tensorboard" in targets:
        reporters.append(TensorBoardReporter(folder.tensorboard))
    if "wandb" in targets:
        reporters.append(WandbReporter(settings.wandb_project_name, settings.name, settings.wandb_notes,
                                       flat_settings, folder.path))
    return Reporters(reporters)
