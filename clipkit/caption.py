"""Captions for images from any model that generates text (``clipkit caption``).

A model generates when it has ``generate(images, **options) -> token ids [N, L]`` (a model family a
plugin adds may give it one); the ids are read back into text with the model's own tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .errors import ClipkitError


def caption_images(model_name: str, images: Sequence[str], *, pretrained: Optional[str] = None,
                   device: str = "cpu", seed: int = 0, batch_size: int = 16,
                   **generate_options: Any) -> List[str]:
    """One caption per image file, in order.

    ``generate_options`` go to the model's ``generate`` (``generation_type``, ``seq_len``, ...); the start
    and end token ids are the tokenizer's when it names them. A model without ``generate`` or an image
    that cannot be read is a one-line :class:`ClipkitError`.
    """
    import torch

    from .factory import create_model_and_transforms
    from .tokenizer import get_tokenizer
    from .train.data import decode_image, max_image_pixels
    from .train.shards import read_image_file

    model, _, preprocess = create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    generate = getattr(model, "generate", None)
    if not callable(generate):
        family = getattr(getattr(model, "model_config", None), "family", "?")
        raise ClipkitError(f"{model_name}: a model of family {family!r} does not generate text (it has no "
                           f"generate()); captions need a model family that does")
    tokenizer = get_tokenizer(model_name)
    ids = _special_ids(tokenizer)
    side: Any = getattr(model.visual, "image_size", None)
    max_pixels = max_image_pixels(max(side) if isinstance(side, (tuple, list)) else side)
    pixels = []
    for path in images:  # decoded with the trainer's safeguards (size and pixel limits)
        why: Dict[str, int] = {}
        image = decode_image(read_image_file(path), why, max_pixels=max_pixels)
        if image is None:
            raise ClipkitError(f"{path}: cannot use the image ({', '.join(why) or 'unreadable'})")
        pixels.append(preprocess(image))
    torch.manual_seed(seed)
    model.eval()
    captions: List[str] = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.stack(pixels[start:start + batch_size]).to(device)
        with torch.no_grad():
            out = generate(batch, **ids, **generate_options)
        captions += [_text(tokenizer, row, ids) for row in out.tolist()]
    return captions


def _special_ids(tokenizer: Any) -> Dict[str, int]:
    """The start and end ids the tokenizer names (else the model's defaults stand)."""
    ids = {}
    start = getattr(tokenizer, "sot_token_id", None)
    end = getattr(tokenizer, "eot_token_id", getattr(tokenizer, "eos_token_id", None))
    if isinstance(start, int):
        ids["sot_token_id"] = start
    if isinstance(end, int):
        ids["eos_token_id"] = end
    return ids


def _text(tokenizer: Any, row: List[int], ids: Dict[str, int]) -> str:
    """The caption of one row of ids: after the start token, up to the end token."""
    start, end = ids.get("sot_token_id"), ids.get("eos_token_id")
    if row and row[0] == start:
        row = row[1:]
    if end in row:
        row = row[:row.index(end)]
    decode = getattr(tokenizer, "decode", None)
    if not callable(decode):
        raise ClipkitError(f"the tokenizer {type(tokenizer).__name__} cannot decode ids into text")
    return " ".join(str(decode(row)).split())


def _exists(paths: Sequence[str]) -> List[str]:
    """The paths that are not files (for the command's usage error)."""
    return [p for p in paths if not Path(p).is_file()]
