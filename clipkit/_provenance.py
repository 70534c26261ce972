"""Which plugin distribution provided each part of a model, recorded where the model is saved.

``save_pretrained`` writes the record into ``open_clip_config.json`` (under :data:`PROVENANCE_KEY`,
a top-level key OpenCLIP does not read) and the trainer into its checkpoints, so loading a model
whose plugin is missing names the package to install instead of only "unknown type". Torch is
imported only to read the record of a checkpoint file.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, ParamSpec, Tuple, TypeVar, Union

from . import kinds
from .config import HF_CONFIG_NAME, ModelConfig, infer_part, load_json
from .errors import ClipkitError, ConfigError, Problem
from .registry import BUILTIN_DIST, registry

logger = logging.getLogger("clipkit")

#: The key under which the record is stored, in saved configs and in training checkpoints alike.
PROVENANCE_KEY = "clipkit_parts"

def _record_kinds() -> Dict[str, kinds.KindSpec]:
    """Record key -> the kind of the part recorded under it (``clipkit.kinds`` declares which are recorded)."""
    return {key: kind for key, kind, _ in kinds.recorded_parts()}


def _part_types(config: Union[ModelConfig, Mapping[str, Any]]) -> Dict[str, Any]:
    """Record key -> the name of the part a config selects (parts keyed by another take that one's name)."""
    raw = config.raw if isinstance(config, ModelConfig) else config
    names: Dict[str, Any] = {}
    for key, kind, keyed_by in kinds.recorded_parts():
        selector = keyed_by or kind
        section = raw if selector.section == kinds.TOP_LEVEL else raw.get(selector.section) if selector.section else None
        if isinstance(section, Mapping):
            names[key] = infer_part(selector.name, section)
    return names


def parts_provenance(config: Union[ModelConfig, Mapping[str, Any]]) -> Dict[str, Dict[str, str]]:
    """Who provides each part of a model config, from the registry as it is now.

    Returns ``{"vision_tower": {"type", "plugin", "distribution", "version"}, "text_tower": ...,
    "tokenizer": ..., "model_family": ...}``, plus ``vision_freezer`` / ``text_freezer`` for tower types that registered a
    freezer. ``config`` is a validated :class:`~clipkit.config.ModelConfig` (``model.model_config``)
    or a raw config mapping. Every value is a plain string, so the dict goes into JSON files and
    ``torch.load(weights_only=True)`` checkpoints as it is.
    """
    record: Dict[str, Dict[str, str]] = {}
    record_kinds = _record_kinds()
    for key, name in _part_types(config).items():
        kind = record_kinds[key].name
        if not isinstance(name, str) or not registry.has(kind, name):
            continue  # an unbuildable config has nothing to record; a freezer is optional
        plugin = registry.get(kind, name).plugin
        record[key] = {"type": name, "plugin": plugin.name, "distribution": plugin.distribution,
                       "version": plugin.version}
    return record


def _install_hint(part: Mapping[str, Any]) -> str:
    dist, version = part.get("distribution"), part.get("version")
    if version == "in-process":  # registered by registry.register_plugin, not by an installed package
        return f"register the in-process plugin {part.get('plugin')!r} again"
    if dist == BUILTIN_DIST:  # a builtin of a newer clipkit
        return f'pip install "{BUILTIN_DIST}>={version}"'
    return f"pip install {dist}" if dist else "install the plugin that provides it"


def check_provenance(record: Any, where: str) -> None:
    """Raise :class:`ClipkitError` when a recorded tower or tokenizer is not registered now.

    The message names every missing part, the distribution (and version) that provided it when the
    model was saved, and the ``pip install`` line. A missing freezer is only a warning: the model
    still loads, but locking falls back to clipkit's default. ``where`` prefixes messages (a file,
    ``local-dir:...``). A record that is not a mapping (none, or hand-edited) is ignored.
    """
    missing = missing_parts(record)
    record_kinds = _record_kinds()
    for key, part in _parts(record):
        kind, name = record_kinds[key], part["type"]
        if registry.has(kind.name, name):
            now = registry.get(kind.name, name).plugin.distribution
            if now != part.get("distribution"):  # same name, another implementation: say so
                logger.warning("%s: %s %r was provided by %s %s when this model was saved, now by %s",
                               where, kind.title, name, part.get("distribution"), part.get("version"), now)
        elif kind.fallback:
            logger.warning("%s: the %s of %s type %r came from %s %s when this model was saved and is not "
                           "installed; %s (%s)", where, kind.title, key.split("_")[0], name,
                           part.get("distribution"), part.get("version"), kind.fallback, _install_hint(part))
    if missing:
        raise ClipkitError(f"{where}: this model needs parts that are not installed: " + "; ".join(missing))


def _parts(record: Any) -> Iterator[Tuple[str, Mapping[str, Any]]]:
    """``(key, part)`` for each well-formed entry of a record; anything else (none, hand-edited) is skipped."""
    if not isinstance(record, Mapping):
        return
    record_kinds = _record_kinds()
    for key, part in record.items():
        if key in record_kinds and isinstance(part, Mapping) and isinstance(part.get("type"), str):
            yield key, part


def missing_parts(record: Any) -> List[str]:
    """The recorded towers and tokenizer that no installed plugin registers now, one phrase each: the part,
    the distribution and version that provided it, and how to install it. Freezers are optional: never listed.
    """
    missing = []
    record_kinds = _record_kinds()
    for key, part in _parts(record):
        kind, name = record_kinds[key], part["type"]
        if not kind.fallback and not registry.has(kind.name, name):
            missing.append(f"{kind.title} {name!r} (provided by {part.get('distribution')} "
                           f"{part.get('version')} when the model was saved; {_install_hint(part)})")
    return missing


def checkpoint_parts(path: Union[str, Path, None]) -> Any:
    """The record saved with a checkpoint, or None: from a training checkpoint file, a ``--fsdp``
    checkpoint folder, or a ``save_pretrained`` folder's ``open_clip_config.json``.

    Never raises: a file that cannot be read is reported by whatever goes on to load it. The file is read
    with ``weights_only=True`` and memory-mapped, so its tensors are not loaded.
    """
    if path is None:
        return None
    path = Path(path).expanduser()
    try:
        if (path / HF_CONFIG_NAME).is_file():
            return load_json(path / HF_CONFIG_NAME).get(PROVENANCE_KEY)  # bounded, like every config read
        if path.is_dir():
            from .train.checkpointer import read_extras

            return read_extras(path).get(PROVENANCE_KEY)
        if path.is_file() and path.suffix != ".safetensors":  # safetensors files hold tensors only
            import warnings

            import torch

            with warnings.catch_warnings():  # a TorchScript archive: torch says so, then weights_only refuses it
                warnings.simplefilter("ignore", UserWarning)
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return data.get(PROVENANCE_KEY) if isinstance(data, dict) else None
    except Exception:  # noqa: BLE001 - the record only improves a message; the loader reports the file
        return None
    return None


def note_missing_parts(exc: ClipkitError, checkpoint: Union[str, Path, None]) -> None:
    """Add to ``exc`` the parts ``checkpoint`` records that are not installed now, with their ``pip install``
    lines: for the unknown model name, tower type or tokenizer a missing plugin leaves behind. A
    :class:`ConfigError` gets it as one more problem line; any other error at the end of its message."""
    missing = missing_parts(checkpoint_parts(checkpoint))
    if not missing:
        return
    note = "saved with parts that are not installed: " + "; ".join(missing)
    if note in str(exc):  # already noted, by an inner loader of the same checkpoint
        return
    if isinstance(exc, ConfigError):
        exc.problems.append(Problem("", note, source=str(checkpoint)))
        exc.args = ("\n".join(str(problem) for problem in exc.problems),)
    else:
        exc.args = (f"{exc}; {checkpoint} was {note}", *exc.args[1:])


@contextlib.contextmanager
def naming_missing_parts(checkpoint: Union[str, Path, None]) -> Iterator[None]:
    """Within: a :class:`ClipkitError` gets :func:`note_missing_parts` of ``checkpoint`` before it goes on."""
    try:
        yield
    except ClipkitError as exc:
        note_missing_parts(exc, checkpoint)
        raise


_P = ParamSpec("_P")
_R = TypeVar("_R")


def names_missing_parts(argument: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorate a loader so its :class:`ClipkitError` notes what the checkpoint in its ``argument`` records
    and is not installed (:func:`note_missing_parts`)."""

    def decorate(function: Callable[_P, _R]) -> Callable[_P, _R]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return function(*args, **kwargs)
            except ClipkitError as exc:  # the call bound its arguments, so binding them again succeeds
                checkpoint = signature.bind(*args, **kwargs).arguments.get(argument)
                note_missing_parts(exc, checkpoint if isinstance(checkpoint, (str, Path)) else None)
                raise

        return wrapper

    return decorate
