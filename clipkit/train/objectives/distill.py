"""The ``distill`` objective: OpenCLIP's ``DistillClipLoss`` (``--distill-model``/``--distill-pretrained``).

The student learns from the contrastive loss and from a frozen teacher's similarities on the same
batch: each row of the student's logits is pulled towards the teacher's softmax over that row.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn.functional as F

from ...errors import TrainingError
from ...model import ClipModel
from ..loss import ClipLoss
from . import FEATURES, BaseObjective


def _soft_cross_entropy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's rows against the teacher's row-wise softmax, averaged over rows."""
    return -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


class DistillObjective(BaseObjective):
    """Terms ``contrastive_loss`` (as the ``clip`` objective) and ``distill_loss``.

    The teacher is put in eval mode with every parameter frozen; its features are computed in
    :meth:`extra_forward`, without gradient, on the student's inputs, so it must share the student's
    preprocessing and tokenizer (as in OpenCLIP). Its logits are formed exactly like the student's
    (gathered across processes, local loss or not) with its own logit scale.
    """

    name = "distill"
    needs: Tuple[str, ...] = FEATURES + ("teacher_image_features", "teacher_text_features")

    def __init__(self, teacher: ClipModel, *, teacher_name: str = "teacher", local_loss: bool = False,
                 gather_with_grad: bool = False, rank: int = 0, world: int = 1) -> None:
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher, self.teacher_name = teacher, teacher_name
        self.clip = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world=world)
        self.per_process = local_loss

    def extra_forward(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        images, texts = batch["images"], batch["texts"]
        size: Any = self.teacher.visual.image_size  # an int or (height, width), by the tower contract
        size = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(images.shape[-2:]) != size or texts.shape[-1] != self.teacher.context_length:
            raise TrainingError(
                f"distill: the teacher {self.teacher_name!r} takes {size[0]}x{size[1]} images and "
                f"{self.teacher.context_length}-token texts, but the batch has {images.shape[-2]}x{images.shape[-1]} "
                f"images and {texts.shape[-1]}-token texts: the teacher must use the student's image size and tokenizer")
        with torch.no_grad():
            return {"teacher_image_features": self.teacher.encode_image(images, normalize=True),
                    "teacher_text_features": self.teacher.encode_text(texts, normalize=True)}

    def __call__(self, outputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if outputs.get("logit_bias") is not None:
            raise TrainingError("distill: the model has a logit bias (a SigLIP-style model), which OpenCLIP's "
                                "distillation loss has no place for; distil into a model without one (no --siglip)")
        image, text, scale, teacher_image, teacher_text = self.inputs(outputs)
        with torch.no_grad():
            teacher_scale = self.teacher.logit_scale.exp()
        per_image, per_text = self.clip.logits(image, text, scale)
        teacher_per_image, teacher_per_text = self.clip.logits(teacher_image, teacher_text, teacher_scale)
        n = per_image.shape[0]
        labels = torch.arange(n, device=per_image.device)
        if self.clip.world > 1 and self.clip.local_loss:
            labels = labels + n * self.clip.rank  # the rows are this process's samples among everyone's
        contrastive = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        distill = (_soft_cross_entropy(teacher_per_image, per_image)
                   + _soft_cross_entropy(teacher_per_text, per_text)) / 2
        return {"contrastive_loss": contrastive, "distill_loss": distill}
