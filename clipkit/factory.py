"""From a model name or config to a built model, its transforms and its tokenizer.

JSON -> validated :class:`~clipkit.config.ModelConfig` -> registry lookup by ``type`` -> tower
factories -> :class:`~clipkit.model.ClipModel`. Signatures follow OpenCLIP 3.3.0.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .config import (ModelConfig, get_model_config, model_config_source, parse_model_name, read_hub_config,
                     unknown_model_message, validate_model_config)
from .errors import ClipkitError, TowerContractError, UnknownModelError
from .hookspecs import TowerContext
from .model import ClipModel
from .pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model, preprocess_of
from .registry import Entry, registry
from .transforms import AugmentationCfg, PreprocessCfg, image_transform, merge_preprocess

logger = logging.getLogger("clipkit")

PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16", "amp_bfloat16")
_LOW = {"fp16": torch.float16, "bf16": torch.bfloat16, "pure_fp16": torch.float16, "pure_bf16": torch.bfloat16}
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _resolve(model_name: str, cache_dir: Optional[str]) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[str], str]:
    """(model config dict, preprocess overrides, weights file or None, where the config came from)."""
    schema, ident = parse_model_name(model_name)
    if schema is not None:
        data = read_hub_config(schema, ident, cache_dir)
        if "model_cfg" not in data:
            raise ClipkitError(f"{model_name}: open_clip_config.json has no 'model_cfg'")
        return data["model_cfg"], data.get("preprocess_cfg", {}), _hub_weights(schema, ident, cache_dir), model_name
    cfg = get_model_config(model_name.replace("/", "-"))
    if cfg is not None:
        return cfg, {}, None, model_config_source(model_name.replace("/", "-")) or model_name
    path = Path(model_name)
    if path.suffix == ".json" and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")), {}, None, str(path)
        except ValueError as exc:
            raise ClipkitError(f"{path}: not valid JSON ({exc})") from exc
    raise UnknownModelError(unknown_model_message(model_name))


def _hub_weights(schema: str, ident: str, cache_dir: Optional[str]) -> str:
    if schema == "local-dir":
        folder = Path(ident).expanduser()
        for name in _WEIGHT_FILES:
            if (folder / name).is_file():
                return str(folder / name)
        extra = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext))
        if extra:
            return str(extra[0])
        raise ClipkitError(f"local-dir:{ident}: no weights file ({', '.join(_WEIGHT_FILES[:3])}, ...) in that folder")
    from huggingface_hub import hf_hub_download

    last: Optional[Exception] = None
    for name in _WEIGHT_FILES[:4]:
        try:
            return hf_hub_download(ident, name, cache_dir=cache_dir)
        except Exception as exc:  # not there: try the next name
            last = exc
    raise ClipkitError(f"hf-hub:{ident}: no open_clip weights file could be fetched ({last!r})")


def _resolve_pretrained(model_name: str, pretrained: str, cache_dir: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(weights file, tag entry or {}) for a tag, a checkpoint file, or a saved model folder."""
    tag_cfg = get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
    if tag_cfg:
        return download_pretrained(tag_cfg, cache_dir), tag_cfg
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}
    if path.is_dir():
        return _hub_weights("local-dir", str(path), cache_dir), {}
    tags = list_pretrained_tags_by_model(model_name.replace("/", "-"))
    raise ClipkitError(f"pretrained {pretrained!r} is not a known pretrained tag of {model_name!r} "
                       f"({'tags: ' + ', '.join(tags) if tags else 'it has no tags'}) or an existing file")


def _folder_preprocess(folder: Path) -> Dict[str, Any]:
    """The preprocess config saved beside weights by save_pretrained, when the folder has one."""
    folder = folder if folder.is_dir() else folder.parent
    config = folder / "open_clip_config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("preprocess_cfg", {})
    except ValueError:
        return {}


def _match_activation(raw: Dict[str, Any], tag_cfg: Dict[str, Any], model_name: str, tag: str, forced: bool) -> None:
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
    """The tower protocol of DESIGN, checked on every build so a broken plugin is named, not a traceback."""
    if not isinstance(tower, nn.Module):
        raise TowerContractError(f"{entry.where}: factory returned {type(tower).__name__}, not a torch.nn.Module")
    needed = ["output_dim", "layer_groups", "set_grad_checkpointing"]
    needed += ["image_size"] if entry.kind == "vision_tower" else ["context_length", "vocab_size"]
    missing = [name for name in needed if not hasattr(tower, name)]
    if missing:
        raise TowerContractError(f"{entry.where}: the tower lacks {', '.join(missing)} (see docs/plugins.md)")
    if tower.output_dim != embed_dim:
        raise TowerContractError(f"{entry.where}: the tower outputs {tower.output_dim} features but embed_dim is "
                                 f"{embed_dim}; give it a projection to embed_dim")


def build_model(config: ModelConfig, *, precision: str = "fp32", output_dict: bool = False,
                pretrained_image: bool = False, pretrained_text: bool = False,
                cache_dir: Optional[str] = None) -> ClipModel:
    """Build a :class:`ClipModel` from a validated config, in fp32 on the CPU (or meta device in context)."""
    top = config.top
    cast = precision if precision in ("fp16", "bf16") else None
    towers = {}
    for key, kind, tower_type, cfg, pretrained in (
            ("visual", "vision_tower", config.vision_type, config.vision, pretrained_image),
            ("text", "text_tower", config.text_type, config.text, pretrained_text)):
        entry = registry.get(kind, tower_type, where=f"{'vision_cfg' if key == 'visual' else 'text_cfg'}.type")
        ctx = TowerContext(embed_dim=top.embed_dim, quick_gelu=top.quick_gelu, cast_dtype=cast,
                           pretrained=pretrained, cache_dir=cache_dir)
        factory = entry.load()
        try:
            tower = factory(cfg, ctx)
        except ClipkitError:
            raise
        except Exception as exc:
            raise ClipkitError(f"{entry.where}: building the tower failed: {exc!r}") from exc
        _check_tower(tower, entry, top.embed_dim)
        towers[key] = (tower, entry)
    freezers = {}
    for key, tower_type in (("visual", config.vision_type), ("text", config.text_type)):
        if registry.has("freezer", tower_type):
            freezers[key] = registry.get("freezer", tower_type).load()
    text_entry = towers["text"][1]
    model = ClipModel(towers["visual"][0], towers["text"][0], embed_dim=top.embed_dim,
                      init_logit_scale=top.init_logit_scale, init_logit_bias=top.init_logit_bias,
                      nonscalar_logit_scale=top.nonscalar_logit_scale, output_dict=output_dict,
                      flat_text=bool(text_entry.meta.get("flat_state_dict")) and not top.custom_text,
                      freezers=freezers)
    model.model_config = config
    model.vision_type, model.text_type = config.vision_type, config.text_type
    return model


def _set_precision(model: nn.Module, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ClipkitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = _LOW.get(precision)
    if dtype is None:
        return
    if precision.startswith("pure_"):
        model.to(dtype)
        return
    # fp16/bf16: matmul weights in low precision, norms (and the logit scale) stay fp32
    for module in model.modules():
        if isinstance(module, _NORM_TYPES) or module is model:
            continue
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(dtype)


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
        **model_kwargs: Any,
) -> ClipModel:
    """Build a model by name (``ViT-B-32``, ``local-dir:/path``, ``hf-hub:org/repo``, or a ``.json`` path).

    ``pretrained`` is a checkpoint file (OpenCLIP, OpenAI-layout state dicts or clipkit training
    checkpoints; ``.safetensors``, ``.pt``, ``.pth``, ``.bin``). Explicit arguments win over the JSON.
    """
    if jit:
        raise ClipkitError("jit=True (TorchScript) is not supported by clipkit; use torch.compile(model) instead")
    if not weights_only:
        raise ClipkitError("weights_only=False is refused: clipkit loads checkpoints with weights_only=True only")
    model_kwargs.pop("pretrained_hf", None)
    raw, hub_preprocess, checkpoint, source = _resolve(model_name, cache_dir)
    if parse_model_name(model_name)[0] is not None and pretrained:
        logger.warning("%s: pretrained=%r ignored, the weights come with the model", model_name, pretrained)
    elif pretrained and load_weights:
        checkpoint, tag_cfg = _resolve_pretrained(model_name, pretrained, cache_dir)
        if tag_cfg:
            hub_preprocess = preprocess_of(tag_cfg)
            _match_activation(raw, tag_cfg, model_name, pretrained,
                              forced=force_quick_gelu or "quick_gelu" in model_kwargs)
        else:  # a file saved by save_pretrained brings its preprocessing (OpenCLIP drops it: its #1068)
            hub_preprocess = _folder_preprocess(Path(checkpoint)) or hub_preprocess
    if not load_weights:
        checkpoint = None
    raw = _apply_overrides(raw, force_quick_gelu=force_quick_gelu, force_custom_text=force_custom_text,
                           force_patch_dropout=force_patch_dropout, force_image_size=force_image_size,
                           force_context_length=force_context_length, model_kwargs=model_kwargs)
    config = validate_model_config(raw, source=source, name=model_name)
    tower_weights = checkpoint is None and pretrained_image_path is None and pretrained_text_path is None
    on_meta = torch.device(device).type == "meta"
    if on_meta and checkpoint is not None:
        raise ClipkitError("device='meta' builds shapes only; it cannot load the weights of a checkpoint")
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = build_model(config, precision=precision, output_dict=bool(output_dict),
                            pretrained_image=pretrained_image and tower_weights and not on_meta,
                            pretrained_text=pretrained_text and tower_weights and not on_meta, cache_dir=cache_dir)
    if checkpoint is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint, strict=True)
        logger.info("loaded %s weights from %s", model_name, checkpoint)
    for path, tower in ((pretrained_image_path, model.visual), (pretrained_text_path, model.text)):
        if path:
            from .checkpoint import load_tower_weights

            load_tower_weights(tower, path)
    if require_pretrained and checkpoint is None:
        raise ClipkitError(f"{model_name}: pretrained weights are required but none were given")
    _set_precision(model, precision)
    if not any(p.is_meta for p in model.parameters()):  # a model built under a meta context stays there
        model.to(device)
    preprocess = PreprocessCfg(size=tuple(model.visual.image_size) if not isinstance(model.visual.image_size, int)
                               else model.visual.image_size).as_dict()
    preprocess = merge_preprocess(merge_preprocess(preprocess, hub_preprocess), force_preprocess_cfg)
    set_model_preprocess_cfg(model, preprocess)
    return model


def _image_overrides(mean, std, interpolation, resize_mode) -> Dict[str, Any]:
    """The ``image_*`` arguments of the factory functions as preprocess overrides (None = keep)."""
    return {"mean": mean, "std": std, "interpolation": interpolation, "resize_mode": resize_mode}


def set_model_preprocess_cfg(model: nn.Module, preprocess_cfg: Dict[str, Any]) -> None:
    """Attach the preprocessing a model expects; saved with it and used by its transforms."""
    model.preprocess_cfg = dict(preprocess_cfg)
    model.visual.preprocess_cfg = model.preprocess_cfg  # where OpenCLIP code looks for it


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
        **model_kwargs: Any,
):
    """``(model, preprocess_train, preprocess_val)``; the ``image_*`` arguments override preprocessing."""
    force_preprocess = _image_overrides(image_mean, image_std, image_interpolation, image_resize_mode)
    model = create_model(
        model_name, pretrained, load_weights=load_weights, precision=precision, device=device, jit=jit,
        force_quick_gelu=force_quick_gelu, force_custom_text=force_custom_text,
        force_patch_dropout=force_patch_dropout, force_image_size=force_image_size,
        force_preprocess_cfg=force_preprocess, force_context_length=force_context_length,
        pretrained_image=pretrained_image, pretrained_text=pretrained_text,
        pretrained_image_path=pretrained_image_path, pretrained_text_path=pretrained_text_path,
        cache_dir=cache_dir, output_dict=output_dict, weights_only=weights_only, **model_kwargs)
    cfg = get_model_preprocess_cfg(model)
    return model, image_transform(cfg, is_train=True, aug_cfg=aug_cfg), image_transform(cfg, is_train=False)


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
        **model_kwargs: Any,
):
    """A model that must come with weights; returns ``model`` or ``(model, preprocess_val)``."""
    if not pretrained and parse_model_name(model_name)[0] is None:
        raise ClipkitError(f"create_model_from_pretrained({model_name!r}) needs pretrained= (a checkpoint file) "
                           f"or a 'local-dir:'/'hf-hub:' model name")
    force_preprocess = _image_overrides(image_mean, image_std, image_interpolation, image_resize_mode)
    model = create_model(
        model_name, pretrained, precision=precision, device=device, jit=jit, force_quick_gelu=force_quick_gelu,
        force_custom_text=force_custom_text, force_image_size=force_image_size,
        force_preprocess_cfg=force_preprocess, force_context_length=force_context_length, cache_dir=cache_dir,
        require_pretrained=True, weights_only=weights_only, **model_kwargs)
    if not return_transform:
        return model
    return model, image_transform(get_model_preprocess_cfg(model), is_train=False)


def get_tokenizer(model_name: str = "", context_length: Optional[int] = None, cache_dir: Optional[str] = None,
                  **kwargs: Any):
    """The tokenizer a model's config implies, at its ``context_length`` (or the one given).

    An unknown model name is an error (OpenCLIP silently falls back to CLIP's BPE tokenizer).
    """
    if not model_name:
        raise UnknownModelError("get_tokenizer needs a model name; see `clipkit models`")
    raw, _, _, source = _resolve(model_name, cache_dir)
    config = validate_model_config(raw, source=source, name=model_name)
    text_cfg = dict(raw.get("text_cfg", {}))
    schema, ident = parse_model_name(model_name)
    if schema == "local-dir" and config.tokenizer.hf_tokenizer_name:
        text_cfg["hf_tokenizer_name"] = ident  # a saved model carries its tokenizer files
    length = context_length or text_cfg.get("context_length") or getattr(config.text, "context_length", None) or 77
    tokenizer_kwargs = dict(config.tokenizer.tokenizer_kwargs or {})
    tokenizer_kwargs.update(kwargs)
    if cache_dir is not None:
        tokenizer_kwargs["cache_dir"] = cache_dir
    entry = registry.get("tokenizer", config.tokenizer_name, where=f"{model_name}: text_cfg.tokenizer")
    tokenizer = entry.load()(text_cfg, length, **tokenizer_kwargs)
    _check_special_ids(model_name, config, tokenizer)
    return tokenizer


def _check_special_ids(model_name: str, config: ModelConfig, tokenizer: Any) -> None:
    """The text tower's special ids must be the tokenizer's, or pooling and masking read the wrong token."""
    text = config.text
    pool = getattr(text, "pool_type", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if pool == "eos" and eos is not None and getattr(text, "eos_id", eos) != eos:
        raise ClipkitError(f"{model_name}: text_cfg.eos_id is {text.eos_id} but the tokenizer's end token is {eos}; "
                           f"pool_type 'eos' would pool the wrong token")
    pad = getattr(tokenizer, "pad_token_id", None)
    if getattr(text, "embed_cls", False) and pad is not None and getattr(text, "pad_id", pad) != pad:
        raise ClipkitError(f"{model_name}: text_cfg.pad_id is {text.pad_id} but the tokenizer pads with {pad}; "
                           f"the attention mask would hide the wrong tokens")
    vocab = getattr(text, "vocab_size", None)
    if eos is not None and vocab is not None and eos >= vocab:
        raise ClipkitError(f"{model_name}: the tokenizer's end token id {eos} is outside text_cfg.vocab_size "
                           f"{vocab}; token ids would fall outside the embedding table")


_TOKENIZE_CACHE: Dict[str, Any] = {}


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77) -> torch.Tensor:
    """CLIP BPE ids, as OpenCLIP's ``tokenize``. A model's own tokenizer comes from :func:`get_tokenizer`."""
    if "clip" not in _TOKENIZE_CACHE:
        _TOKENIZE_CACHE["clip"] = registry.get("tokenizer", "clip").load()({}, context_length)
    return _TOKENIZE_CACHE["clip"](texts, context_length)


def decode(ids: Union[Sequence[int], torch.Tensor]) -> str:
    """Text of CLIP BPE ids, as OpenCLIP's ``decode``."""
    tokenize("")
    return _TOKENIZE_CACHE["clip"].decode(ids)
