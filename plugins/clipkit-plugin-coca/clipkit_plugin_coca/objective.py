"""The ``coca`` objective: OpenCLIP's ``CoCaLoss``, the contrastive loss plus the caption cross-entropy."""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F

from clipkit.plugin import FEATURES, BaseObjective
from clipkit.train.loss import ClipLoss

from . import CocaOptions


class CocaObjective(BaseObjective):
    """Terms ``contrastive_loss`` (weighted) and ``caption_loss``: the decoder's cross-entropy on the next
    token of each caption, padding ignored, weighted. Needs a ``coca`` model's ``logits`` and ``labels``."""

    name = "coca"
    needs = (*FEATURES, "logits", "labels")
    per_process = True  # the caption loss covers this process's captions

    def __init__(self, options: CocaOptions, rank: int = 0, world: int = 1):
        self.options = options
        self.clip = ClipLoss(local_loss=options.local_loss, gather_with_grad=options.gather_with_grad, rank=rank,
                             world=world)

    def __call__(self, outputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        image, text, scale, logits, labels = self.inputs(outputs)
        weight = self.options.contrastive_loss_weight
        contrastive = (weight * self.clip(image, text, scale, outputs.get("logit_bias")) if weight
                       else image.new_zeros(()))  # as OpenCLIP: no contrastive pass when it does not count
        caption = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.options.pad_id)
        return {"contrastive_loss": contrastive, "caption_loss": self.options.caption_loss_weight * caption}

    @staticmethod
    def example_outputs(batch: int, generator: torch.Generator) -> Dict[str, Any]:
        """Decoder logits with gradient and their labels, for the objective's contract cases."""
        labels = torch.randint(0, 11, (batch, 5), generator=generator)
        labels[0, -1] = 0  # one padding position, which the loss ignores
        return {"logits": torch.randn(batch, 5, 11, generator=generator).requires_grad_(), "labels": labels}


def build_objective(options: CocaOptions, ctx: Any) -> CocaObjective:
    """The ``coca`` objective's factory."""
    return CocaObjective(options, rank=ctx.rank, world=ctx.world)
