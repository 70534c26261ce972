"""The ``clip`` and ``siglip`` objectives: the contrastive losses of :mod:`clipkit.train.loss` behind the
objective interface (one term, ``contrastive_loss``, as OpenCLIP names it)."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from ..loss import ClipLoss, SigLipLoss
from . import BaseObjective


class ClipObjective(BaseObjective):
    """OpenCLIP's ``ClipLoss``: local loss and gather-with-grad as there; without either, on several
    processes, the gradient of the global loss (see :class:`clipkit.train.loss.ClipLoss`)."""

    name = "clip"

    def __init__(self, *, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world: int = 1) -> None:
        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world=world)
        self.per_process = local_loss

    def __call__(self, outputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        image, text, scale = self.inputs(outputs)
        return {"contrastive_loss": self.loss(image, text, scale, outputs.get("logit_bias"))}


class SigLipObjective(BaseObjective):
    """OpenCLIP's ``SigLipLoss`` with every exchange of texts between processes (``dist_impl``)."""

    name = "siglip"
    per_process = True  # each process scores its own images

    def __init__(self, *, dist_impl: Optional[str] = None, rank: int = 0, world: int = 1) -> None:
        self.loss = SigLipLoss(rank=rank, world=world, dist_impl=dist_impl)

    def __call__(self, outputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        image, text, scale = self.inputs(outputs)
        return {"contrastive_loss": self.loss(image, text, scale, outputs.get("logit_bias"))}
