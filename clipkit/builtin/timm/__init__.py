"""Builtin timm vision tower, ``"type": "timm"`` (inferred when ``vision_cfg`` has ``timm_model_name``).

Any image model in timm's registry becomes the trunk of the tower; a small head pools and projects
its features to ``embed_dim``. Keys and state-dict layout (``trunk.*``, ``head.*``) are OpenCLIP's
``TimmModel``, so OpenCLIP configs and checkpoints load unchanged. This module is the plugin: the
config class and hookimpls import neither torch nor timm; ``model.py`` beside it does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, Literal, Optional, Tuple, Union

from ..._typed import option
from ...hookspecs import Infer, Register, hookimpl

Size = Union[int, Tuple[int, int]]

#: Pools the head adds itself (timm's attention pools); any other ``timm_pool`` is timm's ``global_pool``.
ATTENTION_POOLS = ("abs_attn", "rot_attn")
#: ``timm.create_model`` arguments that other keys set; ``timm_model_kwargs`` may not repeat them.
_OWNED_KWARGS = {"pretrained": "timm_model_pretrained", "num_classes": "timm_proj", "global_pool": "timm_pool",
                 "drop_path_rate": "timm_drop_path", "patch_drop_rate": "patch_dropout", "img_size": "image_size",
                 "cache_dir": "the cache_dir argument of create_model"}


@dataclass
class TimmCfg:
    """Keys of ``vision_cfg`` for a timm tower (OpenCLIP's ``timm_*`` names and defaults)."""

    timm_model_name: str = option(doc="timm model name, e.g. 'convnext_base' or 'vit_base_patch16_siglip_224' "
                                      "(optionally with a pretrained tag: 'name.tag').")
    timm_model_pretrained: bool = option(
        False, "Load timm's pretrained weights for the trunk when the model is built (pretrained_image=True asks "
               "for the same); skipped when a full checkpoint is loaded over the model. Offline, the weights must "
               "be in the huggingface_hub cache, or point timm at a local file with timm_model_kwargs "
               "{\"pretrained_cfg_overlay\": {\"file\": \"/path/to/weights.safetensors\"}}.")
    timm_pool: str = option(
        "avg", "Pooling: timm's global_pool ('avg', 'token', 'map', 'max', ...; '' keeps the model's default "
               "when a projection is added, or no pooling otherwise), or an attention pool in the head: "
               "'abs_attn' (learned positions) or 'rot_attn' (rotary positions), for models with 2-D features.")
    timm_proj: Optional[Literal["linear", "mlp", "none", ""]] = option(
        "linear", "Projection to embed_dim: 'linear' (dropout + linear), 'mlp' (2-layer, hidden 2 x embed_dim), "
                  "'none' (the trunk's pooled features are the embedding, so their width must equal embed_dim), "
                  "or null/'' (timm's own classifier with embed_dim outputs is the projection).")
    timm_proj_bias: bool = option(False, "Give the last layer of a 'linear' or 'mlp' projection a bias.")
    timm_drop: float = option(0.0, "Dropout before the 'linear' projection (inside the 'mlp' one).", ge=0, lt=1)
    timm_drop_path: Optional[float] = option(None, "Stochastic depth rate of the trunk (timm's drop_path_rate); "
                                                   "null keeps the model's default.", ge=0, lt=1)
    patch_dropout: float = option(0.0, "Fraction of patch tokens dropped during training (timm's patch_drop_rate; "
                                       "ViT-family models only).", ge=0, lt=1)
    image_size: Size = option(224, "Input resolution: an int for square images or [height, width]. Models with a "
                                   "fixed input size (ViTs) are built for it.", gt=0)
    timm_model_kwargs: Optional[Dict[str, Any]] = option(
        None, "Further keyword arguments of timm.create_model (OpenCLIP's later name), e.g. "
              "{\"pretrained_cfg_overlay\": {\"file\": \"/path/to/weights.safetensors\"}} to load "
              "timm_model_pretrained weights from a local file.")

    @property
    def adds_projection(self) -> bool:
        return self.timm_proj in ("linear", "mlp")

    def check(self) -> Iterator[Tuple[str, str]]:
        if not self.timm_model_name.strip():
            yield "timm_model_name", "must name a timm model"
        if self.timm_pool == "" and not self.adds_projection:
            yield "timm_pool", (f"'' with timm_proj {self.timm_proj!r} leaves the features unpooled; name a pool "
                                f"('avg', 'token', 'map', ...) or add a 'linear'/'mlp' projection")
        if self.timm_proj_bias and not self.adds_projection:
            yield "timm_proj_bias", f"only applies to timm_proj 'linear' or 'mlp', not {self.timm_proj!r}"
        if self.timm_drop and not self.adds_projection:
            yield "timm_drop", f"only applies to timm_proj 'linear' or 'mlp', not {self.timm_proj!r}"
        for key in sorted(self.timm_model_kwargs or {}):
            if key in _OWNED_KWARGS:
                yield f"timm_model_kwargs.{key}", f"is set by {_OWNED_KWARGS[key]}; use that instead"


@hookimpl
def register_vision_towers(register: Register) -> None:
    # timm's test_vit: a tiny ViT in timm's registry, built in milliseconds without downloads
    register("timm", "clipkit.builtin.timm.model:build_timm", config=TimmCfg, infer=Infer("timm_model_name"),
             example={"timm_model_name": "test_vit", "timm_pool": "avg", "timm_proj": "linear", "image_size": 32})


@hookimpl
def register_freezers(register: Register) -> None:
    register("timm", "clipkit.builtin.timm.model:lock_timm")
