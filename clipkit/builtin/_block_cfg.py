"""Config keys shared by the builtin transformer towers (torch-free: plugins' config classes load everywhere)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, Literal, Optional, Tuple

from .._typed import option


@dataclass
class TransformerBlockCfg:
    """Keys of the stack of residual attention blocks, common to the builtin ViT and text transformer."""

    width: int = option(512, "Hidden size of the transformer.", gt=0)
    layers: int = option(12, "Number of transformer blocks.", gt=0)
    mlp_ratio: float = option(4.0, "MLP hidden size as a multiple of width.", gt=0)
    ls_init_value: Optional[float] = option(None, "LayerScale initial value; null disables LayerScale.")
    act_kwargs: Optional[Dict[str, Any]] = option(None, "Keyword arguments of the activation, e.g. {\"approximate\": \"tanh\"}.")
    norm_kwargs: Optional[Dict[str, Any]] = option(None, "Keyword arguments of LayerNorm, e.g. {\"eps\": 1e-6}.")
    block_type: Optional[Literal["default", "custom"]] = option(
        None, "OpenCLIP's block class; 'default' forbids the extras below, 'custom' or null allows them "
              "(clipkit has one block class for both).")
    qk_norm: bool = option(False, "LayerNorm on queries and keys of each head.")
    scaled_cosine_attn: bool = option(False, "Cosine attention with a learned per-head temperature (Swin v2).")
    scale_heads: bool = option(False, "Learned per-head output scale (NormFormer).")
    scale_attn_inner: bool = option(False, "LayerNorm on the attention output before its projection.")
    scale_attn: bool = option(False, "LayerNorm after the attention sub-block.")
    scale_fc: bool = option(False, "LayerNorm inside the MLP, after the activation.")

    def block_problems(self) -> Iterator[Tuple[str, str]]:
        """Cross-key rules of the block extras, as ``(key, message)``."""
        if self.qk_norm and self.scaled_cosine_attn:
            yield "qk_norm", "cannot be combined with scaled_cosine_attn"
        extras = (self.qk_norm, self.scaled_cosine_attn, self.scale_heads, self.scale_attn_inner, self.scale_attn,
                  self.scale_fc)
        if self.block_type == "default" and any(extras):
            yield "block_type", "'default' blocks have no qk_norm/scaled_cosine_attn/scale_* extras; use 'custom'"

    def block_kwargs(self) -> Dict[str, Any]:
        """The extras as keyword arguments of ``clipkit.layers.Transformer``."""
        return {"ls_init_value": self.ls_init_value, "qk_norm": self.qk_norm,
                "scaled_cosine_attn": self.scaled_cosine_attn, "scale_heads": self.scale_heads,
                "scale_attn_inner": self.scale_attn_inner, "scale_attn": self.scale_attn, "scale_fc": self.scale_fc}
