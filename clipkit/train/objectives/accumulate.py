"""GradCache for any objective: the outputs one accumulation pass gives the objective.

With ``--accum-freq k`` the trainer first computes every micro-batch's outputs without gradient, then
runs k passes; pass ``j`` recomputes micro-batch ``j`` with gradient and scores it together with the
cached others, so every pass sees the whole step's batch and the gradients of the k passes add up to
the gradient of the objective on that batch.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch

from . import PER_STEP


def gradcache_outputs(cached: Sequence[Mapping[str, torch.Tensor]], live: Mapping[str, torch.Tensor],
                      index: int) -> Dict[str, torch.Tensor]:
    """The outputs of pass ``index``: ``live`` (micro-batch ``index``'s outputs, with gradient) in place
    of ``cached[index]``, each per-sample entry concatenated over the micro-batches in order.

    ``cached[i]`` and ``live`` hold model outputs merged with the objective's extras. The per-step
    entries (:data:`PER_STEP`) are ``live``'s, detached on every pass but the last: every pass computes
    the whole loss, so otherwise the temperature (and bias) would collect its gradient k times.
    """
    last = index == len(cached) - 1
    merged: Dict[str, torch.Tensor] = {}
    for key, value in live.items():
        if key in PER_STEP:
            merged[key] = value if last else value.detach()
        else:
            merged[key] = torch.cat([value if i == index else part[key] for i, part in enumerate(cached)])
    return merged
