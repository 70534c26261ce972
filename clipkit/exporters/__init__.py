"""Exporting a model to other runtimes: ``clipkit export MODEL --format NAME --out DIR``.

Formats are registered parts (kind ``exporter``, hook ``register_exporters``): the builtin ``onnx`` and
``hf`` come from the builtin plugin ``clipkit.builtin.exporters`` exactly as a third party's would, and
``--format`` offers whatever is registered. An exporter decides per model whether it can write it
(``supports(model)`` returns ``None`` or the reason it cannot), so a plugin tower that some format can
express says so in that format's exporter, never in a list here. This module imports no torch
(``clipkit.kinds`` reads its protocols); :func:`export_model` imports what it needs when called.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, List, Optional, Protocol

from .. import errors


def __getattr__(name: str) -> Any:
    # ExportError lived here until every clipkit exception moved to clipkit.errors; exporter plugins
    # written against the old place keep working for a release, told where it went
    if name == "ExportError":
        warnings.warn("clipkit.exporters.ExportError moved to clipkit.errors.ExportError; the old name goes "
                      "away in the next release", DeprecationWarning, stacklevel=2)
        return errors.ExportError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Exporter(Protocol):
    """What an exporter factory returns."""

    def supports(self, model: Any) -> Optional[str]:
        """``None`` when this format can express ``model``, else the reason it cannot (one line)."""

    def export(self, model: Any, out: Path) -> List[str]:
        """Write ``model`` (in eval mode) into the folder ``out`` (which exists, empty) and check what was
        written. Returns the lines to report (files written, the check's result); a failed check raises
        :class:`~clipkit.errors.ExportError`.
        """


class ExporterFactory(Protocol):
    """A registered exporter: ``factory() -> Exporter``."""

    def __call__(self) -> Exporter: ...


def formats() -> List[str]:
    """The registered export formats."""
    from ..kinds import EXPORTER
    from ..registry import registry

    return sorted(registry.names(EXPORTER))


def get_exporter(fmt: str) -> Exporter:
    """The exporter registered as ``fmt``; unknown names are an error listing the registered ones."""
    from ..kinds import EXPORTER
    from ..registry import registry

    if not registry.has(EXPORTER, fmt):
        raise errors.ExportError(f"unknown export format {fmt!r}; registered formats: {', '.join(formats())}")
    exporter: Exporter = registry.get(EXPORTER, fmt).load()()
    return exporter


def export_model(model_name: str, fmt: str, out: Path, pretrained: Optional[str] = None) -> List[str]:
    """Export ``model_name`` (a config name, JSON path, ``local-dir:``/``hf-hub:`` name; weights from
    ``pretrained`` as :func:`clipkit.create_model_and_transforms` takes them) as ``fmt`` into ``out``.

    The model is checked against the format before anything is written. Returns the exporter's report.
    """
    from ..factory import create_model
    exporter = get_exporter(fmt)
    model = create_model(model_name, pretrained=pretrained)
    model.eval()
    reason = exporter.supports(model)
    if reason is not None:
        raise errors.ExportError(f"{model_name} cannot be exported as {fmt}: {reason}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise errors.ExportError(f"{out}: the export folder must be new or empty")
    out.mkdir(parents=True, exist_ok=True)
    return exporter.export(model, out)
