"""A run's life around the trainer: the processes, the log, stop signals, and how a failure or a stop
ends the run — with one line that says what happened and how to go on.

The :class:`Session` exists before anything is built, so a signal or an error while setting up is
reported as well as one while training.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, List, Literal, Optional, Type

import torch

from ..errors import ClipkitError, RunStopped, TrainingError
from . import distributed
from .report import setup_logging

logger = logging.getLogger("clipkit.train")

# sysexits' EX_TEMPFAIL ("try again later"): stopped on request with a checkpoint, to be continued
STOPPED_EXIT_CODE = RunStopped.exit_code


@dataclass
class Position:
    """Where training stands: the epoch (from 0) and the optimizer steps taken."""

    epoch: int = 0
    step: int = 0


class Session:
    """The processes (``env``), the stop signals, the log, and where the run stands (``stage``, ``epoch``,
    ``position``) for the messages that end it. Use as a context manager around building and running."""

    def __init__(self, distributed_settings: Any, checkpoints: Optional[Path], resumable: bool,
                 argv: Optional[List[str]]) -> None:
        self.env = distributed.init(distributed_settings)
        self.checkpoints = checkpoints  # RUN/checkpoints, for "the last checkpoint is ..."
        self.resumable = resumable  # a training run (an evaluation-only one has nothing to continue)
        self.argv = argv
        self.stage = "setting up"
        self.position = Position()
        self.signals = distributed.StopSignals(self._signal_received, self._second_signal)
        self._restore_logging: Optional[Callable[[], None]] = None
        self._closers: List[Callable[[], None]] = []

    # the log -------------------------------------------------------------------------------------------
    def start_logging(self, log_file: Optional[Path], debug: bool, per_process: bool) -> None:
        """Log to the terminal and ``log_file``, then listen for stop signals (their handlers log)."""
        self._restore_logging = setup_logging(log_file, debug, self.env.rank, per_process)
        _guard_log_files()
        self.signals.install()

    def on_close(self, close: Callable[[], None]) -> None:
        """Call ``close`` when the run ends, however it ends (reporters)."""
        self._closers.append(close)

    # ending the run --------------------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> Literal[False]:
        try:
            error = self._explained(exc) if exc is not None else None
            if error is not None:
                # no local may name the error as it leaves: its traceback holds this frame, and the cycle
                # would keep the failed run (its data loader workers too) alive until a garbage collection,
                # or to exit, where multiprocessing waits forever for workers that block SIGTERM
                try:
                    raise error
                finally:
                    del error
        finally:
            self.signals.uninstall()
            for close in self._closers:
                close()
            distributed.shutdown(self.env)
            if self._restore_logging is not None:
                self._restore_logging()
        return False

    def _explained(self, exc: BaseException) -> Optional[ClipkitError]:
        """A failure as one clear :class:`ClipkitError`, logged; ``None`` to let it pass as it is."""
        env = self.env
        if isinstance(exc, distributed.Interrupted):
            exc = self._interrupted(exc.signum)
        elif isinstance(exc, Exception) and env.distributed and _lost_peer(exc):
            got = self.signals.received
            cause = f"; it got {signal.Signals(got).name}, as torchrun sends when another process fails" if got else ""
            exc = TrainingError(f"process {env.rank} lost contact with the others (one failed or was killed"
                                f"{cause}): {str(exc).splitlines()[0][:300]}. Fix the cause and "
                                f"{self.continue_with()}")
        elif isinstance(exc, OSError):
            exc = self.write_error(None, exc)
        if not isinstance(exc, ClipkitError):
            return None
        stopped = isinstance(exc, RunStopped)
        logging_on = self._restore_logging is not None
        if logging_on and (env.main or not stopped):
            # in out.log too, not only on the terminal
            (logger.warning if stopped else logger.error)("%s", exc)
        # a stopped run says so once, on process 0; the others end with the same exit code
        exc.logged = logging_on
        return exc

    def latest(self) -> Optional[Path]:
        from .checkpointer import find_latest

        return find_latest(self.checkpoints) if self.checkpoints is not None and self.checkpoints.is_dir() else None

    def continue_with(self) -> str:
        """How to go on from the last checkpoint: the command with ``--resume latest``."""
        if self.env.distributed or self.argv is None:
            return "rerun the same command with --resume latest"
        argv, kept = list(self.argv), []
        while argv:
            arg = argv.pop(0)
            if arg == "--resume":
                if argv:
                    argv.pop(0)
            elif not arg.startswith("--resume="):
                kept.append(arg)
        return "continue with: " + shlex.join(["clipkit-train", *kept, "--resume", "latest"])

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """A failed write (full disk, read-only folder) as one line that names it."""
        try:
            yield
        except OSError as exc:
            raise self.write_error(what, exc) from exc

    def write_error(self, what: Optional[str], exc: OSError) -> TrainingError:
        path = f" ({exc.filename})" if exc.filename else ""
        latest = self.latest()
        resume = (f"after fixing it, --resume latest continues from the last complete checkpoint, {latest}" if latest
                  else "no checkpoint was saved yet")
        return TrainingError(f"{what + ' failed' if what else 'the run failed'}: {exc.strerror or exc}{path}; "
                             f"{resume}")

    # stop signals ------------------------------------------------------------------------------------
    def _signal_received(self, signum: int) -> None:
        # the signal thread: the main thread may be busy for a whole step, so say now that it was heard
        logger.info("received %s: stopping after this step with a checkpoint (send SIGTERM or SIGINT again to "
                    "stop at once, without saving)", signal.Signals(signum).name)

    def _second_signal(self, signum: int) -> None:
        # the signal thread, while the main thread may wait in a collective: end the process from here
        where = f" in {self.checkpoints}" if self.checkpoints is not None else ""
        logger.error("stopped at once by a second %s at epoch %d, step %d, without saving; the last complete "
                     "checkpoint%s is kept: %s", signal.Signals(signum).name, self.position.epoch + 1,
                     self.position.step, where,
                     self.continue_with())
        os._exit(128 + signum)

    def _interrupted(self, signum: int) -> RunStopped:
        """A signal outside the training steps: nothing to finish, the last checkpoint is all there is."""
        latest = self.latest()
        saved = f"the last checkpoint is {latest}" if latest else "no checkpoint was saved"
        go_on = f"; {self.continue_with()}" if self.resumable else ""
        return RunStopped(f"stopped by {signal.Signals(signum).name} while {self.stage}; {saved}{go_on}")

    def stop_requested(self) -> int:
        """The stop signal any process got (0: none); every process calls it at the same points."""
        return distributed.all_max(self.signals.received or 0, self.env)

    def stopped(self, signum: int, epoch: int, step_in_epoch: int) -> RunStopped:
        where = (f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1} step {step_in_epoch} "
                 f"(global step {self.position.step})")
        if self.checkpoints is None:
            return RunStopped(f"{where}; nothing saved (--logs is 'none')")
        return RunStopped(f"{where}; checkpoint saved to {self.latest() or self.checkpoints}; {self.continue_with()}")

    # every process together --------------------------------------------------------------------------------
    def agree(self, action: Callable[[], Any], epoch: Optional[int], what: str) -> Any:
        """Run ``action`` on every process; if it fails on any, it fails on all."""
        failure: Optional[BaseException] = None
        result = None
        try:
            result = action()
        except Exception as exc:
            failure = exc
        if distributed.all_agree(failure is not None, self.env):
            when = f"epoch {epoch + 1}: " if epoch is not None else ""
            error, failure = failure or TrainingError(f"{when}another process failed while {what}; see its log"), None
            try:  # naming no error in this frame as it leaves (see __exit__)
                raise error
            finally:
                del error
        return result

    def on_main(self, decide: Callable[[], Optional[Path]]) -> Optional[Path]:
        """``decide()`` on process 0, its answer on every process; its failure fails them all, with its message."""
        env = self.env
        found = error = None
        if env.main:
            try:
                found = decide()
            except (ClipkitError, OSError) as exc:
                if not env.distributed:
                    raise
                error = exc
        found, message = distributed.broadcast((str(found) if found else None, str(error) if error else None), env)
        if error is not None:
            raise error
        if message is not None:
            raise TrainingError(message)
        return Path(found) if found else None


def _guard_log_files() -> None:
    """A log file that cannot be written (a full disk) is given up with one line, and the log goes on
    on the terminal, instead of a "--- Logging error ---" traceback for every line."""
    for handler in logging.getLogger("clipkit").handlers:
        if isinstance(handler, logging.FileHandler) and getattr(handler, "_clipkit_train", False):
            # this handler's own handleError: an instance attribute, as logging allows
            handler.handleError = functools.partial(_log_file_failed, handler)  # type: ignore[method-assign]


def _log_file_failed(handler: logging.FileHandler, record: Optional[logging.LogRecord] = None) -> None:
    import sys

    error = sys.exc_info()[1]
    logging.getLogger("clipkit").removeHandler(handler)
    try:
        handler.close()  # flushes what it holds: that fails too
    except OSError:
        pass
    logger.error("cannot write %s: %s; the log goes to the terminal only from here on", handler.baseFilename,
                 getattr(error, "strerror", None) or error)


def _lost_peer(exc: BaseException) -> bool:
    """Whether an exception is a collective failing because another process is gone (or timed out)."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection reset by peer", "Connection closed by peer", "gloo", "NCCL", "Timed out", "timed out"))
