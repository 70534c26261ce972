"""Processes and devices: torchrun's and SLURM's environment, the process group, and the device."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("clipkit.train")


@dataclass
class Env:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: bool = False  # a process group is up (FSDP needs one even for a single process)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _from_environment() -> tuple:
    """``(rank, local_rank, world)`` from torchrun's variables, else SLURM's, else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in os.environ:
        rank, local, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_LOCALID"]), int(os.environ["SLURM_NTASKS"])
        # the env:// rendezvous reads these
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world))
        return rank, local, world
    return 0, 0, 1


def init(args: Any) -> Env:
    """Pick the device and, under torchrun or SLURM, join the process group."""
    rank, local_rank, world = _from_environment()
    wanted = str(args.device)
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        if rank == 0:
            logger.warning("--device %s: CUDA is not available, training on the CPU", wanted)
        wanted = "cpu"
    device = torch.device(wanted)
    if device.type == "cuda" and world > 1 and not args.no_set_device_rank:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index: 'cuda' means the current one
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method=args.dist_url or "env://", world_size=world, rank=rank,
                                timeout=timedelta(seconds=int(os.environ.get("CLIPKIT_DIST_TIMEOUT", "600"))))
    elif world == 1 and getattr(args, "fsdp", False) and not dist.is_initialized():
        # FSDP2 shards over a device mesh, which needs a process group: a group of one, in memory
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return Env(rank=rank, local_rank=local_rank, world=world, device=device, group=dist.is_initialized())


def all_agree(flag: bool, env: Env) -> bool:
    """True on every process when ``flag`` is true on any (a stop decided by one is taken by all)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj: Any, env: Env) -> Any:
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: Env) -> None:
    if (env.distributed or env.group) and dist.is_initialized():
        dist.destroy_process_group()
