"""Saving a model in OpenCLIP's hub layout, loadable by clipkit (``local-dir:``) and by OpenCLIP."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import nn

from ._provenance import PROVENANCE_KEY, parts_provenance
from .config import HF_CONFIG_NAME, infer_text_type, infer_tokenizer, infer_vision_type
from .errors import ClipkitError
from .kinds import TOKENIZER, spec
from .pretrained import HF_SAFE_WEIGHTS_NAME

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _portable_config(raw: Dict[str, Any]) -> Dict[str, Any]:
    """The model config without clipkit-only keys that only restate a default, so OpenCLIP reads it too."""
    cfg = copy.deepcopy(raw)
    if cfg.get("schema_version") == 1:
        del cfg["schema_version"]
    for key, infer in (("vision_cfg", infer_vision_type), ("text_cfg", infer_text_type)):
        section = cfg.get(key, {})
        if "type" in section:
            explicit = section.pop("type")
            if infer(section) != explicit:
                section["type"] = explicit  # a plugin tower: keep it, only clipkit can build this one
    text = cfg.get("text_cfg", {})
    key = spec(TOKENIZER).select_key or ""
    if key in text and text[key] == infer_tokenizer({**text, key: None}):
        text.pop(key)  # it names the tokenizer that would be inferred anyway
    return cfg


def save_pretrained(model: nn.Module, folder: Union[str, Path], tokenizer: Optional[Any] = None) -> Path:
    """Write ``open_clip_config.json``, ``open_clip_model.safetensors`` and tokenizer files to ``folder``.

    The folder loads with ``clipkit.create_model("local-dir:FOLDER")`` (and ``get_tokenizer`` of the
    same name), and with OpenCLIP's ``create_model("local-dir:FOLDER")`` when the config uses only
    OpenCLIP's tower types. The config records which plugin distribution provided each part
    (``clipkit_parts``). ``tokenizer`` defaults to the model's own when it has HF tokenizer files.
    """
    from safetensors.torch import save_file

    config = getattr(model, "model_config", None)
    if config is None:
        raise ClipkitError("save_pretrained needs a model built by clipkit.create_model (it carries its config)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = getattr(model, "preprocess_cfg", {}) or {}
    payload = {"model_cfg": _portable_config(config.raw),
               "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in preprocess.items() if k in _PREPROCESS_KEYS},
               # which plugin provided each part, so a loader without it is told what to install;
               # OpenCLIP reads only model_cfg and preprocess_cfg
               PROVENANCE_KEY: parts_provenance(config)}
    (folder / HF_CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / HF_SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is None and config.tokenizer_name == "hf":
        from .registry import registry

        text_cfg = config.raw.get("text_cfg", {})
        tokenizer = registry.get(TOKENIZER, "hf").load()(text_cfg, text_cfg.get("context_length", 77))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    return folder
