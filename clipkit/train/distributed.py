"""Processes and devices: torchrun's and SLURM's environment, the process group, and the device."""
from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import torch
import torch.distributed as dist

logger = logging.getLogger("clipkit.train")

# a CPU (gloo) process group beside a GPU backend's, for the host-side agreements of all_max; None
# when the run's own group is already gloo, or there is none
_control: Optional["dist.ProcessGroup"] = None


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


def _from_environment() -> Tuple[int, int, int]:
    """``(rank, local_rank, world)`` from torchrun's variables, else SLURM's, else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in os.environ:
        rank, local, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_LOCALID"]), int(os.environ["SLURM_NTASKS"])
        # the env:// rendezvous reads these
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world))
        return rank, local, world
    return 0, 0, 1


def init(settings: Any) -> Env:
    """Pick the device and, under torchrun or SLURM, join the process group (``settings``: the distributed
    group of the run's settings)."""
    rank, local_rank, world = _from_environment()
    wanted = str(settings.device)
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        if rank == 0:
            logger.warning("--device %s: CUDA is not available, training on the CPU", wanted)
        wanted = "cpu"
    device = torch.device(wanted)
    if device.type == "cuda" and world > 1 and not settings.no_set_device_rank:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index: 'cuda' means the current one
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = settings.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        timeout = timedelta(seconds=int(os.environ.get("CLIPKIT_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend=backend, init_method=settings.dist_url or "env://", world_size=world, rank=rank,
                                timeout=timeout)
        global _control
        if backend != "gloo":
            # the per-step agreements (a stop signal, the end of the data) are host values: on a GPU
            # backend each would copy to the device, all-reduce there and wait for the device to read it
            # back, every step. A CPU group next to it decides them without touching the device
            # every process is a member, so this is a group, never new_group's non-member marker
            _control = cast(dist.ProcessGroup, dist.new_group(backend="gloo", timeout=timeout))
    elif world == 1 and settings.fsdp and not dist.is_initialized():
        # FSDP2 shards over a device mesh, which needs a process group: a group of one, in memory
        backend = settings.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return Env(rank=rank, local_rank=local_rank, world=world, device=device, group=dist.is_initialized())


def all_agree(flag: bool, env: Env) -> bool:
    """True on every process when ``flag`` is true on any (a stop decided by one is taken by all)."""
    return bool(all_max(1 if flag else 0, env))


def all_max(value: int, env: Env) -> int:
    """The largest of every process's ``value`` (a small non-negative integer), on every process.

    Decided on the CPU (the gloo control group beside a GPU backend): the device is never waited for."""
    if not env.distributed:
        return value
    on_cpu = _control is not None or dist.get_backend() == "gloo"
    t = torch.tensor([float(value)], device="cpu" if on_cpu else env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return int(t.item())


def gather_to_main(obj: Any, env: Env) -> List[Any]:
    """Every process's ``obj``, in rank order, on process 0 (``[]`` on the others; ``[obj]`` without a
    group). Sent only to process 0, over the CPU group (the control group beside a GPU backend), so a
    process never holds the others' objects: a large per-process state costs its size once, on process 0."""
    if not env.distributed:
        return [obj]
    gathered: Optional[List[Any]] = [None] * env.world if env.main else None
    dist.gather_object(obj, gathered, dst=0, group=_control)
    return gathered if gathered is not None else []


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
    global _control
    if (env.distributed or env.group) and dist.is_initialized():
        dist.destroy_process_group()  # every group, the control group included
    _control = None


# -- stop signals ----------------------------------------------------------------------------------
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1")
                     if hasattr(signal, name))  # Windows has no SIGUSR1
_ACTIVE: List["StopSignals"] = []


class Interrupted(BaseException):
    """A stop signal where nothing has to be finished first, raised in the main thread as
    ``KeyboardInterrupt`` is (so that ``except Exception`` does not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 turned into a request to stop (:attr:`received`, the first signal's
    number). While :attr:`defer` is true (training steps, saving) the signal is only recorded, for the
    training loop to act on between steps (``on_first`` is told); otherwise it raises :class:`Interrupted`
    in the main thread. A second SIGTERM or SIGINT calls ``on_second`` at once (which is expected to end
    the process).

    Python runs signal handlers only when the main thread executes Python code, which a process waiting
    in a collective does not: the signals also reach a thread through a wake-up pipe, so that the second
    one acts even then. Forked children (data loader workers) block the three signals: the main process
    stops them when it stops."""

    def __init__(self, on_first: Callable[[int], None], on_second: Callable[[int], None]) -> None:
        self.received: Optional[int] = None
        self.defer = False
        self._on_first, self._on_second = on_first, on_second
        self._saved: Dict[int, Any] = {}
        self._fds: Optional[Tuple[int, int]] = None
        self._wakeup = -1

    def install(self) -> bool:
        """Take over the signals; False (nothing done) outside the main thread, where Python cannot."""
        if threading.current_thread() is not threading.main_thread():
            return False
        read, write = os.pipe()
        os.set_blocking(write, False)  # the C-level handler must never block
        self._fds = (read, write)
        self._wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            self._saved[sig] = signal.signal(sig, self._handler)
        threading.Thread(target=self._watch, args=(read,), name="clipkit-stop-signals", daemon=True).start()
        _ACTIVE.append(self)
        _kill_daemons_at_exit()
        return True

    def uninstall(self) -> None:
        """Give the signals back as they were."""
        if self._fds is None:
            return
        for sig, previous in self._saved.items():
            signal.signal(sig, previous)
        signal.set_wakeup_fd(self._wakeup)
        read, write = self._fds
        self._fds = None
        _ACTIVE.remove(self)
        try:
            os.write(write, b"\0")  # no signal has number 0: it tells the thread to end
        except OSError:
            pass
        os.close(write)

    def _handler(self, signum: int, frame: Any) -> None:
        # the main thread's record, so that a check right after a signal already sees it
        if self.received is None:
            self.received = signum
        if not self.defer:
            raise Interrupted(signum)

    def _watch(self, read: int) -> None:
        count = 0
        try:
            while True:
                data = os.read(read, 64)
                if not data or 0 in data:
                    return
                for signum in data:
                    if signum not in STOP_SIGNALS:
                        continue  # another signal that has a Python handler
                    count += 1
                    if count == 1:
                        if self.received is None:
                            self.received = signum
                        if self.defer:
                            self._on_first(signum)
                    elif signum in (signal.SIGTERM, signal.SIGINT):
                        self._on_second(signum)
        finally:
            os.close(read)


@functools.lru_cache(maxsize=None)  # once per process
def _kill_daemons_at_exit() -> None:
    """At exit, daemonic child processes (data loader workers) are killed rather than sent SIGTERM.

    multiprocessing ends them at exit with SIGTERM and then waits for them; workers forked during a run
    block SIGTERM, so one still alive then (left over by an error) would make the process wait forever.
    Registered after multiprocessing's own exit handler, so it runs first.
    """
    import atexit
    import multiprocessing

    def kill() -> None:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(kill)


def _after_fork_in_child() -> None:
    for stop in _ACTIVE:
        # blocked, not ignored: torch's data loader workers install their own SIGTERM handler; and
        # torchrun and a terminal's Ctrl-C signal the whole process group, workers included
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:  # forked from a thread other than the main one: no wake-up fd to drop
            pass
        for fd in stop._fds or ():
            try:
                os.close(fd)
            except OSError:
                pass
    _ACTIVE.clear()


if hasattr(os, "register_at_fork"):  # POSIX: where data loader workers are forked
    os.register_at_fork(after_in_child=_after_fork_in_child)
