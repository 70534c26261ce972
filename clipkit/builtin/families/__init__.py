"""Builtin model family ``clip``: two towers and a learned temperature (:class:`clipkit.model.ClipModel`).

Every config that selects no other family is one of these. Registered through the same hook as a
plugin's family; no torch here.
"""
from ...hookspecs import Register, hookimpl


@hookimpl
def register_model_families(register: Register) -> None:
    register("clip", "clipkit.model:build_clip_model",
             example={"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1,
                                                      "head_width": 16},
                      "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}})
