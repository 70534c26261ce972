"""How the model is spread over processes: one process, DDP, or FSDP2 — wrapping, gradient clipping,
the parameters FSDP leaves whole, and getting whole weights into (and out of) the model.

The trainer asks its strategy, never ``--fsdp``; :func:`parallelism_for` picks one from the settings.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, cast

import torch
from torch import nn

from ..errors import TrainingError
from .distributed import Env, all_agree

logger = logging.getLogger("clipkit.train")


def local_part(t: torch.Tensor) -> torch.Tensor:
    """A tensor's part on this process (the tensor itself unless FSDP sharded it)."""
    return t.to_local() if hasattr(t, "to_local") else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _logit_scale(model: nn.Module) -> torch.Tensor:
    # a parameter of every CLIP model; nn.Module types unknown attributes as Tensor | Module
    return cast(torch.Tensor, model.logit_scale)


class SingleProcess:
    """The whole model in one process. ``sharded`` is False: checkpoints are ``.pt`` files."""

    sharded = False

    def __init__(self, env: Env) -> None:
        self.env = env

    def shard(self, model: nn.Module) -> None:
        """Before the optimizer is built: nothing to do unless the weights are sharded."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls."""
        return model

    def nonfinite(self, model: nn.Module) -> List[str]:
        """Names of parameters with NaN or inf; every process has the same weights, so they agree."""
        return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]

    def any_nonfinite(self, model: nn.Module) -> List[str]:
        """:meth:`nonfinite`, and whether any process found one (empty list: none did)."""
        return self.nonfinite(model)

    def before_step(self, model: nn.Module) -> None:
        """After backward, before the optimizer: DDP has averaged every gradient already."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def logit_scale(self, model: nn.Module) -> torch.Tensor:
        """The temperature's value (every process calls it: for a sharded model it is a collective)."""
        return _logit_scale(model).detach()

    def load_whole(self, model: nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
        """A whole ``state_dict`` (a ``.pt`` checkpoint's) into the model."""
        from ..weights import load_state_dict

        load_state_dict(model, state, strict=True, source=where)

    def load_whole_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: Dict[str, Any],
                             saved_names: Optional[List[List[str]]], names: Dict[int, str], where: str) -> None:
        from .checkpointer import load_optimizer

        load_optimizer(optimizer, saved, saved_names, names)


class DataParallel(SingleProcess):
    """A whole copy of the model on every process, gradients averaged by DDP; process 0 writes checkpoints."""

    def __init__(self, env: Env, static_graph: bool = False) -> None:
        super().__init__(env)
        self.static_graph = static_graph

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, static_graph=self.static_graph)


class FullySharded(SingleProcess):
    """FSDP2: one ``fully_shard`` unit per entry of each tower's ``layer_groups()``, then the root.

    FSDP2 cannot shard 0-d parameters (the temperature and the SigLIP bias): they stay whole on every
    process, and their gradients are averaged here. Checkpoints are Distributed Checkpoint folders.
    """

    sharded = True

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.replicated: List[nn.Parameter] = []  # the 0-d parameters, whole on every process

    def shard(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh(self.env.device.type, (self.env.world,))
        for tower in (getattr(model, "visual", None), getattr(model, "text", None)):
            groups = getattr(tower, "layer_groups", None)
            if groups is None:
                continue
            for entry in groups():
                modules = [m for m in entry if isinstance(m, nn.Module)
                           and any(True for _ in m.parameters())
                           and not any(isinstance(p, DTensor) for p in m.parameters())]  # not in a unit already
                if modules:
                    fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh)
        self.replicated = [p for p in model.parameters() if p.ndim == 0 and not isinstance(p, DTensor)]
        fully_shard(model, mesh=mesh, ignored_params=set(self.replicated) or None)
        for method in ("encode_image", "encode_text"):  # evaluation calls these, not forward
            if hasattr(model, method):
                register_fsdp_forward_method(model, method)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # sharded in place by shard()

    def nonfinite(self, model: nn.Module) -> List[str]:
        return [n for n, p in model.named_parameters() if not torch.isfinite(local_part(p)).all()]

    def any_nonfinite(self, model: nn.Module) -> List[str]:
        # each process sees its own shard: all stop together when any shard is bad
        bad = self.nonfinite(model)
        if all_agree(bool(bad), self.env):
            return bad or ["another process's shard"]
        return []

    def before_step(self, model: nn.Module) -> None:
        if not self.env.distributed:
            return
        for p in self.replicated:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.env.world)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> None:
        # sharded gradients (DTensors) and the whole 0-d ones cannot go in one norm: combine the two
        from torch.nn.utils import clip_grads_with_norm_, get_total_norm

        replicated = {id(p) for p in self.replicated}
        params = [p for p in model.parameters() if p.grad is not None]
        sharded = [p for p in params if id(p) not in replicated]
        kept = [p for p in params if id(p) in replicated]
        norms = [whole(get_total_norm([p.grad for p in group if p.grad is not None]))
                 for group in (sharded, kept) if group]
        total = torch.stack([n.to(torch.float32) for n in norms]).norm()
        clip_grads_with_norm_(sharded, max_norm, total)
        clip_grads_with_norm_(kept, max_norm, total)

    def logit_scale(self, model: nn.Module) -> torch.Tensor:
        return whole(_logit_scale(model).detach())

    def load_whole(self, model: nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
        # every process reads the whole file and keeps its shards
        from torch.distributed.tensor import DTensor, distribute_tensor

        from ..weights import check_values

        current = model.state_dict()
        missing = sorted(set(current) - set(state))
        if missing:
            raise TrainingError(f"--resume {where}: the checkpoint lacks {len(missing)} of this model's weights "
                                f"({', '.join(missing[:3])})")
        check_values(current, state, {k for k, _ in model.named_parameters()}, where)
        state = {k: distribute_tensor(state[k].to(v.dtype), v.device_mesh, v.placements) if isinstance(v, DTensor)
                 else state[k].to(v.dtype) for k, v in current.items()}
        model.load_state_dict(state, strict=True)

    def load_whole_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: Dict[str, Any],
                             saved_names: Optional[List[List[str]]], names: Dict[int, str], where: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from .checkpointer import optimizer_to_fqn

        if not saved_names:
            logger.warning("%s has no optimizer parameter names (an OpenCLIP checkpoint?): under --fsdp the "
                           "optimizer starts fresh, the weights are restored", where)
            return
        set_optimizer_state_dict(model, optimizer, optimizer_to_fqn(saved, saved_names),
                                 options=StateDictOptions(full_state_dict=True))


def parallelism_for(fsdp: bool, static_graph: bool, env: Env) -> SingleProcess:
    """The strategy for the settings and the processes: FSDP2 with ``--fsdp`` (also in one process), else
    DDP when there are several processes, else the plain model."""
    if fsdp:
        return FullySharded(env)
    return DataParallel(env, static_graph) if env.distributed else SingleProcess(env)
