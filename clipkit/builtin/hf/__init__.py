"""Builtin HuggingFace text tower, ``"type": "hf"`` (inferred from ``hf_model_name``).

Any ``transformers`` encoder by hub name or local folder, or the encoder half of an
encoder-decoder (T5/mT5, NLLB). Its structure (embeddings, the list of layers) is discovered from
the model, so new architectures need no table. This module is the plugin and imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Tuple

from ..._typed import option
from ...hookspecs import Infer, Register, hookimpl
from ...kinds import POOLER


@dataclass
class HFTextCfg:
    """Keys of ``text_cfg`` for a HuggingFace text encoder (OpenCLIP's ``hf_*`` names)."""

    hf_model_name: str = option(doc="Hub name (roberta-base) or local folder of the encoder.")
    hf_model_pretrained: bool = option(True, "Load the encoder's pretrained weights (else its config only); "
                                             "skipped when a full checkpoint is loaded.")
    hf_proj_type: Optional[Literal["mlp", "linear", "none"]] = option(
        "mlp", "Projection to embed_dim: mlp (Linear-GELU-Linear, hidden (width+embed_dim)//2, no bias), "
               "linear (no bias), or none/null (identity: the encoder width must equal embed_dim).")
    hf_pooler_type: str = option("mean_pooler", "Registered pooler: mean_pooler, max_pooler, cls_pooler "
                                                "(the model's pooled output, else the first token), "
                                                "cls_last_hidden_state_pooler.")
    context_length: int = option(77, "Tokens per text the tokenizer produces (at most the encoder's "
                                     "max_position_embeddings).", gt=0)
    output_tokens: bool = option(False, "forward returns (pooled, token features) instead of pooled.")
    width: Optional[int] = option(None, "The encoder's hidden size, as OpenCLIP's text configs may state it; "
                                        "checked against the model when built (null: not stated).", gt=0)
    trust_remote_code: bool = option(False, "A request only, kept for OpenCLIP-era configs: the repo's own code runs "
                                            "only when the caller opts in (trust_remote_code=True, --trust-remote-code "
                                            "or CLIPKIT_TRUST_REMOTE_CODE=1), never because a config says so.")

    def check(self) -> Iterator[Tuple[str, str]]:
        from ...registry import registry

        if not registry.has(POOLER, self.hf_pooler_type):
            yield "hf_pooler_type", registry.unknown_message(POOLER, self.hf_pooler_type)


@hookimpl
def register_text_towers(register: Register) -> None:
    register("hf", "clipkit.builtin.hf.model:build_hf_text", config=HFTextCfg, infer=Infer("hf_model_name"))


@hookimpl
def register_freezers(register: Register) -> None:
    register("hf", "clipkit.builtin.hf.model:lock_hf_text")
