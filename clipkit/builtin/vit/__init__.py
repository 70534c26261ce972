"""Builtin Vision Transformer tower, ``"type": "vit"`` (the default vision type).

This module is the plugin: its config class and hookimpls import no torch; ``model.py`` beside it
holds the ``nn.Module``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple, Union

from ...hookspecs import hookimpl
from ..._typed import option

Size = Union[int, Tuple[int, int]]


@dataclass
class ViTCfg:
    """Keys of ``vision_cfg`` for the builtin ViT (OpenCLIP's ``CLIPVisionCfg`` names and defaults)."""

    image_size: Size = option(224, "Input resolution: an int for square images or [height, width].", gt=0)
    patch_size: Size = option(16, "Side of the square (or [h, w]) patches the image is cut into.", gt=0)
    layers: int = option(12, "Number of transformer blocks.", gt=0)
    width: int = option(768, "Hidden size of the transformer.", gt=0)
    head_width: int = option(64, "Width of each attention head; heads = width // head_width.", gt=0)
    mlp_ratio: float = option(4.0, "MLP hidden size as a multiple of width.", gt=0)
    ls_init_value: Optional[float] = option(None, "LayerScale initial value; null disables LayerScale.")
    patch_dropout: float = option(0.0, "Fraction of patch tokens dropped during training (FLIP).", ge=0, lt=1)
    attentional_pool: bool = option(False, "Pool with learned queries by cross-attention (CoCa-style) before ln_post.")
    attn_pooler_queries: int = option(256, "Number of learned queries of the attentional pooler.", gt=0)
    attn_pooler_heads: int = option(8, "Attention heads of the attentional pooler.", gt=0)
    no_ln_pre: bool = option(False, "Skip the LayerNorm before the transformer (CLIPA).")
    pos_embed_type: Literal["learnable", "sin_cos_2d"] = option(
        "learnable", "Position embedding: learned, or fixed 2-D sine-cosine (square grids only).")
    final_ln_after_pool: bool = option(False, "Apply ln_post after pooling instead of before (CLIPA).")
    pool_type: Literal["tok", "avg", "none"] = option(
        "tok", "Pooling: the class token, the mean of patch tokens, or none (all tokens).")
    output_tokens: bool = option(False, "forward returns (pooled, patch tokens) instead of pooled.")
    act_kwargs: Optional[Dict[str, Any]] = option(None, "Keyword arguments of the activation, e.g. {\"approximate\": \"tanh\"}.")
    norm_kwargs: Optional[Dict[str, Any]] = option(None, "Keyword arguments of LayerNorm, e.g. {\"eps\": 1e-6}.")
    block_type: Optional[Literal["default", "custom"]] = option(
        None, "'custom' enables the block extras below; chosen automatically when any extra is set.")
    qk_norm: bool = option(False, "LayerNorm on queries and keys of each head.")
    scaled_cosine_attn: bool = option(False, "Cosine attention with a learned per-head temperature (Swin v2).")
    scale_heads: bool = option(False, "Learned per-head output scale (NormFormer).")
    scale_attn_inner: bool = option(False, "LayerNorm on the attention output before its projection.")
    scale_attn: bool = option(False, "LayerNorm after the attention sub-block.")
    scale_fc: bool = option(False, "LayerNorm inside the MLP, after the activation.")

    def grid(self) -> Tuple[int, int]:
        image, patch = _pair(self.image_size), _pair(self.patch_size)
        return image[0] // patch[0], image[1] // patch[1]

    def check(self):
        if self.width % self.head_width:
            yield "width", f"must be divisible by head_width ({self.width} % {self.head_width} != 0)"
        if min(self.grid()) < 1:
            yield "patch_size", f"{self.patch_size} is larger than image_size {self.image_size}"
        if self.pos_embed_type == "sin_cos_2d" and self.grid()[0] != self.grid()[1]:
            yield "pos_embed_type", "sin_cos_2d needs a square patch grid"
        if self.qk_norm and self.scaled_cosine_attn:
            yield "qk_norm", "cannot be combined with scaled_cosine_attn"
        extras = (self.qk_norm, self.scaled_cosine_attn, self.scale_heads, self.scale_attn_inner, self.scale_attn,
                  self.scale_fc)
        if self.block_type == "default" and any(extras):
            yield "block_type", "'default' blocks have no qk_norm/scaled_cosine_attn/scale_* extras; use 'custom'"


def _pair(value: Size) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


@hookimpl
def register_vision_towers(register):
    register("vit", "clipkit.builtin.vit.model:build_vit", config=ViTCfg)


@hookimpl
def register_freezers(register):
    register("vit", "clipkit.freeze:lock_layer_groups")
