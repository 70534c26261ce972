"""Which objective a run trains with, and its options: from ``--objective`` and ``--objective-opt``, and for
the builtins from OpenCLIP's flags (``--siglip``, ``--distill-*``, ``--local-loss``, ...).

Torch-free: :func:`clipkit.train.args.validate` checks the choice and the options before any work starts,
and the trainer builds the objective from the same answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import ArgsError, ClipkitError

#: How OpenCLIP's flags set the builtin objectives' options: option -> (settings group, setting).
FLAG_OPTIONS: Dict[str, Dict[str, Tuple[str, str]]] = {
    "clip": {"local_loss": ("optimization", "local_loss"), "gather_with_grad": ("optimization", "gather_with_grad")},
    "siglip": {"dist_impl": ("optimization", "loss_dist_impl")},
    "distill": {"model": ("model", "distill_model"), "pretrained": ("model", "distill_pretrained"),
                "local_loss": ("optimization", "local_loss"), "gather_with_grad": ("optimization", "gather_with_grad")},
}


def objective_name(explicit: Optional[str], siglip: bool, distill_model: Optional[str]) -> str:
    """``--objective`` when given; else what OpenCLIP's flags mean: ``distill`` with ``--distill-model``,
    ``siglip`` with ``--siglip``, else ``clip``."""
    if explicit:
        return explicit
    if distill_model is not None:
        return "distill"
    return "siglip" if siglip else "clip"


@dataclass(frozen=True)
class ObjectiveChoice:
    """The objective a run trains with: its registered name, and its options as given (a plain mapping)."""

    name: str
    options: Mapping[str, Any]

    def entry(self) -> Any:
        """The registry entry; an :class:`ArgsError` naming ``--objective`` when there is none."""
        from ..kinds import OBJECTIVE
        from ..registry import registry

        try:
            return registry.get(OBJECTIVE, self.name, where="--objective")
        except ClipkitError as exc:
            raise ArgsError(str(exc)) from exc

    def bound(self) -> Any:
        """The options bound to the objective's registered options class (every problem one line, by key),
        or ``None`` for an objective registered without one (it then takes no options)."""
        from .._typed import validate

        entry = self.entry()
        try:
            cls = entry.config_class()
        except ClipkitError as exc:
            raise ArgsError(f"--objective {self.name}: {exc}") from exc
        if cls is None:
            if self.options:
                raise ArgsError(f"--objective-opt: objective {self.name!r} takes no options "
                                f"(got {', '.join(sorted(self.options))})")
            return None
        options, problems = validate(cls, self.options, "", f"objective {self.name!r}")
        if problems:
            raise ArgsError("; ".join(f"--objective-opt {p.path}: {p.message}" for p in problems))
        return options


def objective_choice(model: Any, optimization: Any) -> ObjectiveChoice:
    """The objective the settings select (the model and optimization groups), with its options: OpenCLIP's
    flags for a builtin, then ``--objective-opt`` (which wins)."""
    name = objective_name(optimization.objective, model.siglip, model.distill_model)
    groups = {"model": model, "optimization": optimization}
    options: Dict[str, Any] = {}
    for option, (group, setting) in FLAG_OPTIONS.get(name, {}).items():
        value = getattr(groups[group], setting)
        if value is not None and value is not False:
            options[option] = value
    options.update(optimization.objective_opt)
    return ObjectiveChoice(name, options)
