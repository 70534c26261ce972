"""The timm tower: a timm model (``trunk``) -> optional attention pool and projection (``head``).

Which part pools and which projects depends on ``timm_pool`` and ``timm_proj``:

- ``'linear'`` / ``'mlp'``: the trunk keeps timm's pooling and drops its classifier; the head projects.
- ``null`` / ``''``: timm's classifier, sized ``embed_dim``, is the projection; the head is empty.
- ``'none'``: the trunk's pooled features are the embedding as they are.
- ``'abs_attn'`` / ``'rot_attn'``: the trunk returns its 2-D feature map and the head pools it with
  timm's attention pool, which also projects to ``embed_dim``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import timm
import torch
from torch import nn

from ...errors import ClipkitError, suggest
from ...freeze import lock_layer_groups
from ...hookspecs import TowerContext
from . import ATTENTION_POOLS, TimmCfg

_LOCAL_FILE_HINT = ('point timm at a local file with vision_cfg.timm_model_kwargs '
                    '{"pretrained_cfg_overlay": {"file": "/path/to/weights.safetensors"}}')


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_model_name(name: str) -> None:
    if ":" in name or timm.is_model(name):  # 'hf-hub:...' names are resolved by timm itself
        return
    hint = suggest(name, timm.list_models(), n=3)
    raise ClipkitError(f"vision_cfg.timm_model_name: timm {timm.__version__} has no model {name!r}{hint}; "
                       f"a model added in a later timm needs `pip install -U timm`")


def _takes_img_size(name: str) -> bool:
    """Whether the model is built for one input size (timm's ``fixed_input_size``, ViTs and the like)."""
    if ":" in name:
        return False
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # an architecture timm knows, with a tag it does not
        raise ClipkitError(f"vision_cfg.timm_model_name: {exc} (timm {timm.__version__})") from exc
    return bool(pretrained_cfg is not None and pretrained_cfg.fixed_input_size)


def _create(cfg: TimmCfg, pretrained: bool, cache_dir: Optional[str], **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with clipkit errors for arguments the model lacks and weights not found."""
    name = cfg.timm_model_name
    try:
        return timm.create_model(name, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
    except TypeError as exc:  # the model's __init__ does not take an argument a key asked for
        for kwarg, key in (("patch_drop_rate", "patch_dropout"), ("drop_path_rate", "timm_drop_path")):
            if f"'{kwarg}'" in str(exc):
                raise ClipkitError(f"vision_cfg.{key}: timm model {name!r} does not take {kwarg}; "
                                   f"remove {key} for this model") from exc
        raise
    except (OSError, RuntimeError) as exc:
        if not pretrained or (isinstance(exc, RuntimeError) and "pretrained" not in str(exc)):
            raise
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0].split('. ')[0][:160]}" if text else type(exc).__name__
        local = ((cfg.timm_model_kwargs or {}).get("pretrained_cfg_overlay") or {}).get("file")
        if local:
            where, advice = f"the file {local!r}", "check that path"
        else:
            offline = " (HF_HUB_OFFLINE is set, so only its cache was searched)" if os.environ.get("HF_HUB_OFFLINE") else ""
            where, advice = f"the Hugging Face hub{offline}", f"download them once online (they are cached), {_LOCAL_FILE_HINT}"
        raise ClipkitError(f"timm model {name!r}: cannot load its pretrained weights from {where} ({reason}); {advice}, "
                           f"or build without them (timm_model_pretrained false, pretrained_image=False)") from exc


class TimmTower(nn.Module):
    """A timm image model as a CLIP vision tower, in OpenCLIP ``TimmModel``'s parameter layout."""

    # a timm model: reset_classifier, num_features, pretrained_cfg, group_matcher are timm's API, which
    # torch's nn.Module typing (unknown attributes are Tensor | Module) cannot describe
    trunk: Any

    def __init__(self, cfg: TimmCfg, embed_dim: int, pretrained: bool = False, cache_dir: Optional[str] = None):
        super().__init__()
        _check_model_name(cfg.timm_model_name)
        self.cfg = cfg
        self.image_size = _pair(cfg.image_size)
        self.output_dim = embed_dim
        kwargs: Dict[str, Any] = dict(cfg.timm_model_kwargs or {})
        if cfg.timm_drop_path is not None:
            kwargs["drop_path_rate"] = cfg.timm_drop_path
        if cfg.patch_dropout > 0:
            kwargs["patch_drop_rate"] = cfg.patch_dropout
        if _takes_img_size(cfg.timm_model_name):
            kwargs["img_size"] = self.image_size
        attn_pool = cfg.timm_pool in ATTENTION_POOLS

        if not cfg.adds_projection and not attn_pool:
            # timm's classifier is the projection (num_classes=embed_dim), or there is none at all
            kwargs.update(num_classes=0 if cfg.timm_proj == "none" else embed_dim, global_pool=cfg.timm_pool)
            self.trunk = _create(cfg, pretrained, cache_dir, **kwargs)
            width = embed_dim if cfg.timm_proj != "none" else _feature_width(self.trunk)
        else:
            self.trunk = _create(cfg, pretrained, cache_dir, **kwargs)
            # drop the classifier; '' keeps the model's own pooling, attention pools need the 2-D map
            if attn_pool:
                self.trunk.reset_classifier(0, global_pool="")
            elif cfg.timm_pool:
                self.trunk.reset_classifier(0, global_pool=cfg.timm_pool)
            else:
                self.trunk.reset_classifier(0)
            # an attention pool reads the feature map itself, before any pre-logits layer
            width = self.trunk.num_features if attn_pool else _feature_width(self.trunk)

        head: "OrderedDict[str, nn.Module]" = OrderedDict()
        if attn_pool:
            head["pool"] = self._attention_pool(cfg, width, embed_dim)
            width = embed_dim
        if cfg.timm_proj == "linear":
            head["drop"] = nn.Dropout(cfg.timm_drop)
            head["proj"] = nn.Linear(width, embed_dim, bias=cfg.timm_proj_bias)
            width = embed_dim
        elif cfg.timm_proj == "mlp":
            from timm.layers import Mlp

            # hidden 2 x embed_dim; dropout after the activation only; the first layer always has a bias
            head["mlp"] = Mlp(width, 2 * embed_dim, embed_dim, drop=(cfg.timm_drop, 0.0), bias=(True, cfg.timm_proj_bias))
            width = embed_dim
        self.head = nn.Sequential(head)
        if width != embed_dim:
            raise ClipkitError(f"vision_cfg.timm_proj: 'none' passes the {width} features of timm model "
                               f"{cfg.timm_model_name!r} through, but embed_dim is {embed_dim}; use timm_proj "
                               f"'linear' or set embed_dim to {width}")

    def _attention_pool(self, cfg: TimmCfg, width: int, embed_dim: int) -> nn.Module:
        # the learned position table is sized for the feature map at the model's default resolution
        feat_size = (self.trunk.pretrained_cfg or {}).get("pool_size")
        if not feat_size:
            raise ClipkitError(f"vision_cfg.timm_pool: {cfg.timm_pool!r} pools a 2-D feature map, and timm model "
                               f"{cfg.timm_model_name!r} does not have one; use 'avg', 'token' or 'map'")
        if width % 64:  # timm's attention pools use 64-wide heads
            raise ClipkitError(f"vision_cfg.timm_pool: {cfg.timm_pool!r} needs a feature width divisible by 64, and "
                               f"timm model {cfg.timm_model_name!r} has {width}")
        if cfg.timm_pool == "abs_attn":
            from timm.layers import AttentionPool2d

            return AttentionPool2d(width, feat_size=feat_size, out_features=embed_dim)
        from timm.layers import RotAttentionPool2d

        return RotAttentionPool2d(width, out_features=embed_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # in fp16/bf16 models the trunk's matmul weights are low precision and its norms fp32
        dtype = next((p.dtype for p in self.trunk.parameters() if p.dim() > 1), image.dtype)
        features: torch.Tensor = self.head(self.trunk(image.to(dtype)))
        return features

    # -- tower protocol ------------------------------------------------------------------------
    def layer_groups(self) -> List[List[Union[nn.Module, nn.Parameter]]]:
        """timm's parameter groups of the trunk (``group_matcher``), stem first; the head joins the last.

        A module whose parameters all fall in one group stands for them (so freezers find its norms);
        otherwise its own parameters are listed one by one.
        """
        groups = _trunk_groups(self.trunk)
        groups[-1].append(self.head)
        return groups

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        try:
            self.trunk.set_grad_checkpointing(enable)
        except (AttributeError, AssertionError, NotImplementedError) as exc:  # timm's ways of saying "not here"
            if enable:  # asked for memory savings that would silently not happen
                raise ClipkitError(f"timm model {self.cfg.timm_model_name} does not support gradient "
                                   f"checkpointing ({exc!r})") from exc

    def no_weight_decay(self) -> Set[str]:
        names = getattr(self.trunk, "no_weight_decay", None)
        return {f"trunk.{name}" for name in names()} if callable(names) else set()

    def preprocess_defaults(self) -> Dict[str, Any]:
        """mean, std and interpolation of the trunk's timm pretrained config (under JSON, tag and arguments)."""
        pretrained_cfg = getattr(self.trunk, "pretrained_cfg", None) or {}
        out: Dict[str, Any] = {}
        for key in ("mean", "std"):
            value = pretrained_cfg.get(key)
            if isinstance(value, (tuple, list)) and len(value) == 3:
                out[key] = tuple(float(v) for v in value)
        if pretrained_cfg.get("interpolation") in ("bicubic", "bilinear"):
            out["interpolation"] = pretrained_cfg["interpolation"]
        return out


def _feature_width(trunk: Any) -> int:
    """Width of what the trunk returns once its classifier is removed (pre-logits layers included)."""
    return int(getattr(trunk, "head_hidden_size", None) or trunk.num_features)


def _trunk_groups(trunk: Any) -> List[List[Union[nn.Module, nn.Parameter]]]:
    try:
        matcher = trunk.group_matcher(coarse=False)
    except (AttributeError, NotImplementedError):
        return [[trunk]]
    from timm.models import group_parameters

    group_of = group_parameters(trunk, matcher, reverse=True)  # parameter name -> group index
    groups: List[List[Union[nn.Module, nn.Parameter]]] = [[] for _ in range(max(group_of.values(), default=0) + 1)]
    placed: Set[int] = set()
    for prefix, module in trunk.named_modules():
        own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)
               if id(p) not in placed]
        if not own:
            continue
        ids = {group_of[name] for name, _ in own if name in group_of}
        leaf = not any(next(child.parameters(), None) is not None for child in module.children())
        if leaf and len(ids) == 1 and len(own) == len(list(module.parameters(recurse=False))):
            groups[ids.pop()].append(module)
        else:
            for name, param in own:
                groups[group_of.get(name, len(groups) - 1)].append(param)
        placed.update(id(p) for _, p in own)
    return groups


def build_timm(cfg: TimmCfg, ctx: TowerContext) -> TimmTower:
    """Factory registered as vision tower ``timm``; ``ctx.pretrained`` loads timm's weights for the trunk."""
    return TimmTower(cfg, ctx.embed_dim, pretrained=ctx.pretrained, cache_dir=ctx.cache_dir)


def lock_timm(tower: TimmTower, unlocked: int = 0, *, freeze_layer_norm: bool = True,
              freeze_bn_stats: bool = False) -> None:
    """Freezer registered for ``timm``: lock the trunk but its last ``unlocked`` timm groups; the head stays trainable."""
    lock_layer_groups(tower, unlocked, freeze_layer_norm=freeze_layer_norm, freeze_bn_stats=freeze_bn_stats)
    for param in tower.head.parameters():
        param.requires_grad = True
