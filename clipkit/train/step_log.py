"""What the training loop watches without stopping the device: the logged values of recent steps, the
non-finite-loss watch, and the time spent waiting for data.

Reading a device tensor on the host (``.item()``, ``.tolist()``, ``bool()``) waits for every kernel queued
before it, so a loop that reads the loss at every step leaves the accelerator idle while the host prepares
the next step. Everything here stays on the device between log steps and is read in one transfer on a log
step, a save or an epoch's end.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

logger = logging.getLogger("clipkit.train")


class LoggedValues:
    """The losses of the last ``window`` steps and the latest step's terms, as device tensors until read."""

    def __init__(self, window: int):
        self.losses: Deque[torch.Tensor] = deque(maxlen=window)
        self.terms: Dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor]) -> None:
        self.losses.append(loss.detach())
        self.terms = {k: v.detach() for k, v in terms.items()}

    def read(self, *extra: torch.Tensor) -> Tuple[float, float, Dict[str, float], List[float]]:
        """``(latest loss, mean loss over the window, latest terms, extra values)`` in one device-to-host copy."""
        parts = [torch.stack(list(self.losses)).float()]
        parts += [v.float().reshape(1) for v in self.terms.values()]
        parts += [v.detach().float().reshape(1).to(parts[0].device) for v in extra]
        values = torch.cat(parts).tolist()
        n, k = len(self.losses), len(self.terms)
        losses = values[:n]
        return losses[-1], sum(losses) / n, dict(zip(self.terms, values[n:n + k])), values[n + k:]


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss was NaN or infinite and that loss.

    ``observe`` queues a few element-wise kernels and never reads anything back; ``first`` reads the record.
    """

    def __init__(self) -> None:
        self.step: Optional[torch.Tensor] = None  # -1 while every loss has been finite
        self.loss: Optional[torch.Tensor] = None

    def observe(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        if self.step is None or self.loss is None:
            self.step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self.loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = ~torch.isfinite(loss) & (self.step < 0)
        # the step as a Python scalar is a kernel argument: no host-to-device copy is waited for
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss, self.loss)

    def first(self) -> Optional[Tuple[int, float]]:
        """``(step, loss)`` of the first non-finite loss observed, or ``None``."""
        if self.step is None or self.loss is None:
            return None
        step = int(self.step.item())
        return (step, float(self.loss.item())) if step >= 0 else None


@dataclass
class Interval:
    """One log interval's timing: wall seconds, seconds blocked waiting for data, and optimizer steps."""

    wall: float
    waited: float
    steps: int

    @property
    def wait_fraction(self) -> float:
        return self.waited / self.wall if self.wall > 0 else 0.0


class DataWait:
    """Times how long the loop blocks on the data loader per log interval, and warns once when the data
    keeps the training step waiting: more than ``threshold`` of the wall time for ``patience`` log intervals
    in a row (0 disables). The first interval of an epoch, which includes starting the data workers, is
    reported but not judged.

    ``workers``, ``train_data`` and ``image_size`` make the warning say what to change.
    """

    def __init__(self, threshold: float, *, workers: int, train_data: Optional[str], image_size: Optional[int],
                 patience: int = 3, clock: Callable[[], float] = time.perf_counter):
        self.threshold, self.patience, self.clock = threshold, patience, clock
        self.workers, self.train_data, self.image_size = workers, train_data, image_size
        self.warned = False
        self.high: List[float] = []
        self.start = clock()
        self.waited, self.steps, self.first = 0.0, 0, True

    def batches(self, items: Iterable[Any]) -> Iterator[Any]:
        """``items``, timing each wait for the next one."""
        iterator = iter(items)
        while True:
            before = self.clock()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.waited += self.clock() - before
            yield item

    def start_epoch(self) -> None:
        self.start = self.clock()
        self.waited, self.steps, self.first = 0.0, 0, True

    def step(self) -> None:
        self.steps += 1

    def interval(self) -> Interval:
        """The interval since the last call (or the epoch's start), judged for the warning; starts the next."""
        now = self.clock()
        done = Interval(wall=now - self.start, waited=self.waited, steps=self.steps)
        first, self.first = self.first, False
        self.start, self.waited, self.steps = now, 0.0, 0
        if not first and self.threshold > 0 and not self.warned:
            self.high = self.high + [done.wait_fraction] if done.wait_fraction > self.threshold else []
            if len(self.high) >= self.patience:
                self.warned = True
                logger.warning(self.advice())
        return done

    def advice(self) -> str:
        """The warning: the measured fractions, and what to change."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        seen = ", ".join(f"{f:.0%}" for f in self.high)
        remote = any(m in (self.train_data or "") for m in ("://", "pipe:"))
        where = ("the shards are read over the network (pipe:/URL): copy them to a local disk, or raise --workers "
                 "to hide the latency" if remote else
                 "a slow or network file system: copy the shards to a local disk")
        size = f"the model's {self.image_size} px input" if self.image_size else "the model's input size"
        return (f"the training step waited for data {seen} of the time over the last {len(self.high)} log intervals "
                f"(above --data-wait-warn {self.threshold:g}): the data pipeline is the bottleneck. What to change: "
                f"--workers {self.workers} on {cpus} CPUs (raise it if CPUs are idle; `clipkit data bench SHARDS "
                f"--workers 2,4,8` measures the rate per worker count); {where}; decoding cost: images much larger "
                f"than {size} are decoded and resized every epoch, so store them resized (e.g. shorter side about "
                f"twice the input)")
