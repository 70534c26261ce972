"""clipkit: build and train CLIP-style contrastive image-text models from JSON configs.

``import clipkit`` is cheap: torch and the plugins load the first time something needs them. Plugin
authors find what they use in :mod:`clipkit.plugin`. ``python -m clipkit`` is the ``clipkit`` command.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

if TYPE_CHECKING:  # the lazy names below, as type checkers and IDEs should see them
    from .config import add_model_config, get_model_config, list_models, validate_model_config
    from .embed import embed_images, embed_texts
    from .errors import ClipkitError, ConfigError, PluginError, PluginWarning
    from .export import save_pretrained
    from .factory import (
        create_model,
        create_model_and_transforms,
        create_model_from_pretrained,
        get_model_preprocess_cfg,
        set_model_preprocess_cfg,
    )
    from .model import ClipModel
    from .pretrained import (
        get_pretrained_cfg,
        is_pretrained_cfg,
        list_pretrained,
        list_pretrained_models_by_tag,
        list_pretrained_tags_by_model,
    )
    from .tokenizer import decode, get_tokenizer, tokenize
    from .transforms import (
        OPENAI_DATASET_MEAN,
        OPENAI_DATASET_STD,
        AugmentationCfg,
        PreprocessCfg,
        image_transform,
        image_transform_v2,
    )
    from .weights import load_checkpoint
    from .zero_shot import build_zero_shot_classifier, build_zero_shot_classifier_legacy
    from .zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

__version__ = "0.1.0"

_LAZY = {
    # config store (no torch)
    "add_model_config": "clipkit.config",
    "list_models": "clipkit.config",
    "get_model_config": "clipkit.config",
    "validate_model_config": "clipkit.config",
    # factory and model (torch)
    "create_model": "clipkit.factory",
    "create_model_and_transforms": "clipkit.factory",
    "create_model_from_pretrained": "clipkit.factory",
    "get_tokenizer": "clipkit.tokenizer",
    "tokenize": "clipkit.tokenizer",
    "decode": "clipkit.tokenizer",
    "build_zero_shot_classifier": "clipkit.zero_shot",
    "build_zero_shot_classifier_legacy": "clipkit.zero_shot",
    "IMAGENET_CLASSNAMES": "clipkit.zero_shot_metadata",
    "OPENAI_IMAGENET_TEMPLATES": "clipkit.zero_shot_metadata",
    "SIMPLE_IMAGENET_TEMPLATES": "clipkit.zero_shot_metadata",
    "get_model_preprocess_cfg": "clipkit.factory",
    "set_model_preprocess_cfg": "clipkit.factory",
    "load_checkpoint": "clipkit.weights",
    "save_pretrained": "clipkit.export",
    "embed_images": "clipkit.embed",
    "embed_texts": "clipkit.embed",
    "list_pretrained": "clipkit.pretrained",
    "list_pretrained_tags_by_model": "clipkit.pretrained",
    "list_pretrained_models_by_tag": "clipkit.pretrained",
    "get_pretrained_cfg": "clipkit.pretrained",
    "is_pretrained_cfg": "clipkit.pretrained",
    "ClipModel": "clipkit.model",
    "image_transform": "clipkit.transforms",
    "image_transform_v2": "clipkit.transforms",
    "AugmentationCfg": "clipkit.transforms",
    "PreprocessCfg": "clipkit.transforms",
    "OPENAI_DATASET_MEAN": "clipkit.transforms",
    "OPENAI_DATASET_STD": "clipkit.transforms",
    "ClipkitError": "clipkit.errors",
    "ConfigError": "clipkit.errors",
    "PluginError": "clipkit.errors",
    "PluginWarning": "clipkit.errors",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clipkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
