"""How big a config's model would be, before building it: a bound that a config cannot talk past.

A config is data: ``layers: 1000000`` validates and then builds until memory runs out. Parameters
are counted from the config (exactly enough for the builtin ViT and text transformer, whose keys are
read by name; roughly for any tower whose config has an integer ``width`` and ``layers``; towers
without those keys, such as HuggingFace and timm ones naming a published model, are not counted).
Torch-free: ``clipkit config check`` uses it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, List, Mapping, Optional, Tuple

from .errors import Problem

MAX_PARAMS_ENV = "CLIPKIT_MAX_PARAMS"
#: Far above every published CLIP (ViT-bigG-14: 2.5e9) and far below what a host can build.
DEFAULT_MAX_PARAMS = 20_000_000_000


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default) if dataclasses.is_dataclass(cfg) else default


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _pair(value: Any) -> Optional[Tuple[int, int]]:
    if _whole(value):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_whole(v) for v in value):
        return value[0], value[1]
    return None


def tower_params(cfg: Any, embed_dim: int) -> Optional[int]:
    """Parameters of a tower from its config, or ``None`` when its config has no ``width``/``layers``."""
    width, layers = _get(cfg, "width"), _get(cfg, "layers")
    if not (_whole(width) and _whole(layers)):
        return None
    ratio = _get(cfg, "mlp_ratio", 4.0)
    hidden = int(width * ratio) if isinstance(ratio, (int, float)) and ratio > 0 else 4 * width
    # two LayerNorms, the qkv and output projections, the MLP, all with biases
    block = 4 * width * width + 2 * width * hidden + 9 * width + hidden
    total = layers * block + 2 * width + width * embed_dim  # final norm, projection
    patch, image = _pair(_get(cfg, "patch_size")), _pair(_get(cfg, "image_size"))
    if patch and image:  # a ViT: patch embedding, class token, positions, ln_pre
        (ph, pw), (ih, iw) = patch, image
        total += 3 * ph * pw * width + width + ((ih // ph) * (iw // pw) + 1) * width + 2 * width
    vocab, context = _get(cfg, "vocab_size"), _get(cfg, "context_length")
    if _whole(vocab):  # a text transformer: token and position embeddings
        total += vocab * width + (context if _whole(context) else 0) * width
    return int(total)


def max_params() -> int:
    """The bound: ``CLIPKIT_MAX_PARAMS`` (e.g. ``5e10``) or :data:`DEFAULT_MAX_PARAMS`."""
    raw = os.environ.get(MAX_PARAMS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PARAMS
    try:
        return int(float(raw))
    except (ValueError, OverflowError):
        raise ValueError(f"{MAX_PARAMS_ENV}={raw!r} is not a number of parameters (e.g. 5e10)") from None


def size_problems(embed_dim: int, towers: List[Tuple[str, Any]]) -> List[Problem]:
    """A problem when the towers ``[(section key, validated config), ...]`` exceed :func:`max_params`."""
    try:
        limit = max_params()
    except ValueError as exc:
        return [Problem("", str(exc))]
    counted = [(key, cfg, n) for key, cfg in towers if (n := tower_params(cfg, embed_dim)) is not None]
    total = sum(n for _, _, n in counted)
    if total <= limit:
        return []
    key, cfg, biggest = max(counted, key=lambda item: item[2])
    return [Problem(key, f"width {_get(cfg, 'width')} and layers {_get(cfg, 'layers')} make the model about "
                         f"{total:.3g} parameters ({total * 4 / 2 ** 30:.3g} GiB in fp32, {biggest:.3g} in {key}), "
                         f"over the limit of {limit:.3g}; set {MAX_PARAMS_ENV} to build it anyway")]
