"""clipkit plugin ``coca``: CoCa (contrastive captioners) as a model family, its objective and its configs.

A CoCa model is a CLIP model (the builtin image and text towers, both returning their token features)
plus a multimodal text decoder that reads the text tokens causally and attends to the image tokens,
predicting the next token: a captioner trained beside the contrastive loss. The plugin registers

- the model family ``coca``, selected by a config's top-level ``multimodal_cfg`` (the decoder's keys);
- the objective ``coca``: the contrastive loss plus the caption cross-entropy, weighted by
  ``--coca-contrastive-loss-weight`` and ``--coca-caption-loss-weight`` as in OpenCLIP;
- OpenCLIP's four CoCa configs and their pretrained tags.

clipkit imports this module in every process, so it imports no torch; ``model.py`` and ``objective.py``
hold the modules and are imported on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import clipkit
from clipkit.plugin import Infer, option

#: OpenCLIP 3.3.0's CoCa configs, shipped unchanged as package data.
MODELS = ("coca_base", "coca_ViT-B-32", "coca_ViT-L-14", "coca_roberta-ViT-B-32")

_OPENAI_NORM = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                "interpolation": "bicubic", "resize_mode": "shortest"}
#: OpenCLIP 3.3.0's pretrained CoCa weights, by model and tag (its ``pretrained.py``).
PRETRAINED = {
    model: {
        "laion2b_s13b_b90k": {"hf_hub": f"laion/CoCa-{arch}-laion2B-s13B-b90k/", **_OPENAI_NORM},
        "mscoco_finetuned_laion2b_s13b_b90k": {"hf_hub": f"laion/mscoco_finetuned_CoCa-{arch}-laion2B-s13B-b90k/",
                                               **_OPENAI_NORM},
    }
    for model, arch in (("coca_ViT-B-32", "ViT-B-32"), ("coca_ViT-L-14", "ViT-L-14"))
}


@dataclass
class MultimodalCfg:
    """Keys of ``multimodal_cfg``: the multimodal text decoder (OpenCLIP's ``MultimodalCfg``).

    The decoder has ``layers`` pairs of blocks: a causal self-attention block over the text tokens,
    then a cross-attention block from them to the image tokens. Its logits cover the text tower's
    vocabulary (``text_cfg.vocab_size``, 49408 when the text config does not set it), as in OpenCLIP.
    """

    context_length: int = option(77, "Longest token sequence the decoder reads (its causal mask's size).", gt=0)
    vocab_size: int = option(49408, "Carried by OpenCLIP's configs; the logits' width is text_cfg.vocab_size "
                                    "(OpenCLIP reads that one too).", gt=0)
    width: int = option(512, "Width of the decoder's blocks; the text tower's token features have this width.",
                        gt=0)
    heads: int = option(8, "Attention heads of every decoder block.", gt=0)
    layers: int = option(12, "Self-attention + cross-attention block pairs.", ge=0)
    ls_init_value: Optional[float] = option(None, "LayerScale initial value of the decoder blocks; null: none.")
    mlp_ratio: float = option(4.0, "Width of the blocks' MLP over width. OpenCLIP builds 4 whatever this says; "
                                   "clipkit honours it, so only 4 loads OpenCLIP weights.", gt=0)
    dim_head: int = option(64, "Carried by OpenCLIP's configs and not read by its decoder (nor clipkit's); "
                               "heads set the head width.", gt=0)
    n_queries: int = option(256, "Carried by OpenCLIP's configs and not read by its decoder (nor clipkit's); "
                                 "the image tower's attn_pooler_queries sets the pooler's queries.", gt=0)
    attn_pooler_heads: int = option(8, "Carried by OpenCLIP's configs and not read by its decoder (nor "
                                       "clipkit's); vision_cfg.attn_pooler_heads sets the pooler's heads.", gt=0)

    def check(self):
        if self.width % self.heads:
            yield "heads", f"{self.heads} heads do not divide width {self.width}"


@dataclass
class CocaCfg:
    """Top-level keys the ``coca`` family adds to a model config."""

    multimodal_cfg: MultimodalCfg = option(doc="The multimodal text decoder.", default_factory=MultimodalCfg)


@dataclass
class CocaOptions:
    """Options of the ``coca`` objective (OpenCLIP's ``CoCaLoss``)."""

    caption_loss_weight: float = option(2.0, "Weight of the caption cross-entropy (--coca-caption-loss-weight).",
                                        ge=0)
    contrastive_loss_weight: float = option(1.0, "Weight of the contrastive loss "
                                                 "(--coca-contrastive-loss-weight); 0 trains the captioner alone.",
                                            ge=0)
    pad_id: int = option(0, "Token id the caption loss ignores (padding; OpenCLIP's CoCaLoss uses 0).", ge=0)
    local_loss: bool = option(False, "As for the clip objective (--local-loss).")
    gather_with_grad: bool = option(False, "As for the clip objective (--gather-with-grad).")


#: A small coca config its contract cases build.
EXAMPLE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4, "output_tokens": True},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    "custom_text": True,
}


@clipkit.hookimpl
def register_model_families(register):
    register("coca", "clipkit_plugin_coca.model:build_coca", config=CocaCfg, infer=Infer("multimodal_cfg"),
             example=EXAMPLE, trains_with="coca")


@clipkit.hookimpl
def register_objectives(register):
    # OpenCLIP's trainer flags for the two weights
    register("coca", "clipkit_plugin_coca.objective:build_objective", config=CocaOptions,
             flags={"caption_loss_weight": "--coca-caption-loss-weight",
                    "contrastive_loss_weight": "--coca-contrastive-loss-weight"})


@clipkit.hookimpl
def register_model_configs(register):
    for name in MODELS:
        # package data, read relative to this package
        register(name, f"model_configs/{name}.json", pretrained=PRETRAINED.get(name, {}))
