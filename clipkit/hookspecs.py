"""The plugin contract: one hook per kind of part, and the types of what gets registered.

A plugin is a module with functions marked ``@clipkit.hookimpl`` named after the hooks below, listed
under ``[project.entry-points.clipkit]`` in its distribution. Each hook receives a ``register``
callback; calling it adds one named part to clipkit's registry::

    @clipkit.hookimpl
    def register_vision_towers(register):
        register("resnet", "clipkit_plugin_resnet.model:build_resnet",
                 config="clipkit_plugin_resnet.config:ResNetCfg")

``factory`` and ``config`` may be objects or ``"package.module:attr"`` strings, imported the first
time the part is used, so a plugin module imports without torch. This module itself imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, Union

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


#: A named model config a plugin ships: the JSON mapping itself, or a path to a ``.json`` file.
ModelConfigSource = Union[Mapping[str, Any], str]


@hookspec
def register_vision_towers(register: Register) -> None:
    """Register image towers: ``register(type_name, factory: TowerFactory, config=ConfigClass)``.

    ``example={...}`` gives a small section (without ``type``) that builds quickly; the contract
    tests build every tower that has one."""


@hookspec
def register_text_towers(register: Register) -> None:
    """Register text towers: ``register(type_name, factory: TowerFactory, config=ConfigClass)``.

    ``flat_state_dict=True`` declares that, in a model whose config does not set ``custom_text``, the
    tower's state dict keys sit at the top level of the model (OpenCLIP's ``CLIP`` layout).
    ``example={...}`` as for vision towers."""


@hookspec
def register_poolers(register: Register) -> None:
    """Register poolers for towers that pool token features: ``register(name, factory: PoolerFactory)``."""


@hookspec
def register_tokenizers(register: Register) -> None:
    """Register tokenizers, selected by ``text_cfg.tokenizer``: ``register(name, factory: TokenizerFactory)``.

    ``options=(...)`` lists the ``tokenizer_kwargs`` it takes, so configs are checked against them."""


@hookspec
def register_freezers(register: Register) -> None:
    """Register how to lock a tower type: ``register(tower_type, freezer: Freezer)``."""


@hookspec
def register_model_configs(register: Register) -> None:
    """Ship named model configs: ``register(model_name, source: ModelConfigSource)``."""


HOOK_KINDS = {
    "register_vision_towers": "vision_tower",
    "register_text_towers": "text_tower",
    "register_poolers": "pooler",
    "register_tokenizers": "tokenizer",
    "register_freezers": "freezer",
    "register_model_configs": "model_config",
}
"""Hook name -> the registry kind it fills."""
