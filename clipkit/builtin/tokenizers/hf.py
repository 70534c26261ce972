"""Any HuggingFace tokenizer (hub name or local folder), padded and truncated to the context length."""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Union

import torch

from ..._trust import hf_loading, remote_code_allowed
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
        trust_remote_code: let the repository's own tokenizer code run. Only a caller sets it (the
            builder and ``get_tokenizer`` never take it from a config); ``CLIPKIT_TRUST_REMOTE_CODE=1``
            and ``get_tokenizer(..., trust_remote_code=True)`` set it too.
        **kwargs: passed to ``AutoTokenizer.from_pretrained``.
    """

    def __init__(self, tokenizer_name: str, context_length: int = 77, clean: str = "whitespace",
                 strip_sep_token: bool = False, language: Optional[str] = None, cache_dir: Optional[str] = None,
                 tokenizer_mode: Optional[str] = None, trust_remote_code: bool = False, **kwargs: Any) -> None:
        from transformers import AutoTokenizer

        if clean not in CLEAN_MODES:
            raise ClipkitError(f"tokenizer clean mode must be one of {', '.join(CLEAN_MODES)}, got {clean!r}")
        if tokenizer_mode not in (None, "", "clips"):
            raise ClipkitError(f"tokenizer_mode must be 'clips' or null, got {tokenizer_mode!r}")
        # always explicit: None would make transformers prompt [y/N] on a terminal and wait
        trust = trust_remote_code or remote_code_allowed()
        with hf_loading("HF tokenizer", tokenizer_name,
                        lambda reason: f"HF tokenizer {tokenizer_name!r} cannot be loaded ({reason}); offline, point "
                                       f"hf_tokenizer_name at a local folder with its tokenizer files"):
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, cache_dir=cache_dir,
                                                           trust_remote_code=trust, **kwargs)
        self.name = tokenizer_name
        self.context_length = context_length
        self.clean = clean
        self.strip_sep_token = strip_sep_token
        self.tokenizer_mode = tokenizer_mode or ""
        self.pad_token_id = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        self.eos_token_id = eos if eos is not None else self.tokenizer.sep_token_id
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
        ids: torch.Tensor = self.tokenizer(list(texts), return_tensors="pt", max_length=length,
                                           padding="max_length", truncation=True).input_ids
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
    """Factory registered as tokenizer ``hf``: ``text_cfg.hf_tokenizer_name`` at ``context_length``.

    ``trust_remote_code`` among the keyword arguments (a config's ``tokenizer_kwargs``) is dropped: only the
    caller's opt-in lets a repository's code run.
    """
    kwargs.pop("trust_remote_code", None)
    name = kwargs.pop("tokenizer_name", None) or text_cfg.get("hf_tokenizer_name")
    if not name:
        raise ClipkitError("tokenizer 'hf' needs text_cfg.hf_tokenizer_name (a hub name or a local folder)")
    kwargs.setdefault("tokenizer_mode", text_cfg.get("tokenizer_mode"))
    return HFTokenizer(name, context_length, **kwargs)
