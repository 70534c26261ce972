"""Pretrained tags (OpenCLIP's table, as data, plus the tags plugins ship) and where their weights come from.

A tag names published weights for a model config: ``create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")``.
Each tag carries the preprocessing its weights were trained with and whether they need QuickGELU.
Weights are fetched through ``huggingface_hub`` and its cache (``HF_HUB_OFFLINE=1`` reads the cache
only). No torch import here.
"""
from __future__ import annotations

import copy
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import ClipkitError
from .kinds import MODEL_CONFIG

logger = logging.getLogger("clipkit")

TAGS_FILE = Path(__file__).with_name("pretrained_tags.json")
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"


@lru_cache()
def _builtin_table() -> Dict[str, Dict[str, Dict[str, Any]]]:
    models: Dict[str, Dict[str, Dict[str, Any]]] = json.loads(TAGS_FILE.read_text(encoding="utf-8"))["models"]
    return models


@lru_cache()
def _merged(generation: int) -> Dict[str, Dict[str, Dict[str, Any]]]:
    from .registry import registry

    table = dict(_builtin_table())
    for entry in registry.entries(MODEL_CONFIG):  # tags a plugin ships with its config (``pretrained=``)
        tags = entry.meta.get("pretrained")
        if isinstance(tags, dict):
            table[entry.name] = {**table.get(entry.name, {}), **{_clean_tag(t): dict(c) for t, c in tags.items()}}
    return table


def _table() -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Model -> tag -> entry: clipkit's table and the tags plugins register with their configs."""
    from .registry import registry

    registry.names(MODEL_CONFIG)  # load the plugins first, so the generation is that of the loaded set
    return _merged(registry.generation)


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")


def list_pretrained(as_str: bool = False) -> List[Union[Tuple[str, str], str]]:
    """Every ``(model, tag)`` pair (or ``"model:tag"`` strings)."""
    pairs = [(model, tag) for model, tags in _table().items() for tag in tags]
    return [f"{m}:{t}" for m, t in pairs] if as_str else list(pairs)


def list_pretrained_tags_by_model(model: str) -> List[str]:
    return list(_table().get(model, {}))


def list_pretrained_models_by_tag(tag: str) -> List[str]:
    tag = _clean_tag(tag)
    return [model for model, tags in _table().items() if tag in tags]


def get_pretrained_cfg(model: str, tag: str) -> Dict[str, Any]:
    """The tag's entry (``hf_hub``, ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``quick_gelu``), or ``{}``."""
    return copy.deepcopy(_table().get(model, {}).get(_clean_tag(tag), {}))


def is_pretrained_cfg(model: str, tag: str) -> bool:
    return bool(get_pretrained_cfg(model, tag))


def preprocess_of(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing keys of a tag entry, as a preprocess config."""
    return {key: tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key]
            for key in ("mean", "std", "interpolation", "resize_mode") if key in cfg}


def _safe_alternatives(filename: str) -> List[str]:
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


def download_from_hub(repo_id: str, filename: Optional[str] = None, cache_dir: Optional[str] = None,
                      revision: Optional[str] = None) -> str:
    """A file of a hub repo through the huggingface_hub cache, preferring a ``.safetensors`` twin."""
    from huggingface_hub import hf_hub_download

    filename = filename or HF_WEIGHTS_NAME
    errors = []
    for name in _safe_alternatives(filename) + [filename]:
        try:
            return hf_hub_download(repo_id=repo_id, filename=name, revision=revision, cache_dir=cache_dir)
        except Exception as exc:  # try the next candidate; report them all if none works
            reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            errors.append(f"{name}: {type(exc).__name__} {reason}".strip())
    raise ClipkitError(f"hf-hub:{repo_id}: cannot fetch weights ({'; '.join(errors)}); offline, download them "
                       f"once with network access (they stay in the huggingface_hub cache) or pass pretrained= a "
                       f"local file")


def download_pretrained(cfg: Dict[str, Any], cache_dir: Optional[str] = None) -> str:
    """The local path of a tag's weights (``hf_hub`` is ``"org/repo/"`` or ``"org/repo/file"``)."""
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise ClipkitError(f"pretrained entry has no hf_hub source: {cfg}")
    parts = hub.split("/")
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or None
    return download_from_hub(repo_id, filename, cache_dir=cache_dir)
