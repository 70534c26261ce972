"""The plugin contract: the types of what gets registered, and the marker of hook implementations.

A plugin is a module with functions marked ``@clipkit.hookimpl`` named after the hooks that
:mod:`clipkit.kinds` declares (one per kind of part, e.g. ``register_vision_towers``), listed under
``[project.entry-points.clipkit]`` in its distribution. Each hook receives a ``register``
callback; calling it adds one named part to clipkit's registry::

    @clipkit.hookimpl
    def register_vision_towers(register):
        register("resnet", "clipkit_plugin_resnet.model:build_resnet",
                 config="clipkit_plugin_resnet.config:ResNetCfg")

``factory`` and ``config`` may be objects or ``"package.module:attr"`` strings, imported the first
time the part is used, so a plugin module imports without torch. This module itself imports no torch.
Plugin authors import all of this, and the rest of what they need, from :mod:`clipkit.plugin`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Literal, Mapping, Optional, Protocol, Tuple, Union

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

PROJECT = "clipkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: A factory or config class, given as the object or as a lazy ``"package.module:attr"`` string.
Target = Union[str, Callable[..., Any], type]


class Register(Protocol):
    """The callback every ``register_*`` hook receives."""

    def __call__(self, name: str, factory: Target, *, config: Optional[Target] = None, **meta: Any) -> None: ...


@dataclass(frozen=True)
class TowerContext:
    """What the model around a tower tells the tower's factory.

    Attributes:
        embed_dim: the shared embedding width; the tower's ``forward`` returns ``[B, embed_dim]``.
        quick_gelu: the config's top-level ``quick_gelu`` (OpenAI's ``x * sigmoid(1.702 x)``).
        cast_dtype: ``"fp16"``, ``"bf16"`` or ``None``: the precision the model is built for, so a
            tower can keep its norms in fp32 (OpenCLIP's ``LayerNormFp32``).
        pretrained: whether the tower should load its own pretrained weights (timm/HF towers); false
            when a full checkpoint will be loaded over it.
        cache_dir: where hub downloads go, when the caller chose.
    """

    embed_dim: int
    quick_gelu: bool = False
    cast_dtype: Optional[str] = None
    pretrained: bool = False
    cache_dir: Optional[str] = None


class TowerFactory(Protocol):
    """``register_vision_towers`` / ``register_text_towers`` factories.

    ``cfg`` is an instance of the config class registered with the tower (or the plain ``dict`` of
    the JSON section when none was registered). The returned module must honour the tower protocol:
    ``forward`` returns ``[B, ctx.embed_dim]`` (or ``(pooled, tokens)`` with ``output_tokens``), and
    it has ``output_dim``, ``image_size`` (vision) or ``context_length`` and ``vocab_size`` (text),
    ``layer_groups()`` and ``set_grad_checkpointing(enable)``. clipkit checks this on every build.

    Optionally, the stage protocol: ``forward_head(x, n)`` returns the state after the first ``n`` layer
    groups (a tensor or a tuple of tensors, batch first) and ``forward_tail(state, n)`` the output from
    there, with ``forward_tail(forward_head(x, n), n) == forward(x)`` for every ``n`` (a ``ClipkitError``
    refuses an ``n``). ``clipkit-train`` then computes a locked prefix once per input (docs/plugins.md,
    "Stages"; the ``stages`` contract checks it).
    """

    def __call__(self, cfg: Any, ctx: TowerContext) -> "nn.Module": ...


class PoolerFactory(Protocol):
    """``register_poolers`` factories: ``factory(cfg)`` returns a module called as
    ``pooler(hidden_states [B, L, D], attention_mask [B, L], pooler_output=None) -> [B, D]``.

    ``pooler_output`` is the encoder's own pooled output when it has one (BERT's). A pooler that
    represents the text by one token sets ``cls_token_position`` to its index (else ``None``)."""

    def __call__(self, cfg: Any) -> "nn.Module": ...


class TokenizerFactory(Protocol):
    """``register_tokenizers`` factories: ``factory(text_cfg, context_length, **kwargs)`` returns a
    callable ``tokenizer(texts: str | list[str]) -> LongTensor[N, context_length]``. ``text_cfg`` is
    the model config's ``text_cfg`` mapping."""

    def __call__(self, text_cfg: Mapping[str, Any], context_length: int, **kwargs: Any) -> Callable[..., "torch.Tensor"]: ...


class Freezer(Protocol):
    """``register_freezers`` entries, keyed by tower type: lock a built tower in place.

    ``unlocked`` counts groups of ``tower.layer_groups()`` left trainable from the end;
    ``freeze_layer_norm=False`` leaves LayerNorm parameters of locked groups trainable;
    ``freeze_bn_stats=True`` puts BatchNorms of locked groups in eval mode.
    """

    def __call__(self, tower: "nn.Module", unlocked: int = 0, *, freeze_layer_norm: bool = True,
                 freeze_bn_stats: bool = False) -> None: ...


@dataclass(frozen=True)
class ModelContext:
    """What :func:`clipkit.create_model` hands a model family's factory: the built towers and the config.

    Attributes:
        visual, text: the built image and text towers (each already held to the tower protocol).
        config: the validated :class:`~clipkit.config.ModelConfig` (``config.raw`` is the JSON mapping,
            ``config.top`` its typed top-level keys).
        output_dict: whether ``forward`` returns a dict rather than a tuple.
        cast_dtype: ``"fp16"``, ``"bf16"`` or ``None``, as for towers.
        flat_text: the text tower's keys sit at the top level of the state dict (OpenCLIP's ``CLIP`` layout).
        freezers: the registered freezers of the two towers, by attribute (``"visual"``, ``"text"``).
    """

    visual: Any
    text: Any
    config: Any
    output_dict: bool = False
    cast_dtype: Optional[str] = None
    flat_text: bool = False
    freezers: Mapping[str, Any] = field(default_factory=dict)

    def clip_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :class:`clipkit.model.ClipModel` besides the towers, from the config:
        a family whose model subclasses it passes them on unchanged."""
        top = self.config.top
        return {"embed_dim": top.embed_dim, "init_logit_scale": top.init_logit_scale,
                "init_logit_bias": top.init_logit_bias, "nonscalar_logit_scale": top.nonscalar_logit_scale,
                "output_dict": self.output_dict, "flat_text": self.flat_text, "freezers": dict(self.freezers)}


class ModelFamilyFactory(Protocol):
    """``register_model_families`` factories: ``factory(cfg, ctx)`` assembles the model from the built towers.

    ``cfg`` is an instance of the config class registered with the family, bound to the config's
    top-level keys that the family adds (``None`` when it registered none); ``ctx`` is a
    :class:`ModelContext`. The returned ``nn.Module`` has ``visual`` and ``text`` (the towers it was
    given), ``output_dict``, ``encode_image(x, normalize=False)``, ``encode_text(t, normalize=False)``,
    ``forward(image, text)`` (a dict with ``image_features``, ``text_features`` and ``logit_scale`` when
    ``output_dict``, else those as a tuple, first), ``lock_image_tower``, ``lock_text_tower`` and
    ``set_grad_checkpointing``; subclassing :class:`clipkit.model.ClipModel` gives all of them.
    clipkit checks this on every build.
    """

    def __call__(self, cfg: Any, ctx: ModelContext) -> "nn.Module": ...


#: A named model config a plugin ships: the JSON mapping itself, or a path to a ``.json`` file.
ModelConfigSource = Union[Mapping[str, Any], str]


@dataclass(frozen=True)
class Infer:
    """A rule that selects a registered part for a config section that does not name one.

    ``register("timm", ..., infer=Infer("timm_model_name"))``: a ``vision_cfg`` without ``"type"`` whose
    ``timm_model_name`` holds a value is a ``timm`` tower. ``test="list"`` asks for a JSON list instead
    (``Infer("layers", "list")``: a list of ``layers`` is a ResNet). ``infer="key"`` is short for
    ``Infer("key")``, and a tuple of rules matches when any of them does. Rules are data, not code, so
    ``clipkit config schema`` states them too.
    """

    key: str
    test: Literal["set", "list"] = "set"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key or self.test not in ("set", "list"):
            raise ValueError(f"Infer({self.key!r}, {self.test!r}): key must be a key name and test 'set' or 'list'")

    def matches(self, section: Mapping[str, Any]) -> bool:
        """Whether ``section`` selects the part by this rule."""
        value = section.get(self.key)
        return isinstance(value, (list, tuple)) if self.test == "list" else bool(value)

    def describe(self) -> str:
        """The rule in words, as messages say it (``"a list of layers"``)."""
        return f"a list of {self.key}" if self.test == "list" else self.key

    def json_schema(self) -> Dict[str, Any]:
        """The JSON Schema of a section this rule matches."""
        value: Dict[str, Any] = {"type": "array"} if self.test == "list" else {"not": {"enum": [None, "", 0, False, [], {}]}}
        return {"required": [self.key], "properties": {self.key: value}}


def infer_rules(value: Any) -> Tuple[Infer, ...]:
    """The rules an ``infer=`` keyword gives: a key name, an :class:`Infer`, or a tuple/list of either."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    rules = tuple(Infer(item) if isinstance(item, str) else item for item in items)
    if not rules or not all(isinstance(rule, Infer) for rule in rules):
        raise TypeError(f"infer={value!r}: expected a key name, an Infer(key, test) or a tuple of them")
    return rules


def __getattr__(name: str) -> Any:
    if name == "HOOK_KINDS":  # moved to the kinds table
        warnings.warn("clipkit.hookspecs.HOOK_KINDS is deprecated; use clipkit.kinds.by_hook()", DeprecationWarning,
                      stacklevel=2)
        from .kinds import by_hook

        return by_hook()
    raise AttributeError(f"module 'clipkit.hookspecs' has no attribute {name!r}")
