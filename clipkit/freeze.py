"""Locking towers by layer group: the default freezer, registered for the builtin towers.

A tower lists its parameters in groups, first to last (``tower.layer_groups()``); locking with
``unlocked=N`` leaves the last N groups trainable and freezes everything else in the tower.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Sequence, Union

from torch import nn

from .errors import ClipkitError

_NORMS = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_norm(module: nn.Module) -> bool:
    # transformers' own norms (T5LayerNorm, LlamaRMSNorm...) are not nn.LayerNorm subclasses
    return isinstance(module, _NORMS) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _params(item: Union[nn.Module, nn.Parameter]) -> Iterator[nn.Parameter]:
    if isinstance(item, nn.Parameter):
        yield item
    elif isinstance(item, nn.Module):
        yield from item.parameters()


def _modules(group: Sequence[Union[nn.Module, nn.Parameter]]) -> Iterator[nn.Module]:
    for item in group:
        if isinstance(item, nn.Module):
            yield from item.modules()


def lock_as_asked(model: Any, options: Any) -> None:
    """Lock ``model``'s towers as ``options`` asks, through its attributes named as clipkit-train's flags
    (``lock_image``, ``lock_image_unlocked_groups``, ``lock_image_freeze_bn_stats``, ``lock_text``, ...):
    the trainer's model settings and ``clipkit trainable``'s arguments both have them."""
    if options.lock_image:
        model.lock_image_tower(unlocked_groups=options.lock_image_unlocked_groups,
                               freeze_bn_stats=options.lock_image_freeze_bn_stats)
    if options.lock_text:
        model.lock_text_tower(unlocked_layers=options.lock_text_unlocked_layers,
                              freeze_layer_norm=options.lock_text_freeze_layer_norm)


def _keep_eval(module: nn.Module, _inputs: Any) -> None:
    module.eval()


def _release_bn_stats(tower: nn.Module) -> None:
    """Undo an earlier ``freeze_bn_stats`` so each lock call starts from scratch."""
    for module in tower.modules():
        handle = module.__dict__.pop("_clipkit_bn_hook", None)
        if handle is not None:
            handle.remove()
            module.train(tower.training)


def lock_layer_groups(tower: nn.Module, unlocked: int = 0, *, freeze_layer_norm: bool = True,
                      freeze_bn_stats: bool = False) -> None:
    """Freeze ``tower`` except its last ``unlocked`` layer groups.

    ``freeze_layer_norm=False`` leaves the norm-layer parameters of locked groups trainable;
    ``freeze_bn_stats=True`` keeps the BatchNorms of locked groups in eval mode, across later
    ``model.train()`` calls too. Calling it again re-locks from scratch, so a resumed run may unlock
    more groups than the run it resumes.
    """
    if not isinstance(unlocked, int) or unlocked < 0:
        raise ClipkitError(f"unlocked layer groups must be an int >= 0, got {unlocked!r}")
    groups = list(tower.layer_groups())  # type: ignore[operator]  # the tower contract; nn.Module types it Tensor | Module
    _release_bn_stats(tower)
    if unlocked >= len(groups):  # everything unlocked, parameters outside any group included
        for param in tower.parameters():
            param.requires_grad = True
        return
    locked = groups[: len(groups) - unlocked]
    for param in tower.parameters():
        param.requires_grad = False
    for group in groups[len(groups) - unlocked:]:
        for item in group:
            for param in _params(item):
                param.requires_grad = True
    for group in locked:
        for module in _modules(group):
            if not freeze_layer_norm and _is_norm(module):
                for param in module.parameters(recurse=False):
                    param.requires_grad = True
            if freeze_bn_stats and isinstance(module, nn.modules.batchnorm._BatchNorm) \
                    and "_clipkit_bn_hook" not in module.__dict__:
                module.eval()
                module.__dict__["_clipkit_bn_hook"] = module.register_forward_pre_hook(_keep_eval)


def _all_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def eval_frozen_parts(tower: nn.Module) -> List[str]:
    """Put every maximal submodule of ``tower`` whose parameters are all frozen in eval mode (the tower
    itself when it is wholly frozen); their names (``""`` for the tower).

    Called after ``model.train()``: a locked part then computes without dropout and with BatchNorm on
    its running statistics, so its output depends on its input alone (and can be computed once).
    """
    names: List[str] = []

    def visit(module: nn.Module, name: str) -> None:
        if _all_frozen(module):
            module.eval()
            names.append(name)
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(tower, "")
    return names


def locked_prefix(tower: Any) -> int:
    """How many of ``tower.layer_groups()``, from the first, have all their parameters frozen."""
    count = 0
    for group in tower.layer_groups():
        if any(p.requires_grad for item in group for p in _params(item)):
            break
        count += 1
    return count
