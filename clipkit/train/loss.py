"""Contrastive losses: CLIP's softmax loss and SigLIP's sigmoid loss, on one or many processes.

Logits are computed in fp32 whatever the autocast dtype: the logit scale reaches 100, where bf16's
8-bit mantissa would blur neighbouring similarities.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(image: torch.Tensor, text: torch.Tensor, *, local_loss: bool, gather_with_grad: bool,
                    rank: int, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every process's features, concatenated in rank order.

    ``gather_with_grad`` back-propagates through the gather (each process gets the gradient of the
    whole loss); otherwise other processes' features are constants and, unless ``local_loss``, the
    local slice is put back so that its gradient flows.
    """
    if gather_with_grad:
        import torch.distributed.nn as dist_nn

        return torch.cat(dist_nn.all_gather(image), 0), torch.cat(dist_nn.all_gather(text), 0)
    images: List[torch.Tensor] = [torch.zeros_like(image) for _ in range(world)]
    texts: List[torch.Tensor] = [torch.zeros_like(text) for _ in range(world)]
    dist.all_gather(images, image)
    dist.all_gather(texts, text)
    if not local_loss:
        images[rank], texts[rank] = image, text
    return torch.cat(images, 0), torch.cat(texts, 0)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over image-text similarities; the pairs on the diagonal are positives.

    With ``local_loss`` each process scores its own features against everyone's (memory linear in the
    global batch); OpenCLIP's semantics and numerics.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world: int = 1) -> None:
        super().__init__()
        self.local_loss, self.gather_with_grad, self.rank, self.world = local_loss, gather_with_grad, rank, world

    def logits(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        image, text = image.float(), text.float()
        if self.world > 1:
            if not self.gather_with_grad and not self.local_loss:
                # each process back-propagates the whole loss through its own features only, and DDP
                # averages: scaling those gradients by the world size makes the average the gradient of
                # the global loss (OpenCLIP trains with it divided by the world size)
                image, text = _ScaleGrad.apply(image, self.world), _ScaleGrad.apply(text, self.world)
            all_image, all_text = gather_features(image, text, local_loss=self.local_loss,
                                                  gather_with_grad=self.gather_with_grad,
                                                  rank=self.rank, world=self.world)
            if self.local_loss:
                per_image, per_text = scale * image @ all_text.T, scale * text @ all_image.T
            else:
                per_image = scale * all_image @ all_text.T
                per_text = per_image.T
        else:
            per_image = scale * image @ text.T
            per_text = per_image.T
        if bias is not None:
            per_image, per_text = per_image + bias, per_text + bias
        return per_image, per_text

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None, output_dict: bool = False
                ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        per_image, per_text = self.logits(image_features, text_features, logit_scale, logit_bias)
        n = per_image.shape[0]
        labels = torch.arange(n, device=per_image.device)
        if self.world > 1 and self.local_loss:
            labels = labels + n * self.rank
        loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss




class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al. 2023): every pair is a binary problem, positives on the diagonal.

    On several processes each one scores its images against every process's texts, one b x b block
    at a time, so no process holds the global B x B matrix. ``dist_impl`` picks how the texts travel:
    ``"shift"`` and ``"bidir"`` (the default) pass them around a ring of neighbours, one block per
    step, so a process holds one other block of texts at a time; ``"gather"`` and ``"reduce"`` gather
    all texts at once (fewer, larger messages). Gradients travel back the same way.
    """

    def __init__(self, rank: int = 0, world: int = 1, dist_impl: Optional[str] = None) -> None:
        super().__init__()
        self.rank, self.world, self.dist_impl = rank, world, dist_impl or "bidir"

    @staticmethod
    def _block(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
               positive: bool) -> torch.Tensor:
        logits = scale * image @ text.T
        if bias is not None:
            logits = logits + bias
        n = image.shape[0]
        labels = -torch.ones((n, text.shape[0]), device=image.device, dtype=logits.dtype)
        if positive:
            labels = labels + 2 * torch.eye(n, device=image.device, dtype=logits.dtype)
        return -F.logsigmoid(labels * logits).sum() / n

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None, output_dict: bool = False
                ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        image, text = image_features.float(), text_features.float()
        loss = self._block(image, text, logit_scale, logit_bias, positive=True)
        if self.world > 1 and self.dist_impl in ("shift", "bidir"):
            # "bidir" sends each block one way round the ring too: the same numbers as OpenCLIP's
            # two-way exchange, in world - 1 steps instead of about half as many
            neighbour = text
            for _ in range(self.world - 1):
                neighbour = _RingPass.apply(neighbour, self.rank, self.world)  # now the texts of rank - k
                loss = loss + self._block(image, neighbour, logit_scale, logit_bias, positive=False)
        elif self.world > 1:
            import torch.distributed.nn as dist_nn

            texts = dist_nn.all_gather(text)
            for other in range(self.world):
                if other != self.rank:
                    loss = loss + self._block(image, texts[other], logit_scale, logit_bias, positive=False)
        return {"contrastive_loss": loss} if output_dict else loss


def _exchange(x: torch.Tensor, to: int, source: int) -> torch.Tensor:
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), to), dist.P2POp(dist.irecv, out, source)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return out


class _RingPass(torch.autograd.Function):
    """Send a tensor to the next process and receive the previous one's; gradients go the other way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank, ctx.world = rank, world
        return _exchange(x, (rank + 1) % world, (rank - 1) % world)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        return _exchange(grad, (ctx.rank - 1) % ctx.world, (ctx.rank + 1) % ctx.world), None, None


def clip_metrics(image: torch.Tensor, text: torch.Tensor, scale: float) -> Dict[str, float]:
    """Retrieval metrics over aligned pairs, with OpenCLIP's keys (``image_to_text_R@1``, ...)."""
    metrics: Dict[str, float] = {}
    per_image = (scale * image @ text.T).detach().cpu()
    truth = torch.arange(len(text)).view(-1, 1)
    for name, logits in (("image_to_text", per_image), ("text_to_image", per_image.T)):
        ranking = torch.argsort(logits, descending=True)
        rank = torch.where(ranking == truth)[1].float()
        metrics[f"{name}_mean_rank"] = rank.mean().item() + 1
        metrics[f"{name}_median_rank"] = float(torch.floor(torch.median(rank)).item()) + 1
        for k in (1, 5, 10):
            metrics[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return metrics
