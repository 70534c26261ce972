"""OpenAI CLIP's byte-level BPE tokenizer, with the vocabulary shipped in the package.

Ids equal OpenCLIP's ``SimpleTokenizer`` on any text: texts are cleaned (ftfy, HTML unescaping,
then one of the ``clean`` modes), split by CLIP's pattern, mapped byte-wise to printable characters,
merged by the 48,894 ranked BPE merges, and framed as ``[49406] + ids + [49407]``, zero-padded.

Two bounds keep one hostile caption from stalling a data worker (BPE is quadratic in a word's length,
and nothing else bounds a caption): a text is cut to :func:`text_cap` characters before it is cleaned,
and a word longer than :data:`MAX_WORD_SYMBOLS` bytes is merged in chunks of that many. Neither
changes the ids of real captions (see those names for why); tokenizing into a context also stops
reading once the context is full.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import string
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ...errors import ClipkitError

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP was trained with; the file holds more
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
CLEAN_MODES = ("lower", "whitespace", "canonicalize")
REDUCTION_MASKS = ("", "simple", "random", "shuffle")
# The longest vocabulary entry spells 32 bytes and words are separated by one space, so a token never
# stands for more than 33 characters of cleaned text; 64 per token leaves room for what cleaning drops
# (runs of whitespace, "&amp;" entities, canonicalize's punctuation). A 77-token context reads at most
# the first 4,928 characters; only a text padded with over 30 droppable characters per token can differ.
MAX_CHARS_PER_TOKEN = 64
# BPE costs len(word)^2: 512 bytes merge in ~15 ms. The pattern splits letters from digits and
# punctuation (so URLs too), and the vocabulary's longest entry is 32 bytes: the only real text this
# long is a run of over 170 CJK characters without punctuation, whose ids may change next to each cut.
MAX_WORD_SYMBOLS = 512
CACHE_SIZE = 100_000  # merged words kept per tokenizer: a stream of distinct words must not grow it forever


def text_cap(context_length: int) -> int:
    """Characters of a text that can matter to a context of ``context_length`` tokens."""
    return max(context_length, 77) * MAX_CHARS_PER_TOKEN


@lru_cache()
def byte_alphabet() -> Dict[int, str]:
    """A printable character for each of the 256 byte values (BPE never sees raw control bytes).

    Bytes that are already printable Latin-1 keep their character; the others are given the
    code points from 256 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(extra)
            extra += 1
    return table


def _basic_clean(text: str) -> str:
    import ftfy

    # twice: captions scraped from the web are often escaped twice ("&amp;amp;")
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_text(text: str, mode: str = "lower") -> str:
    """The cleaning CLIP tokenizers apply: ``lower`` (default), ``whitespace`` or ``canonicalize``.

    ``canonicalize`` (big_vision's) also drops ASCII punctuation and reads ``_`` as a space.
    """
    text = _basic_clean(text)
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    elif mode not in ("lower", "whitespace"):
        raise ClipkitError(f"tokenizer clean mode must be one of {', '.join(CLEAN_MODES)}, got {mode!r}")
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


@lru_cache(maxsize=2)
def _load_vocab(path: str) -> Tuple[Tuple[Tuple[str, str], ...], str]:
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:NUM_MERGES + 1])
    return merges, digest  # type: ignore[return-value]  # a merges line is two symbols


class ClipTokenizer:
    """CLIP BPE: ``tokenizer(texts) -> LongTensor[N, context_length]``; ``decode(ids) -> str``.

    Args:
        context_length: tokens per text, start and end tokens included.
        clean: ``lower``, ``whitespace`` or ``canonicalize``.
        reduction_mask: how a text longer than the context is shortened: ``""`` truncates (the end
            token is kept), ``simple`` keeps a random contiguous span, ``random`` keeps a random
            subset in order, ``shuffle`` a random subset in random order.
        additional_special_tokens: extra tokens appended to the vocabulary, never split.
        vocab_path: a BPE merges file (``.txt.gz``); the shipped one by default.
    """

    def __init__(self, context_length: int = 77, clean: str = "lower", reduction_mask: str = "",
                 additional_special_tokens: Optional[Sequence[str]] = None, vocab_path: Optional[str] = None) -> None:
        import regex

        if clean not in CLEAN_MODES:
            raise ClipkitError(f"tokenizer clean mode must be one of {', '.join(CLEAN_MODES)}, got {clean!r}")
        if reduction_mask not in REDUCTION_MASKS:
            raise ClipkitError(f"tokenizer reduction_mask must be one of {', '.join(repr(m) for m in REDUCTION_MASKS)}"
                               f", got {reduction_mask!r}")
        if not isinstance(context_length, int) or context_length < 2:
            raise ClipkitError(f"tokenizer context_length must be an int >= 2, got {context_length!r}")
        path = Path(vocab_path) if vocab_path else VOCAB_FILE
        merges, digest = _load_vocab(str(path))
        if vocab_path is None and digest != VOCAB_SHA256:
            raise ClipkitError(f"{path}: the shipped CLIP vocabulary is damaged (sha256 {digest}); reinstall clipkit-torch")
        self.context_length = context_length
        self.clean = clean
        self.reduction_mask = reduction_mask
        self.byte_encoder = byte_alphabet()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
        specials = list(SPECIAL_TOKENS) + list(additional_special_tokens or [])
        vocab += specials
        self.encoder: Dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: Dict[int, str] = {i: token for token, i in self.encoder.items()}
        self.ranks: Dict[Tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.all_special_ids = [self.encoder[t] for t in specials]
        self.sot_token_id, self.eot_token_id = self.all_special_ids[:2]
        self.eos_token_id = self.eot_token_id
        self.pad_token_id = 0  # padding is id 0 (which is also "!"): argmax pooling relies on EOT being the top id
        self.all_special_tokens = specials
        self._cache: Dict[str, List[str]] = {t: [t] for t in specials}
        # special tokens first, then contractions, letter runs, single digits, other non-space runs
        alternatives = [regex.escape(t) for t in specials] + [
            r"'s", r"'t", r"'re", r"'ve", r"'m", r"'ll", r"'d", r"[\p{L}]+", r"[\p{N}]", r"[^\s\p{L}\p{N}]+"]
        self.pattern = regex.compile("|".join(alternatives), regex.IGNORECASE)

    def _merge(self, piece: str, end: bool = True) -> List[str]:
        """BPE on one pre-token: repeatedly join the adjacent pair with the lowest merge rank.

        ``end=False`` merges a chunk of a longer word: no end-of-word marker, and not cached.
        """
        cached = self._cache.get(piece) if end else None
        if cached is not None:
            return cached
        parts = list(piece[:-1]) + [piece[-1] + "</w>"] if end else list(piece)
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = self.ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            merged: List[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if end:
            if len(self._cache) >= CACHE_SIZE:
                self._cache = {t: [t] for t in self.all_special_tokens}
            self._cache[piece] = parts
        return parts

    def _ids(self, text: str, limit: Optional[int] = None) -> List[int]:
        """Token ids of ``text``; with ``limit``, stop once at least that many are known."""
        ids: List[int] = []
        for match in self.pattern.finditer(clean_text(text, self.clean)):
            symbols = "".join(self.byte_encoder[b] for b in match.group().encode("utf-8"))
            for start in range(0, len(symbols), MAX_WORD_SYMBOLS):
                last = start + MAX_WORD_SYMBOLS >= len(symbols)
                ids.extend(self.encoder[token] for token in self._merge(symbols[start:start + MAX_WORD_SYMBOLS], last))
                if limit is not None and len(ids) >= limit:
                    return ids
        return ids

    def encode(self, text: str) -> List[int]:
        """Token ids of one text, without start/end tokens (the whole text: no cap)."""
        return self._ids(text)

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        """Text of token ids; end-of-word markers become spaces, special tokens read as their names."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        # every vocabulary entry, special names included, is spelled in byte-alphabet characters
        chars = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in chars)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def _fit(self, ids: List[int], length: int) -> List[int]:
        body = length - 2
        if len(ids) <= body or not self.reduction_mask:
            framed = [self.sot_token_id] + ids + [self.eot_token_id]
            if len(framed) > length:
                framed = framed[:length]
                framed[-1] = self.eot_token_id  # a truncated text still ends with the end token
            return framed
        if self.reduction_mask == "simple":
            start = int(torch.randint(0, len(ids) - body + 1, ()).item())
            kept = ids[start:start + body]
        else:
            order = torch.randperm(len(ids))[:body]
            if self.reduction_mask == "random":
                order = order.sort().values
            kept = [ids[i] for i in order.tolist()]
        return [self.sot_token_id] + kept + [self.eot_token_id]

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        cap = text_cap(length)
        # truncation needs only the ids that fit; the reduction masks choose among all of the capped text's
        limit = None if self.reduction_mask else length
        for row, text in enumerate(texts):
            framed = self._fit(self._ids(text[:cap], limit), length)
            out[row, : len(framed)] = torch.tensor(framed, dtype=torch.long)
        return out


_KWARGS = ("clean", "reduction_mask", "additional_special_tokens", "vocab_path")


def build_clip_tokenizer(text_cfg: Mapping[str, Any], context_length: int, **kwargs: Any) -> ClipTokenizer:
    """Factory registered as tokenizer ``clip``; ``kwargs`` are ``text_cfg.tokenizer_kwargs`` plus the caller's."""
    kwargs.pop("cache_dir", None)  # the vocabulary ships with clipkit: nothing to download
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise ClipkitError(f"tokenizer 'clip' does not take {', '.join(unknown)}; it takes {', '.join(_KWARGS)}")
    return ClipTokenizer(context_length=context_length, **kwargs)
