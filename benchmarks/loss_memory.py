"""Memory of the contrastive losses against the global batch, on W CPU processes (gloo).

    python benchmarks/loss_memory.py [--world-sizes 1 2 4] [--batch 512] [--dim 512] [--threads 1] [--list]

For each world size W, W processes are spawned (torch.multiprocessing, gloo backend, this machine
only). Each holds a fixed per-process batch b of random L2-normalised image and text features
(b x d, fp32, requires_grad), so the global batch is B = W * b, a learnable logit scale (and bias,
for SigLIP), and runs forward + backward of:

- ``ClipLoss(local_loss=True,  gather_with_grad=True)``  -- "clip local": each process scores its own
  b rows against all B gathered features; logits b x B (two of them: per image, per text).
- ``ClipLoss(local_loss=False, gather_with_grad=True)``  -- "clip full": each process builds the
  global B x B matrix.
- ``SigLipLoss()``                                       -- "siglip": W blocks of b x b, one per
  process's texts.

At W = 1 both CLIP modes take the same single-process path.

On rank 0 the loss forward (from the features and the scale to the scalar loss) runs under
``torch.autograd.graph.saved_tensors_hooks``: the pack hook sees every tensor autograd keeps for
backward; the script sums ``untyped_storage().nbytes()`` over the unique storages (a transpose or
view shares its storage and is counted once) and records the largest one, whose shape is the
logits' shape. Saved tensors include feature-sized ones (the gathered B x d features, the scaled
b x d features, which grow linearly or not at all); ``--list`` breaks the total down by shape.
Transient tensors that are not saved (e.g. the gradients made during backward) are not counted.

Reported per (W, mode): the global batch, saved-for-backward MiB, the largest saved tensor (MiB and
shape), rank 0's loss; then for each mode the growth factor of the saved bytes and of the largest
saved tensor from one world size to the next, with k in bytes ~ B^k (k ~ 1: linear, k ~ 2:
quadratic). As a check, rank 0's feature gradients in the two CLIP modes are compared: with
gather_with_grad both give every process the gradient of the global loss (times W), so they agree.

Only torch is needed. The numbers are byte counts, not timings: they do not depend on the machine
or its load.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import socket
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clipkit.train.loss import ClipLoss, SigLipLoss  # noqa: E402

MODES = ("clip local", "clip full", "siglip")
MiB = 1024 * 1024


def _make_loss(mode: str, rank: int, world: int) -> torch.nn.Module:
    if mode == "clip local":
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world=world)
    if mode == "clip full":
        return ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world=world)
    return SigLipLoss(rank=rank, world=world)


class SavedTensors:
    """Pack hook that sums the bytes of the unique storages autograd saves for backward."""

    def __init__(self) -> None:
        self.storages: Dict[int, int] = {}
        self.shapes: List[Tuple[Tuple[int, ...], int]] = []  # (shape, bytes) of each new storage
        self.largest: Tuple[int, Tuple[int, ...]] = (0, ())
        self.keep: List[torch.Tensor] = []  # keeps the storages alive, so no address is reused

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if storage.data_ptr() not in self.storages:
            self.storages[storage.data_ptr()] = nbytes
            self.shapes.append((tuple(tensor.shape), nbytes))
        self.keep.append(tensor)
        if nbytes > self.largest[0]:
            self.largest = (nbytes, tuple(tensor.shape))
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _worker(rank: int, world: int, port: int, batch: int, dim: int, threads: int, queue) -> None:
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
    torch.set_num_threads(threads)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        generator = torch.Generator().manual_seed(1000 + rank)
        image0 = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
        text0 = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
        # learnable, as in training: the products they multiply are then saved for their gradients
        log_scale, bias = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        results = []
        grads = {}
        for mode in MODES:
            image, text = image0.clone().requires_grad_(), text0.clone().requires_grad_()
            loss_fn = _make_loss(mode, rank, world)
            saved = SavedTensors()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                args = (image, text, log_scale.exp()) + ((bias,) if mode == "siglip" else ())
                loss = loss_fn(*args)
            loss.backward()
            if rank == 0:
                grads[mode] = torch.cat([image.grad, text.grad])
                results.append({"mode": mode, "saved": saved.total, "largest": saved.largest[0],
                                "shape": saved.largest[1], "loss": loss.item(),
                                "storages": saved.shapes})
            del saved, loss
            dist.barrier()
        if rank == 0:
            diff = (grads["clip local"] - grads["clip full"]).abs().max().item()
            queue.put({"world": world, "results": results, "grad_diff": diff})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, batch: int, dim: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(world, _free_port(), batch, dim, threads, queue), nprocs=world, join=True)
    return queue.get()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=512, help="per-process batch b")
    parser.add_argument("--dim", type=int, default=512, help="feature dim d")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--list", action="store_true", help="also list the saved storages (shape, MiB)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    print(f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}, gloo on CPU, b={args.batch} per process, d={args.dim}, fp32")
    runs = [run_world(w, args.batch, args.dim, args.threads) for w in args.world_sizes]

    header = (f"{'W':>2} {'global B':>8}  {'mode':<10} {'saved MiB':>10} {'largest MiB':>11}  "
              f"{'largest saved (logits)':<22} {'loss r0':>8}")
    print("\n" + header)
    print("-" * len(header))
    for run in runs:
        world = run["world"]
        for r in run["results"]:
            shape = " x ".join(map(str, r["shape"]))
            if r["mode"] == "siglip" and world > 1:
                shape += f"  ({world} blocks)"
            print(f"{world:>2} {world * args.batch:>8}  {r['mode']:<10} {r['saved'] / MiB:>10.2f} "
                  f"{r['largest'] / MiB:>11.2f}  {shape:<22} {r['loss']:>8.4f}")
            if args.list:
                counts: Dict[Tuple[Tuple[int, ...], int], int] = {}
                for key in r["storages"]:
                    counts[key] = counts.get(key, 0) + 1
                for (shp, nbytes), n in counts.items():
                    print(f"{'':>14}{n} x {' x '.join(map(str, shp)) or 'scalar'}: {n * nbytes / MiB:.3f} MiB")

    if len(runs) > 1:
        print("\ngrowth from one global batch to the next, as a factor and as k in bytes ~ B^k")
        for mode in MODES:
            for key, label in (("saved", "saved"), ("largest", "largest")):
                parts = []
                for prev, run in zip(runs, runs[1:]):
                    s0 = next(r[key] for r in prev["results"] if r["mode"] == mode)
                    s1 = next(r[key] for r in run["results"] if r["mode"] == mode)
                    ratio_b = run["world"] / prev["world"]
                    k = math.log(s1 / s0) / math.log(ratio_b) if ratio_b != 1 else float("nan")
                    parts.append(f"B {prev['world'] * args.batch}->{run['world'] * args.batch}: "
                                 f"x{s1 / s0:.2f} (k={k:.2f})")
                print(f"  {mode:<10} {label:<8} " + ";  ".join(parts))

    print("\nrank 0 feature gradients, clip local vs clip full: max |diff| = "
          + ", ".join(f"W={run['world']}: {run['grad_diff']:.1e}" for run in runs))


if __name__ == "__main__":
    main()
