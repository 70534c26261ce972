"""Builtin tokenizers: ``clip`` (OpenAI CLIP's byte-level BPE, shipped offline) and ``hf`` (any
HuggingFace tokenizer). Selected by ``text_cfg.tokenizer`` or inferred (``hf_tokenizer_name`` -> hf).

This module is the plugin and imports no torch; the tokenizers live beside it.
"""
from ...hookspecs import Infer, Register, hookimpl


@hookimpl
def register_tokenizers(register: Register) -> None:
    register("clip", "clipkit.builtin.tokenizers.clip_bpe:build_clip_tokenizer",
             options=("clean", "reduction_mask", "additional_special_tokens", "vocab_path"), example={})
    # any further keyword goes to transformers.AutoTokenizer.from_pretrained, so no closed list
    register("hf", "clipkit.builtin.tokenizers.hf:build_hf_tokenizer", infer=Infer("hf_tokenizer_name"))
