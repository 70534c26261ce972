"""Which objective a run trains with, and its options: from ``--objective`` and ``--objective-opt``, for
the builtins from OpenCLIP's flags (``--siglip``, ``--distill-*``, ``--local-loss``, ...), for a plugin's
from the flags it registered for its options, else from the model family of ``--model``.

Torch-free: :func:`clipkit.train.args.validate` checks the choice and the options before any work starts,
and the trainer builds the objective from the same answer.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import ArgsError, ClipkitError

#: How OpenCLIP's flags set the builtin objectives' options: option -> (settings group, setting).
FLAG_OPTIONS: Dict[str, Dict[str, Tuple[str, str]]] = {
    "clip": {"local_loss": ("optimization", "local_loss"), "gather_with_grad": ("optimization", "gather_with_grad")},
    "siglip": {"dist_impl": ("optimization", "loss_dist_impl")},
    "distill": {"model": ("model", "distill_model"), "pretrained": ("model", "distill_pretrained"),
                "local_loss": ("optimization", "local_loss"), "gather_with_grad": ("optimization", "gather_with_grad")},
}


@dataclass(frozen=True)
class ObjectiveFlag:
    """A ``clipkit-train`` flag an installed objective registered for one of its options (``flags=``)."""

    objective: str
    option: str
    flag: str
    kind: type
    doc: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def objective_flags() -> List[ObjectiveFlag]:
    """The flags installed objectives registered for their options, in name order (the parser adds them)."""
    from ..kinds import OBJECTIVE
    from ..registry import registry

    out = []
    for entry in registry.entries(OBJECTIVE):
        flags = entry.meta.get("flags") or {}
        cls = entry.config_class() if flags else None
        if cls is None:
            continue
        hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
        for option, flag in flags.items():
            if option in fields and hints[option] in (bool, int, float, str):
                out.append(ObjectiveFlag(entry.name, option, flag, hints[option], fields[option].metadata.get("doc", "")))
    return out


def family_objective(model: str) -> Optional[str]:
    """The objective the model family of ``--model`` asks for (``trains_with=`` in its registration), if any.

    Read from the config alone (a name or a ``.json`` file; torch-free, offline); anything unreadable has
    none here and is reported when the model is built."""
    from pathlib import Path

    from ..config import get_model_config, infer_part, parse_model_name, read_json_object
    from ..kinds import MODEL_FAMILY
    from ..registry import registry

    if parse_model_name(model)[0] is not None:  # hub models are not fetched to check flags: use --objective
        return None
    try:
        raw = get_model_config(model)
        if raw is None and model.endswith(".json") and Path(model).is_file():
            raw = read_json_object(Path(model))
    except ClipkitError:
        return None
    if not isinstance(raw, dict):
        return None
    family = infer_part(MODEL_FAMILY, raw)
    return registry.get(MODEL_FAMILY, family).meta.get("trains_with") if registry.has(MODEL_FAMILY, family) else None


def apply_objective_flags(args: Any) -> None:
    """Move the values of installed objectives' flags into ``args.objective_opt`` (``--objective-opt`` wins),
    and make the objective explicit when those flags, or the model's family, choose it."""
    chosen: Dict[str, Dict[str, Any]] = {}
    given = vars(args)
    for flag in objective_flags():
        value = given.pop(flag.dest, None)  # not a setting: it becomes an option of its objective
        if value is None or value is False:
            continue
        if args.objective not in (None, flag.objective):
            raise ArgsError(f"{flag.flag} is an option of objective {flag.objective!r}, not of {args.objective!r}")
        chosen.setdefault(flag.objective, {})[flag.option] = value
    if len(chosen) > 1:
        raise ArgsError(f"flags of several objectives given ({', '.join(sorted(chosen))}); pick one with --objective")
    for name, options in chosen.items():
        args.objective = name
        args.objective_opt = {**options, **args.objective_opt}
    if args.objective is None and not args.siglip and args.distill_model is None:
        args.objective = family_objective(args.model)


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
