"""From a model name or config to a built model, its transforms and its tokenizer.

JSON -> validated :class:`~clipkit.config.ModelConfig` -> registry lookup by ``type`` -> tower
factories -> :class:`~clipkit.model.ClipModel`. Signatures follow OpenCLIP 3.3.0.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union, cast

import torch
from torch import nn

from ._precision import PRECISIONS
from ._provenance import names_missing_parts
from ._sources import folder_preprocess, hub_weights, match_activation, resolve_model, resolve_pretrained
from ._trust import caller_trust, warn_ignored_requests
from .config import ModelConfig, parse_model_name, validate_model_config
from .errors import ClipkitError, TowerContractError
from .hookspecs import ModelContext, TowerContext
from .kinds import FREEZER, MODEL_FAMILY, TEXT_TOWER, VISION_TOWER, spec
from .model import ClipModel
from .pretrained import get_pretrained_cfg, preprocess_of
from .registry import PLUGIN_FAILURES, Entry, registry
from .transforms import AugmentationCfg, ImageTransform, PreprocessCfg, image_transform_v2, merge_preprocess

logger = logging.getLogger("clipkit")

_LOW = {"fp16": torch.float16, "bf16": torch.bfloat16, "pure_fp16": torch.float16, "pure_bf16": torch.bfloat16}
_KEEP_FP32_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding)
_KEEP_FP32_NAMES = {"positional_embedding", "class_embedding", "cls_emb"}


def _apply_overrides(cfg: Dict[str, Any], *, force_quick_gelu: bool, force_custom_text: bool,
                     force_patch_dropout: Optional[float], force_image_size: Any,
                     force_context_length: Optional[int], model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    if force_quick_gelu:
        cfg["quick_gelu"] = True
    if force_custom_text:
        cfg["custom_text"] = True
    if force_patch_dropout is not None and isinstance(cfg.get("vision_cfg"), dict):
        cfg["vision_cfg"]["patch_dropout"] = force_patch_dropout
    if force_image_size is not None and isinstance(cfg.get("vision_cfg"), dict):
        cfg["vision_cfg"]["image_size"] = force_image_size
    if force_context_length is not None and isinstance(cfg.get("text_cfg"), dict):
        cfg["text_cfg"]["context_length"] = force_context_length
    cfg.update(model_kwargs)  # explicit arguments win over the JSON, at the top level as in OpenCLIP
    return cfg


def _check_tower(tower: Any, entry: Entry, embed_dim: int) -> None:
    """The tower protocol (hookspecs.TowerFactory, docs/plugins.md), checked on every build so a broken plugin is
    named, not a traceback."""
    if not isinstance(tower, nn.Module):
        raise TowerContractError(f"{entry.where}: factory returned {type(tower).__name__}, not a torch.nn.Module")
    needed = ["output_dim", "layer_groups", "set_grad_checkpointing", *spec(entry.kind).tower_attrs]
    missing = [name for name in needed if not hasattr(tower, name)]
    if missing:
        raise TowerContractError(f"{entry.where}: the tower lacks {', '.join(missing)} (see docs/plugins.md)")
    if tower.output_dim != embed_dim:
        raise TowerContractError(f"{entry.where}: the tower outputs {tower.output_dim} features but embed_dim is "
                                 f"{embed_dim}; give it a projection to embed_dim")


#: What every assembled model has (the model family protocol of docs/plugins.md).
MODEL_ATTRS = ("visual", "text", "output_dict", "encode_image", "encode_text", "lock_image_tower", "lock_text_tower",
               "set_grad_checkpointing")


def _check_model(model: Any, entry: Entry, ctx: ModelContext) -> None:
    """The model family protocol, checked on every build so a broken plugin is named, not a traceback."""
    if not isinstance(model, nn.Module):
        raise TowerContractError(f"{entry.where}: factory returned {type(model).__name__}, not a torch.nn.Module")
    missing = [name for name in MODEL_ATTRS if not hasattr(model, name)]
    if missing:
        raise TowerContractError(f"{entry.where}: the model lacks {', '.join(missing)} (see docs/plugins.md)")
    if model.visual is not ctx.visual or model.text is not ctx.text:
        raise TowerContractError(f"{entry.where}: the model's visual and text must be the towers it was given")


def build_model(config: ModelConfig, *, precision: str = "fp32", output_dict: bool = False,
                pretrained_image: bool = False, pretrained_text: bool = False,
                cache_dir: Optional[str] = None) -> nn.Module:
    """Build the model a validated config describes (a :class:`ClipModel` unless its model family is another),
    in fp32 on the CPU (or the meta device in context)."""
    top = config.top
    cast = precision if precision in ("fp16", "bf16") else None
    towers = {}
    for key, kind, tower_type, cfg, pretrained in (
            ("visual", VISION_TOWER, config.vision_type, config.vision, pretrained_image),
            ("text", TEXT_TOWER, config.text_type, config.text, pretrained_text)):
        entry = registry.get(kind, tower_type, where=f"{spec(kind).section}.{spec(kind).select_key}")
        ctx = TowerContext(embed_dim=top.embed_dim, quick_gelu=top.quick_gelu, cast_dtype=cast,
                           pretrained=pretrained, cache_dir=cache_dir)
        factory = entry.load()
        try:
            tower = factory(cfg, ctx)
        except ClipkitError:
            raise
        except PLUGIN_FAILURES as exc:
            raise ClipkitError(f"{entry.where}: building the tower failed: {exc!r}") from exc
        _check_tower(tower, entry, top.embed_dim)
        towers[key] = (tower, entry)
    freezers = {}
    for key, tower_type in (("visual", config.vision_type), ("text", config.text_type)):
        if registry.has(FREEZER, tower_type):
            freezers[key] = registry.get(FREEZER, tower_type).load()
    text_entry = towers["text"][1]
    family = registry.get(MODEL_FAMILY, config.family, where=str(spec(MODEL_FAMILY).select_key))
    parts = ModelContext(towers["visual"][0], towers["text"][0], config, output_dict=output_dict, cast_dtype=cast,
                         flat_text=bool(text_entry.meta.get("flat_state_dict")) and not top.custom_text,
                         freezers=freezers)
    try:
        model: Any = family.load()(config.family_cfg, parts)  # held to the family protocol just below
    except ClipkitError:
        raise
    except PLUGIN_FAILURES as exc:
        raise ClipkitError(f"{family.where}: building the model failed: {exc!r}") from exc
    _check_model(model, family, parts)
    model.model_config = config
    model.vision_type, model.text_type = config.vision_type, config.text_type
    built: nn.Module = model
    return built


def _set_precision(model: nn.Module, precision: str) -> None:
    dtype = _LOW.get(precision)
    if dtype is None:
        return
    if precision.startswith("pure_"):
        model.to(dtype)
        return
    # fp16/bf16 as OpenCLIP: matmul weights in low precision; norms, embedding tables, the logit
    # scale and bias stay fp32 (the towers cast activations to their blocks' dtype)
    for module in model.modules():
        if isinstance(module, _KEEP_FP32_TYPES) or module is model:
            continue
        for name, param in module.named_parameters(recurse=False):
            if name not in _KEEP_FP32_NAMES:
                param.data = param.data.to(dtype)


@names_missing_parts("pretrained")  # a checkpoint of a plugin's parts: name the package to install
def create_model(
        model_name: str,
        pretrained: Optional[str] = None,
        load_weights: bool = True,
        precision: str = "fp32",
        device: Union[str, torch.device] = "cpu",
        jit: bool = False,
        force_quick_gelu: bool = False,
        force_custom_text: bool = False,
        force_patch_dropout: Optional[float] = None,
        force_image_size: Optional[Union[int, Tuple[int, int]]] = None,
        force_preprocess_cfg: Optional[Dict[str, Any]] = None,
        force_context_length: Optional[int] = None,
        pretrained_image: bool = False,
        pretrained_text: bool = True,
        pretrained_image_path: Optional[str] = None,
        pretrained_text_path: Optional[str] = None,
        cache_dir: Optional[str] = None,
        output_dict: Optional[bool] = None,
        require_pretrained: bool = False,
        weights_only: bool = True,
        trust_remote_code: bool = False,
        **model_kwargs: Any,
) -> ClipModel:
    """Build a model by name (``ViT-B-32``, ``local-dir:/path``, ``hf-hub:org/repo``, or a ``.json`` path).

    ``pretrained`` is a pretrained tag of the model (``list_pretrained_tags_by_model``), a checkpoint
    file (OpenCLIP or OpenAI-layout state dicts, clipkit or OpenCLIP training checkpoints;
    ``.safetensors``, ``.pt``, ``.pth``, ``.bin``) or a folder written by ``save_pretrained``.
    Explicit arguments win over the JSON. See docs/pretrained.md.

    ``trust_remote_code=True`` (or ``CLIPKIT_TRUST_REMOTE_CODE=1``) lets a HuggingFace repository named by
    the config run its own Python; a config's ``trust_remote_code`` key never does. Without it such a
    repository is a one-line error.
    """
    if jit:
        raise ClipkitError("jit=True (TorchScript) is not supported by clipkit; use torch.compile(model) instead")
    if not weights_only:
        raise ClipkitError("weights_only=False is refused: clipkit loads checkpoints with weights_only=True only")
    if precision not in PRECISIONS:
        raise ClipkitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    pretrained_text = model_kwargs.pop("pretrained_hf", pretrained_text)  # OpenCLIP's legacy name
    PreprocessCfg(**merge_preprocess(PreprocessCfg(), force_preprocess_cfg))  # bad overrides fail before building
    source = resolve_model(model_name, cache_dir)
    raw, saved_preprocess, checkpoint = source.config, source.preprocess, None
    if source.schema is not None:
        if pretrained:
            logger.warning("%s: pretrained=%r ignored, the weights come with the model", model_name, pretrained)
        if load_weights:
            checkpoint = hub_weights(source.schema, source.ident, cache_dir)
    elif pretrained:
        tag_cfg = get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
        if tag_cfg:  # a tag sets preprocessing and activation even when its weights are not loaded
            saved_preprocess = preprocess_of(tag_cfg)
            match_activation(raw, tag_cfg, model_name, pretrained,
                             forced=force_quick_gelu or "quick_gelu" in model_kwargs)
        if load_weights or not tag_cfg:
            checkpoint, _ = resolve_pretrained(model_name, pretrained, cache_dir)
            if not tag_cfg:  # a file saved by save_pretrained brings its preprocessing (OpenCLIP drops it: its #1068)
                saved_preprocess = folder_preprocess(Path(checkpoint)) or saved_preprocess
        if not load_weights:
            checkpoint = None
    raw = _apply_overrides(raw, force_quick_gelu=force_quick_gelu, force_custom_text=force_custom_text,
                           force_patch_dropout=force_patch_dropout, force_image_size=force_image_size,
                           force_context_length=force_context_length, model_kwargs=model_kwargs)
    config = validate_model_config(raw, source=source.label, name=model_name)
    tower_weights = checkpoint is None and pretrained_image_path is None and pretrained_text_path is None
    # the JSON may ask for the image tower's own weights too (OpenCLIP's key); pretrained_image's
    # default False cannot tell "no" from "not said", so either one asks
    pretrained_image = pretrained_image or config.raw["vision_cfg"].get("timm_model_pretrained") is True
    on_meta = torch.device(device).type == "meta"
    if on_meta and checkpoint is not None:
        raise ClipkitError("device='meta' builds shapes only; it cannot load the weights of a checkpoint")
    warn_ignored_requests(config.raw, source.label, trust_remote_code)
    with torch.device("meta") if on_meta else contextlib.nullcontext(), caller_trust(trust_remote_code):
        built = build_model(config, precision=precision, output_dict=bool(output_dict),
                            pretrained_image=pretrained_image and tower_weights and not on_meta,
                            pretrained_text=pretrained_text and tower_weights and not on_meta, cache_dir=cache_dir)
    # a family's model need not subclass ClipModel, but it has ClipModel's interface (_check_model)
    model = cast(ClipModel, built)
    if checkpoint is not None:
        from .weights import load_checkpoint

        load_checkpoint(model, checkpoint, strict=True)
        logger.info("loaded %s weights from %s", model_name, checkpoint)
    for path, tower in ((pretrained_image_path, model.visual), (pretrained_text_path, model.text)):
        if path:
            from .weights import load_tower_weights

            load_tower_weights(tower, path)
    if require_pretrained and checkpoint is None:
        raise ClipkitError(f"{model_name}: pretrained weights are required but none were given")
    _set_precision(model, precision)
    if not any(p.is_meta for p in model.parameters()):  # a model built under a meta context stays there
        model.to(device)
    size: Any = model.visual.image_size  # an int or (height, width): the tower contract
    preprocess = PreprocessCfg(size=size if isinstance(size, int) else tuple(size)).as_dict()
    # precedence: defaults < the tower's own (a timm model's pretrained config) < saved/tag < arguments
    tower_defaults = getattr(model.visual, "preprocess_defaults", None)
    if callable(tower_defaults):
        preprocess = merge_preprocess(preprocess, tower_defaults())
    preprocess = merge_preprocess(merge_preprocess(preprocess, saved_preprocess), force_preprocess_cfg)
    set_model_preprocess_cfg(model, preprocess)
    return model


def _image_overrides(mean: Optional[Tuple[float, ...]], std: Optional[Tuple[float, ...]],
                     interpolation: Optional[str], resize_mode: Optional[str]) -> Dict[str, Any]:
    """The ``image_*`` arguments of the factory functions as preprocess overrides (None = keep)."""
    return {"mean": mean, "std": std, "interpolation": interpolation, "resize_mode": resize_mode}


def set_model_preprocess_cfg(model: nn.Module, preprocess_cfg: Dict[str, Any]) -> None:
    """Attach the preprocessing a model expects; saved with it and used by its transforms."""
    # plain attributes, which nn.Module's typed __setattr__ (tensors and modules) does not describe
    holder: Any = model
    holder.preprocess_cfg = dict(preprocess_cfg)
    # where OpenCLIP code looks for it, legacy attributes included
    holder.visual.preprocess_cfg = holder.preprocess_cfg
    holder.visual.image_mean = holder.preprocess_cfg.get("mean")
    holder.visual.image_std = holder.preprocess_cfg.get("std")


def get_model_preprocess_cfg(model: nn.Module) -> Dict[str, Any]:
    """The preprocessing attached by :func:`create_model` (defaults for a bare model)."""
    cfg = getattr(model, "preprocess_cfg", None) or getattr(getattr(model, "visual", None), "preprocess_cfg", None)
    return dict(cfg) if cfg else PreprocessCfg().as_dict()


def create_model_and_transforms(
        model_name: str,
        pretrained: Optional[str] = None,
        load_weights: bool = True,
        precision: str = "fp32",
        device: Union[str, torch.device] = "cpu",
        jit: bool = False,
        force_quick_gelu: bool = False,
        force_custom_text: bool = False,
        force_patch_dropout: Optional[float] = None,
        force_image_size: Optional[Union[int, Tuple[int, int]]] = None,
        force_context_length: Optional[int] = None,
        image_mean: Optional[Tuple[float, ...]] = None,
        image_std: Optional[Tuple[float, ...]] = None,
        image_interpolation: Optional[str] = None,
        image_resize_mode: Optional[str] = None,
        aug_cfg: Optional[Union[Dict[str, Any], AugmentationCfg]] = None,
        pretrained_image: bool = False,
        pretrained_text: bool = True,
        pretrained_image_path: Optional[str] = None,
        pretrained_text_path: Optional[str] = None,
        cache_dir: Optional[str] = None,
        output_dict: Optional[bool] = None,
        weights_only: bool = True,
        trust_remote_code: bool = False,
        **model_kwargs: Any,
) -> Tuple[ClipModel, ImageTransform, ImageTransform]:
    """``(model, preprocess_train, preprocess_val)``; the ``image_*`` arguments override preprocessing."""
    force_preprocess = _image_overrides(image_mean, image_std, image_interpolation, image_resize_mode)
    model = create_model(
        model_name, pretrained, load_weights=load_weights, precision=precision, device=device, jit=jit,
        force_quick_gelu=force_quick_gelu, force_custom_text=force_custom_text,
        force_patch_dropout=force_patch_dropout, force_image_size=force_image_size,
        force_preprocess_cfg=force_preprocess, force_context_length=force_context_length,
        pretrained_image=pretrained_image, pretrained_text=pretrained_text,
        pretrained_image_path=pretrained_image_path, pretrained_text_path=pretrained_text_path,
        cache_dir=cache_dir, output_dict=output_dict, weights_only=weights_only,
        trust_remote_code=trust_remote_code, **model_kwargs)
    cfg = get_model_preprocess_cfg(model)
    return model, image_transform_v2(cfg, is_train=True, aug_cfg=aug_cfg), image_transform_v2(cfg, is_train=False)


def create_model_from_pretrained(
        model_name: str,
        pretrained: Optional[str] = None,
        precision: str = "fp32",
        device: Union[str, torch.device] = "cpu",
        jit: bool = False,
        force_quick_gelu: bool = False,
        force_custom_text: bool = False,
        force_image_size: Optional[Union[int, Tuple[int, int]]] = None,
        force_context_length: Optional[int] = None,
        image_mean: Optional[Tuple[float, ...]] = None,
        image_std: Optional[Tuple[float, ...]] = None,
        image_interpolation: Optional[str] = None,
        image_resize_mode: Optional[str] = None,
        return_transform: bool = True,
        cache_dir: Optional[str] = None,
        weights_only: bool = True,
        trust_remote_code: bool = False,
        **model_kwargs: Any,
) -> Union[ClipModel, Tuple[ClipModel, ImageTransform]]:
    """A model that must come with weights; returns ``model`` or ``(model, preprocess_val)``."""
    if not pretrained and parse_model_name(model_name)[0] is None:
        raise ClipkitError(f"create_model_from_pretrained({model_name!r}) needs pretrained= (a tag or a checkpoint file) "
                           f"or a 'local-dir:'/'hf-hub:' model name")
    force_preprocess = _image_overrides(image_mean, image_std, image_interpolation, image_resize_mode)
    model = create_model(
        model_name, pretrained, precision=precision, device=device, jit=jit, force_quick_gelu=force_quick_gelu,
        force_custom_text=force_custom_text, force_image_size=force_image_size,
        force_preprocess_cfg=force_preprocess, force_context_length=force_context_length, cache_dir=cache_dir,
        require_pretrained=True, weights_only=weights_only, trust_remote_code=trust_remote_code, **model_kwargs)
    if not return_transform:
        return model
    return model, image_transform_v2(get_model_preprocess_cfg(model), is_train=False)


