"""A third-party clipkit plugin: vision tower "toyvision" and a model config that uses it."""
from dataclasses import dataclass

import clipkit


@dataclass
class ToyVisionCfg:
    image_size: int = 32
    channels: int = 8

    def check(self):
        if self.channels <= 0:
            yield "channels", "must be > 0"


@clipkit.hookimpl
def register_vision_towers(register):
    register("toyvision", "clipkit_plugin_toyvision.model:build", config=ToyVisionCfg)


@clipkit.hookimpl
def register_model_configs(register):
    register("toy-clip", {
        "embed_dim": 16,
        "vision_cfg": {"type": "toyvision", "image_size": 32, "channels": 4},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    })
