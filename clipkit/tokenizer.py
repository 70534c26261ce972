"""Tokenizers for models: the one a model's config implies, checked against its text tower."""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from ._sources import resolve_model
from ._trust import caller_trust, warn_ignored_requests
from .config import ModelConfig, validate_model_config
from .errors import ClipkitError, UnknownModelError
from .kinds import TOKENIZER
from .registry import PLUGIN_FAILURES, registry

if TYPE_CHECKING:
    import torch

    from .builtin.tokenizers.clip_bpe import ClipTokenizer


def get_tokenizer(model_name: str = "", context_length: Optional[int] = None, cache_dir: Optional[str] = None,
                  trust_remote_code: bool = False, **kwargs: Any) -> Callable[..., torch.Tensor]:
    """The tokenizer a model's config implies, at its ``context_length`` (or the one given).

    An unknown model name is an error (OpenCLIP logs a warning and falls back to CLIP's BPE tokenizer,
    which silently mis-tokenizes for other models: its #1118). ``trust_remote_code=True`` (or
    ``CLIPKIT_TRUST_REMOTE_CODE=1``) lets a tokenizer repository run its own code; the config's
    ``tokenizer_kwargs.trust_remote_code`` never does.
    """
    if not model_name:
        raise UnknownModelError("get_tokenizer needs a model name; see `clipkit models`")
    source = resolve_model(model_name, cache_dir)
    config = validate_model_config(source.config, source=source.label, name=model_name)
    text_cfg = dict(source.config.get("text_cfg", {}))
    if source.schema == "local-dir" and config.tokenizer.hf_tokenizer_name:
        text_cfg["hf_tokenizer_name"] = source.ident  # a saved model carries its tokenizer files
    length = context_length or text_cfg.get("context_length") or getattr(config.text, "context_length", None) or 77
    tokenizer_kwargs = dict(config.tokenizer.tokenizer_kwargs or {})
    warn_ignored_requests({"text_cfg": {"tokenizer_kwargs": tokenizer_kwargs}}, model_name, trust_remote_code)
    tokenizer_kwargs.pop("trust_remote_code", None)  # a config's request; the caller decides below
    tokenizer_kwargs.update(kwargs)
    if cache_dir is not None:
        tokenizer_kwargs["cache_dir"] = cache_dir
    entry = registry.get(TOKENIZER, config.tokenizer_name, where=f"{model_name}: text_cfg.tokenizer")
    factory = entry.load()
    try:
        with caller_trust(trust_remote_code):
            tokenizer: Callable[..., torch.Tensor] = factory(text_cfg, length, **tokenizer_kwargs)
    except ClipkitError:
        raise
    except PLUGIN_FAILURES as exc:
        raise ClipkitError(f"{model_name}: building {entry.where} failed: {exc!r}") from exc
    _check_special_ids(model_name, config, tokenizer)
    return tokenizer


def _check_special_ids(model_name: str, config: ModelConfig, tokenizer: Any) -> None:
    """The text tower's special ids must be the tokenizer's, or pooling and masking read the wrong token."""
    text = config.text
    pool = getattr(text, "pool_type", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if pool == "eos" and eos is not None and getattr(text, "eos_id", eos) != eos:
        raise ClipkitError(f"{model_name}: text_cfg.eos_id is {text.eos_id} but the tokenizer's end token is {eos}; "
                           f"pool_type 'eos' would pool the wrong token")
    pad = getattr(tokenizer, "pad_token_id", None)
    if getattr(text, "embed_cls", False) and pad is not None and getattr(text, "pad_id", pad) != pad:
        raise ClipkitError(f"{model_name}: text_cfg.pad_id is {text.pad_id} but the tokenizer pads with {pad}; "
                           f"the attention mask would hide the wrong tokens")
    vocab = getattr(text, "vocab_size", None)
    if eos is not None and vocab is not None and eos >= vocab:
        raise ClipkitError(f"{model_name}: the tokenizer's end token id {eos} is outside text_cfg.vocab_size "
                           f"{vocab}; token ids would fall outside the embedding table")


@lru_cache(maxsize=1)
def _clip_bpe(generation: int) -> ClipTokenizer:
    tokenizer: ClipTokenizer = registry.get(TOKENIZER, "clip").load()({}, 77)
    return tokenizer


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77) -> torch.Tensor:
    """CLIP BPE ids, as OpenCLIP's ``tokenize``. A model's own tokenizer comes from :func:`get_tokenizer`."""
    return _clip_bpe(registry.generation)(texts, context_length)


def decode(ids: Union[Sequence[int], torch.Tensor]) -> str:
    """Text of CLIP BPE ids, as OpenCLIP's ``decode``."""
    return _clip_bpe(registry.generation).decode(ids)
