"""ImageNet-1k class names and prompt templates for zero-shot classification.

``IMAGENET_CLASSNAMES`` holds the 1000 ImageNet-1k class names in label order, in the readable form
OpenAI chose for CLIP. ``OPENAI_IMAGENET_TEMPLATES`` are the 80 prompts from the CLIP paper and
``SIMPLE_IMAGENET_TEMPLATES`` a subset of 7 of them. Each template is a callable
``template(classname) -> str`` (as in OpenCLIP) that also keeps its pattern as plain text in
``template.pattern``, with ``{}`` where the class name goes. The values are those of OpenCLIP 3.3.0's
``open_clip.zero_shot_metadata`` (MIT; originally from OpenAI's CLIP, MIT; see NOTICE). The data
lives in ``zero_shot_metadata.json`` beside this module and must stay identical to OpenCLIP's (the tests
compare them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

__all__ = ["PromptTemplate", "IMAGENET_CLASSNAMES", "OPENAI_IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES"]


class PromptTemplate:
    """A prompt pattern with one ``{}`` slot; calling it with a class name fills the slot.

    ``PromptTemplate("a photo of a {}.")("dog") == "a photo of a dog."``. Unlike a lambda it can be
    pickled, compared and printed.
    """

    __slots__ = ("pattern",)

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def __call__(self, classname: str) -> str:
        return self.pattern.format(classname)

    def __repr__(self) -> str:
        return f"PromptTemplate({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PromptTemplate) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash((PromptTemplate, self.pattern))


def _read() -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]:
    # the package's own file (not user input): read whole, as shipped
    data = json.loads(Path(__file__).with_name("zero_shot_metadata.json").read_text(encoding="utf-8"))
    return (tuple(data["imagenet_classnames"]), tuple(data["openai_imagenet_patterns"]),
            tuple(data["simple_imagenet_patterns"]))


# Label order matters: index i is ImageNet-1k class i.
IMAGENET_CLASSNAMES, _OPENAI_PATTERNS, _SIMPLE_PATTERNS = _read()
OPENAI_IMAGENET_TEMPLATES: Tuple[PromptTemplate, ...] = tuple(PromptTemplate(p) for p in _OPENAI_PATTERNS)
SIMPLE_IMAGENET_TEMPLATES: Tuple[PromptTemplate, ...] = tuple(PromptTemplate(p) for p in _SIMPLE_PATTERNS)
