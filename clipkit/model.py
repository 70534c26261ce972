"""The two-tower contrastive model: encode images and texts into one space, with a learned temperature."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Set, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import ModelConfig


class ClipModel(nn.Module):
    """An image tower and a text tower that project into a shared ``embed_dim`` space.

    ``visual`` and ``text`` are any modules honouring the tower protocol. With ``flat_text=True`` the
    text tower's keys sit at the top level of :meth:`state_dict` (OpenCLIP's ``CLIP`` layout) instead
    of under ``text.`` (its ``CustomTextCLIP`` layout); loading accepts either.
    """

    # set by the factory on every model it builds: the validated config, the tower types it selected and
    # the preprocessing the model expects
    model_config: ModelConfig
    vision_type: str
    text_type: str
    preprocess_cfg: Dict[str, Any]

    def __init__(self, visual: nn.Module, text: nn.Module, *, embed_dim: int, init_logit_scale: float,
                 init_logit_bias: Optional[float] = None, nonscalar_logit_scale: bool = False,
                 output_dict: bool = False, flat_text: bool = False,
                 freezers: Optional[Dict[str, Callable[..., None]]] = None) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.embed_dim = embed_dim
        self.output_dict = output_dict
        self.flat_text = flat_text
        self._freezers = freezers or {}
        shape = (1,) if nonscalar_logit_scale else ()
        self.logit_scale = nn.Parameter(torch.full(shape, float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.full(shape, float(init_logit_bias))) if init_logit_bias is not None else None
        self._register_state_dict_hook(_flatten_text_keys)
        self._register_load_state_dict_pre_hook(_nest_text_keys, with_module=True)

    @property
    def context_length(self) -> int:
        # nn.Module types unknown attributes as Tensor | Module; the tower contract makes this an int
        return cast(int, self.text.context_length)

    @property
    def vocab_size(self) -> int:
        return cast(int, self.text.vocab_size)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        if isinstance(features, tuple):
            features = features[0]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(text)
        if isinstance(features, tuple):
            features = features[0]
        return F.normalize(features, dim=-1) if normalize else features

    def get_logits(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(image_logits [N_img, N_txt], text_logits [N_txt, N_img])``, scaled and biased."""
        image_features = self.encode_image(image, normalize=True)
        image_logits = self.logit_scale.exp() * image_features @ self.encode_text(text, normalize=True).T
        if self.logit_bias is not None:
            image_logits = image_logits + self.logit_bias
        return image_logits, image_logits.T

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None
                ) -> Union[Tuple[Any, ...], Dict[str, Any]]:
        """Normalised features and ``logit_scale.exp()`` (and ``logit_bias`` when the model has one).

        Returns a tuple ``(image_features, text_features, logit_scale[, logit_bias])`` or, with
        ``output_dict``, a dict with those keys. A missing input gives ``None`` features.
        """
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        out: Dict[str, Any] = {"image_features": image_features, "text_features": text_features,
                               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out if self.output_dict else tuple(out.values())

    # -- training helpers ----------------------------------------------------------------------
    def _lock(self, tower_name: str, unlocked: int, freeze_layer_norm: bool, freeze_bn_stats: bool) -> None:
        from .freeze import lock_layer_groups

        freezer = self._freezers.get(tower_name, lock_layer_groups)
        freezer(getattr(self, tower_name), unlocked, freeze_layer_norm=freeze_layer_norm, freeze_bn_stats=freeze_bn_stats)

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the image tower except its last ``unlocked_groups`` layer groups (LiT)."""
        self._lock("visual", unlocked_groups, True, freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower except its last ``unlocked_layers`` layer groups."""
        self._lock("text", unlocked_layers, freeze_layer_norm, False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # every tower has it (the tower contract); nn.Module types the attribute as Tensor | Module
        self.visual.set_grad_checkpointing(enable)  # type: ignore[operator]
        self.text.set_grad_checkpointing(enable)  # type: ignore[operator]

    def no_weight_decay(self) -> Set[str]:
        """Parameter names (as in ``named_parameters``) that take no weight decay."""
        names: Set[str] = set()
        for prefix in ("visual", "text"):
            tower = getattr(self, prefix)
            if hasattr(tower, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in tower.no_weight_decay()}
        return names


def _flatten_text_keys(module: ClipModel, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: in the flat layout, ``text.X`` is saved as ``X`` (OpenCLIP's ``CLIP``)."""
    if not module.flat_text:
        return
    inner = prefix + "text."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _nest_text_keys(module: ClipModel, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """Load hook: accept flat (``CLIP``) keys for the text tower in either layout."""
    # the model's own modules and parameters (a model family's extra modules too) keep their keys
    own = {prefix + name + "." for name, _ in module.named_children()}
    own |= {prefix + name for name, _ in module.named_parameters(recurse=False)} | {prefix + "logit_bias"}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not any(key == o or key.startswith(o) for o in own):
            state_dict[prefix + "text." + key[len(prefix):]] = state_dict.pop(key)


def build_clip_model(cfg: Any, ctx: Any) -> ClipModel:
    """The builtin ``clip`` model family's factory: the towers of ``ctx`` (a ``ModelContext``) as they are."""
    return ClipModel(ctx.visual, ctx.text, **ctx.clip_kwargs())
