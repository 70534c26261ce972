"""Any HuggingFace tokenizer (hub name or local folder), padded and truncated to the context length."""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Union

import torch

from ...errors import ClipkitError
from .clip_bpe import CLEAN_MODES, clean_text


class HFTokenizer:
    """``tokenizer(texts) -> LongTensor[N, context_length]`` through ``transformers.AutoTokenizer``.

    Args:
        tokenizer_name: hub name (``roberta-base``) or a local folder with tokenizer files.
        context_length: tokens per text.
        clean: ``whitespace`` (default), ``lower`` or ``canonicalize``, applied before tokenizing.
        strip_sep_token: replace the separator token by 0 (CLIPA's BERT tokenizer).
        language: source language for tokenizers that have one (NLLB).
        tokenizer_mode: ``"clips"``: ``[bos] + ids[:ctx-3] + [eos]``, padding, and the class token last.
        **kwargs: passed to ``AutoTokenizer.from_pretrained`` (``trust_remote_code`` only when given).
    """

    def __init__(self, tokenizer_name: str, context_length: int = 77, clean: str = "whitespace",
                 strip_sep_token: bool = False, language: Optional[str] = None, cache_dir: Optional[str] = None,
                 tokenizer_mode: Optional[str] = None, **kwargs: Any):
        from transformers import AutoTokenizer

        if clean not in CLEAN_MODES:
            raise ClipkitError(f"tokenizer clean mode must be one of {', '.join(CLEAN_MODES)}, got {clean!r}")
        if tokenizer_mode not in (None, "", "clips"):
            raise ClipkitError(f"tokenizer_mode must be 'clips' or null, got {tokenizer_mode!r}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, cache_dir=cache_dir, **kwargs)
        except OSError as exc:
            raise ClipkitError(f"HF tokenizer {tokenizer_name!r} cannot be loaded ({str(exc).splitlines()[0]}); "
                               f"offline, point hf_tokenizer_name at a local folder with its tokenizer files") from exc
        self.name = tokenizer_name
        self.context_length = context_length
        self.clean = clean
        self.strip_sep_token = strip_sep_token
        self.tokenizer_mode = tokenizer_mode or ""
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.sep_token_id
        if language is not None:
            self.set_language(language)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def set_language(self, language: str) -> None:
        """Set the source language of multilingual tokenizers (NLLB)."""
        setter = getattr(self.tokenizer, "set_src_lang_special_tokens", None)
        if setter is None:
            raise ClipkitError(f"HF tokenizer {self.name!r} has no source language to set")
        setter(language)

    def save_pretrained(self, folder: str) -> None:
        self.tokenizer.save_pretrained(folder)

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        texts = [clean_text(t, self.clean) for t in texts]
        if self.tokenizer_mode == "clips":
            return self._clips(texts, length)
        ids = self.tokenizer(list(texts), return_tensors="pt", max_length=length, padding="max_length",
                             truncation=True).input_ids
        if self.strip_sep_token:
            ids = ids.masked_fill(ids == self.tokenizer.sep_token_id, 0)
        return ids

    def _clips(self, texts: List[str], length: int) -> torch.Tensor:
        tok = self.tokenizer
        missing = [name for name in ("bos", "eos", "cls") if getattr(tok, f"{name}_token_id") is None]
        if missing:
            raise ClipkitError(f"tokenizer_mode 'clips' needs {', '.join(missing)} token(s), which HF tokenizer "
                               f"{self.name!r} lacks; pass them in tokenizer_kwargs (e.g. bos_token)")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out = torch.full((len(texts), length), pad, dtype=torch.long)
        for row, ids in enumerate(tok(texts, add_special_tokens=False)["input_ids"]):
            framed = ([tok.bos_token_id] + ids[: length - 3] + [tok.eos_token_id])[: length - 1]
            out[row, : len(framed)] = torch.tensor(framed)
            out[row, -1] = tok.cls_token_id  # the class token always takes the last position
        return out


def build_hf_tokenizer(text_cfg: Mapping[str, Any], context_length: int, **kwargs: Any) -> HFTokenizer:
    """Factory registered as tokenizer ``hf``: ``text_cfg.hf_tokenizer_name`` at ``context_length``."""
    name = kwargs.pop("tokenizer_name", None) or text_cfg.get("hf_tokenizer_name")
    if not name:
        raise ClipkitError("tokenizer 'hf' needs text_cfg.hf_tokenizer_name (a hub name or a local folder)")
    kwargs.setdefault("tokenizer_mode", text_cfg.get("tokenizer_mode"))
    return HFTokenizer(name, context_length, **kwargs)
