"""Poolers over a transformer's token features, aware of the attention mask (1 = real token)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


class MeanPooler(nn.Module):
    """Mean of the real tokens' features; padding does not count."""

    cls_token_position: Optional[int] = None

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, pooler_output: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        mask = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


class MaxPooler(nn.Module):
    """Feature-wise maximum over the real tokens (OpenCLIP 3.3.0's crashes on its own masks)."""

    cls_token_position: Optional[int] = None

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, pooler_output: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).max(dim=1).values


class ClsPooler(nn.Module):
    """The model's own pooled output when it has one (BERT's pooler), else the first token."""

    cls_token_position = 0

    def __init__(self, use_pooler_output: bool = True):
        super().__init__()
        self.use_pooler_output = use_pooler_output

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, pooler_output: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        if self.use_pooler_output and pooler_output is not None:
            return pooler_output
        return hidden[:, 0]


def mean_pooler(cfg: Any = None) -> MeanPooler:
    return MeanPooler()


def max_pooler(cfg: Any = None) -> MaxPooler:
    return MaxPooler()


def cls_pooler(cfg: Any = None) -> ClsPooler:
    return ClsPooler(use_pooler_output=True)


def cls_last_hidden_state_pooler(cfg: Any = None) -> ClsPooler:
    return ClsPooler(use_pooler_output=False)
