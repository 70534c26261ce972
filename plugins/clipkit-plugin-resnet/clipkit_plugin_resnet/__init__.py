"""clipkit plugin ``resnet``: OpenAI's ModifiedResNet image tower and the RN50-family model configs.

clipkit imports this module in every process (training ranks, data workers, ``clipkit models``), so
it imports no torch; ``model.py`` beside it holds the ``nn.Module`` and is imported on first build.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import clipkit
from clipkit.plugin import Infer, option

#: OpenAI's ResNet CLIP models; each ships with its ``-quickgelu`` twin (OpenCLIP's config files).
MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")


@dataclass
class ResNetCfg:
    """Keys of ``vision_cfg`` when ``"type": "resnet"`` (inferred when ``layers`` is a list).

    These are the ``CLIPVisionCfg`` keys, names and defaults OpenCLIP's ``ModifiedResNet`` reads;
    keys it would ignore (``output_tokens``, ``patch_dropout``, ...) are rejected.
    """

    layers: Tuple[int, int, int, int] = option(
        doc="Bottleneck blocks in each of the four residual stages, e.g. [3, 4, 6, 3] for RN50.", gt=0)
    width: int = option(64, "Channels after the stem; stage i has width * 2**i bottleneck channels, "
                            "so the final feature map has width * 32.", ge=2)
    head_width: int = option(64, "Width of each head of the attention pool; heads = width * 32 // head_width.", gt=0)
    image_size: int = option(224, "Side of the square input image in pixels; a multiple of 32, since the "
                                  "tower downsamples by 32 before attention pooling.", gt=0)
    patch_size: None = option(None, "Not used by a ResNet. OpenCLIP's RN configs carry it as null, so null "
                                    "is the only value accepted.")

    def heads(self) -> int:
        """Attention heads of the pool, as OpenCLIP computes them."""
        return self.width * 32 // self.head_width

    def check(self):
        if self.image_size % 32:
            yield "image_size", (f"must be a multiple of 32 (the tower downsamples by 32 and its attention "
                                 f"pool has one position per cell of that grid), got {self.image_size}")
        feature = self.width * 32
        if self.heads() < 1:
            yield "head_width", (f"{self.head_width} is wider than the final feature map "
                                 f"(width * 32 = {feature}), so no attention head fits")
        elif feature % self.heads():
            yield "head_width", (f"gives heads = width * 32 // head_width = {self.heads()}, which does not "
                                 f"divide the feature width {feature}; pick a head_width that divides {feature}")


@clipkit.hookimpl
def register_vision_towers(register):
    # OpenCLIP's RN configs name no type: a list of layers (one count per stage) is what makes them ResNets
    register("resnet", "clipkit_plugin_resnet.model:build_resnet", config=ResNetCfg, infer=Infer("layers", "list"),
             example={"layers": [1, 1, 1, 1], "width": 8, "head_width": 32, "image_size": 64})


@clipkit.hookimpl
def register_freezers(register):
    # layer_groups() is stem, layer1..layer4, attnpool: counting groups from the end is the lock
    register("resnet", "clipkit.freeze:lock_layer_groups")


@clipkit.hookimpl
def register_model_configs(register):
    for model in MODELS:
        for name in (model, f"{model}-quickgelu"):
            register(name, f"model_configs/{name}.json")  # package data, read relative to this package
