"""Zero-shot classifier weights from class names and prompt templates, as in OpenCLIP 3.3.0.

For every class, each template is filled in with the class name, the prompts are encoded by the
text tower, and the unit-length embeddings are averaged and rescaled to unit length. The result is
a ``[embed_dim, num_classes]`` matrix, so ``100. * image_features @ classifier`` gives the logits
for L2-normalised image features.

A template is either a callable ``template(classname) -> str`` (such as the entries of
:data:`clipkit.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES`) or a ``str.format`` pattern with one
positional slot, e.g. ``"a photo of a {}."``.
"""
from __future__ import annotations

from collections.abc import Sequence as _SequenceABC
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, TypeVar, Union

import torch

__all__ = ["build_zero_shot_classifier", "build_zero_shot_classifier_legacy"]

Template = Union[Callable[[str], str], str]


def _check_inputs(classnames: Sequence[str], templates: Sequence[Template]) -> None:
    for what, value in (("templates", templates), ("classnames", classnames)):
        if isinstance(value, str) or not isinstance(value, _SequenceABC):
            raise TypeError(f"{what} must be a sequence (list or tuple), got {type(value).__name__}")
        if len(value) == 0:
            raise ValueError(f"{what} must not be empty")


def _prompt(template: Template, classname: str) -> str:
    if isinstance(template, str):
        return template.format(classname)
    return template(classname)


def _chunks(items: Sequence[str], size: int) -> Iterator[List[str]]:
    for start in range(0, len(items), size):
        yield [items[i] for i in range(start, min(start + size, len(items)))]


_T = TypeVar("_T")


def _progress(iterable: Iterable[_T], use_tqdm: bool, **tqdm_kwargs: Any) -> Iterable[_T]:
    if not use_tqdm:
        return iterable
    from tqdm import tqdm  # only needed when a progress bar is asked for

    return tqdm(iterable, **tqdm_kwargs)


def _unit(x: torch.Tensor) -> torch.Tensor:
    unit: torch.Tensor = x / x.norm(dim=-1, keepdim=True)
    return unit


def build_zero_shot_classifier(
        model: Any,  # any model with encode_text (OpenCLIP's too): duck-typed, as documented below
        tokenizer: Callable[[List[str]], torch.Tensor],
        classnames: Sequence[str],
        templates: Sequence[Template],
        num_classes_per_batch: Optional[int] = 10,
        device: Union[str, torch.device] = "cpu",
        use_tqdm: bool = False,
) -> torch.Tensor:
    """Zero-shot classifier weights, ``[embed_dim, len(classnames)]``, column ``i`` for class ``i``.

    Args:
        model: a CLIP model; only ``model.encode_text(tokens, normalize=True)`` is used.
        tokenizer: maps a list of strings to a ``[N, context_length]`` token tensor.
        classnames: the class (label) names, in label order.
        templates: callables ``template(classname) -> str`` or ``str.format`` patterns (``"{}"``).
        num_classes_per_batch: how many classes' prompts go through the text tower together
            (``len(templates) * num_classes_per_batch`` texts per forward); ``None`` or ``0`` encodes
            all classes in a single forward.
        device: where the token tensors are moved before encoding (the model's device).
        use_tqdm: show a progress bar over the batches (imports ``tqdm`` only then).

    Runs under ``torch.no_grad()`` and leaves the model's train/eval mode as it is.
    """
    _check_inputs(classnames, templates)
    if num_classes_per_batch is not None and num_classes_per_batch < 0:
        raise ValueError(f"num_classes_per_batch must be positive or None, got {num_classes_per_batch}")
    per_class = len(templates)

    def embed(batch: Sequence[str]) -> torch.Tensor:
        texts = [_prompt(template, name) for name in batch for template in templates]
        tokens = tokenizer(texts).to(device)
        features = model.encode_text(tokens, normalize=True)
        # rows are class-major: the prompts of one class are consecutive
        mean = features.reshape(len(batch), per_class, -1).mean(dim=1)
        return _unit(mean).T

    with torch.no_grad():
        if not num_classes_per_batch:
            return embed(classnames)
        num_batches = -(-len(classnames) // num_classes_per_batch)
        batches = _progress(_chunks(classnames, num_classes_per_batch), use_tqdm,
                            total=num_batches, unit_scale=num_classes_per_batch)
        return torch.cat([embed(batch) for batch in batches], dim=1)


def build_zero_shot_classifier_legacy(
        model: Any,  # any model with encode_text (OpenCLIP's too): duck-typed, as documented below
        tokenizer: Callable[[List[str]], torch.Tensor],
        classnames: Sequence[str],
        templates: Sequence[Template],
        device: Union[str, torch.device] = "cpu",
        use_tqdm: bool = False,
) -> torch.Tensor:
    """The one-class-at-a-time variant of :func:`build_zero_shot_classifier` (same result).

    Encodes the prompts of each class in its own forward with ``model.encode_text(tokens)`` and
    normalises the embeddings itself; the returned ``[embed_dim, len(classnames)]`` tensor is moved
    to ``device``. ``use_tqdm`` shows a progress bar over the classes.
    """
    _check_inputs(classnames, templates)
    columns = []
    with torch.no_grad():
        for name in _progress(classnames, use_tqdm):
            tokens = tokenizer([_prompt(template, name) for template in templates]).to(device)
            features = _unit(model.encode_text(tokens))
            columns.append(_unit(features.mean(dim=0)))
        return torch.stack(columns, dim=1).to(device)
