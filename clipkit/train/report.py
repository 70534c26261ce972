"""Where a run reports: the log (terminal and ``out.log``), TensorBoard, wandb, and ``results.jsonl``."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

logger = logging.getLogger("clipkit.train")
_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"


def setup_logging(log_file: Optional[Path], debug: bool, rank: int, all_ranks: bool) -> Callable[[], None]:
    """Log to stderr and ``log_file``; other processes only warn unless ``--log-local``.

    Returns a function that puts the ``clipkit`` logger back as it was (a run inside a larger program).
    """
    root = logging.getLogger("clipkit")
    saved = (root.level, root.propagate)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler._clipkit_train = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(_FORMAT if rank == 0 else f"rank {rank} | " + _FORMAT))
        if rank != 0 and not all_ranks:
            handler.setLevel(logging.WARNING)
        root.addHandler(handler)
    root.propagate = False

    def restore() -> None:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved[0])
        root.propagate = saved[1]
    return restore


class Reporter:
    """Scalars to TensorBoard and wandb (rank 0 only); eval results to ``results.jsonl`` too."""

    def __init__(self, args: Any, run_dir: Optional[Path], enabled: bool):
        self.tb = None
        self.wandb = None
        self.results = run_dir / "checkpoints" / "results.jsonl" if run_dir is not None and enabled else None
        if not enabled:
            return
        targets = args.report_to.split(",") if args.report_to else []
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("--report-to wandb needs the wandb package: pip install wandb") from exc
            try:
                self.wandb = wandb.init(project=args.wandb_project_name, name=args.name, id=args.name,
                                        resume="allow", notes=args.wandb_notes, config=vars(args),
                                        dir=str(run_dir) if run_dir is not None else None)
            except Exception as exc:  # no API key, no network, ...: say so in one line
                from ..errors import ClipkitError

                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ClipkitError(f"--report-to wandb: wandb.init failed: {first} (WANDB_MODE=offline logs "
                                   f"locally; `wandb login` sets the API key)") from exc

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({**values, "step": step}, step=step)

    def result(self, metrics: Dict[str, Any]) -> None:
        if self.results is not None:
            self.results.parent.mkdir(parents=True, exist_ok=True)
            with open(self.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
