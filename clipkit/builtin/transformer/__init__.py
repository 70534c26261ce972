"""Builtin text transformer tower, ``"type": "transformer"`` (the default text type).

This module is the plugin: its config class and hookimpls import no torch; ``model.py`` beside it
holds the ``nn.Module``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Tuple

from ..._typed import option
from ...hookspecs import Register, hookimpl
from .._block_cfg import TransformerBlockCfg


@dataclass
class TextTransformerCfg(TransformerBlockCfg):
    """Keys of ``text_cfg`` for the builtin text transformer (OpenCLIP's ``CLIPTextCfg`` names and defaults)."""

    context_length: int = option(77, "Tokens per text: the tokenizer's output length and the number of positions.", gt=0)
    vocab_size: int = option(49408, "Size of the token embedding table (49408 for CLIP's BPE).", gt=0)
    heads: int = option(8, "Attention heads.", gt=0)
    embed_cls: bool = option(False, "Append a learned class token and pool it (with ln_final after pooling).")
    pad_id: int = option(0, "Token id of padding; masked from attention when embed_cls is set.", ge=0)
    eos_id: int = option(2, "Token id that ends a text; pool_type 'eos' pools its first occurrence.", ge=0)
    no_causal_mask: bool = option(False, "Bidirectional attention instead of causal (SigLIP, CLIPA).")
    final_ln_after_pool: bool = option(False, "Apply ln_final to the pooled token instead of to every token.")
    pool_type: Literal["argmax", "first", "last", "eos", "none"] = option(
        "argmax", "Which token's features represent the text: the highest id (CLIP's end token), the first, "
                  "the last, the first eos_id, or none (all tokens).")
    proj_type: Literal["linear", "none"] = option(
        "linear", "Projection to embed_dim: linear, or none (width must equal embed_dim).")
    proj_bias: bool = option(False, "Give the projection a bias (an nn.Linear instead of a bare matrix).")
    output_tokens: bool = option(False, "forward returns (pooled, token features) instead of pooled.")

    def check(self) -> Iterator[Tuple[str, str]]:
        if self.width % self.heads:
            yield "width", f"must be divisible by heads ({self.width} % {self.heads} != 0)"
        if self.pad_id >= self.vocab_size:
            yield "pad_id", f"{self.pad_id} is outside the vocabulary (vocab_size {self.vocab_size})"
        if self.pool_type == "eos" and self.eos_id >= self.vocab_size:
            yield "eos_id", f"{self.eos_id} is outside the vocabulary (vocab_size {self.vocab_size})"
        yield from self.block_problems()


@hookimpl
def register_text_towers(register: Register) -> None:
    register("transformer", "clipkit.builtin.transformer.model:build_text_transformer", config=TextTransformerCfg,
             flat_state_dict=True,
             example={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2})


@hookimpl
def register_freezers(register: Register) -> None:
    register("transformer", "clipkit.freeze:lock_layer_groups")
