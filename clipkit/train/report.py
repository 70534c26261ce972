"""Where a run reports: the log (terminal and ``out.log``), and the registered reporters (kind ``reporter``):
TensorBoard, wandb, ``results.jsonl``, or any a plugin registers.

A reporter is built once, on process 0, by a factory: ``factory(ctx: ReporterContext) -> Reporter``.
``--report-to a,b`` names the ones a run uses (OpenCLIP's ``all`` is ``tensorboard,wandb``); a reporter
registered with ``always=True`` is used by every run that has a run folder without being named: that is
how ``results.jsonl`` is always written, as in OpenCLIP. This module imports no torch (``clipkit.kinds``
reads its protocol); the builtin factories import what they need when called.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple

from ..errors import ArgsError, ClipkitError
from .run_folder import RunPaths

logger = logging.getLogger("clipkit.train")
_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"


def setup_logging(log_file: Optional[Path], debug: bool, rank: int, all_ranks: bool) -> Callable[[], None]:
    """Log to stderr and ``log_file``; other processes only warn unless ``--log-local``.

    Returns a function that puts the ``clipkit`` logger back as it was (a run inside a larger program).
    """
    root = logging.getLogger("clipkit")
    saved = (root.level, root.propagate)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler._clipkit_train = True  # type: ignore[attr-defined]  # clipkit's mark: its own handlers, removed at the end
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


@dataclass(frozen=True)
class ReporterContext(RunPaths):
    """What a reporter's factory is told about the run: its places (``checkpoints``: ``RUN/checkpoints``,
    where OpenCLIP writes ``results.jsonl``; ``tensorboard``: ``RUN/tensorboard``; both ``None`` without a
    run folder) and:

    Attributes:
        run_folder: the run's folder (``{logs}/{name}``), or ``None`` under ``--logs none``.
        name: the run's name (``--name``).
        settings: every setting of the run under its flag's name (OpenCLIP's flat namespace).
    """

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)


class Reporter(Protocol):
    """Where metrics go. Every method may be called on process 0 only; ``close`` may be called twice."""

    def scalars(self, values: Dict[str, float], step: int) -> None:
        """Training values (``train/loss``, ``train/<term>``, ``train/lr``, ...) and evaluation values
        (``val/...``), at an optimizer step."""

    def result(self, metrics: Dict[str, Any]) -> None:
        """One evaluation's metrics, with ``epoch`` and ``step``."""

    def close(self) -> None:
        """Flush and release; called once at the end of the run, and harmless a second time."""


class ReporterFactory(Protocol):
    """A registered reporter's factory: ``factory(ctx)``."""

    def __call__(self, ctx: ReporterContext) -> Reporter: ...


class TensorBoardReporter:
    """Scalars as TensorBoard events in ``folder``."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def result(self, metrics: Dict[str, Any]) -> None:
        """Evaluation results reach TensorBoard as ``val/`` scalars."""

    def close(self) -> None:
        self.writer.close()  # closing twice is a no-op for SummaryWriter


class WandbReporter:
    """Scalars to a wandb run named (and identified, so that a resume continues it) by the run's name."""

    def __init__(self, project: str, name: str, notes: str, config: Dict[str, Any], folder: Optional[Path]) -> None:
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
        self.closed = False

    def scalars(self, values: Dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step}, step=step)

    def result(self, metrics: Dict[str, Any]) -> None:
        """Evaluation results reach wandb as ``val/`` scalars."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.run.finish()


class ResultsFile:
    """``checkpoints/results.jsonl``: one JSON object per evaluation, as OpenCLIP writes it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def scalars(self, values: Dict[str, float], step: int) -> None:
        """Only evaluation results are written here."""

    def result(self, metrics: Dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        """Every result is closed when written."""


# -- the builtins, registered by clipkit.builtin.reporters as a third party registers its own ---------
def build_tensorboard(ctx: ReporterContext) -> Reporter:
    """``tensorboard``: scalars as events in ``RUN/tensorboard``."""
    if ctx.tensorboard is None:
        raise ClipkitError("the tensorboard reporter needs a run folder; --logs is 'none'")
    return TensorBoardReporter(ctx.tensorboard)


def build_wandb(ctx: ReporterContext) -> Reporter:
    """``wandb``: scalars to the wandb run named by the run (``--wandb-project-name``, ``--wandb-notes``)."""
    return WandbReporter(str(ctx.settings.get("wandb_project_name", "open-clip")), ctx.name,
                         str(ctx.settings.get("wandb_notes", "")), dict(ctx.settings), ctx.run_folder)


def build_results_file(ctx: ReporterContext) -> Reporter:
    """``results``: every evaluation as a line of ``RUN/checkpoints/results.jsonl``."""
    if ctx.checkpoints is None:
        raise ClipkitError("the results reporter needs a run folder; --logs is 'none'")
    return ResultsFile(ctx.checkpoints / "results.jsonl")


@dataclass(frozen=True)
class ReporterSpec:
    """One reporter as a plugin registers it: ``register(name, factory, **keywords)``."""

    name: str
    factory: str
    keywords: Mapping[str, Any] = field(default_factory=dict)


BUILTIN_REPORTERS: Tuple[ReporterSpec, ...] = (
    ReporterSpec("tensorboard", f"{__name__}:build_tensorboard", {"needs_folder": True}),
    ReporterSpec("wandb", f"{__name__}:build_wandb", {"requires": "wandb"}),
    ReporterSpec("results", f"{__name__}:build_results_file", {"always": True, "needs_folder": True}),
)
#: What OpenCLIP's ``--report-to all`` means.
ALL = ("tensorboard", "wandb")


def register_builtin_reporters(register: Any) -> None:
    """Register the builtins through a ``register`` callback, as a third party's hook does."""
    for spec in BUILTIN_REPORTERS:
        register(spec.name, spec.factory, **spec.keywords)


def selected_reporters(report_to: str, has_folder: bool) -> str:
    """The ``--report-to`` value checked against the registered reporters: the names joined by commas
    (``all`` expanded), or an :class:`ArgsError` naming what is wrong (an unknown name with did-you-mean
    and the installed ones, a missing package, a reporter that needs a run folder without one)."""
    import importlib.util

    from ..kinds import REPORTER
    from ..registry import registry

    names = [t.strip() for t in report_to.split(",") if t.strip()]
    if names == ["all"]:
        names = list(ALL)
    problems: List[str] = []
    for name in names:
        if not registry.has(REPORTER, name):
            problems.append(registry.unknown_message(REPORTER, name, where="--report-to"))
            continue
        entry = registry.get(REPORTER, name)
        if entry.meta.get("always"):
            problems.append(f"--report-to {name}: the {name} reporter is always on when the run has a folder; "
                            f"drop it from --report-to")
        required = entry.meta.get("requires")
        if required and importlib.util.find_spec(required) is None:
            problems.append(f"--report-to {name} needs the {required} package: pip install {required}")
        if entry.meta.get("needs_folder") and not has_folder:
            problems.append(f"--report-to {name} needs a run folder; --logs is 'none'")
    if problems:
        raise ArgsError(problems[0] if len(problems) == 1 else "; ".join(problems))
    return ",".join(dict.fromkeys(names))


class Reporters:
    """Every reporter of the run, called alike: ``scalars`` (training and ``val/`` values by step),
    ``result`` (one evaluation's metrics) and ``close``. Empty on processes other than 0."""

    def __init__(self, reporters: List[Any]) -> None:
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
    """The reporters ``--report-to`` names (``settings``: the logging group), after every reporter registered
    with ``always=True`` when the run has a folder; none where not ``enabled`` (processes other than 0)."""
    if not enabled:
        return Reporters([])
    from ..kinds import REPORTER
    from ..registry import registry

    ctx = ReporterContext(folder.run_folder, settings.name, dict(flat_settings))
    chosen = [e for e in registry.entries(REPORTER) if e.meta.get("always") and folder.run_folder is not None]
    chosen += [registry.get(REPORTER, name, where="--report-to")
               for name in (settings.report_to.split(",") if settings.report_to else [])]
    reporters: List[Any] = []
    try:
        for entry in chosen:
            reporter = entry.load()(ctx)
            for method in ("scalars", "result", "close"):
                if not callable(getattr(reporter, method, None)):
                    raise ClipkitError(f"{entry.where}: its factory returned {type(reporter).__name__}, which has no "
                                       f"{method}() method")
            reporters.append(reporter)
    except BaseException:
        for reporter in reporters:  # what was opened before the failure is closed again
            reporter.close()
        raise
    return Reporters(reporters)
