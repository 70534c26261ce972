"""Builtin Vision Transformer tower, ``"type": "vit"`` (the default vision type).

This module is the plugin: its config class and hookimpls import no torch; ``model.py`` beside it
holds the ``nn.Module``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Tuple, Union

from ..._typed import option
from ...hookspecs import Register, hookimpl
from .._block_cfg import TransformerBlockCfg

Size = Union[int, Tuple[int, int]]


@dataclass
class ViTCfg(TransformerBlockCfg):
    """Keys of ``vision_cfg`` for the builtin ViT (OpenCLIP's ``CLIPVisionCfg`` names and defaults)."""

    image_size: Size = option(224, "Input resolution: an int for square images or [height, width].", gt=0)
    patch_size: Size = option(16, "Side of the square (or [h, w]) patches the image is cut into.", gt=0)
    width: int = option(768, "Hidden size of the transformer.", gt=0)
    head_width: int = option(64, "Width of each attention head; heads = width // head_width.", gt=0)
    patch_dropout: float = option(0.0, "Fraction of patch tokens dropped during training (FLIP).", ge=0, lt=1)
    attentional_pool: bool = option(False, "Pool with learned queries by cross-attention before ln_post.")
    attn_pooler_queries: int = option(256, "Number of learned queries of the attentional pooler.", gt=0)
    attn_pooler_heads: int = option(8, "Attention heads of the attentional pooler.", gt=0)
    no_ln_pre: bool = option(False, "Skip the LayerNorm before the transformer (CLIPA).")
    pos_embed_type: Literal["learnable", "sin_cos_2d"] = option(
        "learnable", "Position embedding: learned, or fixed 2-D sine-cosine (square grids only).")
    final_ln_after_pool: bool = option(False, "Apply ln_post after pooling instead of before (CLIPA).")
    pool_type: Literal["tok", "avg", "none"] = option(
        "tok", "Pooling: the class token, the mean of patch tokens, or none (all tokens).")
    output_tokens: bool = option(False, "forward returns (pooled, patch tokens) instead of pooled.")

    def grid(self) -> Tuple[int, int]:
        image, patch = _pair(self.image_size), _pair(self.patch_size)
        return image[0] // patch[0], image[1] // patch[1]

    def check(self) -> Iterator[Tuple[str, str]]:
        if self.width % self.head_width:
            yield "width", f"must be divisible by head_width ({self.width} % {self.head_width} != 0)"
        if min(self.grid()) < 1:
            yield "patch_size", f"{self.patch_size} is larger than image_size {self.image_size}"
        if self.pos_embed_type == "sin_cos_2d" and self.grid()[0] != self.grid()[1]:
            yield "pos_embed_type", "sin_cos_2d needs a square patch grid"
        if self.pos_embed_type == "sin_cos_2d" and self.width % 4:
            yield "pos_embed_type", f"sin_cos_2d needs a width divisible by 4, got {self.width}"
        yield from self.block_problems()


def _pair(value: Size) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


@hookimpl
def register_vision_towers(register: Register) -> None:
    register("vit", "clipkit.builtin.vit.model:build_vit", config=ViTCfg,
             example={"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 16})


@hookimpl
def register_freezers(register: Register) -> None:
    register("vit", "clipkit.freeze:lock_layer_groups")
