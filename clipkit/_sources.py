"""Where a model's config, preprocessing and weights come from: names, prefixes, tags, files, folders.

Torch-free: resolving a name reads JSON and may download through ``huggingface_hub``; nothing is built.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple

from ._provenance import PROVENANCE_KEY, check_provenance
from .config import (
    HF_CONFIG_NAME,
    get_model_config,
    load_json,
    model_config_source,
    parse_model_name,
    read_hub_config,
    read_json_object,
    unknown_model_message,
)
from .errors import ClipkitError, UnknownModelError
from .pretrained import (
    HF_SAFE_WEIGHTS_NAME,
    HF_WEIGHTS_NAME,
    download_from_hub,
    download_pretrained,
    get_pretrained_cfg,
    list_pretrained_tags_by_model,
)

logger = logging.getLogger("clipkit")

# OpenCLIP's preference order for the weights file of a saved model folder
WEIGHT_FILES = (HF_SAFE_WEIGHTS_NAME, "open_clip_pytorch_model.safetensors", HF_WEIGHTS_NAME,
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


class ModelSource(NamedTuple):
    """A resolved model name: its config mapping, saved preprocessing, and where both came from."""

    config: Dict[str, Any]
    preprocess: Dict[str, Any]
    label: str
    schema: Optional[str]
    ident: str


def resolve_model(model_name: str, cache_dir: Optional[str] = None, offline: bool = False) -> ModelSource:
    """The config of a named model, a ``local-dir:``/``hf-hub:`` model, or a ``.json`` file path."""
    schema, ident = parse_model_name(model_name)
    if schema is not None:
        data = read_hub_config(schema, ident, cache_dir, offline=offline)
        if not isinstance(data.get("model_cfg"), dict):
            raise ClipkitError(f"{model_name}: {HF_CONFIG_NAME} has no 'model_cfg' object")
        check_provenance(data.get(PROVENANCE_KEY), model_name)
        return ModelSource(data["model_cfg"], data.get("preprocess_cfg", {}), model_name, schema, ident)
    cfg = get_model_config(model_name.replace("/", "-"))
    if cfg is not None:
        return ModelSource(cfg, {}, model_config_source(model_name.replace("/", "-")) or model_name, None, model_name)
    path = Path(model_name)
    if path.suffix == ".json" and path.is_file():
        return ModelSource(read_json_object(path), {}, str(path), None, model_name)
    raise UnknownModelError(unknown_model_message(model_name))


def hub_weights(schema: str, ident: str, cache_dir: Optional[str] = None) -> str:
    """The weights file of a ``local-dir:`` folder or ``hf-hub:`` repo, in OpenCLIP's preference order."""
    if schema == "local-dir":
        folder = Path(ident).expanduser()
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return str(folder / name)
        for pattern in ("*.safetensors", "*.bin", "*.pth"):  # safetensors first, whatever the names
            found = sorted(folder.glob(pattern))
            if found:
                return str(found[0])
        raise ClipkitError(f"local-dir:{ident}: no weights file ({', '.join(WEIGHT_FILES[:3])}, ...) in that folder")
    return download_from_hub(ident, HF_WEIGHTS_NAME, cache_dir=cache_dir)


def resolve_pretrained(model_name: str, pretrained: str, cache_dir: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(weights file, tag entry or {}) for a tag, a checkpoint file, or a saved model folder."""
    tag_cfg = get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
    if tag_cfg:
        return download_pretrained(tag_cfg, cache_dir), tag_cfg
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}
    if path.is_dir():
        return hub_weights("local-dir", str(path), cache_dir), {}
    tags = list_pretrained_tags_by_model(model_name.replace("/", "-"))
    raise ClipkitError(f"pretrained {pretrained!r} is not a known pretrained tag of {model_name!r} "
                       f"({'tags: ' + ', '.join(tags) if tags else 'it has no tags'}) or an existing file")


def folder_preprocess(path: Path) -> Dict[str, Any]:
    """The preprocess config saved with a model folder (or beside one of its standard weight files)."""
    if path.is_file() and path.name not in WEIGHT_FILES:
        return {}  # an arbitrary checkpoint does not adopt a config that merely sits beside it
    folder = path if path.is_dir() else path.parent
    config = folder / HF_CONFIG_NAME
    if not config.is_file():
        return {}
    try:
        data = load_json(config)  # bounded, as every config file clipkit reads
    except ValueError:
        return {}
    return data.get("preprocess_cfg", {}) if isinstance(data, dict) else {}


def match_activation(raw: Dict[str, Any], tag_cfg: Dict[str, Any], model_name: str, tag: str, forced: bool) -> None:
    """Weights trained with QuickGELU need it (OpenCLIP only warns, and computes wrong features)."""
    wanted = bool(tag_cfg.get("quick_gelu", False))
    if bool(raw.get("quick_gelu", False)) == wanted:
        return
    if forced:
        logger.warning("%s:%s weights were trained %s QuickGELU, but the caller forced quick_gelu=%s; features "
                       "will differ from the published ones", model_name, tag, "with" if wanted else "without",
                       not wanted)
        return
    raw["quick_gelu"] = wanted
    logger.info("%s:%s weights were trained %s QuickGELU: building the model with quick_gelu=%s",
                model_name, tag, "with" if wanted else "without", wanted)
