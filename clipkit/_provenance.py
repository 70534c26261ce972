"""Which plugin distribution provided each part of a model, recorded where the model is saved.

``save_pretrained`` writes the record into ``open_clip_config.json`` (under :data:`PROVENANCE_KEY`,
a top-level key OpenCLIP does not read) and the trainer into its checkpoints, so loading a model
whose plugin is missing names the package to install instead of only "unknown type". No torch here.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Union

from .config import ModelConfig, infer_text_type, infer_vision_type
from .errors import ClipkitError
from .registry import BUILTIN_DIST, KIND_TITLES, registry

logger = logging.getLogger("clipkit")

#: The key under which the record is stored, in saved configs and in training checkpoints alike.
PROVENANCE_KEY = "clipkit_parts"

# record key -> registry kind; the freezers are keyed by their tower's type
_KINDS = {"vision_tower": "vision_tower", "text_tower": "text_tower", "tokenizer": "tokenizer",
          "vision_freezer": "freezer", "text_freezer": "freezer"}


def _part_types(config: Union[ModelConfig, Mapping[str, Any]]) -> Dict[str, str]:
    if isinstance(config, ModelConfig):
        vision, text, tokenizer = config.vision_type, config.text_type, config.tokenizer_name
    else:  # a raw model config: the types clipkit would infer from it
        vision_cfg, text_cfg = config.get("vision_cfg") or {}, config.get("text_cfg") or {}
        vision, text = infer_vision_type(vision_cfg), infer_text_type(text_cfg)
        tokenizer = text_cfg.get("tokenizer") or ("hf" if text_cfg.get("hf_tokenizer_name") else "clip")
    return {"vision_tower": vision, "text_tower": text, "tokenizer": tokenizer,
            "vision_freezer": vision, "text_freezer": text}


def parts_provenance(config: Union[ModelConfig, Mapping[str, Any]]) -> Dict[str, Dict[str, str]]:
    """Who provides each part of a model config, from the registry as it is now.

    Returns ``{"vision_tower": {"type", "plugin", "distribution", "version"}, "text_tower": ...,
    "tokenizer": ...}``, plus ``vision_freezer`` / ``text_freezer`` for tower types that registered a
    freezer. ``config`` is a validated :class:`~clipkit.config.ModelConfig` (``model.model_config``)
    or a raw config mapping. Every value is a plain string, so the dict goes into JSON files and
    ``torch.load(weights_only=True)`` checkpoints as it is.
    """
    record: Dict[str, Dict[str, str]] = {}
    for key, name in _part_types(config).items():
        kind = _KINDS[key]
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
    if not isinstance(record, Mapping):
        return
    missing = []
    for key, part in record.items():
        kind = _KINDS.get(key)
        if kind is None or not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            continue
        name = part["type"]
        if registry.has(kind, name):
            now = registry.get(kind, name).plugin.distribution
            if now != part.get("distribution"):  # same name, another implementation: say so
                logger.warning("%s: %s %r was provided by %s %s when this model was saved, now by %s",
                               where, KIND_TITLES[kind], name, part.get("distribution"), part.get("version"), now)
            continue
        saved_by = f"{part.get('distribution')} {part.get('version')}"
        if kind == "freezer":
            logger.warning("%s: the freezer of %s type %r came from %s when this model was saved and is not "
                           "installed; locking uses clipkit's default freezer (%s)", where, key.split("_")[0],
                           name, saved_by, _install_hint(part))
            continue
        missing.append(f"{KIND_TITLES[kind]} {name!r} (provided by {saved_by} when the model was saved; "
                       f"{_install_hint(part)})")
    if missing:
        raise ClipkitError(f"{where}: this model needs parts that are not installed: " + "; ".join(missing))
